"""Strata: an event-sourced storage engine for virtual-machine disk images."""
