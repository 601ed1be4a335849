"""A fine-tune's folder carries the LoRA delta it merged (lora_delta.safetensors/.json, twice/hf.py): a bf16 load gets
the exact bf16 base back plus frozen fp32 adapters, instead of fp32 compute (or a bf16 cast that erases the update).

    python -m pytest -q tests/test_lora_delta.py            # the real-270m check: add  -m slow  (or nothing: CI skips)

Tolerance (tiny random Gemma-3, PRESETS["tiny"], as tests/test_precision.py): bf16 logits vs the fp32 merged model
  max |bf16+delta - fp32 merged| <= 0.05 * max |fp32 logit|               (measured 0.011-0.015 / 0.50-0.57, seeds 0-2)
and the reason for the feature: on a fine-tune whose update is below bf16's resolution per weight (every target
weight +-0.02, the update <= half a bf16 step there) but not per activation (adapters aligned with the layer inputs,
as a trained LoRA is), bf16+delta is closer to fp32 merged than the merged weights cast to bf16:
  rms error bf16+delta <= 0.92 * rms error naive bf16 cast               (measured 0.76-0.82, seeds 0-2)
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from twice import lora, precision
from twice.checkpoint import export_hf
from twice.gemma3 import PRESETS, Gemma3
from twice.hf import DELTA_FILE, DELTA_META, read_delta
from twice.lora import TARGETS, LoRALinear, apply_lora, delta_dense, lora_modules, merge_lora_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")
REAL = Path("~/.cache/twice/gemma-3-270m").expanduser()
LOGIT_REL = 0.05


def _targets(model):
    return {n: m for n, m in model.named_modules() if n.split(".")[-1] in TARGETS}


def _bf16_base(tmp_path, seed=0, flat=False) -> Path:
    """A tiny random Gemma-3 stored in bf16 (like Google's releases). flat: every target weight is +-0.02, so a
    bf16 step there is 2^-13 everywhere and a small update is below it in every entry."""
    torch.manual_seed(seed)
    m = Gemma3.from_config(PRESETS["tiny"])
    if flat:
        for n, mod in _targets(m).items():
            mod.weight.data = mod.weight.data.sign() * 0.02
    return m.to(torch.bfloat16).save_pretrained(tmp_path / "base")


def _trained(path, r=4, alpha=16, seed=1, scale_b=1e-3, dtype=torch.float32, aligned_ids=None):
    """Load `path` as training does (merged), add LoRA with nonzero B (a stand-in for training). aligned_ids: rows
    of A = the top right-singular vectors of each module's inputs on those ids (a trained adapter reads directions
    the inputs use), B = +-scale_b."""
    m = Gemma3.from_pretrained(path, dtype=dtype, delta="merged")
    g = torch.Generator().manual_seed(seed)
    xs = {}
    if aligned_ids is not None:
        hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: xs.__setitem__(n, i[0].reshape(-1, i[0].shape[-1])))
                 for n, mod in _targets(m).items()]
        with torch.no_grad():
            m(aligned_ids)
        for h in hooks:
            h.remove()
    apply_lora(m, r=r, alpha=alpha, seed=seed)
    for n, mod in m.named_modules():
        if isinstance(mod, LoRALinear):
            if aligned_ids is not None:
                mod.lora_A.data = torch.linalg.svd(xs[n].float(), full_matrices=False).Vh[:r].contiguous()
                mod.lora_B.data = torch.randn(mod.lora_B.shape, generator=g).sign() * scale_b
            else:
                mod.lora_B.data = torch.randn(mod.lora_B.shape, generator=g) * scale_b
    return m


def _adapters(model) -> dict:
    return {n: (m.lora_A.detach().clone(), m.lora_B.detach().clone() * m.scale) for n, m in model.named_modules()
            if isinstance(m, LoRALinear)}


def _weights(model) -> dict:
    return {k: v for k, v in model.state_dict().items() if not k.endswith((".lora_A", ".lora_B"))}


# ---------------------------------------------------------------------------------------------------- export

def test_export_writes_the_merged_delta(tmp_path):
    base = _bf16_base(tmp_path)
    m = _trained(base)
    want = _adapters(m)
    out = export_hf(m, tmp_path / "ft")
    meta = json.loads((out / DELTA_META).read_text())
    assert meta["base_dtype"] == "bfloat16" and meta["modules"] == {n: 4 for n in want}
    assert len(want) == 7 * PRESETS["tiny"].num_hidden_layers
    tensors = load_file(out / DELTA_FILE)
    for n, (A, B) in want.items():
        assert tensors[n + ".lora_A"].dtype == torch.float32 and torch.equal(tensors[n + ".lora_A"], A)
        assert torch.equal(tensors[n + ".lora_B"], B)             # [out, r], the scale (16/4) folded in
    # the merged weights are still a plain HF folder, base + B @ A (fp32 where the update is not bf16-exact)
    merged = Gemma3.from_pretrained(out, dtype=torch.float32)
    assert not lora_modules(merged)
    b = Gemma3.from_pretrained(base, dtype=torch.float32).state_dict()
    for n, (A, B) in want.items():
        assert torch.allclose(merged.state_dict()[n + ".weight"], b[n + ".weight"] + B @ A, atol=1e-7, rtol=0)


def test_export_in_bf16_writes_no_delta_and_a_reexport_removes_a_stale_one(tmp_path):
    m = _trained(_bf16_base(tmp_path))
    out = export_hf(m, tmp_path / "ft")
    assert (out / DELTA_FILE).is_file()
    export_hf(m, out, dtype=torch.bfloat16)   # the merged weights rounded: a delta would no longer describe them
    assert not (out / DELTA_FILE).exists() and not (out / DELTA_META).exists()
    assert read_delta(out) is None


# ---------------------------------------------------------------------------------------------------- load

def test_bf16_load_recovers_the_bf16_base_bit_exactly(tmp_path):
    base = _bf16_base(tmp_path)
    m = _trained(base)
    want = _adapters(m)
    out = export_hf(m, tmp_path / "ft")
    got = Gemma3.from_pretrained(out, dtype=torch.bfloat16)
    ref = Gemma3.from_pretrained(base, dtype=torch.bfloat16).state_dict()
    w = _weights(got)
    assert w.keys() == ref.keys() and all(torch.equal(w[k], ref[k]) for k in ref)
    frozen = {n: mod for n, mod in got.named_modules() if isinstance(mod, LoRALinear)}
    assert frozen.keys() == want.keys() and got.lora_delta_adapters
    for n, mod in frozen.items():
        assert mod.lora_A.dtype == torch.float32 and not mod.lora_A.requires_grad and not mod.lora_B.requires_grad
        assert torch.equal(mod.lora_A, want[n][0]) and torch.equal(mod.lora_B * mod.scale, want[n][1])
    with pytest.raises(ValueError, match="frozen lora_delta but is not in targets"):   # a delta the new LoRA would
        apply_lora(got, targets=("q_proj", "v_proj"))                                   # not cover: load merged
    # an fp32 "adapters" load holds the same exact bf16 base (FSDP2's fp32 masters of a stacked LoRA)
    w32 = _weights(Gemma3.from_pretrained(out, dtype=torch.float32, delta="adapters"))
    assert all(torch.equal(w32[k], ref[k].float()) for k in ref)
    # dtype float32 is the merged weights, as before
    assert not lora_modules(Gemma3.from_pretrained(out, dtype=torch.float32))


@pytest.mark.slow
def test_bf16_load_recovers_the_real_270m_base_bit_exactly(tmp_path):
    """The real bf16 Gemma-3-270m, LoRA r=8 alpha=16 on every target with a realistic update (most entries below
    bf16's resolution): every tensor of the bf16 load equals the released bf16 weights bit for bit."""
    if not (REAL / "model.safetensors").is_file():
        pytest.skip(f"{REAL} is absent")
    m = _trained(REAL, r=8, alpha=16, scale_b=1e-3)
    out = export_hf(m, tmp_path / "ft")
    del m
    got = _weights(Gemma3.from_pretrained(out, dtype=torch.bfloat16))
    ref = Gemma3.from_pretrained(REAL, dtype=torch.bfloat16).state_dict()
    bad = {k: int((got[k] != ref[k]).sum()) for k in ref if not torch.equal(got[k], ref[k])}
    assert not bad, bad


def test_bf16_delta_logits_match_fp32_merged_better_than_a_bf16_cast(tmp_path):
    base = _bf16_base(tmp_path, flat=True)
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    out = export_hf(_trained(base, r=4, alpha=4, scale_b=1e-4, aligned_ids=ids), tmp_path / "ft")
    with torch.no_grad():
        l32 = Gemma3.from_pretrained(out, dtype=torch.float32)(ids)
        l_delta = Gemma3.from_pretrained(out, dtype=torch.bfloat16)(ids).float()
        l_naive = Gemma3.from_pretrained(out, dtype=torch.bfloat16, delta="merged")(ids).float()  # today's cast
        l_base = Gemma3.from_pretrained(base, dtype=torch.float32)(ids)
    assert (l32 - l_base).abs().max() > 0.005                      # the fine-tune moves the logits
    assert (l_delta - l32).abs().max() <= LOGIT_REL * l32.abs().max()
    assert not torch.equal(l_delta, l32)                            # it did compute in bf16
    rms = lambda x: x.pow(2).mean().sqrt().item()  # noqa: E731
    assert rms(l_delta - l32) <= 0.92 * rms(l_naive - l32), (rms(l_delta - l32), rms(l_naive - l32))


# ---------------------------------------------------------------------------------------------------- two stages

def test_second_stage_export_concatenates_the_deltas(tmp_path):
    """GRPO trains a fresh LoRA on SFT's final/ (loaded merged): its export records base -> total, rank r1 + r2."""
    base = _bf16_base(tmp_path)
    m1 = _trained(base, r=4, alpha=16, seed=1)
    d1 = _adapters(m1)
    sft = export_hf(m1, tmp_path / "sft")
    m2 = _trained(sft, r=2, alpha=8, seed=2)                      # what train_grpo.build_policy does
    assert m2.lora_delta.keys() == d1.keys()
    d2 = _adapters(m2)
    grpo = export_hf(m2, tmp_path / "grpo")
    delta, meta = read_delta(grpo)
    assert meta["modules"] == {n: 6 for n in d1}
    for n in d1:
        A, B = delta[n]
        assert torch.equal(A[:4], d1[n][0]) and torch.equal(A[4:], d2[n][0])
        assert torch.allclose(delta_dense(A, B), d1[n][1] @ d1[n][0] + d2[n][1] @ d2[n][0], atol=1e-9, rtol=0)
    # the bf16 load of stage 2 is still the exact bf16 base + the total delta
    got = Gemma3.from_pretrained(grpo, dtype=torch.bfloat16)
    ref = Gemma3.from_pretrained(base, dtype=torch.bfloat16).state_dict()
    w = _weights(got)
    assert all(torch.equal(w[k], ref[k]) for k in ref)
    # and its merged weights are what training ended with (base + d1 + d2), to fp32 accuracy
    trained = merge_lora_state_dict(m2.state_dict(), m2.layers[0].self_attn.q_proj.scale)
    merged = Gemma3.from_pretrained(grpo, dtype=torch.float32).state_dict()
    assert all(torch.allclose(merged[k], trained[k].float(), atol=1e-6, rtol=0) for k in merged)


# ---------------------------------------------------------------------------------------------------- policy

def test_auto_picks_bf16_for_a_delta_folder_and_fp32_without_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "_logged", set())
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda *a: ["avx512_bf16"])
    m = _trained(_bf16_base(tmp_path))
    out = export_hf(m, tmp_path / "ft")
    assert precision.resolve_dtype("auto", "cpu", checkpoint=out, delta_adapters=True) == torch.bfloat16
    assert "lora_delta" in capsys.readouterr().out
    assert precision.weights_note(torch.bfloat16, out) == "bfloat16 base + float32 lora_delta (rank 4) unmerged"
    assert precision.weights_note(torch.float32, out) == "merged"
    # training loads merged (no stacking on a frozen delta): fp32 as before
    assert precision.resolve_dtype("auto", "cpu", checkpoint=out, delta_adapters=False) == torch.float32
    # a folder WITHOUT the delta file (an export from before, or a full fine-tune) behaves exactly as before
    (out / DELTA_FILE).unlink()
    (out / DELTA_META).unlink()
    assert precision.resolve_dtype("auto", "cpu", checkpoint=out, delta_adapters=True) == torch.float32
    assert precision.weights_note(torch.bfloat16, out) == "merged"
    plain = Gemma3.from_pretrained(out, dtype=torch.bfloat16)
    assert not lora_modules(plain) and not plain.lora_delta_adapters and not hasattr(plain, "lora_delta")
    raw = load_file(out / "model.safetensors")
    assert all(torch.equal(v, raw["model." + k].to(torch.bfloat16)) for k, v in plain.state_dict().items())


