"""Gemma-3 text decoder (270m / 1B / 4B / 12B / 27B), written to match HF `Gemma3ForCausalLM` (eager) exactly.

    python -c "import torch; from twice.gemma3 import Gemma3, PRESETS; \
               m = Gemma3.from_config(PRESETS['tiny']); print(m(torch.tensor([[2, 5, 7]])).shape)"

Every rule below is checked against transformers' eager Gemma3ForCausalLM (tests/test_hf.py):
  - RMSNorm multiplies by (1 + w) in fp32 and casts afterwards; four norms per block ("sandwich") + q_norm, k_norm.
  - QK-norm over head_dim before RoPE; two RoPE tables: local (theta 1e4) and global (theta 1e6, linear scaling).
  - Scores scaled by query_pre_attn_scalar**-0.5 (not head_dim**-0.5), GQA, masks use finfo.min (never -inf).
  - Multi-token attention (prefill, training, shared prefix) runs torch's scaled_dot_product_attention (flash /
    memory-efficient kernels: no [B, H, T, S] score tensor); attn_implementation="eager" keeps the materialised
    path that is bit-exact with transformers' eager attention (fp32 max|diff| ~1e-7 between the two).
  - GeGLU with tanh-GELU; embeddings scaled by sqrt(hidden) cast to the weight dtype; LM head tied to embeddings.
Checkpoint I/O lives in twice/hf.py (`Gemma3.from_pretrained`, `model.save_pretrained` are thin wrappers).
Imports are one-way: this file imports torch at import time; `kernels` (fused log-probs) and twice.hf (checkpoint
files) are imported only when used, and neither imports this module back. No distributed code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

SLIDING, FULL = "sliding_attention", "full_attention"
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")  # Gemma3Config.attn_implementation / set_attn_implementation; the training
                                          #   scripts' model.attn_implementation is checked against it


# ----------------------------------------------------------------------------------------------------------------
# Config

@dataclass
class Gemma3Config:
    """Text decoder hyper-parameters; names are HF `Gemma3TextConfig` names so config.json maps 1:1."""
    vocab_size: int = 262144            # 262144 on 270m/1B, 262208 on 4B+ (size logits by this, not the tokenizer)
    hidden_size: int = 1152             # D (model width)
    intermediate_size: int = 6912       # I (GeGLU width)
    num_hidden_layers: int = 26         # L
    num_attention_heads: int = 4        # H (query heads)
    num_key_value_heads: int = 1        # KV heads (GQA: each serves H // KV query heads)
    head_dim: int = 256                 # hd; H * hd may differ from D (1B: 1024 vs 1152)
    query_pre_attn_scalar: float = 256  # scores are scaled by this ** -0.5 (27B: 168 != head_dim 128)
    sliding_window: int = 512           # W: a local layer's query sees itself and the W-1 previous slots
    sliding_window_pattern: int = 6     # only used to fill layer_types when absent: every 6th layer is global
    layer_types: list[str] | None = None  # per layer "sliding_attention" | "full_attention" (None -> from pattern)
    rope_theta: float = 1e6             # RoPE base of the global (full-attention) layers
    rope_local_base_freq: float = 1e4   # RoPE base of the sliding layers (never scaled)
    rope_scaling_factor: float = 1.0    # linear RoPE scaling of the global layers (8.0 on 4B+)
    rms_norm_eps: float = 1e-6          # RMSNorm epsilon
    max_position_embeddings: int = 32768  # informational (no dynamic RoPE); written to config.json
    final_logit_softcapping: float | None = None  # null for every Gemma-3 release; kept so odd configs still match
    pad_token_id: int = 0               # <pad>
    bos_token_id: int = 2               # <bos>
    eos_token_id: int | list[int] = 1   # <eos>; -it checkpoints list [1, 106] (<end_of_turn>)
    attn_implementation: str = "sdpa"   # ATTN_IMPLEMENTATIONS: "sdpa" (fused kernels, default) | "eager" (materialised
                                        #   scores, HF-exact)

    def __post_init__(self):
        if not self.layer_types:
            p = self.sliding_window_pattern
            self.layer_types = [SLIDING if (i + 1) % p != 0 else FULL for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries, num_hidden_layers is "
                             f"{self.num_hidden_layers}")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"layer_types: unknown kind(s) {bad}; expected '{SLIDING}' or '{FULL}'")
        if self.attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation {self.attn_implementation!r}: expected 'sdpa' or 'eager'")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads {self.num_key_value_heads}")


_BIG = dict(vocab_size=262208, sliding_window=1024, rope_scaling_factor=8.0, max_position_embeddings=131072)
PRESETS: dict[str, Gemma3Config] = {  # copy before editing: dataclasses.replace(PRESETS[name], ...)
    "gemma-3-270m": Gemma3Config(hidden_size=640, intermediate_size=2048, num_hidden_layers=18),
    "gemma-3-1b": Gemma3Config(),
    "gemma-3-4b": Gemma3Config(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                               num_attention_heads=8, num_key_value_heads=4, **_BIG),
    "gemma-3-12b": Gemma3Config(hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
                                num_attention_heads=16, num_key_value_heads=8, **_BIG),
    "gemma-3-27b": Gemma3Config(hidden_size=5376, intermediate_size=21504, num_hidden_layers=62,
                                num_attention_heads=32, num_key_value_heads=16, head_dim=128,
                                query_pre_attn_scalar=168, **_BIG),
    # Random CPU model for tests/CI (tests/test_hf.py): GQA, H*hd != D, query_pre_attn_scalar != head_dim, window 4,
    # local theta != global theta, linear scaling, sqrt(48) inexact in bf16.
    "tiny": Gemma3Config(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=32,
                         sliding_window=4, sliding_window_pattern=3, rope_scaling_factor=8.0,
                         max_position_embeddings=128),
}


# ----------------------------------------------------------------------------------------------------------------
# Small pure pieces

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))  # zero-centred: the scale is (1 + w)

    def forward(self, x):
        # fp32 throughout and cast at the end: Gemma casts (x*w), Llama casts x then multiplies (differs in bf16).
        # F.rms_norm is one fused kernel on CUDA (aten::_fused_rms_norm) instead of ~8 launches; on CPU torch 2.13
        # decomposes it into the same pow/mean/add/rsqrt/mul in the same order as transformers, so logits stay
        # bit-identical there (tests/test_gemma3.py). (1 + w) is handed in as its weight: x * rstd * (1 + w), fp32.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float() + 1.0, self.eps).to(x.dtype)


def rope_cos_sin(position_ids, head_dim: int, theta: float, factor: float, dtype):
    """cos, sin [B, T, hd] in `dtype`, computed in fp32 from positions (no cached tables: meta-init friendly)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).float()
                                / head_dim))  # [hd/2]
    inv_freq = inv_freq / factor  # linear scaling == dividing positions by `factor`
    freqs = position_ids.float()[..., None] * inv_freq  # [B, T, hd/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, hd]: half-split ("NeoX") pairing
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x, cos, sin):
    # x [B, H, T, hd]; cos/sin [B, T, hd] -> broadcast over heads
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


