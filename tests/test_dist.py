"""FSDP2 on 2 gloo ranks == 1 process; full-state-dict gather; unsharded(); FSDP checkpoint round trip; optim nouns.

    pytest tests/test_dist.py -q

One torchrun launch (module fixture) runs every 2-rank scenario of tests/dist_worker.py and writes its results;
the single-process references are computed here by the same functions.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file

import dist_worker as W
from twice import dist
from twice.checkpoint import load_checkpoint
from twice.optim import build_adamw, clip_grad_norm_, lr_at

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the gloo path under test, also on a GPU machine (one GPU cannot host 2 ranks)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "dist_worker.py"), "fsdp", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, f"torchrun worker failed:\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}"
    return out, json.loads((out / "results.json").read_text())


def assert_state_close(got: dict, want: dict, atol: float):
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], atol=atol, rtol=0), (k, (got[k] - want[k]).abs().max())


# ----------------------------------------------------------------------------------------------------------------
# 2 ranks vs 1 process

def test_full_state_dict_gather_equals_unwrapped(fsdp_run):
    out, _ = fsdp_run
    plain, gathered = load_file(out / "init_plain.safetensors"), load_file(out / "init_gathered.safetensors")
    here = W.build_model(lora=False).state_dict()  # and the worker built the same init as this process
    assert set(plain) == set(gathered) == set(here)
    for k in plain:
        assert torch.equal(gathered[k], plain[k]) and torch.equal(plain[k], here[k]), k


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_fsdp_two_ranks_equals_one_process(fsdp_run, kind):
    out, res = fsdp_run
    model = W.build_model(lora=kind == "lora", train_norms=True)
    losses, norms = W.run_fixed(model, W.N_FIXED)
    got_losses, got_norms = res[kind]
    assert all(n > W.MAX_NORM for n in norms), "clipping must be active for the test to mean anything"
    assert got_losses == pytest.approx(losses, rel=1e-5)
    assert got_norms == pytest.approx(norms, rel=1e-5)  # DTensor grad norm == full-gradient norm
    assert_state_close(load_file(out / f"{kind}_final.safetensors"), model.state_dict(), atol=1e-5)
    if kind == "lora":  # adapters gathered, loaded into another wrapped model, gathered again: unchanged
        adapters, reloaded = load_file(out / "lora_adapters.safetensors"), load_file(out / "lora_reloaded.safetensors")
        final = load_file(out / "lora_final.safetensors")
        assert set(adapters) == {k for k in final if k.endswith((".lora_A", ".lora_B"))} == set(reloaded)
        assert all(torch.equal(adapters[k], final[k]) and torch.equal(reloaded[k], final[k]) for k in adapters)
    # and the run moved the weights well beyond that tolerance
    init = W.build_model(lora=kind == "lora", train_norms=True).state_dict()
    assert max(float((model.state_dict()[k] - init[k]).abs().max()) for k in init) > 1e-3


def test_fsdp_export_hf_merges_lora(fsdp_run):
    out, _ = fsdp_run
    pytest.importorskip("twice.hf")
    from twice.gemma3 import Gemma3
    from twice.lora import merge_lora
    model = W.build_model(lora=True, train_norms=True)
    model.load_state_dict(load_file(out / "lora_final.safetensors"), strict=True)
    ids = W.fixed_batches(1)[0]
    model.eval()
    with torch.no_grad():
        want = model(ids)
        back = Gemma3.from_pretrained(out / "hf")
        assert set(back.state_dict()) == set(merge_lora(model).state_dict())  # original key names
        assert torch.allclose(back(ids), want, atol=1e-5, rtol=0)


def test_fsdp_stacked_lora_on_a_frozen_delta_equals_one_process(fsdp_run, tmp_path):
    """A LoRA stacked on a frozen lora_delta (twice/lora.py stack_on_delta) under FSDP2, 2 ranks: same losses, grad
    norms and adapters as one process; the delta is never a parameter (not sharded, not trained); the gathered
    export writes the same concatenated delta (rank 2 + 4) and merged weights as the one-process export."""
    from twice.checkpoint import export_hf
    from twice.hf import read_delta
    out, res = fsdp_run
    model = W.build_stacked()
    assert not any("delta" in n for n, _ in model.named_parameters())
    losses, norms = W.run_fixed(model, W.N_FIXED)
    got_losses, got_norms = res["stacked"]
    assert got_losses == pytest.approx(losses, rel=1e-5) and got_norms == pytest.approx(norms, rel=1e-5)
    assert_state_close(load_file(out / "stacked_final.safetensors"), model.state_dict(), atol=1e-5)
    here = export_hf(model, tmp_path / "hf")
    (d1, m1), (d2, m2) = read_delta(here), read_delta(out / "hf_stacked")
    assert m1["modules"] == m2["modules"] and set(m1["modules"].values()) == {6}
    for k in d1:
        torch.testing.assert_close(d2[k][0], d1[k][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(d2[k][1], d1[k][1], rtol=0, atol=1e-5)
    assert_state_close(load_file(out / "hf_stacked" / "model.safetensors"), load_file(here / "model.safetensors"),
                       atol=1e-5)


def test_unsharded_gathers_once_and_reshards(fsdp_run):
    _, res = fsdp_run
    u = res["unsharded"]
    assert u["max_diff"] == 0.0        # same logits as the normal per-block gather
    assert u["inside_plain"]           # full tensors inside, across ranks running different numbers of forwards
    assert u["after_sharded"]          # DTensor shards again on exit


def test_fsdp_checkpoint_exact_resume(fsdp_run):
    out, res = fsdp_run
    straight, resumed = load_file(out / "resume_straight.safetensors"), load_file(out / "resume_resumed.safetensors")
    assert set(straight) == set(resumed)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k  # bitwise: LoRA dropout + every RNG stream restored
    assert res["resume"]["step"] == W.N_RESUME // 2 and res["resume"]["config"] == {"run": "fsdp-test"}
    assert res["resume"]["ranks_raised_on_bad_keys"] == 2.0  # a mismatched key table fails on both ranks
    ck = out / "ckpt" / f"step_{W.N_RESUME // 2:06d}"
    assert sorted(p.name for p in ck.iterdir()) == ["meta.json", "model.safetensors", "optim.pt", "rng_rank0.pt",
                                                    "rng_rank1.pt"]
    assert all(k.endswith((".lora_A", ".lora_B")) for k in load_file(ck / "model.safetensors"))  # trainable only


def test_two_rank_checkpoint_loads_in_one_process(fsdp_run, capsys):
    """Weights and AdamW state are keyed by name, unsharded: a 2-rank checkpoint resumes on 1 process."""
    out, _ = fsdp_run
    ck = out / "ckpt" / f"step_{W.N_RESUME // 2:06d}"
    model = W.build_model(lora=True, dropout=0.1)
    opt = W.new_optimizer(model)
    meta = load_checkpoint(ck, model, opt, extra_generators={"rollout": torch.Generator()})
    assert "RNG streams not restored" in capsys.readouterr().out
    saved = load_file(ck / "model.safetensors")
    for n, p in model.named_parameters():
        if n in saved:
            assert torch.equal(p, saved[n]), n
    osd = torch.load(ck / "optim.pt", weights_only=True)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    by_param = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        assert torch.equal(st["exp_avg"], osd["state"][by_param[id(p)]]["exp_avg"])
    assert len(opt.state) == len(names) and meta["step"] == W.N_RESUME // 2
    assert meta["data"] == {"rows_seen": 2 * (W.N_RESUME // 2)}


# ----------------------------------------------------------------------------------------------------------------
# one process: the same code path with no process group

def test_single_process_is_world_size_one(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    info = dist.init_distributed()
    assert (info.rank, info.local_rank, info.world_size, info.is_main) == (0, 0, 1, True)
    if not torch.cuda.is_available():
        assert info.device == torch.device("cpu") and not dist.is_distributed()
        t = torch.tensor([3.0, 4.0])
        assert dist.all_reduce_sum(t) is t and t.tolist() == [3.0, 4.0]
        assert dist.all_reduce_mean(t).tolist() == [3.0, 4.0]
        dist.barrier()
        model = W.build_model(lora=False)
        assert dist.wrap_fsdp(model) is model and not dist.is_fsdp(model)
        with pytest.raises(RuntimeError, match="process group"):
            dist.wrap_fsdp(model, mixed_precision=True)
        with dist.unsharded(model):
            pass
        sd = dist.full_state_dict(model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in sd.items())


def test_seed_everything_covers_all_streams():
    import random
    import numpy as np
    dist.seed_everything(5)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    dist.seed_everything(5)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


# ----------------------------------------------------------------------------------------------------------------
# optim

def test_lr_schedule_golden_values():
    # lr=1, warmup 2, 7 steps, min ratio 0.1: warmup (s+1)/2, cosine over steps 2..6 (4 intervals), then min
    want = [0.5, 1.0, 1.0, 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.55, 0.1 + 0.45 * (1 + math.cos(3 * math.pi / 4)),
            0.1, 0.1, 0.1]
    got = [lr_at(s, 7, 2, 1.0, 0.1) for s in range(9)]
    assert got == pytest.approx(want, abs=1e-12)
    assert lr_at(0, 10, 0, 2.0, 0.0) == 2.0 and lr_at(9, 10, 0, 2.0, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_adamw_groups_decay_matrices_only():
    model = W.build_model(lora=True, train_norms=True)
    opt = build_adamw(model.named_parameters(), lr=1e-3, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(names[id(p)].endswith((".lora_A", ".lora_B")) for p in decay["params"])
    assert all(names[id(p)].endswith("norm.weight") for p in no_decay["params"])
    n_trainable = sum(p.requires_grad for p in model.parameters())
    assert len(decay["params"]) + len(no_decay["params"]) == n_trainable  # frozen base: not in the optimizer
    with pytest.raises(ValueError, match="no trainable"):
        build_adamw(nn.Linear(2, 2).requires_grad_(False).named_parameters(), lr=1e-3)


def test_clip_grad_norm_against_float64():
    torch.manual_seed(0)
    ps = [nn.Parameter(torch.randn(5, 3)), nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(2))]
    for p in ps[:2]:
        p.grad = torch.randn_like(p) * 3
    g64 = [p.grad.double().clone() for p in ps[:2]]
    total = math.sqrt(sum(float((g ** 2).sum()) for g in g64))
    norm = clip_grad_norm_(ps, 1.0)  # ps[2] has no grad: skipped, not an error
    assert float(norm) == pytest.approx(total, rel=1e-6)
    for p, g in zip(ps, g64):
        assert torch.allclose(p.grad.double(), g / total, atol=1e-6)
    before = [p.grad.clone() for p in ps[:2]]
    assert float(clip_grad_norm_(ps, 0.0)) == pytest.approx(1.0, rel=1e-5)  # measure only
    assert all(torch.equal(p.grad, b) for p, b in zip(ps, before))
