"""One YAML file per training run, read into typed, frozen dataclasses.

    run_dir: runs/my-run
    max_steps: 10000
    model: {pretrained: path/to/Sana_600M_512px_diffusers}
    data: {...}                      # sana.data.DataConfig (its own module documents the keys)
    optim: {lr: 1.0e-4}
    ...

Every key is checked against the dataclass that owns it, and a typo fails at load time with the dotted key
named ("unknown key optim.learning_rate (did you mean optim.lr?)"). Values are checked against the field
types: numbers written like `1e-4`, which YAML 1.1 reads as a *string*, are accepted for float fields.
The top-level `task:` key picks the dataclass: the run config of that task's module, as the registry
(sana/training/tasks.py, which also holds `load_train_config`) names it, a subclass of `RunConfig` below that
adds its own sections (`model`, `data`, ...) to the shared ones here. This module is the leaf of the training
package: it imports nothing of it, so every task module can build on it. Command-line overrides are dotted
assignments applied to the YAML before checking: `sana train run.yaml optim.lr=3e-5 validation.prompts="[a cat,
a dog]"`; each value is parsed with yaml.safe_load, so numbers, booleans and lists work. A run file may start
from another with `base: OTHER.yaml` (see `read_yaml`).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from sana.config import ConfigError, read_yaml_file

# ------------------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA fine-tuning (peft): each targeted linear layer W learns a low-rank update (alpha / rank) * B @ A while
    every other weight stays frozen; needs model.pretrained. Off by default.

    targets: module names as peft matches a list: a layer is adapted when its dotted path equals a target or
    ends with "." + target ("to_q" adapts attn1.to_q and attn2.to_q of every block). Only linear layers: the
    Mix-FFN applies its 1x1 convolutions as matmuls on the conv weights, which a peft wrapper would not see.
    The run exports `RUN/lora/pytorch_lora_weights.safetensors` (diffusers' format, alpha folded in), and with
    export_merged also `RUN/final`, the full model with the update merged.
    """

    enabled: bool = False
    rank: int = 16
    alpha: float | None = None  # None: alpha = rank (update scale 1)
    dropout: float = 0.0  # on the LoRA branch's input, during training only
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # both attentions of every block
    export_merged: bool = True

    def __post_init__(self) -> None:
        _check(self.rank >= 1, "lora.rank must be >= 1")
        _check(self.alpha is None or self.alpha > 0, "lora.alpha must be > 0")
        _check(0 <= self.dropout < 1, "lora.dropout must be in [0, 1)")
        _check(bool(self.targets) and all(self.targets), "lora.targets must list at least one module name")


@dataclass(frozen=True)
class FlowConfig:
    """The objective (sana/flow.py): logit-normal time sampling, the time shift, caption dropout."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # the sampling flow_shift; 3.0 for the published 1024px models
    caption_dropout: float = 0.1  # probability of training a sample on the empty prompt (enables CFG)

    def __post_init__(self) -> None:
        _check(self.logit_std >= 0, "flow.logit_std must be >= 0")
        _check(self.shift > 0, "flow.shift must be > 0")
        _check(0 <= self.caption_dropout <= 1, "flow.caption_dropout must be in [0, 1]")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW (torch) or CAME (the `came-pytorch` package, Sana's own choice: factored second moments)."""

    name: Literal["adamw", "came"] = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.0  # applied to matrices and convolution kernels only (see optim.param_groups)
    betas: tuple[float, ...] | None = None  # None: (0.9, 0.999) for AdamW, (0.9, 0.999, 0.9999) for CAME
    eps: float = 1e-8  # AdamW only; CAME keeps its own pair (1e-30, 1e-16)
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    grad_accum_steps: int = 1  # micro-batches per optimizer step

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _check(self.grad_clip >= 0, "optim.grad_clip must be >= 0 (0 disables clipping)")
        _check(self.grad_accum_steps >= 1, "optim.grad_accum_steps must be >= 1")
        want = 2 if self.name == "adamw" else 3
        _check(self.betas is None or len(self.betas) == want, f"optim.betas: {self.name} takes {want} betas")


@dataclass(frozen=True)
class ScheduleConfig:
    """Learning rate: linear warm-up from 0, then constant or cosine decay to `min_lr` at max_steps."""

    warmup_steps: int = 0
    decay: Literal["constant", "cosine"] = "constant"
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _check(self.warmup_steps >= 0, "schedule.warmup_steps must be >= 0")
        _check(self.min_lr >= 0, "schedule.min_lr must be >= 0")


@dataclass(frozen=True)
class EMAConfig:
    enabled: bool = True
    decay: float = 0.9999

    def __post_init__(self) -> None:
        _check(0 <= self.decay < 1, "ema.decay must be in [0, 1)")


@dataclass(frozen=True)
class PrecisionConfig:
    """Autocast for the forward pass; weights, gradients and optimizer state stay in model.dtype.

    fp16 adds a gradient scaler (fp16 gradients underflow without one); bf16 needs none.
    """

    mixed: Literal["no", "bf16", "fp16"] = "no"
    allow_tf32: bool = True  # CUDA matmuls in TF32 (fp32 range, 10-bit mantissa): free speed on Ampere+


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 1000  # steps between checkpoints (one is always written at max_steps)
    keep_last: int = 3
    resume: str | None = None  # "latest": the newest checkpoint in run_dir; or a checkpoint folder
    export_ema: bool = True  # the final model is the EMA weights (when EMA is on)
    write_delay_s: float = 0.0  # testing aid only: pause mid-write so a test can kill a half-written save

    def __post_init__(self) -> None:
        _check(self.every >= 1, "checkpoint.every must be >= 1")
        _check(self.keep_last >= 1, "checkpoint.keep_last must be >= 1")
        _check(self.write_delay_s >= 0, "checkpoint.write_delay_s must be >= 0")


