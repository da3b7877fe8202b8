from collections.abc import Callable
from typing import Any

def make_object_hook(
    decoders: dict[str, Callable[[Any], Any]], fallback: Callable[[Any], Any]
) -> Callable[[Any], Any]: ...
