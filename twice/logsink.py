"""A run's log files (log.txt, metrics.jsonl, completions.jsonl) and the optional metric sinks beside metrics.jsonl:
TensorBoard and Weights & Biases, off by default.

    log = RunLog(run_dir / "log.txt", is_main)                    # log(msg): rank 0 -> console + log.txt
    metrics_f = JsonlWriter(run_dir / "metrics.jsonl", is_main)   # metrics_f.write(rec): one JSON line, flushed

    log:                       # in a train_sft.py / train_grpo.py YAML (or log.tensorboard=true on the command line)
      tensorboard: true        # -> RUN_DIR/tensorboard (event files); needs `pip install tensorboard`
      wandb: {project: twice}  # any wandb.init keyword (project, entity, name, mode: offline, ...); needs `pip install wandb`

metrics.jsonl stays the record (the scripts write it themselves, and `python -m twice.plot` reads it); a sink only
mirrors each line. The packages are imported lazily, only when enabled, so neither is a dependency: enabled but
not installed is a one-line error before training starts. The scripts need two lines:

    sink = open_sinks(cfg.log, run_dir, cfg, enabled=is_main)     # after the run dir exists
    sink.write(rec)                                                # wherever a metrics.jsonl line is written
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from twice.config import ConfigError


class RunLog:
    """log(msg): rank 0 -> console (above any tqdm bar) + the file, flushed per line; other ranks write nothing."""

    def __init__(self, path: str | Path, enabled: bool):
        self.f = open(path, "a", encoding="utf-8") if enabled else None

    def __call__(self, msg: str) -> None:
        if self.f:
            tqdm.write(msg)
            self.f.write(msg + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


class JsonlWriter:
    """Append-only JSONL on rank 0, flushed per line (a kill loses at most the line being written)."""

    def __init__(self, path: str | Path, enabled: bool):
        self.f = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, rec: dict) -> None:
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()

    def close(self) -> None:
        if self.f:
            self.f.close()


@dataclass
class LogConfig:
    tensorboard: bool = False     # mirror metrics to RUN_DIR/tensorboard (torch.utils.tensorboard; needs tensorboard)
    wandb: dict = field(default_factory=dict)   # {} = off; else wandb.init(**this, dir=RUN_DIR, config=run config)


class SinkError(ConfigError):
    """An enabled sink whose package is missing: the scripts report it like any config error (one line)."""


def _numbers(rec: dict) -> dict[str, float]:
    return {k: float(v) for k, v in rec.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class Sinks:
    """Mirrors metric records to the enabled sinks. With nothing enabled, write() does nothing."""

    def __init__(self, tb=None, wandb_run=None):
        self.tb, self.wandb_run = tb, wandb_run

    def write(self, rec: dict) -> None:
        step = rec.get("step")
        vals = _numbers(rec)
        if not vals:
            return
        if self.tb is not None:
            for k, v in vals.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()      # a killed run keeps every line written so far (no close() needed)
        if self.wandb_run is not None:
            self.wandb_run.log(vals, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def open_sinks(cfg: LogConfig, run_dir: str | Path, run_config=None, enabled: bool = True) -> Sinks:
    """The sinks `cfg` enables (none on non-main ranks: enabled=False). Raises SinkError (one line) when an enabled
    sink's package is not installed."""
    if not enabled or (not cfg.tensorboard and not cfg.wandb):
        return Sinks()
    run_dir = Path(run_dir)
    tb = wb = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SinkError("log.tensorboard: true needs the tensorboard package: pip install tensorboard "
                            "(or set log.tensorboard=false)") from None
        tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
    if cfg.wandb:
        try:
            import wandb
        except ImportError:
            raise SinkError("log.wandb is set but the wandb package is not installed: pip install wandb "
                            "(or remove log.wandb)") from None
        conf = dataclasses.asdict(run_config) if dataclasses.is_dataclass(run_config) else (run_config or {})
        wb = wandb.init(**{"dir": str(run_dir), "config": conf, **cfg.wandb})
    return Sinks(tb, wb)
