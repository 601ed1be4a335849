"""twice.logsink: TensorBoard / W&B mirrors of metrics.jsonl, off by default, lazy imports, one-line errors.
The real packages are optional; fakes stand in for them here (the calls they receive are what is checked).

    python -m pytest tests/test_logsink.py -q
"""
from __future__ import annotations

import sys
import types

import pytest

from twice.config import ConfigError, load_config
from twice.logsink import LogConfig, SinkError, Sinks, open_sinks


class FakeWriter:
    def __init__(self, log_dir):
        self.log_dir, self.scalars, self.flushes, self.closed = log_dir, [], 0, False

    def add_scalar(self, k, v, step):
        self.scalars.append((k, v, step))

    def flush(self):
        self.flushes += 1

    def close(self):
        self.closed = True


class FakeRun:
    def __init__(self, kw):
        self.kw, self.logged, self.finished = kw, [], False

    def log(self, vals, step=None):
        self.logged.append((vals, step))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_tb(monkeypatch):
    mod = types.ModuleType("torch.utils.tensorboard")
    mod.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", mod)


@pytest.fixture
def fake_wandb(monkeypatch):
    mod = types.ModuleType("wandb")
    mod.init = lambda **kw: FakeRun(kw)
    monkeypatch.setitem(sys.modules, "wandb", mod)


def test_off_by_default_imports_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)          # importing either would now fail
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    s = open_sinks(LogConfig(), tmp_path)
    assert (s.tb, s.wandb_run) == (None, None)
    s.write({"step": 1, "loss": 1.0})
    s.close()
    # enabled on a non-main rank: nothing either
    assert open_sinks(LogConfig(tensorboard=True, wandb={"project": "p"}), tmp_path, enabled=False).tb is None


def test_tensorboard_and_wandb_get_the_numeric_keys(tmp_path, fake_tb, fake_wandb):
    from dataclasses import dataclass

    @dataclass
    class Run:
        lr: float = 0.1
    s = open_sinks(LogConfig(tensorboard=True, wandb={"project": "twice", "mode": "offline"}), tmp_path, Run())
    s.write({"step": 3, "loss": 2.5, "eval/hr@1": 1, "note": "text", "ok": True, "bad": float("nan")})
    assert s.tb.log_dir == str(tmp_path / "tensorboard")
    assert s.tb.scalars == [("loss", 2.5, 3), ("eval/hr@1", 1.0, 3)] and s.tb.flushes == 1
    assert s.wandb_run.kw == {"dir": str(tmp_path), "config": {"lr": 0.1}, "project": "twice", "mode": "offline"}
    assert s.wandb_run.logged == [({"loss": 2.5, "eval/hr@1": 1.0}, 3)]
    s.write({"step": 4, "note": "only text"})                  # nothing numeric: no empty log call
    assert len(s.wandb_run.logged) == 1 and s.tb.flushes == 1
    s.close()
    assert s.tb.closed and s.wandb_run.finished


def test_enabled_but_missing_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(SinkError, match="pip install tensorboard") as e:
        open_sinks(LogConfig(tensorboard=True), tmp_path)
    assert "\n" not in str(e.value) and isinstance(e.value, ConfigError)   # scripts print config errors in one line
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SinkError, match="pip install wandb"):
        open_sinks(LogConfig(wandb={"project": "p"}), tmp_path)


def test_train_sft_config_has_the_log_section():
    import train_sft
    c = load_config(train_sft.SFTConfig, None, ["log.tensorboard=true", "log.wandb={project: twice}"])
    assert c.log == LogConfig(tensorboard=True, wandb={"project": "twice"})
    assert train_sft.SFTConfig().log == LogConfig()
    with pytest.raises(ConfigError, match="tensorboard"):
        load_config(train_sft.SFTConfig, None, ["log.tensorbord=true"])


def test_train_grpo_config_has_the_log_section():
    import train_grpo
    c = load_config(train_grpo.GRPORunConfig, None, ["log.tensorboard=true"])
    assert c.log == LogConfig(tensorboard=True) and train_grpo.GRPORunConfig().log == LogConfig()
