"""Shared pytest fixtures for the Strata test suite."""
