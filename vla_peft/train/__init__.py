"""Training a VLAPolicy on demonstrations with accelerate; checkpoints, metrics, the task bundle."""

from vla_peft.train.config import RunConfig, TrainConfig, load_run_config
from vla_peft.train.loop import TrainingDiverged, train

__all__ = ["RunConfig", "TrainConfig", "TrainingDiverged", "load_run_config", "train"]
