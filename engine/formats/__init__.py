"""Repository formats (localfs-1.0, ...) and image formats (raw, qcow2 via qemu-img)."""

# The driver interface is imported before any driver, which imports it back (see driver.py).
from engine.formats.driver import (
    FORMATS,
    RepositoryFormat,
    RepositoryStorage,
    VolumeFile,
    get_format,
)
from engine.formats.qemu import CheckResult, Measurement, QemuImg, allocated_bytes

__all__ = [
    "FORMATS",
    "CheckResult",
    "Measurement",
    "QemuImg",
    "RepositoryFormat",
    "RepositoryStorage",
    "VolumeFile",
    "allocated_bytes",
    "get_format",
]
