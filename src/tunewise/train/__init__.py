"""Shared training machinery used by every trainer: seeding, optimizers, schedules, the fit loop."""
