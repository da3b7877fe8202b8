"""Builds the optional C fast paths of the log reader; pyproject.toml holds the metadata.

``optional=True``: where no C compiler is at hand the install still succeeds and the engine
reads logs with the pure-Python scanner, which is the reference anyway
(docs/adr/0023-compiled-code-only-where-a-target-needs-it.md). ``STRATA_NO_EXTENSIONS=1``
builds none of them, as on such a machine (``make test-pure`` sets it for the copy of the
checkout it tests, where nothing is built).
"""

import os

from setuptools import Extension, setup

# -O3 whatever the interpreter was built with: Debian's python3 compiles extensions at -O2, at
# which the scanner's BLAKE2b runs a fifth slower (docs/adr/0012).
OPTIMIZE = ["-O3"]
SOURCES = "engine/log/csrc"

EXTENSIONS = [
    # The frames of the common shape, read into records (engine/log/scan.py; ADR 0008).
    Extension(
        "engine.log._fastscan",
        [f"{SOURCES}/fastscan.c", f"{SOURCES}/payload.c", f"{SOURCES}/blake2b.c"],
        optional=True,
        extra_compile_args=OPTIMIZE,
    ),
    # A segment's next chunks read and hashed in a thread, without the GIL
    # (engine/log/read_ahead.py; ADR 0009).
    Extension(
        "engine.log._readahead",
        [f"{SOURCES}/readahead.c", f"{SOURCES}/blake2b.c"],
        optional=True,
        extra_compile_args=OPTIMIZE,
    ),
]

setup(ext_modules=[] if os.environ.get("STRATA_NO_EXTENSIONS") == "1" else EXTENSIONS)
