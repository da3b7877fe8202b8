"""Is a volume file sound? A look at its first bytes, in Python: no QEMU process per volume.

A check of a large repository looks at every volume; starting ``qemu-img check`` for each would
take minutes. What a cheap look can tell is what goes wrong on storage in practice: a file cut
short, or bytes written over its start (a stray ``dd``, a guest given the wrong device). A qcow2
file must start with a header QEMU would accept (magic ``QFI\\xfb``, version 2 or 3, a sane
cluster size, its tables aligned to clusters and inside the file); a raw file must be as long
as the image it holds. Anything subtler is for ``qemu-img check`` (ADR 0017).

Imports: the standard library only.
"""

from __future__ import annotations

import os
import struct

QCOW2_MAGIC = b"QFI\xfb"
# magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
# l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters
_HEADER = struct.Struct(">4sIQIIQIIQQI")


def qcow2_damage(path: str, length: int) -> str | None:
    """Why the file at ``path``, ``length`` bytes long when listed, is not a sound qcow2
    volume, or None. Never follows a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return "is missing"
    except OSError as e:
        return f"cannot be opened ({e.strerror})"
    try:
        header = os.pread(fd, _HEADER.size, 0)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    finally:
        os.close(fd)
    if len(header) < _HEADER.size:
        return f"is {length} bytes long, shorter than a qcow2 header"
    (magic, version, _, _, cluster_bits, size, crypt, l1_size, l1_offset, refcount_offset, _) = (
        _HEADER.unpack(header)
    )
    if magic != QCOW2_MAGIC:
        return f"does not start with the qcow2 magic (found {magic!r})"
    if version not in (2, 3):
        return f"has qcow2 version {version}, not 2 or 3"
    if not 9 <= cluster_bits <= 21:
        return f"has a cluster size of 2**{cluster_bits} bytes"
    if crypt > 2:
        return f"has an unknown encryption method {crypt}"
    cluster = 1 << cluster_bits
    if refcount_offset == 0 or refcount_offset % cluster or refcount_offset >= length:
        return f"has its refcount table at {refcount_offset}, outside its {length} bytes"
    if l1_size and (l1_offset % cluster or l1_offset >= length):
        return f"has its L1 table at {l1_offset}, outside its {length} bytes"
    if size == 0 and l1_size:
        return "has a virtual size of 0 with an L1 table"
    return None


def raw_damage(length: int, expected: int | None, largest: int) -> str | None:
    """Why a raw file of ``length`` bytes is not a sound volume, or None: it must be exactly
    ``expected`` bytes (the image's size, when it is an image's top volume), or else a whole
    number of sectors no longer than the ``largest`` image that reads it."""
    if expected is not None:
        if length != expected:
            return f"is {length} bytes long, not the image's {expected}"
        return None
    if length == 0 or length % 512 or length > largest:
        return f"is {length} bytes long, not a size an image reading it can have"
    return None
