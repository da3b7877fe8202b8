"""The facade's boundary: no call lets anything out but a :class:`~engine.errors.StrataError`.

Errors that code deeper down raises on purpose are typed already. What is left is the operating
system's (a full, read-only or unreadable filesystem under the repository or the state
directory), SQLite's (the host-local read model) and, if there is one, a bug: each is translated
here, once, with the cause chained (``raise ... from e``), so that a caller keys on ``code``
(architecture §7) and an operator still sees the original traceback.

Imports: ``engine.errors``; the standard library.
"""

from __future__ import annotations

import functools
import inspect
import sqlite3
from collections.abc import Callable
from typing import Any, TypeVar

from engine.errors import InternalError, StrataError, sqlite_error, storage_error

C = TypeVar("C", bound=type)


def translate(e: Exception, doing: str) -> StrataError:
    """The typed error for ``e``, met while ``doing`` something."""
    if isinstance(e, StrataError):
        return e
    if isinstance(e, OSError):
        return storage_error(e, doing)
    if isinstance(e, sqlite3.Error):
        return sqlite_error(e, doing, "this host's read model")
    return InternalError(f"{type(e).__name__}: {e}", doing=doing)


def _guarded(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    doing = name.replace("_", " ").capitalize()

    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except StrataError:
            raise
        except Exception as e:
            raise translate(e, doing) from e

    return call


def typed_errors(cls: C) -> C:
    """Guard every public method of ``cls`` (inherited ones included) at the boundary."""
    names = {
        name
        for klass in cls.__mro__[:-1]  # object's own methods are not the API
        for name, member in vars(klass).items()
        if not name.startswith("_") and inspect.isfunction(member)
    }
    for name in sorted(names):
        setattr(cls, name, _guarded(name, getattr(cls, name)))
    return cls
