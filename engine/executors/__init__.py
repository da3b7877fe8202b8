"""Stage execution: claiming, leases, heartbeats, recovery and following the log."""
