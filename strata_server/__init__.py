"""``strata serve`` and the ``strata`` command line: clients of the engine (architecture §9,
docs/adr/0030).

Imports: the engine's public names only (``engine``, ``engine.errors``, ``engine.types``);
FastAPI, uvicorn and the standard library.
"""
