"""Flow-matching training and fine-tuning of Sana models: `train(load_train_config("run.yaml"))`.

Modules, one concept each: config (the run YAML as typed dataclasses), step (one optimizer step), loop
(`train`), ema, optim (optimizer + LR schedule), checkpoint (atomic save / exact resume / final export),
logging (CSV, TensorBoard, progress bar, loss plot), distributed (DDP / FSDP2 under torchrun). The objective
itself lives in sana/flow.py. Importing this package loads no model and starts nothing.
"""

from sana.training.config import TrainConfig, load_train_config
from sana.training.loop import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "load_train_config", "train"]
