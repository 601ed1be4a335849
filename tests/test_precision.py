"""The precision policy (twice/precision.py): `dtype: auto` detection, bf16-vs-fp32 parity with stated tolerances,
fp32 trainable weights and optimizer state under bf16 compute, and `dtype: float32` really computing in fp32.

    python -m pytest -q tests/test_precision.py

Tolerances (tiny random Gemma-3, PRESETS["tiny"], init std 0.02: logits ~0.5 in size, 6 layers; bf16 has 8 bits of
mantissa, so one rounding is <= 2^-9 relative and ~20 chained ops give a few 1e-3):
  logits        max |bf16 - fp32| <= 0.05 * max |fp32 logit|         (measured 0.011 / 0.56 = 2%)
  log-probs     max |bf16 - fp32| <= 0.02 nats (log-probs ~ -6.2)     (measured 0.005)
  gradients     ||g_bf16 - g_fp32|| / ||g_fp32|| <= 0.10 over all trainable tensors, cosine >= 0.99
                                                                    (measured 0.031 / 0.9995 SFT LoRA step,
                                                                     0.030 / 0.9995 GRPO full-FT step)
Each parity test also asserts the bf16 run differs from fp32 (so it cannot pass by silently running fp32).
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from twice import precision  # noqa: E402
from twice.config import ConfigError  # noqa: E402
from twice.gemma3 import PRESETS, Gemma3, SharedPrefix  # noqa: E402
from twice.grpo import policy_loss  # noqa: E402
from twice.lora import LoRALinear, apply_lora  # noqa: E402
from twice.optim import build_adamw  # noqa: E402

torch.set_num_threads(1)
LOGIT_REL, LOGP_ATOL, GRAD_REL, GRAD_COS = 0.05, 0.02, 0.10, 0.99


# ---------------------------------------------------------------------------------------------------- policy

def test_cpu_flags_parsed_from_cpuinfo(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert precision.cpu_bf16_flags(str(f)) == ["avx512_bf16"]
    f.write_text("flags\t\t: fpu sse amx_bf16 avx512_bf16 amx_tile\n")
    assert precision.cpu_bf16_flags(str(f)) == ["amx_bf16", "avx512_bf16"]
    f.write_text("flags\t\t: fpu sse avx2\n")
    assert precision.cpu_bf16_flags(str(f)) == []
    assert precision.cpu_bf16_flags(str(tmp_path / "absent")) == []


def test_resolve_dtype_auto_follows_the_cpu_and_logs_once(monkeypatch, capsys):
    monkeypatch.setattr(precision, "_logged", set())
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda *a: ["avx512_bf16"])
    assert precision.resolve_dtype("auto", "cpu") == torch.bfloat16
    assert precision.resolve_dtype("auto", "cpu") == torch.bfloat16
    out = capsys.readouterr().out
    assert out.count("precision:") == 1 and "bfloat16" in out and "avx512_bf16" in out
    monkeypatch.setattr(precision, "_logged", set())
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda *a: [])
    assert precision.resolve_dtype("auto", "cpu") == torch.float32
    assert precision.resolve_dtype("float32", "cpu") == torch.float32
    assert precision.resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    with pytest.raises(ConfigError, match=r"model\.dtype: expected one of \['auto', 'bfloat16', 'float32'\]"):
        precision.resolve_dtype("fp32", "cpu", "model.dtype")


# ------------------------------------------------------------------------------------------------ LoRA, mixed dtypes

def test_lora_adapters_fp32_on_bf16_base_forward_and_grads():
    torch.manual_seed(0)
    base = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    lin = LoRALinear(base, r=4, alpha=8)
    assert lin.weight.dtype == torch.bfloat16 and lin.lora_A.dtype == lin.lora_B.dtype == torch.float32
    with torch.no_grad():
        lin.lora_B.normal_(std=0.05)
    x = torch.randn(5, 64).to(torch.bfloat16)
    y = lin(x)
    assert y.dtype == torch.bfloat16
    W, A, B, xd = (t.detach().double() for t in (lin.weight, lin.lora_A, lin.lora_B, x))
    ref = xd @ W.T + 2.0 * (xd @ A.T) @ B.T
    assert (y.double() - ref).abs().max() <= 0.02 * ref.abs().max()
    y.float().pow(2).sum().backward()
    assert lin.lora_A.grad.dtype == lin.lora_B.grad.dtype == torch.float32 and lin.weight.grad is None
    # the same adapters on an fp32 copy of the base: grads agree within bf16 tolerance
    lin32 = LoRALinear(torch.nn.Linear(64, 32, bias=False), r=4, alpha=8)
    with torch.no_grad():
        lin32.weight.copy_(lin.weight.float()), lin32.lora_A.copy_(lin.lora_A), lin32.lora_B.copy_(lin.lora_B)
    lin32(x.float()).pow(2).sum().backward()
    for a, b in ((lin.lora_A.grad, lin32.lora_A.grad), (lin.lora_B.grad, lin32.lora_B.grad)):
        assert (a - b).norm() / b.norm() <= GRAD_REL


# ---------------------------------------------------------------------------------------------------- model parity

@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    m32 = Gemma3.from_config(PRESETS["tiny"])
    return m32, copy.deepcopy(m32).to(torch.bfloat16)


def test_logits_and_logprobs_bf16_match_fp32(pair):
    m32, m16 = pair
    ids = torch.randint(3, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    x, tg = ids[:, :-1], ids[:, 1:].clone()
    tg[0, :5] = -100  # ignored positions stay exactly 0
    with torch.no_grad():
        l32, l16 = m32(x), m16(x)
        p32, p16 = m32(x, targets=tg), m16(x, targets=tg)
    assert l16.dtype == torch.bfloat16 and p16.dtype == torch.float32  # log-probs accumulate fp32
    d = (l16.float() - l32).abs().max()
    assert 0 < d <= LOGIT_REL * l32.abs().max(), (float(d), float(l32.abs().max()))
    dp = (p16 - p32).abs().max()
    assert 0 < dp <= LOGP_ATOL, float(dp)
    assert (p16[0, :5] == 0).all()
    # the log-probs are those of the bf16 logits (fp32 log_softmax of the same rounded hidden . W), not a cast of them
    ref = torch.log_softmax(l16.float(), -1).gather(-1, tg.clamp_min(0)[..., None])[..., 0].masked_fill(tg < 0, 0)
    assert (p16 - ref).abs().max() <= 0.02


def _grad_close(g16: dict, g32: dict):
    assert g16.keys() == g32.keys() and g16
    a = torch.cat([g32[k].float().flatten() for k in g32])
    b = torch.cat([g16[k].float().flatten() for k in g32])
    rel, cos = float((a - b).norm() / a.norm()), float(F.cosine_similarity(a, b, dim=0))
    assert 0 < rel <= GRAD_REL and cos >= GRAD_COS, (rel, cos)


def _lora_pair(pair):
    m32, m16 = (copy.deepcopy(m) for m in pair)
    for m in (m32, m16):
        apply_lora(m, r=4, alpha=8, seed=0)
    g = torch.Generator().manual_seed(2)
    for a, b in zip(m32.modules(), m16.modules()):
        if isinstance(a, LoRALinear):  # nonzero B so A gets a gradient too
            with torch.no_grad():
                b.lora_B.copy_(a.lora_B.copy_(torch.randn(a.lora_B.shape, generator=g) * 0.02))
    for m in (m32, m16):
        m.train()
        m.gradient_checkpointing = True
    return m32, m16


def test_sft_step_gradients_bf16_match_fp32(pair):
    """One SFT step (token-mean response NLL, LoRA r 4, activation checkpointing): fp32 adapters on the bf16 base
    get fp32 grads within tolerance of the all-fp32 step, and AdamW's state for them is fp32."""
    m32, m16 = _lora_pair(pair)
    ids = torch.randint(3, 512, (3, 20), generator=torch.Generator().manual_seed(3))
    x, tg = ids[:, :-1], ids[:, 1:].clone()
    tg[:, :8] = -100  # prompt tokens carry no loss
    grads = []
    for m in (m16, m32):
        loss = -m(x, targets=tg).sum() / (tg != -100).sum()
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.requires_grad})
    assert all(g.dtype == torch.float32 for g in grads[0].values())
    _grad_close(*grads)
    opt = build_adamw(m16, lr=1e-3)
    assert type(opt) is torch.optim.AdamW  # all trainable params are fp32: no master copies needed
    opt.step()
    assert all(v.dtype == torch.float32 for st in opt.state.values() for k, v in st.items() if k != "step")


