"""The registry of training tasks: the one place a task's name lives.

`sana train` trains several kinds of model with one loop (loop.py), selected by the run config's top-level
`task:` key (DEFAULT_TASK when absent). `TASKS` maps each name to the module that implements it:

    dit            the Sana DiT, flow matching on latents + caption embeddings               (dit_task)
    dcae           a DC-AE autoencoder, reconstruction (+ optional perceptual and adversarial terms)   (dcae_task)
    text_encoder   a small Gemma-2 decoder as a causal language model on captions, and its tokenizer (text_task)

A new task is one module plus one registry line. The module defines two attributes: `CONFIG`, its run-config
dataclass (a `sana.training.config.RunConfig` subclass whose `task` field defaults to the registry name, so a
config built in code names its own task), and `TASK`, its `sana.training.task.Task` subclass (built as
`TASK(cfg, ctx, resume)`). The line is `"name": "package.module"` in `TASKS`. Nothing else names tasks:
`TASK_NAMES`, the config loader (`config.train_config_from_dict`), `make_task` and the error for an unknown
name all read this table.

Modules are imported on demand, so a run loads only the module of the task it asks for. This module imports
nothing from sana.training (the task modules are named, not imported, here), so every module of the package,
config.py included, can consult it without an import cycle.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from sana.config import ConfigError

TASKS: dict[str, str] = {
    "dit": "sana.training.dit_task",
    "dcae": "sana.training.dcae_task",
    "text_encoder": "sana.training.text_task",
}
DEFAULT_TASK = "dit"  # the task of a run YAML without a `task:` key
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def task_module(name: str) -> ModuleType:
    """The module of task `name`, imported now if it was not yet; ConfigError (one line) for an unknown name."""
    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(map(repr, TASK_NAMES))}, got {name!r}")
    return importlib.import_module(TASKS[name])


def config_class(name: str) -> type:
    """The run-config dataclass of task `name` (its module's `CONFIG`)."""
    return task_module(name).CONFIG


def task_class(name: str) -> type:
    """The `Task` subclass of task `name` (its module's `TASK`)."""
    return task_module(name).TASK
