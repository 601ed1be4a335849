"""The Gemma-3 decoder itself: HF parity in memory, masks, left padding, the KV-cache protocol, the fused log-prob
path, activation checkpointing, meta-device construction. (Checkpoint-file parity: tests/test_hf.py.)

    pytest tests/test_gemma3.py -q
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from twice.gemma3 import FULL, PRESETS, SLIDING, Gemma3, Gemma3Config, build_mask

TINY = PRESETS["tiny"]


pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed=0, dtype=torch.float32, config=TINY):
    """Tiny model with random norm weights too (zero norms would hide (1 + w) bugs)."""
    torch.manual_seed(seed)
    m = Gemma3.from_config(config, std=0.05)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    return m.to(dtype).eval()


def ids_batch(B=2, T=13, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, TINY.vocab_size, (B, T), generator=g)


class FullCache:
    """Minimal reference cache implementing the protocol: keeps every slot, masks causality/window/padding."""

    def __init__(self, config: Gemma3Config, attention_mask=None):
        self.cfg, self.pad = config, attention_mask  # pad: [B, S_total] over every slot ever written, or None
        self.k, self.v, self.calls = {}, {}, []

    def update(self, layer_idx, k, v):  # k, v [B, KV, T, hd]
        self.calls.append((layer_idx, tuple(k.shape)))
        past = self.k[layer_idx].shape[2] if layer_idx in self.k else 0
        self.k[layer_idx] = k if past == 0 else torch.cat([self.k[layer_idx], k], 2)
        self.v[layer_idx] = v if past == 0 else torch.cat([self.v[layer_idx], v], 2)
        S = past + k.shape[2]
        q = torch.arange(past, S)[:, None]
        kv = torch.arange(S)[None, :]
        allowed = kv <= q
        if self.cfg.layer_types[layer_idx] == SLIDING:
            allowed = allowed & (kv > q - self.cfg.sliding_window)
        allowed = allowed[None, None]
        if self.pad is not None:
            allowed = allowed & self.pad[:, None, None, :S].bool()
        mask = torch.zeros(allowed.shape, dtype=k.dtype).masked_fill(~allowed, torch.finfo(k.dtype).min)
        return self.k[layer_idx], self.v[layer_idx], mask


# ---- reference parity in memory -------------------------------------------------------------------------------

def test_matches_transformers_eager_in_memory():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Gemma3TextConfig(
        vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=32, sliding_window=4,
        layer_types=TINY.layer_types, rope_theta=1e6, rope_local_base_freq=1e4,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=128)
    ours = random_model()
    hf = transformers.Gemma3ForCausalLM(cfg)
    hf.config._attn_implementation = "eager"
    hf.model.load_state_dict(ours.state_dict())  # same module tree, minus the "model." prefix
    hf.eval()
    ids = ids_batch()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding too: both sides build the same padded masks
    with torch.no_grad():
        for am in (None, mask):
            ref = hf(ids, attention_mask=am).logits
            assert (ours(ids, attention_mask=am) - ref).abs().max().item() <= 1e-5


def test_preset_sizes():
    with torch.device("meta"):
        assert Gemma3(PRESETS["gemma-3-1b"]).num_params() == 999_885_952  # the Hub / keras-hub count
        m27 = Gemma3(PRESETS["gemma-3-27b"])
    assert m27.layers[0].self_attn.q_proj.weight.shape == (32 * 128, 5376)
    assert [i for i, t in enumerate(PRESETS["gemma-3-4b"].layer_types) if t == FULL] == [5, 11, 17, 23, 29]
    c = PRESETS["gemma-3-270m"]
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.sliding_window, c.vocab_size) == (18, 640, 2048, 4, 1, 256, 512, 262144)


# ---- masks and padding ----------------------------------------------------------------------------------------

def test_sliding_mask_sees_itself_and_w_minus_1_previous():
    m = build_mask(None, 1, 6, 3, torch.float32, "cpu")[0, 0]  # [T, T]
    allowed = (m == 0).int()
    expected = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                             [0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
    assert torch.equal(allowed, expected)
    assert m.min().item() == torch.finfo(torch.float32).min  # never -inf


@pytest.mark.parametrize("explicit_positions", [False, True])
def test_left_padding_matches_unpadded_run(explicit_positions):
    m = random_model()
    ids = ids_batch(B=2, T=13)
    n_pad = 5
    padded = torch.cat([torch.zeros(1, n_pad, dtype=torch.long), ids[1:, :13 - n_pad]], 1)  # row 1: pads + 8 real
    batch = torch.stack([ids[0], padded[0]])
    mask = torch.ones_like(batch)
    mask[1, :n_pad] = 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0) if explicit_positions else None
    with torch.no_grad():
        out = m(batch, attention_mask=mask, position_ids=pos)
        solo = m(ids[1:, :13 - n_pad])
        alone0 = m(ids[:1])
    assert torch.isfinite(out).all()  # fully masked pad rows stay finite (finfo.min, not -inf)
    assert (out[1, n_pad:] - solo[0]).abs().max().item() <= 1e-5
    assert (out[0] - alone0[0]).abs().max().item() <= 1e-5


# ---- KV-cache protocol ----------------------------------------------------------------------------------------

def test_kv_cache_decode_matches_full_forward_past_the_window():
    m = random_model()
    ids = ids_batch(B=2, T=13)
    with torch.no_grad():
        full = m(ids)
        cache = FullCache(TINY)
        steps = [m(ids[:, :6], position_ids=torch.arange(6)[None].expand(2, 6), kv_cache=cache)]  # prefill > W
        for t in range(6, 13):  # decode one token at a time, well past the window of 4
            steps.append(m(ids[:, t:t + 1], position_ids=torch.full((2, 1), t), kv_cache=cache))
    assert (torch.cat(steps, 1) - full).abs().max().item() <= 1e-5
    # the protocol: one update per layer per forward, with [B, KV, T, hd] post-norm/RoPE keys
    assert cache.calls[:6] == [(i, (2, 2, 6, 24)) for i in range(6)] and cache.calls[6] == (0, (2, 2, 1, 24))


def test_kv_cache_with_left_padding_and_default_positions():
    """attention_mask [B, S] (S = cached + new slots) gives the default positions arange(S - T, S)."""
    m = random_model()
    ids = ids_batch(B=2, T=10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        full = m(ids, attention_mask=mask)
        cache = FullCache(TINY, attention_mask=mask)
        steps = [m(ids[:, :7], attention_mask=mask[:, :7], kv_cache=cache)]
        for t in range(7, 10):
            steps.append(m(ids[:, t:t + 1], attention_mask=mask[:, :t + 1], kv_cache=cache))
    got = torch.cat(steps, 1)
    assert (got[:, 3:] - full[:, 3:]).abs().max().item() <= 1e-5
    assert (got[1] - full[1]).abs().max().item() <= 1e-5


def test_kv_cache_without_positions_is_a_clear_error():
    m = random_model()
    with pytest.raises(ValueError, match="position_ids"):
        m(ids_batch(1, 3), kv_cache=FullCache(TINY))


# ---- outputs: hidden states and the fused log-prob path ------------------------------------------------------

def test_return_hidden_is_what_the_head_consumes():
    m = random_model()
    ids = ids_batch()
    with torch.no_grad():
        h = m(ids, return_hidden=True)
        assert h.shape == (2, 13, TINY.hidden_size)
        assert torch.equal(F.linear(h, m.embed_tokens.weight), m(ids))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_targets_path_equals_log_softmax_gather(temperature):
    pytest.importorskip("kernels")
    m = random_model()
    ids = ids_batch()
    targets = torch.roll(ids, -1, 1)
    targets[:, -1] = -100
    targets[0, :4] = -100  # e.g. prompt tokens
    valid = targets != -100

    logp, ent = m(ids, targets=targets, temperature=temperature, return_entropy=True)
    (logp.sum() + 0.1 * ent.sum()).backward()
    g_fused = m.embed_tokens.weight.grad.clone()
    m.zero_grad()

    ref_lsm = torch.log_softmax(m(ids).float() / temperature, -1)  # [B, T, V]
    ref = ref_lsm.gather(-1, targets.clamp_min(0)[..., None])[..., 0] * valid
    ref_ent = -(ref_lsm.exp() * ref_lsm).sum(-1) * valid
    (ref.sum() + 0.1 * ref_ent.sum()).backward()

    assert logp.dtype == torch.float32 and logp.shape == (2, 13)
    assert torch.equal(logp[~valid], torch.zeros_like(logp[~valid]))
    torch.testing.assert_close(logp, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g_fused, m.embed_tokens.weight.grad, atol=1e-5, rtol=1e-4)
    assert torch.equal(m(ids, targets=targets, temperature=temperature).detach(), logp.detach())


# ---- training plumbing ----------------------------------------------------------------------------------------

def test_gradient_checkpointing_same_grads_and_recomputes():
    m = random_model().train()
    ids = ids_batch()
    calls = []
    m.layers[2].register_forward_pre_hook(lambda *_: calls.append(1))  # pre: recompute may stop early

    def grads(ckpt):
        m.zero_grad(set_to_none=True)
        m.gradient_checkpointing = ckpt
        calls.clear()
        F.cross_entropy(m(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}, len(calls)

    plain, n_plain = grads(False)
    ckpt, n_ckpt = grads(True)
    assert (n_plain, n_ckpt) == (1, 2)  # checkpointing really re-ran the block in backward
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], atol=1e-7, rtol=0, msg=n)


def test_meta_build_then_init_weights():
    with torch.device("meta"):
        m = Gemma3(TINY)
    assert all(p.is_meta for p in m.parameters())  # nothing was allocated
    m.to_empty(device="cpu")
    m.init_weights(std=0.02)
    assert all(torch.count_nonzero(p) == 0 for n, p in m.named_parameters() if n.endswith("norm.weight"))
    w = m.layers[0].mlp.up_proj.weight
    assert 0.015 < w.std().item() < 0.025
    assert torch.isfinite(m(ids_batch(1, 5))).all()


def test_bf16_embedding_scale_cast_to_weight_dtype():
    """sqrt(48) = 6.928 is 6.9375 in bf16: HF multiplies by the bf16 value, so must we."""
    m = random_model(dtype=torch.bfloat16)
    ids = ids_batch(1, 4)
    x = m.embed_tokens(ids) * torch.tensor(6.9375, dtype=torch.bfloat16)
    h = m.layers[0].input_layernorm(x)
    seen = {}
    m.layers[0].input_layernorm.register_forward_hook(lambda mod, i, o: seen.setdefault("h", o))
    with torch.no_grad():
        m(ids)
    assert torch.equal(seen["h"], h)


def test_config_validation():
    with pytest.raises(ValueError, match="layer_types has 2 entries"):
        dataclasses.replace(TINY, layer_types=[SLIDING, FULL])
    with pytest.raises(ValueError, match="unknown kind"):
        dataclasses.replace(TINY, layer_types=["local"] * 6)
    assert Gemma3Config(num_hidden_layers=7, sliding_window_pattern=3).layer_types == [SLIDING, SLIDING, FULL] * 2 + [
        SLIDING]
