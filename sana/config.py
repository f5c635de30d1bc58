"""Strict config dataclasses: every component config is a frozen dataclass whose field names are the keys of
the published `config.json`, so a checkpoint folder's config maps onto it one to one.

Unknown keys are an error that names them (a typo in a run file must not be silently ignored); list values
become tuples so configs stay hashable and immutable.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, TypeVar

from sana.errors import UserError

T = TypeVar("T")

# Bookkeeping keys that diffusers/transformers write into config.json; they describe the file, not the model.
_META_PREFIX = "_"


class ConfigError(UserError):
    """A config that cannot describe a valid model (unknown field, bad value)."""


def _freeze(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


def config_from_dict(cls: type[T], data: dict[str, Any], *, source: str = "") -> T:
    """Build the dataclass `cls` from `data`, rejecting unknown keys. Keys starting with '_' are metadata."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in data if k not in names and not k.startswith(_META_PREFIX))
    where = f" in {source}" if source else ""
    if unknown:
        raise ConfigError(f"unknown field(s) for {cls.__name__}{where}: {', '.join(unknown)}")
    try:
        return cls(**{k: _freeze(v) for k, v in data.items() if k in names})
    except TypeError as e:  # e.g. a required field is missing
        raise ConfigError(f"invalid {cls.__name__}{where}: {e}") from None


def config_to_dict(config: Any) -> dict[str, Any]:
    return {f.name: _thaw(getattr(config, f.name)) for f in dataclasses.fields(config)}


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from a file, or a one-line ConfigError naming the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"missing {path}") from None
    except (IsADirectoryError, NotADirectoryError, PermissionError) as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def read_config(cls: type[T], path: str | Path) -> T:
    return config_from_dict(cls, read_json(path), source=str(path))


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """The YAML (or JSON) value in the user's file `path`; a one-line ConfigError naming the file, with the
    line and column of a syntax error, or a UserError if it cannot be read."""
    import yaml  # only where YAML is read

    from sana.errors import read_user_file

    text = read_user_file(path, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        reason = getattr(e, "problem", None) or " ".join(str(e).split())
        raise ConfigError(f"{path} is not valid YAML: {reason}{where}") from None
