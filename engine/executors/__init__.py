"""Stage execution: claiming, leases, heartbeats, recovery and following the log.

Imports: the aggregates and their rules, the service layer (a claim, a progress, an outcome
is a command), the adapters (:mod:`engine.formats`, :mod:`engine.log`) and the errors; never
projections, the facade or the bootstrap (docs/adr/0025-layers-and-the-import-rule.md).
"""
