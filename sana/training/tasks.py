"""The registry of training tasks: the one place a task's name lives.

`sana train` trains several kinds of model with one loop (loop.py), selected by the run config's top-level
`task:` key (DEFAULT_TASK when absent). `TASKS` maps each name to the module that implements it:

    dit            the Sana DiT, flow matching on latents + caption embeddings               (dit_task)
    dcae           a DC-AE autoencoder, reconstruction (+ optional perceptual and adversarial terms)   (dcae_task)
    text_encoder   a small Gemma-2 decoder as a causal language model on captions, and its tokenizer (text_task)
    controlnet     a ControlNet for a frozen DiT, flow matching with control images            (controlnet_task)

A new task is one module plus one registry line. The module defines two attributes: `CONFIG`, its run-config
dataclass (a `sana.training.config.RunConfig` subclass whose `task` field defaults to the registry name, so a
config built in code names its own task), and `TASK`, its `sana.training.task.Task` subclass (built as
`TASK(cfg, ctx, resume)`). The line is `"name": "package.module"` in `TASKS`. Nothing else names tasks:
`TASK_NAMES`, the config loader (`load_train_config`, `train_config_from_dict`, below), `make_task` and the
error for an unknown name all read this table.

Modules are imported on demand, so a run loads only the module of the task it asks for. The registry sits
above the task modules: it imports only the leaf config.py (and, for type hints, the Task base class); no task
module imports it, so naming a task module here never closes a loop.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

from sana.config import ConfigError
from sana.training.config import RunConfig, apply_overrides, parse, read_yaml

if TYPE_CHECKING:
    from sana.training.distributed import DistContext
    from sana.training.task import Task

TASKS: dict[str, str] = {
    "dit": "sana.training.dit_task",
    "dcae": "sana.training.dcae_task",
    "text_encoder": "sana.training.text_task",
    "controlnet": "sana.training.controlnet_task",
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


def load_train_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a run YAML, apply dotted overrides, check everything: the one way a run config is made from text."""
    return train_config_from_dict(apply_overrides(read_yaml(path), overrides))


def train_config_from_dict(data: dict[str, Any]) -> RunConfig:
    """The run config of the task named by the top-level `task:` key (the registry's DEFAULT_TASK when absent);
    the registry (sana/training/tasks.py) gives its dataclass, importing only that task's module."""
    task = data.get("task", DEFAULT_TASK) if isinstance(data, Mapping) else DEFAULT_TASK
    cls = config_class(task)  # a one-line ConfigError naming the registry's tasks for an unknown one
    own = {f.name for f in dataclasses.fields(cls)}
    for key in (k for k in data if k not in own):  # a section of another task: say so, not "did you mean"
        owners = [t for t in TASK_NAMES if key in {f.name for f in dataclasses.fields(config_class(t))}]
        if owners:
            raise ConfigError(f"unknown key {key}: it belongs to task {owners[0]}, and this run has task: {task}")
    return parse(cls, data)


def make_task(cfg: RunConfig, ctx: DistContext, resume: Path | None = None) -> Task:
    """The task object of a run: its registered `TASK` class built from the run config."""
    return task_class(cfg.task)(cfg, ctx, resume)
