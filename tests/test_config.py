"""twice.config: YAML -> typed dataclasses, dotted overrides, unknown keys named with the closest valid one."""
from dataclasses import dataclass, field
from typing import Optional

import pytest

from twice.config import ConfigError, load_config, parse_args, save_config


@dataclass
class Optim:
    lr: float = 1e-4
    steps: int = 10
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])


@dataclass
class Run:
    optim: Optim = field(default_factory=Optim)
    name: str = "run"
    lora: bool = True
    rewards: dict[str, float] = field(default_factory=lambda: {"cg": 1.0})
    sasrec_dir: Optional[str] = None


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("name: a\noptim:\n  lr: 3.0e-5\n  steps: 7\nrewards: {cg: 1, format: 0.5}\n")
    cfg = parse_args(Run, [str(cfg_file), "optim.steps=9", "optim.lr=1e-3", "lora=false", "sasrec_dir=runs/s"])
    assert cfg.name == "a" and cfg.optim.steps == 9 and cfg.lora is False and cfg.sasrec_dir == "runs/s"
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)   # "1e-3" is a string to YAML 1.1
    assert cfg.rewards == {"cg": 1.0, "format": 0.5} and cfg.optim.betas == [0.9, 0.999]


def test_defaults_without_file():
    assert parse_args(Run, ["optim.steps=3"]).optim == Optim(steps=3)


def test_unknown_keys_name_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.lrr' \(did you mean 'optim.lr'\?\)"):
        load_config(Run, None, ["optim.lrr=1"])
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("optim:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match=r"'optim.stepz' \(did you mean 'optim.steps'\?\)"):
        load_config(Run, cfg_file)
    with pytest.raises(ConfigError, match=r"'nme' \(did you mean 'name'\?\)"):
        load_config(Run, None, ["nme=x"])


def test_types_are_checked():
    for bad, msg in [("optim.steps=1.5", "expected an integer"), ("optim.lr=abc", "expected a number"),
                     ("lora=3", "expected true/false"), ("optim=5", "expected a mapping")]:
        with pytest.raises(ConfigError, match=msg):
            load_config(Run, None, [bad])
    with pytest.raises(ConfigError, match="must look like"):
        load_config(Run, None, ["optim.steps"])


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Run, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Run, bad)


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(Run, None, ["optim.lr=2e-5", "name=z"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(Run, tmp_path / "config.yaml") == cfg