# ---------------------------------------------------------------------------------------------------- stacked LoRA
# Training on a delta folder (GRPO on SFT's final/): the bf16 load (exact bf16 base + frozen fp32 delta) with a new
# trainable LoRA stacked on it (twice/lora.py stack_on_delta) vs the fp32 merged path, same seeds.

def _sft_folder(tmp_path) -> Path:
    return export_hf(_trained(_bf16_base(tmp_path), r=4, alpha=16, seed=1, scale_b=2e-2), tmp_path / "sft")


def _grpo_step(model, ids, adv, opt, beta=0.04):
    """One GRPO update on fixed rollouts ids [B, T] (the prompt = first 3 tokens): policy logp, reference logp under
    lora_disabled (k3 KL, beta), twice.grpo.policy_loss, backward, AdamW step. -> (loss, {name: grad fp32})."""
    from twice.grpo import policy_loss
    from twice.lora import lora_disabled

    def logp_of(m):
        lp = torch.log_softmax(m(ids[:, :-1]).float(), -1)                      # [B, T-1, V]
        return lp.gather(-1, ids[:, 1:, None])[..., 0]                          # [B, T-1]
    with torch.no_grad(), lora_disabled(model):
        ref = logp_of(model)
    mask = torch.ones(ids.shape[0], ids.shape[1] - 1)
    mask[:, :2] = 0
    loss, _ = policy_loss(logp_of(model), None, adv, mask, ref_logp=ref, beta=beta)
    opt.zero_grad()
    loss.backward()
    g = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt.step()
    return loss.item(), g