def test_grpo_step_gradients_bf16_match_fp32(pair):
    """One GRPO step (shared-prefix forward, clipped policy loss with pi_old = pi, seq-mean-token-mean), full
    fine-tuning: the bf16 model's grads match fp32's; then one MasterAdamW step equals the fp32 AdamW step."""
    m32, m16 = (copy.deepcopy(m) for m in pair)
    G, K, P, Tc = 2, 3, 10, 6
    gen = torch.Generator().manual_seed(4)
    prompts = torch.randint(3, 512, (G, P), generator=gen)
    plen = torch.tensor([10, 7])
    comp = torch.randint(3, 512, (G * K, Tc), generator=gen)
    mask = torch.ones(G * K, Tc, dtype=torch.bool)
    mask[1, 4:] = False
    adv = torch.randn(G * K, generator=gen)
    grads = []
    for m in (m16, m32):
        m.train()
        m.gradient_checkpointing = True
        logp = m(comp, shared_prefix=SharedPrefix(prompts, plen, K), targets=comp.masked_fill(~mask, -100))
        loss, _ = policy_loss(logp, None, adv, mask, loss_norm="seq_mean_token_mean", max_len=Tc)
        assert loss.dtype == torch.float32
        loss.backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    _grad_close(*grads)
    # one optimizer step: bf16 params + MasterAdamW vs fp32 params + AdamW, on the fp32 grads rounded the same way
    opt16, opt32 = build_adamw(m16, lr=1e-2), build_adamw(m32, lr=1e-2)
    assert type(opt16) is precision.MasterAdamW and type(opt32) is torch.optim.AdamW
    for (n, p16), p32 in zip(m16.named_parameters(), m32.parameters()):
        p32.grad = p16.grad.float()  # same gradient: isolate the update math
        with torch.no_grad():
            p32.copy_(p16.float())
    opt16.step(), opt32.step()
    for (n, p16), p32 in zip(m16.named_parameters(), m32.parameters()):
        st = opt16.state[p16]
        assert st["master"].dtype == st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(st["master"], p32.detach()), n       # the fp32 master IS the fp32 trajectory
        assert torch.equal(p16.detach(), p32.detach().to(torch.bfloat16)), n  # the working copy is its rounding


