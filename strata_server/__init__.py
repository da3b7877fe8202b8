"""``strata serve`` and the ``strata`` command line, clients of the engine (SPEC §9, ADR 0030).

Imports: the engine's public names only (``engine``, ``engine.errors``, ``engine.types``); FastAPI,
uvicorn and the standard library.
"""
