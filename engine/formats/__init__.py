"""Adapters to storage: repository formats (``repository/``) and QEMU's image tools (``qemu/``).

Imports: :mod:`engine.errors` and :mod:`engine.log` only; nothing above the adapters.
"""
