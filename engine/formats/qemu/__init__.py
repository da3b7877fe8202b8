"""The adapter around QEMU's image tools (``qemu-img``, ``qemu-io``): arguments, processes, headers.

Imports: :mod:`engine.errors` only. Every QEMU process the engine runs starts in this package.
"""
