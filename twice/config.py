"""Typed run configs: YAML -> nested dataclasses, with dotted command-line overrides.

    python train_grpo.py configs/quickstart/grpo.yaml rollout.group_size=8 optim.lr=1e-6

Each stage script defines its own top-level dataclass (its sections are the dataclasses of the things it
configures: `twice.data.DataConfig`, `twice.sasrec.SASRecConfig`, ...), so a YAML key is one hop from the
field that reads it. This file is only the machinery:
  - unknown or misspelled keys are errors that name the closest valid key (a typo never silently becomes a
    default),
  - values are checked against the field's type (int, float, bool, str, list, dict, Optional, nested dataclass),
  - overrides `a.b=3` are parsed as YAML scalars, so `x=1e-6`, `flag=true`, `ids=[1,2]` do what they look like.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def _closest(key: str, valid: list[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f" (did you mean '{prefix}{match[0]}'?)" if match else ""


def _coerce(value, tp, where: str):
    """Check `value` against the annotation `tp`, converting int->float where a float is expected."""
    origin = typing.get_origin(tp)
    if tp is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):  # Optional[X] and X | None
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: cannot be None")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=where + ".")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (typing.Any,)
        return [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        args = typing.get_args(tp)
        return {k: _coerce(v, args[1], f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string; accept any float literal
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if typing.get_origin(tp) is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{where}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass `cls` from a (possibly partial) dict; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"unknown config key '{prefix}{key}'{_closest(key, list(fields), prefix)}")
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a field without a default was not given
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _set_dotted(tree: dict, dotted: str, value, cls) -> None:
    """Apply `a.b.c=value` to a plain dict, validating each key against the dataclass tree as we descend."""
    keys = dotted.split(".")
    node, node_cls, path = tree, cls, ""
    for i, key in enumerate(keys):
        names = [f.name for f in dataclasses.fields(node_cls)] if dataclasses.is_dataclass(node_cls) else None
        if names is not None and key not in names:
            raise ConfigError(f"unknown config key '{path}{key}'{_closest(key, names, path)}")
        if i == len(keys) - 1:
            node[key] = value
            return
        sub_tp = typing.get_type_hints(node_cls)[key] if names is not None else None
        if sub_tp is not None and typing.get_origin(sub_tp) in (typing.Union, types.UnionType):
            sub_tp = next(a for a in typing.get_args(sub_tp) if a is not type(None))
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"'{path}{key}' is not a section, cannot set '{dotted}'")
        node_cls, path = sub_tp, f"{path}{key}."


def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """YAML file (optional) + `key.sub=value` overrides -> validated instance of `cls`."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "", cls)
    return from_dict(cls, tree)


def parse_args(cls, argv: list[str]):
    """`script.py cfg.yaml a.b=1 ...` -> config. The first argument is the YAML unless it contains '='."""
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path is not None else argv
    return load_config(cls, path, overrides)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config next to a run's outputs (JSON-compatible YAML)."""
    Path(path).write_text(yaml.safe_dump(json.loads(json.dumps(to_dict(cfg))), sort_keys=False))
