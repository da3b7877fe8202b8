"""Stable topic strings for aggregate and event classes, so stored events outlive refactoring.

eventsourcing names a stored event's class by its topic, by default the module path
(``engine.aggregates.repository:Repository.Created``): moving or renaming the class would then
orphan every event already in a log. Here each class states its topic itself
(``TOPIC = "strata.repository.Repository.Created"``), which eventsourcing's ``get_topic``
honours, and :func:`register_topics` tells eventsourcing's ``resolve_topic`` about every one of
them at wiring time, so a fresh process resolves them before any class was ever written.

A subclass must state its own topic: inheriting its parent's would silently store it under the
parent's name, so a missing one fails when the class is defined.

Imports: eventsourcing; the standard library.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import ClassVar

from eventsourcing.domain import ProgrammingError
from eventsourcing.utils import TopicError, register_topic

DOMAIN_PACKAGE = "engine.aggregates"

_declared: list[type[StableTopic]] = []


class StableTopic:
    """Base of every class whose instances go into the log: aggregates and their events."""

    TOPIC: ClassVar[str]

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        topic = cls.__dict__.get("TOPIC")
        if not isinstance(topic, str) or not topic:
            raise ProgrammingError(
                f"{cls.__module__}.{cls.__qualname__} must state its own TOPIC string, e.g. "
                f'TOPIC = "strata.<aggregate>.{cls.__qualname__}"'
            )
        _declared.append(cls)


def register_topics(*packages: str) -> dict[str, type[StableTopic]]:
    """Import the domain model and register every stable topic with eventsourcing.

    Imports every module of ``engine.aggregates`` (and of the other ``packages`` given), so no
    class is missed because nothing had imported its module yet. Returns topic -> class.
    """
    for package in (DOMAIN_PACKAGE, *packages):
        _import_all(package)
    topics: dict[str, type[StableTopic]] = {}
    for cls in _declared:
        other = topics.setdefault(cls.TOPIC, cls)
        if other is not cls:
            raise ProgrammingError(
                f"{cls.__module__}.{cls.__qualname__} and {other.__module__}."
                f"{other.__qualname__} both claim topic {cls.TOPIC!r}"
            )
        try:
            register_topic(cls.TOPIC, cls)
        except TopicError as e:
            raise ProgrammingError(f"topic {cls.TOPIC!r} is already taken: {e}") from e
    return topics


def _import_all(package: str) -> None:
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), f"{package}."):
        importlib.import_module(info.name)
