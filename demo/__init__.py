"""The demo: ``python -m demo`` (``make demo``) runs :mod:`demo.__main__`.

Imports: the engine's facade (``from engine import StorageEngine``), the QEMU adapter to
play a virtual machine and stop the storage daemon, and ``log_tools`` to verify the log;
nothing imports the demo.
"""
