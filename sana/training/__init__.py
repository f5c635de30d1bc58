"""Training of Sana models: `train(load_train_config("run.yaml"))`. The DiT by flow matching (fine-tuning
included); with `task: dcae` or `task: text_encoder`, the autoencoder and the text encoder a model built from
scratch needs.

Modules, one concept each: config (the run YAML as typed dataclasses), step (one optimizer step), loop
(`train`, and the DiT task), task (what a task adds to the loop), dcae_task, text_task, tokenizer (a
Gemma-style BPE trained on captions), ema, optim (optimizer + LR schedule), checkpoint (atomic save / exact
resume / final export), logging (CSV, TensorBoard, progress bar, loss plot), distributed (DDP / FSDP2 under
torchrun). The flow-matching objective itself lives in sana/flow.py. Importing this package loads no model
and starts nothing.
"""

from sana.training.config import TrainConfig, load_train_config
from sana.training.loop import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "load_train_config", "train"]
