"""Training of Sana models: `train(load_train_config("run.yaml"))`. The DiT by flow matching (fine-tuning
included) and, selected by the run's `task:` key, the autoencoder and the text encoder a model built from
scratch needs; tasks.py names them all.

Modules, one concept each: tasks (the registry: task name -> module), config (the run YAML as typed
dataclasses: the shared sections and the loader), task (what a task adds to the loop, and the `Run` it is
handed), loop (`train`, the same for every task), dit_task, dcae_task, text_task (one module per task: its run
config and its Task), step (one optimizer step), tokenizer (a Gemma-style BPE trained on captions), ema, optim
(optimizer + LR schedule), checkpoint (atomic save / exact resume / final export), logging (CSV, TensorBoard,
progress bar, loss plot), distributed (DDP / FSDP2 under torchrun), lora. The flow-matching objective itself
lives in sana/flow.py. Importing this package loads no model and starts nothing. Modules inside the package
import each other directly, never this __init__, so the package has no import cycle (tests/test_imports.py).
"""

from sana.training.dit_task import TrainConfig
from sana.training.loop import TrainingError, TrainResult, train
from sana.training.tasks import load_train_config

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "load_train_config", "train"]