def _policy(folder, dtype, delta):
    m = Gemma3.from_pretrained(folder, dtype=dtype, delta=delta)
    apply_lora(m, r=2, alpha=8, seed=3)
    return m, torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)


def test_stacked_lora_grpo_steps_match_the_fp32_merged_path(tmp_path):
    """Two GRPO steps (KL to the reference on) from the same seeds on SFT's folder: the fp32 merged weights + LoRA
    (today's path) vs the frozen delta + a stacked LoRA, in fp32 (the same function: equal to fp32 rounding) and in
    bf16 (the exact bf16 base; the new path under `auto`). Only the new A/B train (the delta is no parameter).
      fp32 stacked: every grad and updated adapter within 1e-5 of merged                 (measured 0 to print)
      bf16 stacked: step-1 grads max |g_bf16 - g_fp32| <= 0.05 * max |g_fp32|           (measured 0.021)
                    losses within 5% both steps"""
    sft = _sft_folder(tmp_path)
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    adv = torch.tensor([1.0, -0.5, 0.3, -0.8])
    runs = {}
    for name, dtype, delta in (("merged", torch.float32, "merged"), ("fp32", torch.float32, "adapters"),
                               ("bf16", torch.bfloat16, "adapters")):
        m, opt = _policy(sft, dtype, delta)
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert trainable == {n for n, _ in m.named_parameters() if n.endswith((".lora_A", ".lora_B"))}
        assert len(opt.param_groups[0]["params"]) == len(trainable) == 2 * len(lora_modules(m))
        steps = [_grpo_step(m, ids, adv, opt) for _ in range(2)]
        runs[name] = (steps, {n: p.detach().float().clone() for n, p in m.named_parameters() if p.requires_grad})
        if delta == "adapters":
            assert len(lora.frozen_deltas(m)) == len(lora_modules(m))       # it did stack on the frozen delta
            assert m.layers[0].self_attn.q_proj.weight.dtype == dtype
    (ref_steps, ref_w) = runs["merged"]
    init = {n: p.detach().float() for n, p in _policy(sft, torch.float32, "merged")[0].named_parameters()
            if p.requires_grad}
    assert max(float((ref_w[k] - init[k]).abs().max()) for k in ref_w) > 1e-3   # the adapters did move
    for (l0, g0), (l1, g1) in zip(ref_steps, runs["fp32"][0]):
        assert l1 == pytest.approx(l0, rel=1e-5)
        for k in g0:
            torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-5 * float(g0[k].abs().max()) + 1e-9)
    for k in ref_w:
        torch.testing.assert_close(runs["fp32"][1][k], ref_w[k], rtol=0, atol=1e-5)
    (l0, g0), (l1, g1) = ref_steps[0], runs["bf16"][0][0]
    scale = max(float(v.abs().max()) for v in g0.values())
    assert scale > 1e-6
    err = max(float((g1[k] - g0[k]).abs().max()) for k in g0)
    assert err <= 0.05 * scale, (err, scale)
    for (l0, _), (l1, _) in zip(ref_steps, runs["bf16"][0]):
        assert l1 == pytest.approx(l0, rel=0.05)


