"""The demo: ``python -m demo`` (``make demo``) runs :mod:`demo.__main__`."""