@dataclass(frozen=True)
class LoggingConfig:
    every: int = 10  # steps between TensorBoard points and progress-bar refreshes; the CSV gets every step
    tensorboard: bool | None = None  # None: when the `tensorboard` package is installed
    progress: bool = True
    plot: bool = True  # loss.png at the end of the run

    def __post_init__(self) -> None:
        _check(self.every >= 1, "logging.every must be >= 1")


@dataclass(frozen=True)
class DistributedConfig:
    """Used when launched by torchrun (WORLD_SIZE > 1). ddp: full replicas; fsdp: FSDP2 sharding per block."""

    strategy: Literal["ddp", "fsdp"] = "ddp"
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl on CUDA, gloo on CPU


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """The sections every task shares. Each task's config (its module's `CONFIG`, see sana/training/tasks.py)
    adds its own `model` and `data` sections and whatever else it needs, and gives `task` its name as default;
    the top-level `task:` key picks which one a YAML file is read into."""

    run_dir: str
    max_steps: int
    task: str  # the registry name (sana/training/tasks.py); each task's config sets it as its default
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    seed: int = 0
    device: str = "auto"  # auto: cuda:LOCAL_RANK when CUDA is available, else cpu

    def __post_init__(self) -> None:
        _check(self.max_steps >= 1, "max_steps must be >= 1")
        _check(self.schedule.warmup_steps <= self.max_steps, "schedule.warmup_steps must be <= max_steps")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ------------------------------------------------------------------------------------------------- parsing


def data_config_class() -> type:
    """sana.data.DataConfig, imported when a data section is actually parsed."""
    from sana.data import DataConfig

    return DataConfig


def parse(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, checking every key and value; errors name the dotted key."""
    where = path or "the run config"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where} must be a mapping of keys to values, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            dotted = _join(path, str(key))
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {_join(path, close[0])}?)" if close else ""
            raise ConfigError(f"unknown key {dotted}{hint}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        dotted = _join(path, name)
        if fields[name].metadata.get("parse") == "data":
            values[name] = None if value is None else parse(data_config_class(), value, dotted)
        else:
            values[name] = _coerce(hints[name], value, dotted)
    missing = [n for n, f in fields.items() if n not in values and _required(f)]
    if missing:
        raise ConfigError(f"missing key(s): {', '.join(_join(path, n) for n in missing)}")
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def _required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """Check `value` against the type hint (bool, int, float, str, Literal, tuple, Optional, dataclass)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return parse(hint, value, path)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{path}: {value!r} fits none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be true or false, got {value!r}")
        return value
    if hint is int:
        number = _number(value, path)
        if number != int(number):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return int(number)
    if hint is float:
        return float(_number(value, path))
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    return value  # Any and types this checker does not know: the dataclass validates them itself


def _number(value: Any, path: str) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{path} must be a number, got {value!r}")
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    raise ConfigError(f"{path} must be a number, got {value!r}")


# ---------------------------------------------------------------------------------------------- overrides


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with each "dotted.key=value" applied; values are parsed with yaml.safe_load."""
    out = _deep_copy(data)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value")
        parts = key.strip().split(".")
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return out


def _deep_copy(data: Any) -> Any:
    return {k: _deep_copy(v) for k, v in data.items()} if isinstance(data, dict) else data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A run YAML as a dict. A top-level `base: OTHER.yaml` (relative to this file's folder) includes OTHER.yaml,
    itself read this way (it may have a base too): this file is merged over it, mappings key by key at any depth,
    any other value (a number, a string, a list) replacing the base's whole. The result has no `base` key."""
    return _read_yaml(Path(path), ())


def _read_yaml(path: Path, including: tuple[Path, ...]) -> dict[str, Any]:
    """read_yaml of `path`, the base of the last of `including` (the files that include it, outermost first)."""
    if not path.is_file() and not path.is_dir():
        if including:
            raise ConfigError(f"{including[-1]}: no such base file: {path}")
        raise ConfigError(f"no such run config: {path}")
    data = read_yaml_file(path, "base file" if including else "run config")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be a file name, got {base!r}")
    chain = (*including, path)
    base_path = path.parent / base
    if base_path.resolve() in {p.resolve() for p in chain}:
        raise ConfigError(f"base: include cycle: {' -> '.join(str(p) for p in (*chain, base_path))}")
    return _merged(_read_yaml(base_path, chain), data)


def _merged(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` merged over `base` (read_yaml's include): mappings key by key, anything else replaced."""
    out = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def train_config_to_dict(cfg: Any) -> Any:
    """Plain data (dicts, lists, scalars) that `train_config_from_dict` reads back into an equal config."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: train_config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, tuple | list):
        return [train_config_to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: train_config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(train_config_to_dict(cfg), sort_keys=False)
