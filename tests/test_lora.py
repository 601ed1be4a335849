"""LoRA: identity at init, only adapters train, merge == unmerged, disabled == base, save/load, HF export.

    pytest tests/test_lora.py -q
"""
import math

import pytest
import torch
import torch.nn as nn

from twice.gemma3 import PRESETS, Gemma3
from twice.lora import (TARGETS, LoRALinear, apply_lora, load_lora_state_dict, lora_disabled, lora_modules,
                        lora_state_dict, merge_lora, merge_lora_state_dict)


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(seed=0):
    torch.manual_seed(seed)
    return Gemma3.from_config(PRESETS["tiny"]).eval()


def randomize_B(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


IDS = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(5))


def test_lora_linear_matches_float64_formula():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    lin = LoRALinear(base, r=3, alpha=12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lin.lora_B.normal_()
    x = torch.randn(4, 6, dtype=torch.float64)
    W, b, A, B = (t.detach().double() for t in (base.weight, base.bias, lin.lora_A, lin.lora_B))
    want = x @ W.T + b + (12 / 3) * (x @ A.T) @ B.T
    assert torch.allclose(lin.double()(x), want, atol=1e-12)
    # A ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform a=sqrt(5)), B = 0 at init
    fresh = LoRALinear(nn.Linear(300, 4), r=64, alpha=16, generator=torch.Generator().manual_seed(1))
    assert fresh.lora_A.abs().max() <= 1 / math.sqrt(300) and fresh.lora_A.abs().max() > 0.9 / math.sqrt(300)
    assert torch.count_nonzero(fresh.lora_B) == 0
    assert fresh.weight is not None and not fresh.weight.requires_grad


def test_init_is_identity_and_only_adapters_train():
    base = tiny()
    want = base(IDS)
    model = apply_lora(tiny(), r=4, alpha=8)
    assert torch.equal(model(IDS), want)  # B = 0: bit-identical, not just close
    L = PRESETS["tiny"].num_hidden_layers
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * len(TARGETS) * L
    assert all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    # base key names unchanged: a pretrained state dict loads strictly into the LoRA model's non-adapter keys
    keys = set(model.state_dict())
    assert {k for k in keys if "lora_" not in k} == set(base.state_dict())
    # a gradient reaches every adapter (B from the loss, A once B != 0)
    randomize_B(model)
    model(IDS).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)


def test_same_seed_same_adapters_on_every_rank():
    a, b = apply_lora(tiny(), seed=3), apply_lora(tiny(), seed=3)
    torch.manual_seed(999)  # the global RNG must not matter (ranks may have diverged)
    c = apply_lora(tiny(), seed=3)
    for (n, p), (_, q), (_, r) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q) and torch.equal(p, r), n
    As = [m.lora_A for m in lora_modules(a)]
    assert not torch.equal(As[0], As[1])  # layers get different draws


def test_merged_forward_equals_unmerged():
    model = apply_lora(tiny(), r=4, alpha=16)
    randomize_B(model)
    want = model(IDS)
    sd_merged = merge_lora_state_dict(model.state_dict(), scale=16 / 4)
    merge_lora(model)
    assert not lora_modules(model) and all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert torch.allclose(model(IDS), want, atol=1e-5, rtol=0)
    assert set(model.state_dict()) == set(tiny().state_dict())  # original key names for save_pretrained
    for k, v in model.state_dict().items():  # the pure state-dict merge agrees with the in-place merge
        assert torch.equal(v, sd_merged[k]), k
    # and a plain model loaded from it reproduces the adapted outputs
    plain = tiny(seed=42)
    plain.load_state_dict(sd_merged, strict=True)
    assert torch.allclose(plain(IDS), want, atol=1e-5, rtol=0)


def test_lora_disabled_equals_base_and_restores():
    base = tiny()
    want_base = base(IDS)
    model = apply_lora(tiny(), r=4, alpha=8)
    randomize_B(model)
    adapted = model(IDS)
    assert not torch.allclose(adapted, want_base, atol=1e-4)
    with lora_disabled(model):
        assert torch.equal(model(IDS), want_base)
    assert torch.equal(model(IDS), adapted)
    with pytest.raises(RuntimeError):
        with lora_disabled(model):
            raise RuntimeError("boom")
    assert all(m.lora_enabled for m in lora_modules(model))


def test_dropout_only_in_training():
    model = apply_lora(tiny(), r=4, alpha=8, dropout=0.5)
    randomize_B(model)
    model.eval()
    a, b = model(IDS), model(IDS)
    assert torch.equal(a, b)
    model.train()
    torch.manual_seed(0)
    c = model(IDS)
    torch.manual_seed(1)
    d = model(IDS)
    assert not torch.allclose(c, d)


def test_lora_state_dict_roundtrip_and_strict_keys():
    src = apply_lora(tiny(), r=4, alpha=8)
    randomize_B(src)
    sd = lora_state_dict(src)
    assert sd and all(k.endswith((".lora_A", ".lora_B")) for k in sd)
    dst = apply_lora(tiny(), r=4, alpha=8, seed=7)
    load_lora_state_dict(dst, sd)
    assert torch.equal(dst(IDS), src(IDS))
    with pytest.raises(KeyError, match="missing"):
        load_lora_state_dict(dst, {k: v for k, v in sd.items() if "layers.0." not in k})
    with pytest.raises(ValueError, match="shape"):
        wrong = apply_lora(tiny(), r=2, alpha=8)
        load_lora_state_dict(wrong, sd)


def test_apply_lora_without_targets_is_an_error():
    with pytest.raises(ValueError, match="no nn.Linear"):
        apply_lora(tiny(), targets=("nope_proj",))


def test_export_hf_merges_adapters(tmp_path):
    pytest.importorskip("twice.hf")
    from twice.checkpoint import export_hf
    model = apply_lora(tiny(), r=4, alpha=8)
    randomize_B(model)
    want = model(IDS)
    out = export_hf(model, tmp_path / "hf")
    back = Gemma3.from_pretrained(out)
    assert torch.allclose(back(IDS), want, atol=1e-5, rtol=0)
    assert lora_modules(model)  # the training model is left as it was


def test_merge_keeps_an_update_bf16_cannot_represent():
    """A bf16 base + a small fp32 adapter update: the merged weight must not round the update away (it did: W + dW
    cast back to bf16 restored most entries to the base value). Changed weights stay fp32, untouched ones bf16."""
    model = apply_lora(tiny(), r=4, alpha=16).to(torch.bfloat16)
    for m in lora_modules(model):
        m.lora_A.data, m.lora_B.data = m.lora_A.float(), torch.full_like(m.lora_B, 1e-4, dtype=torch.float32)
    sd = model.state_dict()
    merged = merge_lora_state_dict(sd, scale=16 / 4)
    m0 = lora_modules(model)[0]
    name = next(n for n, m in model.named_modules() if m is m0) + ".weight"
    want = sd[name].double() + 4 * (m0.lora_B.double() @ m0.lora_A.double())
    assert merged[name].dtype == torch.float32
    assert (merged[name].double() - want).abs().max() < 1e-6          # the update is there, to fp32 accuracy
    assert (merged[name].bfloat16().double() - want).abs().max() > 1e-5  # what a bf16 cast would have lost
    untouched = [k for k in merged if "lora" not in k and k not in {n + ".weight" for n, m in model.named_modules()
                                                                    if m in lora_modules(model)}]
    assert untouched and all(merged[k].dtype == torch.bfloat16 for k in untouched if merged[k].is_floating_point())
