"""Checkpoints: N steps == N/2 + save + FRESH process + load + N/2 (bitwise); atomicity, keep-last, strict keys.

    pytest tests/test_checkpoint.py -q
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dist_worker as W
from twice import checkpoint as C
from twice.config import ConfigError
from twice.checkpoint import latest_checkpoint, load_checkpoint, load_latest, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
N = 6


# 1 thread here and in the resume subprocess: bitwise comparisons across processes need the same kernels
pytestmark = pytest.mark.usefixtures("one_thread")


def fresh(init_seed=0):
    model = W.build_model(lora=True, dropout=0.1, train_norms=True, init_seed=init_seed)
    return model, W.new_optimizer(model)


def test_exact_resume_in_a_fresh_process(tmp_path):
    # reference: N steps straight (LoRA dropout, numpy/python/torch/generator streams all drive the data)
    model, opt = fresh()
    gen = W.seed_streams(11)
    W.run_random(model, opt, 0, N, N, gen, {"rows_seen": 0})
    want = {k: v.clone() for k, v in model.state_dict().items()}

    # N/2 steps, save everything (full model, not just the adapters)
    model, opt = fresh()
    gen = W.seed_streams(11)
    data = {"rows_seen": 0}
    W.run_random(model, opt, 0, N // 2, N, gen, data)
    cfg = {"optim": {"lr": W.LR}, "seed": 11}
    path = save_checkpoint(tmp_path / "ckpt", N // 2, model, opt, data=data, config=cfg,
                           extra_generators={"rollout": gen})
    assert path == tmp_path / "ckpt" / f"step_{N // 2:06d}"
    meta = json.loads((path / "meta.json").read_text())
    assert (meta["step"], meta["data"], meta["config"], meta["world_size"]) == (N // 2, data, cfg, 1)
    assert (tmp_path / "ckpt" / "latest").read_text().strip() == path.name
    saved = load_file(path / "model.safetensors")
    assert set(saved) == set(model.state_dict()) and all(torch.equal(saved[k], v) for k, v in
                                                         model.state_dict().items())
    torch.load(path / "optim.pt", weights_only=True)  # no pickled code anywhere
    torch.load(path / "rng_rank0.pt", weights_only=True)

    # a new process: new objects from another seed, other RNG states; must finish bit-identical
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, str(ROOT / "tests" / "dist_worker.py"), "resume", str(out),
                        str(tmp_path / "ckpt"), str(N)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr[-4000:]
    got = load_file(out / "resumed.safetensors")
    assert json.loads((out / "resumed.json").read_text()) == {"step": N // 2, "data": {"rows_seen": 2 * N}}
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_resume_without_rng_restore_would_differ(tmp_path):
    """The exact-resume test can fail: skipping the RNG restore (only) changes the result."""
    model, opt = fresh()
    gen = W.seed_streams(11)
    W.run_random(model, opt, 0, N // 2, N, gen, {"rows_seen": 0})
    save_checkpoint(tmp_path, N // 2, model, opt, extra_generators={"rollout": gen})
    W.run_random(model, opt, N // 2, N, N, gen, {"rows_seen": 0})
    want = model.state_dict()

    m2, o2 = fresh(init_seed=5)
    g2 = W.seed_streams(99)
    orig = C.set_rng_state
    C.set_rng_state = lambda *a, **k: None
    try:
        st = load_latest(tmp_path, m2, o2, extra_generators={"rollout": g2})
    finally:
        C.set_rng_state = orig
    W.run_random(m2, o2, st["step"], N, N, g2, {"rows_seen": 0})
    assert any(not torch.equal(m2.state_dict()[k], want[k]) for k in want)


def test_fresh_run_and_keep_last(tmp_path):
    model, opt = fresh()
    assert load_latest(tmp_path / "nothing", model, opt) is None
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, model, opt, keep_last=2)
    assert [p.name for p in C.step_dirs(tmp_path)] == ["step_000003", "step_000004"]
    # re-saving an existing step replaces it (a resumed run passing the same step again)
    save_checkpoint(tmp_path, 4, model, opt, data={"again": True}, keep_last=2)
    assert load_latest(tmp_path, model, opt)["data"] == {"again": True}
    assert not list(tmp_path.glob(".tmp_*")) and not list(tmp_path.glob(".old_*"))


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    model, opt = fresh()
    save_checkpoint(tmp_path, 1, model, opt, data={"pos": 1})

    def dies(*a, **k):
        raise KeyboardInterrupt("killed mid-save")
    monkeypatch.setattr(C, "save_file", dies)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, opt, data={"pos": 2})
    monkeypatch.undo()
    assert (tmp_path / ".tmp_step_000002").exists() and not (tmp_path / "step_000002").exists()
    assert load_latest(tmp_path, model, opt)["data"] == {"pos": 1}
    # a step directory without meta.json (e.g. half-copied by hand) is never taken for complete; the next save
    # sweeps the stale temp dir
    (tmp_path / "step_000009").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_000001"
    save_checkpoint(tmp_path, 3, model, opt)
    assert not (tmp_path / ".tmp_step_000002").exists()
    # the pointer may lag (kill between rename and pointer update): the newest complete dir wins
    (tmp_path / "latest").write_text("step_000001\n")
    assert load_latest(tmp_path, model, opt)["step"] == 3


def test_bad_inputs_fail_clearly_before_writing(tmp_path):
    model, opt = fresh()
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 1, model, opt, data={"gen": torch.Generator()})  # not JSON
    assert not any(tmp_path.iterdir())
    path = save_checkpoint(tmp_path, 1, model, opt, extra_generators={"rollout": torch.Generator()})
    with pytest.raises(KeyError, match="generators"):
        load_checkpoint(path, model, opt, extra_generators={})
    other = W.build_model(lora=False)  # no adapters: the key table does not match
    with pytest.raises(KeyError, match="model.safetensors"):
        load_checkpoint(path, other, None)
    with pytest.raises(C.CheckpointError, match="step_000007/meta.json: missing"):
        load_checkpoint(tmp_path / "step_000007", model, opt)


def test_rewrite_metrics_drops_lines_after_the_checkpoint(tmp_path, capsys):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 3)) + '{"step": 4, "lo')
    C.rewrite_metrics(path, 2)
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2]
    assert "dropping a torn line" in capsys.readouterr().err
    C.rewrite_metrics(tmp_path / "absent.jsonl", 2)  # a fresh run dir: nothing to do
    assert not (tmp_path / "absent.jsonl").exists()


def _weights_after(model, opt, step):
    W.run_random(model, opt, step - 1, step, N, W.seed_streams(step), {"rows_seen": 0})
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_corrupt_latest_falls_back_to_the_newest_intact(tmp_path, capsys):
    """meta.json records every file's size and sha256; a truncated or altered file is named and skipped."""
    model, opt = fresh()
    saved = {}
    for step in (1, 2, 3):
        saved[step] = _weights_after(model, opt, step)
        save_checkpoint(tmp_path, step, model, opt, data={"step": step})
    meta = json.loads((tmp_path / "step_000003" / "meta.json").read_text())
    assert set(meta["files"]) == {"model.safetensors", "optim.pt", "rng_rank0.pt"}
    f3 = tmp_path / "step_000003" / "model.safetensors"
    assert meta["files"]["model.safetensors"]["bytes"] == f3.stat().st_size
    assert C.checkpoint_problem(tmp_path / "step_000003") is None

    # truncated (the case: a copy cut short) -> named, step 2 is loaded
    f3.write_bytes(f3.read_bytes()[: f3.stat().st_size // 2])
    m2, o2 = fresh(init_seed=3)
    st = load_latest(tmp_path, m2, o2)
    err = capsys.readouterr().err
    assert st["step"] == 2 and st["data"] == {"step": 2}
    assert all(torch.equal(m2.state_dict()[k], v) for k, v in saved[2].items())
    assert f"{tmp_path / 'step_000003' / 'model.safetensors'}: " in err and "recorded" in err
    assert "resuming from step_000002" in err

    # same size, one byte changed -> the hash catches it
    f2 = tmp_path / "step_000002" / "optim.pt"
    data = bytearray(f2.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f2.write_bytes(bytes(data))
    assert "optim.pt: sha256 differs" in C.checkpoint_problem(tmp_path / "step_000002")
    assert load_latest(tmp_path, m2, o2)["step"] == 1
    assert "step_000002/optim.pt: sha256 differs" in capsys.readouterr().err

    # asked for a bad one directly, or none intact: one CheckpointError naming the file (a ConfigError: the
    # scripts print it as one line)
    with pytest.raises(C.CheckpointError, match=r"step_000003/model.safetensors: \d+ bytes"):
        load_checkpoint(tmp_path / "step_000003", m2, o2)
    (tmp_path / "step_000001" / "rng_rank0.pt").unlink()
    with pytest.raises(C.CheckpointError, match=r"no intact checkpoint \(3 found; newest: .*step_000003/model"):
        load_latest(tmp_path, m2, o2)
    assert issubclass(C.CheckpointError, ConfigError)


def test_checkpoint_and_export_files_follow_the_umask(tmp_path):
    """safetensors/mkstemp/mkdtemp create 0600/0700; outputs get what open()/mkdir() give under the umask."""
    model, opt = fresh()
    old = os.umask(0o022)
    try:
        path = save_checkpoint(tmp_path / "ck", 1, model, opt)
        for f in path.iterdir():
            assert oct(f.stat().st_mode & 0o777) == oct(0o644), f
        assert oct(path.stat().st_mode & 0o777) == oct(0o755)
        out = C.export_hf(model, tmp_path / "final")     # the issue: final/ was 0700, model.safetensors 0600
        assert oct(out.stat().st_mode & 0o777) == oct(0o755)
        for f in out.iterdir():
            assert oct(f.stat().st_mode & 0o777) == oct(0o644), f
    finally:
        os.umask(old)


def test_export_keeps_the_source_dtype(tmp_path):
    """Trained in fp32 on CPU from a bf16 folder (Gemma-3 releases, our converted 270m): final/ is bf16 again (half the
    disk of the issue's fp32 folders), unless a dtype is asked for."""
    from twice.gemma3 import PRESETS, Gemma3
    torch.manual_seed(0)
    Gemma3.from_config(PRESETS["tiny"]).to(torch.bfloat16).save_pretrained(tmp_path / "src")
    model = Gemma3.from_pretrained(tmp_path / "src", dtype=torch.float32)
    assert C.source_dtype(model) == torch.bfloat16
    out = C.export_hf(model, tmp_path / "final")
    sd = load_file(out / "model.safetensors")
    assert {v.dtype for v in sd.values()} == {torch.bfloat16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    src = load_file(tmp_path / "src" / "model.safetensors")
    assert all(torch.equal(sd[k], src[k]) for k in src)   # bf16 -> fp32 -> bf16 is lossless
    sd32 = load_file(C.export_hf(model, tmp_path / "f32", dtype=torch.float32) / "model.safetensors")
    assert {v.dtype for v in sd32.values()} == {torch.float32}
    # a weight training changed below bf16's resolution stays fp32 (bf16 would round the update away); the rest bf16
    w = model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        w.add_(w.abs().max() * 1e-4)
    sdt = load_file(C.export_hf(model, tmp_path / "tuned") / "model.safetensors")
    changed = [k for k, v in sdt.items() if v.dtype == torch.float32]
    assert len(changed) == 1 and "layers.0.mlp.down_proj" in changed[0]
    assert torch.equal(sdt[changed[0]], w.detach())
    assert all(torch.equal(sdt[k], src[k]) for k in src if k != changed[0])
