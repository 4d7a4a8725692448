"""The training wing: the trainer (prepare_run and the loop), the step functions, the losses,
warm start from another run and pretrained embeddings. Joins model, data and checkpoints;
inference never imports it."""

from s2s_jax.training.trainer import TrainingStopped, train_and_evaluate  # noqa: F401

__all__ = ["TrainingStopped", "train_and_evaluate"]
