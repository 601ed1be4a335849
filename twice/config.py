"""Typed run configs: YAML -> nested dataclasses, with dotted command-line overrides.

    python train_grpo.py configs/quickstart/grpo.yaml rollout.group_size=8 optim.lr=1e-6

Each stage script defines its own top-level dataclass (its sections are the dataclasses of the things it
configures: `twice.data.DataConfig`, `twice.sasrec.SASRecConfig`, ...), so a YAML key is one hop from the
field that reads it. This file is only the machinery:
  - unknown or misspelled keys are errors that name the closest valid key (a typo never silently becomes a
    default),
  - values are checked against the field's type (int, float, bool, str, list, dict, Optional, nested dataclass),
  - overrides `a.b=3` are parsed as YAML scalars, so `x=1e-6`, `flag=true`, `ids=[1,2]` do what they look like,
  - `include: task.yaml` (or a list) at the top of a YAML merges that file in first (path relative to the including
    file; the including file's own keys win): the quickstart's SFT, GRPO and eval configs share one prompt block
    (configs/quickstart/task.yaml), so their prompts agree by construction,
  - `check_inputs` verifies the paths a config names (dataset dir, model folder, SASRec dir, files) before any
    model is loaded, naming the field: scripts print a ConfigError as one line and exit.
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
    """A bad config or input: every script prints it as one line (no traceback) and exits non-zero."""


class InputError(ConfigError):
    """A file or folder a config field names is missing, incomplete or corrupt (the message names field and path)."""


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


def _merge(base: dict, top: dict) -> dict:
    """Deep merge of two YAML trees: mappings merge key by key, anything else in `top` replaces `base`."""
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path, _seen: tuple = ()) -> dict:
    """One YAML file as a dict, with its `include:` files merged in underneath (own keys win)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: include cycle ({' -> '.join(str(p) for p in _seen + (path,))})")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    includes = tree.pop("include", [])
    includes = [includes] if isinstance(includes, str) else includes
    if not isinstance(includes, list) or not all(isinstance(x, str) for x in includes):
        raise ConfigError(f"{path}: include must be a file name or a list of them, got {includes!r}")
    base: dict = {}
    for inc in includes:
        base = _merge(base, read_yaml(path.parent / inc, _seen + (path.resolve(),)))
    return _merge(base, tree)


def load_config(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()):
    """YAML file (optional, with its includes) + `key.sub=value` overrides -> validated instance of `cls`."""
    tree: dict = {}
    if path is not None:
        tree = read_yaml(path)
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


# ---------------------------------------------------------------------------------------------------------------
# inputs named by a config: checked before any model is loaded, so a wrong path costs a second, not a model load

def safetensors_problem(path: str | Path) -> str | None:
    """Why a .safetensors file is unusable (missing, truncated, bad header), or None. Reads only the header: the
    8-byte length, the JSON table, and the file size the table implies."""
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                return f"truncated or not safetensors ({size} bytes)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"unreadable header ({type(e).__name__})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"truncated: {size} bytes, its header needs {8 + n + end}"
    return None


def input_problem(path: str | Path, kind: str) -> str | None:
    """Why `path` is not a usable input of this kind, or None. Kinds:
    dataset (a `python -m twice.data prepare` dir), model (an HF Gemma-3 folder with tokenizer.model), sasrec
    (a SASRec.save folder), file (an existing file), dir (an existing folder)."""
    p = Path(path).expanduser()
    if not p.exists():
        return "does not exist"
    if kind == "file":
        return None if p.is_file() else "is not a file"
    if not p.is_dir():
        return "is not a folder"
    need = {"dataset": ["items.jsonl", "users.jsonl", "meta.json"], "model": ["config.json", "tokenizer.model"],
            "sasrec": ["config.json", "model.safetensors"], "dir": []}[kind]
    missing = [n for n in need if not (p / n).is_file()]
    if missing:
        return f"is incomplete (no {', '.join(missing)})"
    if kind == "model":
        index = p / "model.safetensors.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError):
                return f"has an unreadable {index.name}"
        else:
            shards = ["model.safetensors"]
        for s in shards:
            if (why := safetensors_problem(p / s)) is not None:
                return f"/{s} is {why}"    # "/": the message continues the folder's path
    if kind == "sasrec" and (why := safetensors_problem(p / "model.safetensors")) is not None:
        return f"/model.safetensors is {why}"
    return None


HINTS = {"dataset": "build it with `python -m twice.data prepare CONFIG`",
         "model": "an HF Gemma-3 folder: `python -m twice.convert gemma-3-270m`, or a stage's final/",
         "sasrec": "train it with `python train_sasrec.py CONFIG` (its out_dir/best)"}


def check_inputs(*checks: tuple[str, str | Path, str]) -> None:
    """(field, path, kind) triples -> InputError naming the first bad one, e.g.
    `data_dir: runs/x/data does not exist (build it with ...)`. Empty paths are skipped (optional inputs)."""
    for field_name, path, kind in checks:
        if path is None or (isinstance(path, str) and not path):
            continue
        why = input_problem(path, kind)
        if why is not None:
            hint = f" ({HINTS[kind]})" if kind in HINTS and why in ("does not exist", "is not a folder") else ""
            raise InputError(f"{field_name}: {str(path).rstrip('/')}{why if why.startswith('/') else ' ' + why}{hint}")
