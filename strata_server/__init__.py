"""The host daemon (``strata serve``) and its command-line client (``strata``): clients of the
engine over its public names only, as ``log_tools`` is.

Imports: ``engine``'s public names (``engine``, ``engine.errors``, ``engine.types``); FastAPI,
uvicorn, sse-starlette, httpx, typer, rich; the standard library.
"""