# ---------------------------------------------------------------------------------------------------- MasterAdamW

def test_master_adamw_keeps_small_updates_and_resumes_exactly():
    """lr 1e-3 on weights in [1, 2): each AdamW update (<= lr) is below half of bf16's spacing there (2^-8 = 0.0039),
    so plain bf16 AdamW never moves the weight; MasterAdamW follows fp32 AdamW exactly, and a state_dict round trip
    (what checkpoints store) keeps the masters and moments fp32 (torch's load_state_dict would round them to the parameter's bf16)."""
    torch.manual_seed(0)
    w0 = 1.0 + torch.rand(8, 8)
    grads = [torch.randn(8, 8).to(torch.bfloat16).float() for _ in range(6)]  # the same values in bf16 and fp32

    def run(p, opt, gs):
        for g in gs:
            p.grad = g.to(p.dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)

    p32 = torch.nn.Parameter(w0.clone())
    run(p32, torch.optim.AdamW([p32], lr=1e-3), grads)
    pb = torch.nn.Parameter(w0.to(torch.bfloat16))
    run(pb, torch.optim.AdamW([pb], lr=1e-3), grads)
    assert torch.equal(pb.detach(), w0.to(torch.bfloat16))  # plain bf16 AdamW: every update rounded away
    pm = torch.nn.Parameter(w0.to(torch.bfloat16))
    opt = precision.MasterAdamW([pm], lr=1e-3)
    run(pm, opt, grads[:3])
    sd = copy.deepcopy(opt.state_dict())
    pm2 = torch.nn.Parameter(pm.detach().clone())
    opt2 = precision.MasterAdamW([pm2], lr=1e-3)
    opt2.load_state_dict(sd)
    assert all(v.dtype == torch.float32 for k, v in opt2.state[pm2].items() if k != "step")
    run(pm2, opt2, grads[3:])
    # master: w0 rounded to bf16 at the start, then exactly the fp32 updates
    p_ref = torch.nn.Parameter(w0.to(torch.bfloat16).float())
    run(p_ref, torch.optim.AdamW([p_ref], lr=1e-3), grads)
    assert torch.equal(opt2.state[pm2]["master"], p_ref.detach())
    assert not torch.equal(pm2.detach(), w0.to(torch.bfloat16))  # the bf16 weight did move
    assert torch.equal(pm2.detach(), p_ref.detach().to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------- scripts

@pytest.fixture(scope="module")
def sft_world(tmp_path_factory):
    import sft_worker
    return sft_worker.build(tmp_path_factory.mktemp("prec_sft"))


def _spy_matmul_dtypes(monkeypatch) -> set:
    """Record the dtype of every F.linear / torch.matmul input during a run (LoRA, attention, MLP, the engine)."""
    seen = set()
    lin, mm = F.linear, torch.matmul

    def linear(x, w, b=None):
        seen.add((x.dtype, w.dtype))
        return lin(x, w, b)

    def matmul(a, b, *args, **kw):
        seen.add((a.dtype, b.dtype))
        return mm(a, b, *args, **kw)
    monkeypatch.setattr(F, "linear", linear)
    monkeypatch.setattr(torch, "matmul", matmul)
    return seen


@pytest.mark.parametrize("dtype,flags,want", [("float32", ["avx512_bf16"], "float32"),
                                              ("auto", ["avx512_bf16"], "bfloat16"),
                                              ("auto", [], "float32")])
def test_train_sft_dtype_config_is_what_runs(sft_world, tmp_path, monkeypatch, dtype, flags, want):
    """`model.dtype: float32` computes every projection and attention matmul in fp32 even on a bf16-capable CPU;
    `auto` computes in bf16 there and in fp32 on a CPU without bf16; metrics.jsonl records which."""
    import sft_worker
    import train_sft
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda *a: flags)
    # the base model stored bf16, as Google ships it (an fp32-stored folder keeps fp32 under auto: see below)
    bf16_model = tmp_path / "model_bf16"
    Gemma3.from_pretrained(sft_world["model"], dtype=torch.bfloat16).save_pretrained(
        bf16_model, tokenizer_path=Path(sft_world["model"]) / "tokenizer.model")
    seen = _spy_matmul_dtypes(monkeypatch)
    run = tmp_path / "run"
    train_sft.main(sft_worker.overrides(sft_world, run, **{"model.dtype": dtype, "steps": 1, "checkpoint_every": 0,
                                                            "eval.hr_users": 1, "model.path": str(bf16_model)}))
    rec = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["compute_dtype"] for r in rec] == [want]
    activations = {a for a, _ in seen}
    assert activations == {getattr(torch, want)}, seen


