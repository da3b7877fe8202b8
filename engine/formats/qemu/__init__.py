"""The adapter around QEMU: its image tools (``qemu-img``, ``qemu-io``) and the host's
``qemu-storage-daemon`` (driven over QMP with ``qemu.qmp``): arguments, processes, headers.

Imports: :mod:`engine.errors` only, and ``qemu.qmp``. Every QEMU process the engine runs starts in
this package.
"""
