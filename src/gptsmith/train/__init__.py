"""Training: shared pieces (checkpoints, schedules, logging) and one module per method."""