CAUSAL = "causal"  # mask-slot value: plain causal attention over T == S keys (SDPA's is_causal, no mask tensor)


def attend(q, k, v, mask, scale: float, sdpa: bool = True):
    """q [B, H, T, hd], k/v [B, KV, S, hd], mask [B|1, 1, T, S] additive (or CAUSAL) -> [B, T, H*hd].

    sdpa: torch's fused attention (flash on CPU and CUDA, memory-efficient with a mask on CUDA; GQA as in
    sdpa_gqa); scores never exist as a tensor. Single-token decode keeps the grouped matmul below (one query: no
    score tensor to save, and it is the shape the KV-cache decode loop is tuned for)."""
    if sdpa and q.shape[2] > 1:
        causal = isinstance(mask, str)  # CAUSAL
        o = sdpa_gqa(q, k, v, None if causal else mask, scale, causal)  # [B, H, T, hd]
        return o.transpose(1, 2).flatten(2)
    if isinstance(mask, str):
        mask = build_mask(None, 1, q.shape[2], None, q.dtype, q.device)
    return attend_eager(q, k, v, mask, scale)


def sdpa_gqa(q, k, v, mask, scale: float, causal: bool = False):
    """F.scaled_dot_product_attention with GQA (q [.., H, T, hd], k/v [.., KV, S, hd]) on a fused kernel.

    CPU: the flash kernel takes GQA and a mask natively. CUDA: flash takes GQA but no mask and only bf16/fp16, the
    memory-efficient kernel takes a mask but not GQA, and anything else silently falls back to the math kernel
    (materialised scores). So with a mask or fp32 on CUDA the K/V heads are expanded first (HF's repeat_kv order):
    a zero-stride view when KV = 1 (270m, 1B), a copy otherwise (4B+). bench/gpu.py reports the kernel each call
    lands on."""
    H, KV = q.shape[-3], k.shape[-3]
    gqa = H != KV
    if gqa and q.is_cuda and (mask is not None or q.dtype == torch.float32):
        k, v, gqa = repeat_kv(k, H // KV), repeat_kv(v, H // KV), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=gqa)


def repeat_kv(x, n: int):
    """[.., KV, S, hd] -> [.., KV*n, S, hd]: kv head j serves query heads j*n .. j*n+n-1 (HF repeat_kv); a view
    (stride 0 over the heads) when KV = 1."""
    return x.unsqueeze(-3).expand(*x.shape[:-2], n, *x.shape[-2:]).flatten(-4, -3)


def attend_eager(q, k, v, mask, scale: float):
    """Eager attention exactly as HF: q [B, H, T, hd], k/v [B, KV, S, hd], mask [B|1, 1, T, S] additive -> [B, T, H*hd].

    Scores in the model dtype, + mask, softmax in fp32 then cast back (bit-exact with transformers' eager path)."""
    B, H, T, hd = q.shape
    KV, S = k.shape[1], k.shape[2]
    if H != KV and T == 1:  # cached decode: group the G query heads of each kv head instead of copying the cache
        G = H // KV          # (expanding K/V copies the whole cache every step: 3x slower decode at K=16 on CPU)
        s = (torch.matmul(q.reshape(B, KV, G, hd), k.transpose(2, 3)) * scale).view(B, KV, G, S)
        if mask is not None:
            s = s + mask.view(mask.shape[0], 1, 1, S)  # [B|1, 1, 1, S]
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(p, v).reshape(B, 1, H * hd)  # [B, KV, G, hd] -> heads in order j*G + g
    if H != KV:  # GQA: kv head j serves query heads j*G .. j*G+G-1 (same expand+reshape as HF repeat_kv)
        k = k[:, :, None].expand(B, KV, H // KV, S, hd).reshape(B, H, S, hd)
        v = v[:, :, None].expand(B, KV, H // KV, S, hd).reshape(B, H, S, hd)
    s = torch.matmul(q, k.transpose(2, 3)) * scale  # [B, H, T, S]
    if mask is not None:
        s = s + mask
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(p, v).transpose(1, 2).reshape(B, T, H * hd)


def build_mask(attention_mask, B: int, T: int, window: int | None, dtype, device):
    """Additive mask [B|1, 1, T, T] for a cache-less forward: causal, optional sliding window, key padding.

    Indices are slots (pads included), not position_ids. Sliding: key k visible from query q iff q-W < k <= q."""
    q = torch.arange(T, device=device)[:, None]
    k = torch.arange(T, device=device)[None, :]
    allowed = k <= q  # [T, T]
    if window is not None:
        allowed = allowed & (k > q - window)
    allowed = allowed[None, None]  # [1, 1, T, T]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()  # [B, 1, T, T]
    # finfo.min, not -inf: fully masked pad rows stay finite (uniform softmax) instead of NaN that leaks later
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


# ----------------------------------------------------------------------------------------------------------------
# Modules (tree mirrors HF's minus the "model." prefix, so the checkpoint key table is trivial)

class Attention(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.sliding = cfg.layer_types[layer_idx] == SLIDING
        self.H, self.KV, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar ** -0.5
        self.sdpa = cfg.attn_implementation == "sdpa"
        D = cfg.hidden_size
        self.q_proj = nn.Linear(D, self.H * self.hd, bias=False)
        self.k_proj = nn.Linear(D, self.KV * self.hd, bias=False)
        self.v_proj = nn.Linear(D, self.KV * self.hd, bias=False)
        self.o_proj = nn.Linear(self.H * self.hd, D, bias=False)
        self.q_norm = RMSNorm(self.hd, cfg.rms_norm_eps)  # one [hd] weight shared by all heads
        self.k_norm = RMSNorm(self.hd, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.H, self.hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, self.KV, self.hd).transpose(1, 2)  # [B, KV, T, hd]
        v = self.v_proj(x).view(B, T, self.KV, self.hd).transpose(1, 2)  # [B, KV, T, hd]
        q, k = self.q_norm(q), self.k_norm(k)  # QK-norm BEFORE RoPE; v is not normalised
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is not None:  # the cache owns slots, window and padding: it hands back keys + the mask
            k, v, mask = kv_cache.update(self.layer_idx, k, v)  # [B, KV, S, hd] x2, [B, 1, T, S]
        if isinstance(mask, SharedPrefixLayout):  # packed prompt+completions stream (training only, see below)
            return self.o_proj(attend_shared_prefix(q, k, v, mask, self.sliding, self.scale, self.sdpa))  # [1, N, D]
        if isinstance(mask, PromptFanout):  # decode rows over their prompt's shared cache (twice/engine.py)
            return self.o_proj(attend_prompt_fanout(q, k, v, mask, self.scale))  # [N, 1, D]
        return self.o_proj(attend(q, k, v, mask, self.scale, self.sdpa))  # [B, T, D]


class MLP(nn.Module):
    def __init__(self, cfg: Gemma3Config):
        super().__init__()
        D, I = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(D, I, bias=False)
        self.up_proj = nn.Linear(D, I, bias=False)
        self.down_proj = nn.Linear(I, D, bias=False)

    def forward(self, x):  # GeGLU: the gate goes through tanh-GELU
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: Gemma3Config, layer_idx: int):
        super().__init__()
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(D, eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(D, eps)
        self.pre_feedforward_layernorm = RMSNorm(D, eps)
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(D, eps)
        self.compiled = None  # torch.compile(self.sandwich), set by Gemma3.compile_blocks

    def forward(self, x, cos, sin, mask, kv_cache=None):
        if kv_cache is None and self.compiled is not None:  # training shapes only: decoding stays eager
            return self.compiled(x, cos, sin, mask)
        return self.sandwich(x, cos, sin, mask, kv_cache)

    def sandwich(self, x, cos, sin, mask, kv_cache=None):
        # "sandwich" norms: each sub-block's OUTPUT is normalised before the residual add
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3(nn.Module):
    config_class = Gemma3Config  # what twice.hf builds from config.json (it never imports this module)

    def __init__(self, config: Gemma3Config):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False  # per-block activation checkpointing (training only)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def compile_blocks(self):
        """torch.compile each decoder block's cache-free forward (training and scoring; decoding with a KV cache
        stays eager). Why: on a GPU the eager SFT step is launch-bound (Gemma-3-1B, T = 4,096 on an H100: 246 ms of
        CPU for 130 ms of kernels, MFU 18%); compiled blocks fuse the norms, casts and RoPE: MFU 26%, 1.47x
        (bench/gpu.py, sft rows). Module hooks (FSDP2's unshard/reshard) and activation checkpointing stay outside
        the compiled function. Call after LoRA and before FSDP wrapping; a deepcopy of the model shares the
        compiled functions of the original, so copy first. -> self"""
        for layer in self.layers:
            layer.compiled = torch.compile(layer.sandwich)
        return self

    # ---- construction ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, std: float = 0.02):
        """Random init for tiny/test models: N(0, std) for embeddings and projections, norm weights 0 (scale 1)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, mean=0.0, std=std)
            elif isinstance(m, RMSNorm):
                nn.init.zeros_(m.weight)

    @classmethod
    def from_config(cls, config: Gemma3Config, dtype=torch.float32, device="cpu", std: float = 0.02):
        """A randomly initialised model, built on the meta device first so nothing is allocated twice."""
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device=device)
        model.init_weights(std)
        return model.to(dtype)

    @classmethod
    def from_pretrained(cls, path, dtype=torch.float32, device="cpu", delta: str = "auto"):
        """delta: how a folder's lora_delta is loaded (twice.hf.from_pretrained): auto | adapters | merged."""
        from twice.hf import from_pretrained  # lazy: importing the model needs no safetensors
        return from_pretrained(cls, path, dtype=dtype, device=device, delta=delta)

    def set_attn_implementation(self, impl: str) -> "Gemma3":
        """"sdpa" (default: fused kernels) or "eager" (materialised scores, bit-exact with transformers' eager)."""
        # a new config object: the old one may be shared (PRESETS, other models built from it)
        self.config = dataclasses.replace(self.config, attn_implementation=impl)  # validates the name
        for layer in self.layers:
            layer.self_attn.sdpa = impl == "sdpa"
        return self

    def save_pretrained(self, path, **kwargs):
        from twice.hf import save_pretrained
        return save_pretrained(self, path, **kwargs)

    # ---- forward -----------------------------------------------------------------------------------------------
    def forward(self, input_ids, attention_mask=None, position_ids=None, kv_cache=None, targets=None,
                temperature: float = 1.0, return_entropy: bool = False, return_hidden: bool = False,
                shared_prefix=None):
        """input_ids [B, T]; attention_mask [B, S] (1 real, 0 pad; S = cached + T slots); position_ids [B, T].

        Returns logits [B, T, V] (model dtype); or the final normed hidden [B, T, D] with return_hidden; or, with
        targets [B, T] (-100 = ignore), fp32 log-probs [B, T] (0 where ignored) [and entropy [B, T]] computed by
        the fused kernel so [tokens x V] is never built. With kv_cache, masks come from kv_cache.update()."""
        if shared_prefix is not None:  # inside forward, so FSDP2's root hooks have unsharded embed_tokens
            return self._forward_shared_prefix(input_ids, shared_prefix, targets, temperature, return_entropy)
        cfg = self.config
        B, T = input_ids.shape
        W = self.embed_tokens.weight  # [V, D]
        dt, dev = W.dtype, W.device
        if position_ids is None:
            if attention_mask is not None:
                past = attention_mask.shape[1] - T
            elif kv_cache is not None:
                if not hasattr(kv_cache, "past_len"):
                    raise ValueError("forward with a kv_cache needs position_ids (or an attention_mask [B, S])")
                past = kv_cache.past_len
            else:
                past = 0
            position_ids = torch.arange(past, past + T, device=dev)[None].expand(B, T)

        # the scale is cast to the weight dtype first (bf16: sqrt(1152) = 33.94 -> 34.0), exactly like HF
        x = self.embed_tokens(input_ids) * torch.tensor(cfg.hidden_size ** 0.5).to(dt)  # [B, T, D]
        rope = {  # [B, T, hd] each; local layers never scaled
            SLIDING: rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_local_base_freq, 1.0, dt),
            FULL: rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, dt),
        }
        masks = {SLIDING: None, FULL: None}
        if kv_cache is None:
            if attention_mask is not None and attention_mask.shape != (B, T):
                raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, expected {(B, T)} without cache")
            masks = {SLIDING: build_mask(attention_mask, B, T, cfg.sliding_window, dt, dev),
                     FULL: build_mask(attention_mask, B, T, None, dt, dev)}
            if attention_mask is None:  # no padding: full layers need no mask tensor at all (SDPA is_causal)
                masks[FULL] = CAUSAL

        for layer, kind in zip(self.layers, cfg.layer_types):
            cos, sin = rope[kind]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # recompute the block in backward: activation memory O(1 block) instead of O(L blocks)
                x = checkpoint(layer, x, cos, sin, masks[kind], kv_cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, masks[kind], kv_cache)
        h = self.norm(x)  # [B, T, D]

        if return_hidden:
            return h
        if targets is not None:
            if cfg.final_logit_softcapping:
                raise NotImplementedError("targets= with final_logit_softcapping is not supported")
            from kernels import token_logprobs  # lazy: the model imports without the kernels package
            valid = targets != -100  # [B, T]
            out = token_logprobs(h[valid], W, targets[valid], temperature, return_entropy=return_entropy)
            logp, ent = out if return_entropy else (out, None)
            full = h.new_zeros((B, T), dtype=torch.float32)
            logp = full.masked_scatter(valid, logp.float())
            if not return_entropy:
                return logp
            return logp, full.masked_scatter(valid, ent.float())
        logits = F.linear(h, W)  # [B, T, V], tied head, stays in the model dtype (HF does not upcast)
        if cfg.final_logit_softcapping:
            c = cfg.final_logit_softcapping
            logits = torch.tanh(logits / c) * c
        return logits

    def _forward_shared_prefix(self, completion_ids, sp: "SharedPrefix", targets, temperature: float,
                               return_entropy: bool):
        """The K completions of each of G groups attend to ONE copy of their group's prompt (module end)."""
        cfg = self.config
        W = self.embed_tokens.weight  # [V, D]
        dt, dev = W.dtype, W.device
        prompt_ids, plen, K = sp.prompt_ids.to(dev), sp.prompt_lens.to(dev), sp.K
        G, P = prompt_ids.shape
        R, Tc = completion_ids.shape
        if R != G * K or plen.shape != (G,) or int(plen.min()) < 1 or int(plen.max()) > P:
            raise ValueError(f"shared_prefix: completions {R} rows != G*K = {G}*{K}, or prompt_lens {plen.tolist()} "
                             f"outside 1..{P}")
        # one packed stream [1, N]: G right-padded prompts, then the G*K completions (N = G*P + R*Tc)
        pos_c = plen.repeat_interleave(K)[:, None] + torch.arange(Tc, device=dev)  # [R, Tc]: continue each prompt
        pos = torch.cat([torch.arange(P, device=dev).repeat(G), pos_c.reshape(-1)])[None]  # [1, N]
        ids = torch.cat([prompt_ids.reshape(-1), completion_ids.to(dev).reshape(-1)])[None]  # [1, N]
        x = self.embed_tokens(ids) * torch.tensor(cfg.hidden_size ** 0.5).to(dt)  # [1, N, D]
        rope = {SLIDING: rope_cos_sin(pos, cfg.head_dim, cfg.rope_local_base_freq, 1.0, dt),
                FULL: rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, dt)}
        layout = SharedPrefixLayout.build(plen, K, P, Tc, cfg.sliding_window, dt, dev)
        for layer, kind in zip(self.layers, cfg.layer_types):
            cos, sin = rope[kind]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, layout, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, layout)  # Attention sees the layout in the mask slot
        h = self.norm(x)[0]  # [N, D]
        hp = h[:G * P].view(G, P, -1)[torch.arange(G, device=dev), plen - 1]  # [G, D] last prompt token
        # the hidden that PREDICTS completion token t: last prompt token for t = 0, completion token t-1 after
        h = torch.cat([hp.repeat_interleave(K, 0)[:, None], h[G * P:].view(R, Tc, -1)[:, :-1]], 1)  # [R, Tc, D]
        if targets is None:
            return h
        from kernels import token_logprobs
        valid = targets != -100  # [R, Tc]
        out = token_logprobs(h[valid], W, targets[valid], temperature, return_entropy=return_entropy)
        logp, ent = out if return_entropy else (out, None)
        full = h.new_zeros((R, Tc), dtype=torch.float32)
        logp = full.masked_scatter(valid, logp.float())
        return (logp, full.masked_scatter(valid, ent.float())) if return_entropy else logp

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ----------------------------------------------------------------------------------------------------------------
# Decode over a shared prompt cache (Engine.generate, K samples per prompt): the prompt's keys/values exist once per
# prompt (the prefill's cache, never copied to the K rows) and each row caches only its own tokens. A step's K*G
# queries of one prompt meet that prompt's keys in ONE matmul ([K*G, hd] x [hd, S_p]) instead of K matrix-vector
# products that each stream the whole prompt cache from memory; the row's own keys are scored as usual, and one
# softmax runs over [prompt keys ; own keys]. Same math as attend_eager's decode branch on the fanned-out cache.

