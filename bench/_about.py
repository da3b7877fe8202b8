"""What a benchmark ran on, printed with its figures so that runs can be compared."""

import os
import platform
import sys


def interpreter() -> str:
    """The CPython that runs the benchmark: builds of one version differ by a tenth in speed
    (docs/adr/0012-the-distributions-python.md)."""
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    return f"{platform.python_implementation()} {platform.python_version()} ({base})"
