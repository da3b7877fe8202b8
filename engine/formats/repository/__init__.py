"""Repository format drivers (``localfs-1.0``, ...): the interface, the drivers, the registry.

Imports: :mod:`engine.errors`, :mod:`engine.log` (a driver creates an empty log) and
:mod:`engine.formats.qemu.args` (which image formats a volume may have).
"""
