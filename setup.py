"""Builds the optional C fast paths (log scanner, transcoder hook); pyproject.toml holds the
metadata.

``optional=True``: where no C compiler is at hand the install still succeeds and the engine
reads logs with the pure-Python scanner and decodes with the Python hook
(docs/adr/0008-compiled-fast-path-for-the-log-scanner.md).
"""

from setuptools import Extension, setup

# -O3 whatever the interpreter was built with: Debian's python3 compiles extensions at -O2, at
# which the scanner's BLAKE2b and framing loops run a fifth slower (docs/adr/0012).
OPTIMIZE = ["-O3"]

setup(
    ext_modules=[
        Extension(
            "engine.log._fastscan",
            ["engine/log/_fastscan.c"],
            optional=True,
            extra_compile_args=OPTIMIZE,
        ),
        # Log records made into domain events (engine/projections/log_events.py).
        Extension(
            "engine.projections._fastevents",
            ["engine/projections/_fastevents.c"],
            optional=True,
            extra_compile_args=OPTIMIZE,
        ),
        # The transcoder's msgpack object hook (engine/persistence/transcoder.py).
        Extension(
            "engine.persistence._fasthook",
            ["engine/persistence/_fasthook.c"],
            optional=True,
            extra_compile_args=OPTIMIZE,
        ),
    ]
)
