"""The service layer: command handlers that load aggregates, let them decide, and save.

Imports: :mod:`engine.aggregates`, :mod:`engine.planning`, :mod:`engine.validation`, the errors
and types, and the adapters below. Never projections' internals, executors or the facade.
"""
