"""SFT early stopping on the valid loss (train_sft.py, `eval.patience` / `eval.min_delta`), on the tiny world of
tests/sft_worker.py with a constant LR high enough that the valid T2 loss goes down, bounces and stops improving:

  - patience 2 stops where the rule applied by hand to the logged valid-loss curve says, and final/ holds the
    best eval's weights (== that step's checkpoint, != the last step's)
  - patience 0 (the default) is the old behaviour: every step runs, final/ is the last step, no best/ kept
  - a run killed mid-window (or right after saving a new best, before the checkpoint) resumes to the same stop
    step, the same metrics and bitwise the same final/
  - patience without the evals it watches is a config error

    pytest tests/test_sft_early_stop.py -q
"""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import sft_worker as W
import train_sft as S
from twice.config import ConfigError, parse_args
from twice.gemma3 import Gemma3
from twice.lora import apply_lora, load_lora_state_dict
from twice.tokenizer import Tokenizer

torch.set_num_threads(1)
CAP = 10
# eval after every step, no greedy decoding (only the loss matters here), a checkpoint per step to compare with;
# constant LR (min_lr_ratio 1) so the curve does not depend on the schedule's length
KW = {"steps": CAP, "eval.every": 1, "eval.hr_users": 0, "checkpoint_every": 1, "keep_checkpoints": 0,
      "optim.lr": 2e-2, "optim.min_lr_ratio": 1.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return W.build(tmp_path_factory.mktemp("sft_world"))


def run(world, run_dir, **kw) -> dict:
    return S.main(W.overrides(world, run_dir, **{**KW, **kw}))


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def expected_stop(losses: list[float], patience: int, min_delta: float) -> tuple[int, int]:
    """The rule by hand on a curve of one eval per step: -> (best step, stop step; 0 = ran to the end)."""
    best, best_step, bad = None, 0, 0
    for step, loss in enumerate(losses, 1):
        if best is None or loss < best - min_delta:
            best, best_step, bad = loss, step, 0
        else:
            bad += 1
            if bad == patience:
                return best_step, step
    return best_step, 0


@pytest.fixture(scope="module")
def no_stop(world, tmp_path_factory):
    """patience 0: the whole curve, a checkpoint of every step."""
    out = tmp_path_factory.mktemp("sft_nostop")
    run(world, out, **{"eval.patience": 0})
    return out


@pytest.fixture(scope="module")
def stopped(world, no_stop, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_stop")
    last = run(world, out, **{"eval.patience": 2})
    return out, last


def logits_of(world, model) -> torch.Tensor:
    tok = Tokenizer.from_pretrained(world["model"])
    x = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "red soft thing, item I3?"}])])
    with torch.no_grad():
        return model.eval()(x)


def adapters_at(world, run_dir, step) -> Gemma3:
    """The base model with the LoRA adapters of checkpoints/step_XXXXXX (unmerged)."""
    cfg = parse_args(S.SFTConfig, [str(Path(run_dir) / "config.yaml")])
    live = Gemma3.from_pretrained(world["model"])
    apply_lora(live, r=cfg.lora.r, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets), seed=cfg.seed)
    load_lora_state_dict(live, load_file(Path(run_dir) / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))
    return live


def test_stops_where_the_curve_stops_improving_and_exports_the_best_step(world, no_stop, stopped):
    curve = [r["eval/loss"] for r in read_metrics(no_stop)]
    assert len(curve) == CAP
    best, stop = expected_stop(curve, patience=2, min_delta=0.0)
    assert 1 < best < stop < CAP, (curve, best, stop)  # the curve must stop improving before the cap
    out, last = stopped
    m = read_metrics(out)
    assert [r["step"] for r in m] == list(range(1, stop + 1))  # stopped there, not at the cap
    assert [r["eval/loss"] for r in m] == curve[:stop]  # the same training up to the stop (patience only watches)
    assert [r["eval/best_step"] for r in m] == [expected_stop(curve[:s], 2, 0.0)[0] for s in range(1, stop + 1)]
    assert m[-1]["eval/bad_evals"] == 2 and m[-1]["eval/best_loss"] == min(curve[:stop])
    assert (last["best_step"], last["stopped_at"], last["best_loss"]) == (best, stop, min(curve[:stop]))
    assert m[-1] == last  # the summary is the last metrics line
    log = (out / "log.txt").read_text()
    assert f"early stop at step {stop}: no improvement > min_delta 0.0 for 2 evals; final = step {best}" in log
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*"))[-1] == f"step_{stop:06d}"
    assert [p.name for p in (out / "best").glob("step_*")] == [f"step_{best:06d}"]  # only the best kept
    # final/ is the best step's weights: the adapters of its checkpoint merged, not those of the last step
    final = logits_of(world, Gemma3.from_pretrained(out / "final"))
    at_best, at_stop = logits_of(world, adapters_at(world, out, best)), logits_of(world, adapters_at(world, out, stop))
    assert torch.allclose(final, at_best, atol=1e-5, rtol=0), (final - at_best).abs().max()
    assert (final - at_stop).abs().max() > 1e-3  # the last step differs: the comparison means something
    best_w = load_file(out / "best" / f"step_{best:06d}" / "model.safetensors")
    ckpt_w = load_file(no_stop / "checkpoints" / f"step_{best:06d}" / "model.safetensors")
    assert set(best_w) == set(ckpt_w) and all(torch.equal(best_w[k], ckpt_w[k]) for k in ckpt_w)


