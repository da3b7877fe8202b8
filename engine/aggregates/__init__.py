"""Domain model: aggregates and their past-tense events, one aggregate per module.

Imports: the core imports only its own modules, :mod:`engine.errors`, :mod:`engine.opaque`
and eventsourcing's domain classes; nothing of the adapters, services, projections or
executors (docs/adr/0025-layers-and-the-import-rule.md, checked by ``lint-imports``).
"""
