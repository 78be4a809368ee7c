"""The names `optim.name` and `schedule.name` take, torch-free: validating a config checks them without torch."""

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "linear", "step", "cosine", "plateau")
