"""Training: model loading, losses, optimizers, the guarded loop, checkpoints (`from memfit.train import train`)."""

from memfit.train.loop import TrainJob, TrainResult, train

__all__ = ["TrainJob", "TrainResult", "train"]
