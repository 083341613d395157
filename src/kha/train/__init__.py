"""Training: config, optimizer and schedule, distributed setup, checkpoints, callbacks, the loop."""

from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
