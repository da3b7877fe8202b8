"""Read models rebuilt from the log alone (image status, fixes, history), kept in SQLite."""
