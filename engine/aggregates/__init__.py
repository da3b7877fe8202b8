"""Domain model: aggregates and their past-tense events, one aggregate per module."""
