"""Reading and writing model weights in the diffusers folder layout.

A component folder holds `config.json` and `diffusion_pytorch_model.safetensors` (or shards plus an index).
Loading builds the module on the meta device, checks every key and shape against the file header before any
tensor is read, then fills the module from safetensors with `assign=True`, so a 1.6B model costs one copy
of its weights and a bad file fails in milliseconds with a message that names what is wrong.

Writing is atomic per file (temporary name, then rename), so an interrupted save never leaves a file that
looks complete but is not.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import nn

from sana import __version__
from sana.config import config_to_dict, read_config
from sana.errors import UserError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"
# diffusers warns (only) when this is newer than itself; we write the oracle version we test against.
DIFFUSERS_VERSION = "0.42.1"

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CheckpointError(UserError):
    """A weights file or folder that does not match the model it should fill."""


class SavableModel(Protocol):
    """What a model class offers to this module (SanaDiT, DCAE)."""

    config_class: type
    diffusers_class_name: str
    config: Any

    def state_dict(self) -> dict[str, torch.Tensor]: ...


M = TypeVar("M", bound=nn.Module)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ------------------------------------------------------------------------------------------------ reading


def _weight_files(folder: Path) -> list[Path]:
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or not UTF-8
            raise CheckpointError(f"{index}: unreadable shard index ({e})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: unreadable shard index (weight_map is not an object)")
        return [folder / name for name in sorted(set(weight_map.values()))]
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pth"))
    hint = f" (found {', '.join(others)}: convert it with `sana convert`)" if others else ""
    raise CheckpointError(f"no {WEIGHTS_NAME} in {folder}{hint}")


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise CheckpointError(f"missing weights file {path}") from None
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise CheckpointError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None


def read_header(files: Iterable[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Key -> (shape, file), from the headers only; also rejects files whose data is shorter than declared."""
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        with _open(path) as f:
            end = 0
            for key in f.keys():
                sl = f.get_slice(key)
                shapes[key] = (tuple(sl.get_shape()), path)
                numel = 1
                for s in sl.get_shape():
                    numel *= s
                end += numel * _dtype_size(sl.get_dtype())
        _check_length(path, end)
    return shapes


def _dtype_size(name: str) -> int:
    sizes = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2}
    return sizes.get(name, 1)


def _check_length(path: Path, data_bytes: int) -> None:
    with open(path, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
    if path.stat().st_size < 8 + header_len + data_bytes:
        raise CheckpointError(
            f"{path} is truncated: {path.stat().st_size} bytes, header declares {8 + header_len + data_bytes}"
        )


def _summarise(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_keys(model: nn.Module, header: dict[str, tuple[tuple[int, ...], Path]], source: str) -> None:
    """Raise one CheckpointError naming every missing, unexpected and mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    wrong = sorted(
        f"{k} {header[k][0]} != {expected[k]}" for k in set(expected) & set(header) if header[k][0] != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_summarise(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_summarise(unexpected)}")
    if wrong:
        problems.append(f"shape mismatch: {_summarise(wrong)}")
    if problems:
        raise CheckpointError(f"{source} does not fit {type(model).__name__}: " + "; ".join(problems))


def load_state_into(model: M, folder: Path, dtype: torch.dtype, device: torch.device | str) -> M:
    """Fill a (meta-device) model from the safetensors in `folder`; keys are checked before any read."""
    files = _weight_files(folder)
    header = read_header(files)
    check_keys(model, header, str(folder))
    state: dict[str, torch.Tensor] = {}
    for path in files:
        with _open(path) as f:
            for key in f.keys():
                state[key] = f.get_tensor(key).to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def load_model(cls: type[M], folder: str | Path, *, dtype=torch.float32, device="cpu", overrides=None) -> M:
    """Build `cls` from `folder/config.json` on the meta device and fill it from the folder's safetensors.
    `overrides` replaces config fields first (a dict; a TypeError names an unknown one); the weights must
    still fit the changed config exactly."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"no such model folder: {folder}")
    config = read_config(cls.config_class, folder / CONFIG_NAME)
    if overrides:
        config = dataclasses.replace(config, **overrides)
    with torch.device("meta"):
        model = cls(config)
    return load_state_into(model, folder, parse_dtype(dtype), device).eval()


# ------------------------------------------------------------------------------------------------ writing


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), then rename onto `path`: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the result should look like any written file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def component_config(model: SavableModel) -> dict[str, Any]:
    return {
        "_class_name": model.diffusers_class_name,
        "_diffusers_version": DIFFUSERS_VERSION,
        "_sana_version": __version__,
        **config_to_dict(model.config),
    }


def save_model(model: SavableModel, folder: str | Path, *, dtype: torch.dtype | None = None) -> None:
    """Write `config.json` + one safetensors file that diffusers' `from_pretrained` reads as is."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = {k: v.detach().to("cpu", dtype or v.dtype).contiguous() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    write_json(folder / CONFIG_NAME, component_config(model))
