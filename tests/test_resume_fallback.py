"""The issue's case, through a real script: train_sft.py resuming next to a truncated model.safetensors (a copy cut
short) names the bad file, resumes from the newest intact checkpoint and finishes; with no intact checkpoint left it
exits with one line naming the file (no traceback). Tiny world of tests/sft_worker.py.

    pytest tests/test_resume_fallback.py -q
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import sft_worker as W
import train_sft as S

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]


def _script(args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "train_sft.py")] + args, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_truncated_latest_checkpoint_falls_back_then_one_line(tmp_path):
    world = W.build(tmp_path / "world")
    run = tmp_path / "run"
    args = W.overrides(world, run, keep_checkpoints=0, steps=2, checkpoint_every=1,
                       **{"eval.every": 0, "eval.loss_users": 0, "eval.hr_users": 0})
    S.main(args)                                   # checkpoints at steps 1 and 2
    ck = run / "checkpoints"
    bad = ck / "step_000002" / "model.safetensors"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 3])
    shutil.rmtree(run / "final")                   # as if killed before the export

    p = _script(args)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"checkpoint {bad}: " in p.stderr and "skipped, trying the previous checkpoint" in p.stderr
    assert "resuming from step_000001, the newest intact checkpoint" in p.stderr
    assert f"resumed from {ck / 'step_000001'} at step 1" in (run / "log.txt").read_text()
    assert (run / "final" / "model.safetensors").is_file()

    # the rerun re-saved step 2; now cut every checkpoint: one line, no traceback
    for d in ck.glob("step_*"):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    shutil.rmtree(run / "final")
    p = _script(args)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "WARNING" not in ln]   # warnings: earlier lines
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(lines) == 1 and "no intact checkpoint (2 found; newest:" in lines[0], lines
    assert "step_000002/model.safetensors: 100 bytes, meta.json recorded" in lines[0]
