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


def test_include_merges_a_shared_block_under_the_file(tmp_path):
    """`include:` files are merged first (relative to the including file), the file's own keys win, overrides last."""
    (tmp_path / "shared.yaml").write_text("optim: {lr: 0.5, steps: 3}\nname: shared\n")
    (tmp_path / "a.yaml").write_text("include: shared.yaml\noptim: {steps: 4}\n")
    cfg = load_config(Run, tmp_path / "a.yaml", ["optim.lr=0.25"])
    assert (cfg.optim.lr, cfg.optim.steps, cfg.name) == (0.25, 4, "shared")
    (tmp_path / "b.yaml").write_text("include: [nope.yaml]\n")
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(Run, tmp_path / "b.yaml")
    (tmp_path / "c.yaml").write_text("include: c.yaml\n")
    with pytest.raises(ConfigError, match="include cycle"):
        load_config(Run, tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("include: shared.yaml\noptim: {stepz: 1}\n")
    with pytest.raises(ConfigError, match="did you mean 'optim.steps'"):
        load_config(Run, tmp_path / "d.yaml")


def test_quickstart_prompt_settings_agree_by_construction():
    """SFT, GRPO and eval of the quickstart read the prompt layout from one file (the issue: grpo had 10 items, 5
    elsewhere)."""
    from pathlib import Path

    from twice.config import read_yaml
    q = Path(__file__).resolve().parents[1] / "configs" / "quickstart"
    blocks = [read_yaml(q / f)["task"] for f in ("sft.yaml", "grpo.yaml", "eval.yaml")]
    assert blocks[0] == blocks[1] == blocks[2] == read_yaml(q / "task.yaml")["task"]
    for f in ("sft.yaml", "grpo.yaml", "eval.yaml"):
        assert "task" not in __import__("yaml").safe_load((q / f).read_text())   # only in task.yaml


def test_check_inputs_names_field_and_path(tmp_path):
    import torch
    from safetensors.torch import save_file

    from twice.config import InputError, check_inputs, safetensors_problem
    with pytest.raises(InputError, match=r"^data_dir: .*nope does not exist \(build it with"):
        check_inputs(("data_dir", tmp_path / "nope", "dataset"))
    m = tmp_path / "m"
    m.mkdir()
    (m / "config.json").write_text("{}")
    with pytest.raises(InputError, match=r"model.path: .* is incomplete \(no tokenizer.model\)"):
        check_inputs(("model.path", m, "model"))
    (m / "tokenizer.model").write_bytes(b"x")
    save_file({"w": torch.zeros(256)}, str(m / "model.safetensors"))
    check_inputs(("model.path", m, "model"), ("optional", "", "model"))   # intact; empty = not used
    raw = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(raw[:-100])
    assert safetensors_problem(m / "model.safetensors") == f"truncated: {len(raw) - 100} bytes, its header needs {len(raw)}"
    with pytest.raises(InputError, match=r"model.path: .*/m/model.safetensors is truncated: \d+ bytes"):
        check_inputs(("model.path", m, "model"))
