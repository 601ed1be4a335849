"""bench/stages.py's pieces (no timing asserted): every (stage, dtype) command is twice.pipeline's stage command plus
overrides that the stage's own config loader accepts and that set the compute dtype, the size, a fresh run_dir per
run and one shared SFT folder; the table's ratios and totals are the hand-computed ones.

    python -m pytest tests/test_bench_stages.py -q
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import build_rationales  # noqa: E402
import eval as ev  # noqa: E402
import stages as B  # noqa: E402  (bench/stages.py)
import train_grpo  # noqa: E402
import train_sft  # noqa: E402
from twice.config import load_config  # noqa: E402
from twice.pipeline import stage_command  # noqa: E402

CONFIG = {"rationales": build_rationales.BuildConfig, "sft": train_sft.SFTConfig, "grpo": train_grpo.GRPORunConfig,
          "eval_base": ev.EvalConfig, "eval_sft": ev.EvalConfig}


def _args(tiny: bool):
    a = type("A", (), {})()
    a.tiny = tiny
    a.teacher_users, a.sft_steps, a.sft_batch, a.grpo_steps, a.users = 3, 2, 4, 1, 5
    return a


def _field(cfg, dotted: str):
    for k in dotted.split("."):
        cfg = getattr(cfg, k)
    return cfg


@pytest.mark.parametrize("tiny", [False, True])
def test_commands_load_with_each_scripts_config(tmp_path, tiny):
    work, model, sft = tmp_path / "w", tmp_path / "model", tmp_path / "sft" / "final"
    a = _args(tiny)
    run_dirs = set()
    for stage in B.STAGES:
        for dtype in ("float32", "auto", "bfloat16"):
            cmd = B.command(stage, dtype, work, model, sft, a)
            # the pipeline's own argv comes first, unchanged: same script, same YAML, same relocations
            base = stage_command(B.PIPELINE_STAGE[stage], work, model, tiny)
            assert cmd[:len(base)] == base
            cfg = load_config(CONFIG[stage], cmd[2], cmd[3:])   # [python, script.py, yaml, overrides...]
            assert _field(cfg, B.DTYPE_KEY[stage]) == dtype
            run_dirs.add(cfg.run_dir)
            assert cfg.run_dir == str(work / "runs" / f"{stage}-{dtype}")
            if stage == "rationales":
                assert cfg.teacher.backend == "local" and cfg.n_users == 3
            elif stage == "sft":
                assert (cfg.steps, cfg.optim.batch_size, cfg.eval.patience, cfg.checkpoint_every) == (2, 4, 0, 0)
            elif stage == "grpo":
                assert cfg.steps == 1 and cfg.model.path == str(sft)    # every dtype starts from the same folder
                assert cfg.rewards.weights == {"cg": 1.0, "format": 1.0}   # the paper's variant E
            else:
                assert cfg.max_users == 5 and cfg.sasrec_dir == ""       # SASRec is dtype-independent: not rerun
                name, path = ("base", model) if stage == "eval_base" else ("sft", sft)
                assert list(cfg.models) == [name] and cfg.models[name].path == str(path)
    assert len(run_dirs) == 3 * len(B.STAGES)


def _run(cpu, compute=None, rc=0, what="w"):
    return {"rc": rc, "cpu_s": cpu, "wall_s": cpu / 2, "compute_dtype": compute, "what": what}


def test_table_ratios_and_totals():
    rows = [{"stage": "sft", "runs": {"float32": _run(30.0, "float32", what="3 steps"),
                                      "auto": _run(10.0, "bfloat16")}},
            {"stage": "grpo", "runs": {"float32": _run(60.0, "float32"), "auto": _run(60.0, "float32"),
                                       "bfloat16": _run(20.0, "bfloat16")}},
            {"stage": "eval_sft", "runs": {"float32": _run(12.0, "float32"), "auto": _run(1.0, rc=1)}}]
    text = B.table(rows, ["float32", "auto", "bfloat16"])
    lines = text.splitlines()
    assert lines[0] == ("| stage | float32 CPU-s (wall) | auto CPU-s (wall) | bfloat16 CPU-s (wall) | float32/auto | "
                        "float32/bfloat16 | what it did (float32 run) |")
    # auto resolved to bf16 for SFT: shown; 30 / 10 = 3.00x; no bf16 run: "-"
    assert lines[2] == "| sft | 30.0 (15.0) | 10.0 (5.0) [bfloat16] | - | 3.00x | - | 3 steps |"
    # auto on a float32 folder computed in float32 (no [..] when the dtype is the one asked): 1.00x; bf16 60 / 20
    assert lines[3] == "| grpo | 60.0 (30.0) | 60.0 (30.0) [float32] | 20.0 (10.0) | 1.00x | 3.00x | w |"
    assert lines[4] == "| eval_sft | 12.0 (6.0) | FAILED (exit 1) | - | - | - | w |"
    # totals: fp32 over all 3 stages = 102; auto over sft + grpo = 70 (ratio on those: 90 / 70); bf16 over grpo
    assert lines[5] == ("| total | 102.0 | 70.0 | 20.0 | 1.29x | 3.00x | auto over sft, grpo; bfloat16 over grpo |")
    assert "Not run: data" in text
