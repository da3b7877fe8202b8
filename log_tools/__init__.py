"""Auditor and recovery command-line tools over a repository's log (``strata-log``).

Imports: the engine's public names only: no module or name starting with ``_``
(docs/adr/0025-layers-and-the-import-rule.md); the engine never imports log_tools.
"""
