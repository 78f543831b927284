"""Training: checkpoints, optimizer, schedules, the loop."""