def test_reference_under_lora_disabled_is_the_delta_model_not_the_bare_base(tmp_path):
    """The GRPO reference policy (beta > 0) of a stacked LoRA is the SFT model: lora_disabled switches off only the
    new adapter; the frozen delta stays. Bit-equal to the bf16 + delta load's own forward."""
    from twice.lora import lora_disabled
    sft = _sft_folder(tmp_path)
    ids = torch.randint(0, PRESETS["tiny"].vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = Gemma3.from_pretrained(sft, dtype=torch.bfloat16, delta="adapters")(ids)
        bare = Gemma3.from_pretrained(tmp_path / "base", dtype=torch.bfloat16)(ids)
        m, _ = _policy(sft, torch.bfloat16, "adapters")
        for mod in lora_modules(m):
            mod.lora_B.data.normal_(0, 0.05)
        on = m(ids)
        with lora_disabled(m):
            off = m(ids)
    assert torch.equal(off, want)
    assert not torch.equal(off, bare) and not torch.equal(on, want)


def test_export_after_stacked_training_equals_the_merged_paths(tmp_path):
    """Same trained adapters on both paths: the stacked export (weights = bare base, frozen delta in buffers) writes
    the same folder as the merged one: delta = [SFT's; new] (rank 4 + 2), merged weights = base + total."""
    sft = _sft_folder(tmp_path)
    d1, _ = read_delta(sft)
    m32, _ = _policy(sft, torch.float32, "merged")
    m16, _ = _policy(sft, torch.bfloat16, "adapters")
    g = torch.Generator().manual_seed(4)
    for a, b in zip(lora_modules(m32), lora_modules(m16)):
        a.lora_B.data = torch.randn(a.lora_B.shape, generator=g) * 1e-2
        b.lora_B.data = a.lora_B.data.clone()
        assert torch.equal(a.lora_A, b.lora_A)      # same init on both paths (same generator order)
    e32, e16 = export_hf(m32, tmp_path / "e32"), export_hf(m16, tmp_path / "e16")
    (da, ma), (db, mb) = read_delta(e32), read_delta(e16)
    assert ma["modules"] == mb["modules"] == {k: 6 for k in d1}
    for k in d1:
        assert torch.equal(da[k][0], db[k][0]) and torch.equal(da[k][1], db[k][1])
        assert torch.equal(db[k][0][:4], d1[k][0]) and torch.equal(db[k][1][:, :4], d1[k][1])
    wa, wb = load_file(e32 / "model.safetensors"), load_file(e16 / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-7, msg=k)
    base = Gemma3.from_pretrained(tmp_path / "base", dtype=torch.float32).state_dict()
    merged = Gemma3.from_pretrained(e16, dtype=torch.float32).state_dict()
    for k, (A, B) in db.items():
        torch.testing.assert_close(merged[k + ".weight"], base[k + ".weight"] + delta_dense(A, B), rtol=0, atol=1e-6)
