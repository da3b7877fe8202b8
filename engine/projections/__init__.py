"""Read models rebuilt from the log alone (image status, fixes, history), kept in SQLite.

Imports: the aggregates and their rules, the adapters (:mod:`engine.log`,
:mod:`engine.persistence`, :mod:`engine.formats`), the service layer only to start a fix,
the errors and the facade's value types; never executors, the facade or the bootstrap
(docs/adr/0025-layers-and-the-import-rule.md).
"""
