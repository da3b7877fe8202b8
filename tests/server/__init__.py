"""The daemon (``strata serve``), its event stream and the ``strata`` command line."""