def test_patience_0_runs_every_step_and_exports_the_last(world, no_stop):
    m = read_metrics(no_stop)
    assert [r["step"] for r in m] == list(range(1, CAP + 1))
    assert not (no_stop / "best").exists()
    assert not any(k.startswith("eval/best") or k in ("best_step", "stopped_at") for r in m for k in r)
    meta = json.loads((no_stop / "checkpoints" / f"step_{CAP:06d}" / "meta.json").read_text())
    assert meta["data"] == {"cursor": CAP * 6}  # the training state is what it was before early stopping
    final = logits_of(world, Gemma3.from_pretrained(no_stop / "final"))
    last = logits_of(world, adapters_at(world, no_stop, CAP))
    assert torch.allclose(final, last, atol=1e-5, rtol=0), (final - last).abs().max()


@pytest.mark.parametrize("where", ["mid_window", "after_best_saved"])
def test_killed_run_resumes_to_the_same_stop_and_final(world, stopped, tmp_path, monkeypatch, where):
    """The kill comes inside the training checkpoint of step K (nothing of step K's checkpoint is written), so the
    run resumes from K - 1: K = stop (the resume starts with 1 bad eval in the window), or K = best (best/ already
    holds step K's weights while the checkpoint the run resumes from names an older best)."""
    ref, last = stopped
    kill = last["stopped_at"] if where == "mid_window" else last["best_step"]
    real = S.save_checkpoint

    def save_or_die(ckpt_dir, step, *a, **kw):
        if Path(ckpt_dir).name == "checkpoints" and step == kill:
            raise KeyboardInterrupt(f"killed in the checkpoint of step {step}")
        return real(ckpt_dir, step, *a, **kw)

    monkeypatch.setattr(S, "save_checkpoint", save_or_die)
    with pytest.raises(KeyboardInterrupt):
        run(world, tmp_path, **{"eval.patience": 2})
    assert not (tmp_path / "final").exists()
    state = json.loads((tmp_path / "checkpoints" / f"step_{kill - 1:06d}" / "meta.json").read_text())["data"]
    if where == "mid_window":
        assert state["early_stop"]["bad_evals"] == 1
    else:
        assert state["early_stop"]["best_step"] < kill and (tmp_path / "best" / f"step_{kill:06d}").is_dir()
    monkeypatch.setattr(S, "save_checkpoint", real)
    again = run(world, tmp_path, **{"eval.patience": 2})
    assert f"resumed from {tmp_path / 'checkpoints' / f'step_{kill - 1:06d}'}" in (tmp_path / "log.txt").read_text()
    drop = lambda r: {k: v for k, v in r.items() if not k.startswith(("time", "tokens_per_s", "peak_mem"))}
    assert [drop(r) for r in read_metrics(tmp_path)] == [drop(r) for r in read_metrics(ref)]
    assert (again["best_step"], again["stopped_at"]) == (last["best_step"], last["stopped_at"])
    a, b = load_file(tmp_path / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    assert [p.name for p in (tmp_path / "best").glob("step_*")] == [f"step_{last['best_step']:06d}"]
    # started once more, a finished early-stopped run does not train on past its stop
    run(world, tmp_path, **{"eval.patience": 2})
    assert [r["step"] for r in read_metrics(tmp_path)][-1] == last["stopped_at"]


def test_patience_needs_the_evals_it_watches(world):
    for bad in ({"eval.every": 0}, {"eval.loss_users": 0}, {"eval.min_delta": -0.1}):
        cfg = parse_args(S.SFTConfig, W.overrides(world, "/unused", **{"eval.patience": 2, **bad}))
        with pytest.raises(ConfigError, match="eval.patience"):
            S.check_config(cfg)
