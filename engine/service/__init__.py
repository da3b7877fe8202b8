"""The service layer: command handlers that load aggregates, let them decide, and save.

``unit_of_work`` runs a command on freshly loaded images and saves what they recorded (retrying
on a concurrency conflict); ``image_handlers``, ``fix_handlers`` and ``repository_handlers`` are
the commands of the storage API, each taking its dependencies as arguments and returning what
the call returns (docs/adr/0020).

Imports: :mod:`engine.aggregates`, :mod:`engine.planning`, :mod:`engine.validation`, the errors
and types, and the adapters below. Never projections, executors, the wiring or the facade.
"""
