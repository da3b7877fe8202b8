"""Auditor and recovery command-line tools over a repository's log (``strata-log``)."""