@dataclass
class PromptFanout:
    """The prompt half of a fan-out decode step, handed to attention by the cache in place of a mask."""
    k: torch.Tensor            # [P, KV, S_p, hd] the prompts' keys (this layer), read-only
    v: torch.Tensor            # [P, KV, S_p, hd]
    prompt_bias: torch.Tensor  # [P, 1, 1, S_p] additive: left pads and slots out of the sliding window
    own_bias: torch.Tensor | None  # [N, 1, 1, n] additive over the rows' own keys (None: all visible)
    slot: torch.Tensor         # [N] long: row r's place p*K + k in the dense [P*K] layout (rows compact, slots stay)
    K: int


def attend_prompt_fanout(q, k, v, lay: PromptFanout, scale: float):
    """One decode step of N rows: q [N, H, 1, hd], k/v [N, KV, n, hd] each row's own keys -> [N, 1, H*hd].

    Scores in the model dtype, + bias, fp32 softmax over [prompt keys ; own keys], cast back (attend_eager's decode
    branch); the two halves of p @ V are added in fp32 (or wider) before the cast."""
    N, H, _, hd = q.shape
    P, KV, Sp, _ = lay.k.shape
    G, K, n = H // KV, lay.K, k.shape[2]

    def dense(x):  # [N, KV, G, m] rows -> [P, KV, K*G, m]: each prompt's rows side by side (finished ones zero)
        d = x.new_zeros(P * K, *x.shape[1:])
        d[lay.slot] = x
        return d.view(P, K, KV, G, -1).transpose(1, 2).reshape(P, KV, K * G, -1)

    def rows(x):  # the inverse: [P, KV, K*G, m] -> [N, KV, G, m]
        return x.view(P, KV, K, G, -1).transpose(1, 2).reshape(P * K, KV, G, -1)[lay.slot]

    qr = q.reshape(N, KV, G, hd)  # heads in order j*G + g: kv head j serves query heads j*G .. j*G+G-1
    s_p = rows(torch.matmul(dense(qr), lay.k.transpose(2, 3)) * scale)  # [N, KV, G, Sp]
    s_p = s_p + lay.prompt_bias[lay.slot // K]
    s_o = torch.matmul(qr, k.transpose(2, 3)) * scale  # [N, KV, G, n]
    if lay.own_bias is not None:
        s_o = s_o + lay.own_bias
    p = F.softmax(torch.cat([s_p, s_o], dim=-1), dim=-1, dtype=torch.float32).to(q.dtype)
    p_p, p_o = p.split([Sp, n], dim=-1)
    acc = torch.promote_types(q.dtype, torch.float32)  # bf16 halves add in fp32; fp64 stays fp64
    o = rows(torch.matmul(dense(p_p), lay.v)).to(acc) + torch.matmul(p_o, v).to(acc)  # [N, KV, G, hd]
    return o.to(q.dtype).reshape(N, 1, H * hd)


# Shared-prefix training forward (GRPO): a group's K completions share one prompt, ~95% of the tokens in the paper.
#
#   logp = model(completions [G*K, Tc], shared_prefix=SharedPrefix(prompts [G, P], prompt_lens [G], K),
#                targets=completions with -100 on padding)        # -> [G*K, Tc]: log p(c_t | prompt, c_<t)
#
# equals running the G*K rows [prompt_g ; completion] one by one (tests/test_train_grpo.py checks loss and grads),
# but each prompt runs ONCE and its keys/values are shared, not copied: in attention the K completions are folded
# into the query length for the prefix part (q [G, KV, n*K*Tc, hd] against prefix k [G, KV, P, hd]) and scored
# separately against their own keys ([.., Tc, Tc]); one softmax over the concatenated scores. The gradient of all K
# completions flows back into the one prompt pass. Positions continue each prompt (prompt_len_g + t), so sliding
# windows reach back into the prompt exactly as in the K-times layout. Prompts are right-padded; pad keys are
# masked for completions and sit after every real prompt token (causality hides them from the prompt).

@dataclass
class SharedPrefix:
    prompt_ids: torch.Tensor   # [G, P] long, right-padded (pad id irrelevant: masked)
    prompt_lens: torch.Tensor  # [G] long, real prompt tokens per group (>= 1)
    K: int                     # completions per group; completion row r belongs to group r // K


@dataclass
class SharedPrefixLayout:
    """What attention needs to split the packed [1, G*P + G*K*Tc] stream, plus the masks per layer kind."""
    G: int
    K: int
    P: int
    Tc: int
    prefix_mask: dict          # sliding (bool) -> [1, 1, P, P] additive (causal + window) or CAUSAL: prompt part
    completion_mask: dict      # sliding (bool) -> [G, 1, 1, 1, Tc, P + Tc] additive: [prompt keys ; own keys]

    @staticmethod
    def build(plen, K: int, P: int, Tc: int, window: int, dtype, device) -> "SharedPrefixLayout":
        G = plen.shape[0]
        t = torch.arange(Tc, device=device)
        j = torch.arange(P, device=device)
        qpos = plen[:, None, None] + t[None, :, None]  # [G, Tc, 1] position of completion query t
        in_prompt = (j[None, None, :] < plen[:, None, None]).expand(G, Tc, P)  # [G, Tc, P]
        causal = (t[None, :] <= t[:, None])  # [Tc (query), Tc (key)]
        zero, neg = torch.zeros((), dtype=dtype, device=device), torch.finfo(dtype).min
        pm, cm = {}, {}
        for sliding in (False, True):
            ap, ac = in_prompt, causal
            if sliding:  # a query at position q sees keys at positions q-W+1 .. q
                ap = ap & (j[None, None, :] > qpos - window)
                ac = ac & (t[None, :] > t[:, None] - window)
            allowed = torch.cat([ap, ac[None].expand(G, Tc, Tc)], dim=-1)  # [G, Tc, P + Tc]
            cm[sliding] = torch.where(allowed, zero, neg)[:, None, None, None]  # [G, 1, 1, 1, Tc, P + Tc]
            # prompts are right-padded, so causal alone hides pad keys from real prompt queries
            pm[sliding] = build_mask(None, 1, P, window, dtype, device) if sliding else CAUSAL  # [1, 1, P, P]
        return SharedPrefixLayout(G, K, P, Tc, pm, cm)


def attend_shared_prefix(q, k, v, layout: SharedPrefixLayout, sliding: bool, scale: float, sdpa: bool = True):
    """q [1, H, N, hd], k/v [1, KV, N, hd] of the packed stream (N = G*P + G*K*Tc) -> [1, N, H*hd].

    Same math as `attend` on the K-times layout. sdpa: each completion row attends over [its prompt's keys ; its
    own keys] in one fused call per group; the prompt keys are copied to the group's K rows as one [K, KV, P+Tc,
    hd] tensor (the K-times layout's keys, model dtype) instead of fp32 scores [G, KV, n, K, Tc, P+Tc] (at P = 6144,
    Tc = 512, G = K = 8, n = 4, KV = 1, hd = 256, bf16: 3.5 GB of scores per layer vs 0.44 GB of keys + values).
    eager: the materialised path (scores in the model dtype, + mask, fp32 softmax, cast), bit-exact reference."""
    if not sdpa:
        return _attend_shared_prefix_eager(q, k, v, layout, sliding, scale)
    G, K, P, Tc = layout.G, layout.K, layout.P, layout.Tc
    _, H, N, hd = q.shape
    KV = k.shape[1]
    S = G * P
    # prompts: ordinary causal attention per group
    qp = q[0, :, :S].reshape(H, G, P, hd).transpose(0, 1)  # [G, H, P, hd]
    kp = k[0, :, :S].reshape(KV, G, P, hd).transpose(0, 1)  # [G, KV, P, hd]
    vp = v[0, :, :S].reshape(KV, G, P, hd).transpose(0, 1)
    out_p = attend(qp, kp, vp, layout.prefix_mask[sliding], scale).reshape(1, S, H * hd)
    # completions: row (g, k) sees [prompt g ; completion (g, k)]; one call per group, its K rows as the batch, so
    # the group's [Tc, P + Tc] mask broadcasts over K (a 5-D batch would drop torch's CPU flash kernel for math)
    R = G * K
    qc = q[0, :, S:].reshape(H, R, Tc, hd).transpose(0, 1)  # [R, H, Tc, hd]
    kc = k[0, :, S:].reshape(KV, R, Tc, hd).transpose(0, 1)  # [R, KV, Tc, hd]
    vc = v[0, :, S:].reshape(KV, R, Tc, hd).transpose(0, 1)
    cm = layout.completion_mask[sliding]  # [G, 1, 1, 1, Tc, P + Tc]
    outs = []
    for g in range(G):
        rows = slice(g * K, (g + 1) * K)
        ka = torch.cat([kp[g:g + 1].expand(K, KV, P, hd), kc[rows]], dim=2)  # [K, KV, P + Tc, hd]
        va = torch.cat([vp[g:g + 1].expand(K, KV, P, hd), vc[rows]], dim=2)
        outs.append(sdpa_gqa(qc[rows], ka, va, cm[g, :, 0], scale))  # [K, H, Tc, hd]
    out_c = torch.cat(outs).transpose(1, 2).reshape(1, R * Tc, H * hd)
    return torch.cat([out_p, out_c], dim=1)  # [1, N, H*hd]


def _attend_shared_prefix_eager(q, k, v, layout: SharedPrefixLayout, sliding: bool, scale: float):
    G, K, P, Tc = layout.G, layout.K, layout.P, layout.Tc
    _, H, N, hd = q.shape
    KV = k.shape[1]
    n = H // KV  # query heads per kv head; head h = kv * n + i (HF repeat_kv order)
    S = G * P
    # prompts: ordinary causal attention per group
    qp = q[0, :, :S].reshape(H, G, P, hd).transpose(0, 1)  # [G, H, P, hd]
    kp = k[0, :, :S].reshape(KV, G, P, hd).transpose(0, 1)  # [G, KV, P, hd]
    vp = v[0, :, :S].reshape(KV, G, P, hd).transpose(0, 1)
    out_p = attend(qp, kp, vp, layout.prefix_mask[sliding], scale, sdpa=False).reshape(1, S, H * hd)
    # completions
    qc = q[0, :, S:].reshape(KV, n, G, K, Tc, hd).permute(2, 3, 0, 1, 4, 5)  # [G, K, KV, n, Tc, hd]
    kc = k[0, :, S:].reshape(KV, G, K, Tc, hd).permute(1, 2, 0, 3, 4)[:, :, :, None]  # [G, K, KV, 1, Tc, hd]
    vc = v[0, :, S:].reshape(KV, G, K, Tc, hd).permute(1, 2, 0, 3, 4)[:, :, :, None]
    qf = qc.permute(0, 2, 3, 1, 4, 5).reshape(G, KV, n * K * Tc, hd)  # K folded into the query length
    s_p = (torch.matmul(qf, kp.transpose(2, 3)) * scale).view(G, KV, n, K, Tc, P)  # vs the ONE prompt copy
    s_c = (torch.matmul(qc, kc.transpose(-1, -2)) * scale).permute(0, 2, 3, 1, 4, 5)  # [G, KV, n, K, Tc, Tc]
    s = torch.cat([s_p, s_c], dim=-1) + layout.completion_mask[sliding]  # [G, KV, n, K, Tc, P + Tc]
    p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
    o_p = torch.matmul(p[..., :P].reshape(G, KV, n * K * Tc, P), vp).view(G, KV, n, K, Tc, hd)
    o_c = torch.matmul(p[..., P:].permute(0, 3, 1, 2, 4, 5), vc)  # [G, K, KV, n, Tc, hd]
    o = o_p.permute(0, 3, 1, 2, 4, 5) + o_c  # [G, K, KV, n, Tc, hd]
    out_c = o.permute(0, 1, 4, 2, 3, 5).reshape(1, G * K * Tc, H * hd)
    return torch.cat([out_p, out_c], dim=1)  # [1, N, H*hd]
