"""``strata serve`` and the ``strata`` command line: a client of the engine (SPEC §9).

Imports: the engine's public names only (``engine``, ``engine.errors``, ``engine.types``);
FastAPI, uvicorn and the standard library.
"""