def test_loading_fp32_weights_as_bf16_warns_when_values_change(tmp_path, capsys):
    """A merged fine-tune exported in fp32 loses its sub-resolution updates when a stage loads it in bf16: say so
    (with the fraction); a checkpoint whose fp32 values are all bf16-exact (the base model upcast) loads silently."""
    torch.manual_seed(0)
    m = Gemma3.from_config(PRESETS["tiny"])
    exact = copy.deepcopy(m).to(torch.bfloat16).to(torch.float32)
    exact.save_pretrained(tmp_path / "exact")
    m.save_pretrained(tmp_path / "fp32")
    capsys.readouterr()
    Gemma3.from_pretrained(tmp_path / "exact", dtype=torch.bfloat16)
    assert "WARNING" not in capsys.readouterr().err
    Gemma3.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    err = capsys.readouterr().err
    assert "WARNING" in err and "float32 weights change when loaded as bfloat16" in err
    Gemma3.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    assert "WARNING" not in capsys.readouterr().err


def test_auto_never_rounds_stored_float32_weights(tmp_path, monkeypatch, capsys):
    """`auto` on a bf16 CPU computes a bf16-stored folder (the base model) in bf16, but a folder that stores float32
    tensors (a merged fine-tune, twice.lora.cast_if_exact) in float32: bf16 would round the update away."""
    monkeypatch.setattr(precision, "_logged", set())
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda *a: ["avx512_bf16"])
    torch.manual_seed(0)
    m = Gemma3.from_config(PRESETS["tiny"])
    m.save_pretrained(tmp_path / "tuned")                      # float32 tensors
    m.to(torch.bfloat16).save_pretrained(tmp_path / "base")    # (Module.to is in place)
    assert precision.resolve_dtype("auto", "cpu", checkpoint=tmp_path / "base") == torch.bfloat16
    assert precision.resolve_dtype("auto", "cpu", checkpoint=tmp_path / "tuned") == torch.float32
    assert "bf16 would round them" in capsys.readouterr().out
    assert precision.resolve_dtype("bfloat16", "cpu", checkpoint=tmp_path / "tuned") == torch.bfloat16  # forced
