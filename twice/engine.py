"""KV cache + group sampling engine: the sampler GRPO spends most of its time in, and exact candidate scoring.

    python -c "import torch; from twice.gemma3 import Gemma3, PRESETS; from twice.engine import Engine; \
               m = Gemma3.from_config(PRESETS['tiny']).eval(); \
               print(Engine(m).generate([[2, 5, 7]], num_samples=4, max_new_tokens=8, seeds=0).tokens)"

Pieces (nouns only; the loops that use them live in train_grpo.py / eval.py / bench/generate.py):
  KVCache       preallocated per layer. Global layers: [B, KV, max_len, hd], slot s at index s. Sliding layers: a
                ring buffer of R = min(W, max_len) slots, slot s at index s % R. Implements the model's protocol
                `k_all, v_all, mask = cache.update(layer_idx, k, v)`; masks are built once per step per layer kind.
  StaticKVCache the decode-only, graph-capturable view of a filled KVCache (Engine(decode="static"|"compiled")):
                fixed shapes, device slot counter, index_copy_ writes, masks built on device, no compaction.
  sample_tokens one vectorised sampling step (temperature, top-k, top-p) driven by per-row uniforms; sample_top
                the same draw read from the bf16 head's refined candidates (eager decode on a CPU).
  Engine        generate(): prefill every prompt ONCE (left-padded batch), fan the cache out to K rows, decode with
                one seeded generator per output row; score(): log-likelihood of N continuations of one prompt
                from one prefill; greedy(): batched greedy decoding.

Conventions (documented once, here):
  - Padding: batched prompts are LEFT-padded to a common length, so every row shares the slot counter `pos` and
    slot distance == token distance for real tokens (the sliding window is unaffected). `start[b]` is row b's first
    real slot; pad slots are masked as keys for every query. Position ids are `slot - start[b]` (pads clamp to 0),
    so a left-padded row gets exactly the RoPE positions of the same prompt run alone.
  - Ring buffer: a single-token step writes its k/v into the ring first and attends over the R ring slots (the
    overwritten slot s-W is out of the window anyway). A multi-token step (prefill, or a teacher-forced
    continuation) attends over [ring ; the T new keys] under the window mask and only then writes the last
    min(T, R) new keys into the ring: dropping keys before attention corrupts early queries (transformers' Gemma-3 cache; mlxcel#405).
  - Reproducibility: output row r draws its float64 uniforms from its own torch.Generator seeded with seeds[r]
    (prompt-major rows: r = prompt_i * K + k), all up front, and samples by a float64 inverse CDF (_inverse_cdf:
    every token of non-negligible probability has a bin). So a row's tokens do not depend on which other rows
    share the batch (up to float reassociation in batched matmuls).
  - Never drawn: ids the tokenizer cannot decode (embedding rows beyond its vocabulary) and image pieces
    (never_sample_mask); they leave the processed distribution only, full_logprobs keep them.
  - Head: fp32 accumulation and fp32 logits whatever the weight dtype (Engine._logits), as the trainer's kernel.
  - Log-probs, both per generated token:
      logprobs      the sampler's: log-softmax of the PROCESSED logits (logits / T, then top-k, then top-p
                    renormalised) at the sampled token -- the exact probability the token was drawn with.
      full_logprobs log_softmax(logits / T) over the whole vocabulary (no truncation) at the sampled token -- what
                    the trainer computes with kernels.token_logprobs(..., temperature=T). The two agree when
                    top_k/top_p are off; their gap is the truncation bias (sampler vs trainer log-probs) and is worth logging.
    Greedy (temperature == 0): logprobs are 0 (a point mass) and full_logprobs use T = 1.
  - Stops: a row finishes on a stop id (the stop token is kept, mask 1) or when a stop string appears in its decoded
    text (kept up to and including the token that completes the string; the text is cut after the string), or at
    max_new_tokens, whichever comes first -- also when a stop id follows a stop string before the next scan.
    Between host syncs (every `check_every` steps) finished rows keep running in the static-shape batch with their
    outputs masked; at a sync, once a quarter of the batch has finished, the finished rows are compacted out of
    the cache (`compact=True`); the loop exits once all rows are done. Rows never interact, so compaction changes
    no result.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch.profiler import record_function as span  # named phases for bench/generate.py (~1 us when not profiling)

from kernels import token_logprobs
from twice.gemma3 import FULL, SLIDING, PromptFanout  # layer kinds of Gemma3Config.layer_types; decode fan-out


# ----------------------------------------------------------------------------------------------------------------
# KV cache

def ring_slots(last, j, R: int):
    """Absolute slot held by ring index j once slot `last` is written: the latest s <= last with s % R == j
    (negative: never written). last: int or a [1] tensor (StaticKVCache); j: indices [S]."""
    return last - (last - j) % R


class KVCache:
    """Preallocated cache for a batch of B rows that share one slot counter (left padding).

    k[l], v[l]: [B, KV, max_len, hd] for full-attention layers, [B, KV, R, hd] (ring, R = min(W, max_len)) for
    sliding ones. `start` [B] long: first real slot per row (number of left pads). `pos`: slots written so far.
    """

    def __init__(self, config, batch_size: int, max_len: int, dtype=torch.float32, device="cpu", start=None):
        self.layer_types = list(config.layer_types)
        self.window = config.sliding_window
        self.n_layers = len(self.layer_types)
        self.batch_size, self.max_len = batch_size, max_len
        self.ring = min(self.window, max_len)  # R
        KV, hd = config.num_key_value_heads, config.head_dim
        self.k, self.v = [], []
        for kind in self.layer_types:
            n = self.ring if kind == SLIDING else max_len
            self.k.append(torch.zeros(batch_size, KV, n, hd, dtype=dtype, device=device))
            self.v.append(torch.zeros(batch_size, KV, n, hd, dtype=dtype, device=device))
        self.dtype, self.device = dtype, torch.device(device)
        self.start = (torch.zeros(batch_size, dtype=torch.long, device=device) if start is None
                      else start.to(device=device, dtype=torch.long))  # [B]
        self.pos = 0  # Python int: every row shares it, so the decode loop never syncs to read it
        self._masks = {}  # kind -> mask for the current step (built by the first layer of that kind)
        self._init_decode_masks()

    def _init_decode_masks(self):
        """Decode-step masks without per-step construction: a single-token query sees every written slot (causal
        for free), so a global layer's mask is a prefix view of one per-row pad bias [B, 1, 1, max_len] built
        here; a sliding layer's ring mask is all zeros once every ring slot holds a real token of every row."""
        slots = torch.arange(self.max_len, device=self.device)
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self._pad_bias = torch.where(slots[None] >= self.start[:, None], zero,
                                     torch.finfo(self.dtype).min)[:, None, None]  # [B, 1, 1, max_len]
        self._ring_zero = torch.zeros(self.batch_size, 1, 1, self.ring, dtype=self.dtype, device=self.device)
        self._max_start = int(self.start.max()) if self.batch_size else 0  # one host read per cache, not per step

    @property
    def past_len(self) -> int:  # the model reads this when called without position_ids
        return self.pos

    def position_ids(self, T: int):
        """[B, T] RoPE positions of the next T slots: slot - start (left pads clamp to 0)."""
        slots = torch.arange(self.pos, self.pos + T, device=self.device)
        return (slots[None, :] - self.start[:, None]).clamp_min(0)

    # ---- the protocol the model calls ----------------------------------------------------------------------
    def update(self, layer_idx: int, k, v):
        """k, v: [B, KV, T, hd] new tokens (post-norm, post-RoPE) -> (k_all, v_all [B, KV, S, hd], mask [B,1,T,S])."""
        T = k.shape[2]
        p = self.pos
        if p + T > self.max_len:
            raise ValueError(f"KVCache overflow: {p} + {T} slots > max_len {self.max_len}")
        kind = self.layer_types[layer_idx]
        kc, vc = self.k[layer_idx], self.v[layer_idx]
        if kind == FULL:
            kc[:, :, p:p + T] = k
            vc[:, :, p:p + T] = v
            k_all, v_all = kc[:, :, :p + T], vc[:, :, :p + T]  # views, no copy
        else:
            R = self.ring
            if T == 1:  # decode: write first, attend over the R ring slots (the one overwritten is out of window)
                kc[:, :, p % R] = k[:, :, 0]
                vc[:, :, p % R] = v[:, :, 0]
                k_all, v_all = kc, vc
            else:
                if p == 0:  # fresh prefill: nothing cached yet, attend over the T new keys only
                    k_all, v_all = k, v
                else:  # chunk after cached slots: [ring ; new], masked by absolute slot, THEN write the ring
                    k_all, v_all = torch.cat([kc, k], dim=2), torch.cat([vc, v], dim=2)
                n = min(T, R)  # only the last R new keys can ever be needed again
                idx = torch.arange(p + T - n, p + T, device=k.device) % R
                kc[:, :, idx] = k[:, :, T - n:]
                vc[:, :, idx] = v[:, :, T - n:]
        mask = self._masks.get(kind)
        if mask is None:
            mask = self._masks[kind] = self._decode_mask(kind) if T == 1 else self._build_mask(kind, T)
        if layer_idx == self.n_layers - 1:  # the step is over: advance and forget this step's masks
            self.pos += T
            self._masks = {}
        return k_all, v_all, mask

    def _key_slots(self, kind: str, T: int):
        """Absolute slot held by each key column the update returns for this kind (-1 = never written)."""
        p, dev = self.pos, self.device
        if kind == FULL:
            return torch.arange(p + T, device=dev)
        R = self.ring
        j = torch.arange(R, device=dev)
        if T == 1:  # ring after writing slot p
            return ring_slots(p, j, R)
        new = torch.arange(p, p + T, device=dev)
        if p == 0:
            return new
        return torch.cat([ring_slots(p - 1, j, R), new])  # ring before writing (negative = never written)

    def _decode_mask(self, kind: str):
        """The [B, 1, 1, S] mask of a single-token step at slot pos (== _build_mask(kind, 1)), mostly a view."""
        p = self.pos
        if kind == FULL:
            return self._pad_bias[..., :p + 1]
        if p - self.ring + 1 >= self._max_start:  # ring slots hold slots p-R+1..p, all real for every row
            return self._ring_zero
        return self._build_mask(kind, 1)

    def _build_mask(self, kind: str, T: int):
        q = torch.arange(self.pos, self.pos + T, device=self.device)[:, None]  # [T, 1] query slots
        ks = self._key_slots(kind, T)[None, :]  # [1, S]
        allowed = (ks <= q) & (ks >= 0)  # causal; never-written ring slots are negative
        if kind == SLIDING:
            allowed = allowed & (ks > q - self.window)  # a query sees itself + the W-1 previous slots
        allowed = allowed[None] & (ks[None] >= self.start[:, None, None])  # [B, T, S]: left pads are never keys
        # finfo.min, not -inf: fully masked pad query rows stay finite instead of NaN (as transformers' eager mask)
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)[:, None]  # [B, 1, T, S]

    def select(self, idx):
        """Keep only rows idx [n] (in that order): compaction of finished rows. Allocates the smaller cache."""
        self.k = [k.index_select(0, idx) for k in self.k]
        self.v = [v.index_select(0, idx) for v in self.v]
        self.start = self.start.index_select(0, idx)
        self.batch_size = idx.shape[0]
        self._masks = {}
        self._init_decode_masks()

    # ---- group fan-out -------------------------------------------------------------------------------------
    def fan_out(self, K: int, max_len: int, rows=None) -> "KVCache":
        """A new cache with B*K rows (row b*K + k copies row b) and room for max_len slots; copied once. rows: the
        source rows to fan out, in that order (a list or [B] long tensor; None = all): one prefill of a batch of
        prompts can then feed several later calls (eval: the joint decode, then each user's exact scoring)."""
        if max_len < self.pos:
            raise ValueError(f"fan_out: max_len {max_len} < {self.pos} slots already cached")
        if rows is not None:
            rows = torch.as_tensor(rows, dtype=torch.long, device=self.device)
        start = self.start if rows is None else self.start.index_select(0, rows)
        B = start.shape[0]
        cfg = SimpleNamespace(layer_types=self.layer_types, sliding_window=self.window,
                              num_key_value_heads=self.k[0].shape[1], head_dim=self.k[0].shape[3])
        new = KVCache(cfg, B * K, max_len, self.dtype, self.device, start=start.repeat_interleave(K))
        for l, kind in enumerate(self.layer_types):
            # full: slots [0, pos) at the same indices. sliding: the old ring (R0 <= R1) holds slot s at s % R0, and
            # either R0 == R1 == W or nothing ever wrapped (pos <= R0), so the same indices are right in the new ring.
            n = self.pos if kind == FULL else self.ring
            for src, dst in ((self.k[l], new.k[l]), (self.v[l], new.v[l])):
                src = src[:, :, :n] if rows is None else src[:, :, :n].index_select(0, rows)  # [B, KV, n, hd]
                # broadcast copy into a [B, K, ...] view of the destination: no temporary [B*K, ...] tensor
                dst.view(B, K, *dst.shape[1:])[:, :, :, :n].copy_(src[:, None])
        new.pos = self.pos
        return new


class StaticKVCache:
    """The decode-only, graph-capturable view of a filled KVCache: every shape fixed for the whole decode.

    Takes over the KVCache's buffers (no copy). The slot counter `pos` is a device tensor [1] (advanced in place by
    the last layer), writes are index_copy_ at pos (pos % R in the ring), and each step attends over the WHOLE
    buffer (max_len slots for global layers, R for sliding ones) under a mask built on device from pos and
    `start`: unwritten and pad slots get finfo.min, so they weigh exactly 0 after the softmax. No Python int
    changes between steps and nothing syncs with the host, so a step can be traced once (torch.compile, CUDA
    graphs). Rows are never compacted: finished rows keep decoding pad tokens, masked out of the results."""

    def __init__(self, cache: KVCache):
        self.layer_types, self.window, self.n_layers = cache.layer_types, cache.window, cache.n_layers
        self.k, self.v, self.start = cache.k, cache.v, cache.start
        self.batch_size, self.max_len, self.ring = cache.batch_size, cache.max_len, cache.ring
        self.dtype, self.device = cache.dtype, cache.device
        self.pos = torch.full((1,), cache.pos, dtype=torch.long, device=cache.device)  # [1] next slot
        self.slots = {FULL: torch.arange(self.max_len, device=self.device),
                      SLIDING: torch.arange(self.ring, device=self.device)}
        self._masks = {}
        if self.device.type == "cuda":
            # a CUDA graph may write in place only into inputs at fixed addresses: without this, inductor skips
            # graphs for the step ("mutated inputs": the k/v buffers and pos) and replays it kernel by kernel.
            # guard=False: a later generate's new buffers re-record the graph instead of recompiling the step.
            for t in (*self.k, *self.v, self.pos):
                torch._dynamo.mark_static_address(t, guard=False)

    def position_ids(self, T: int = 1):
        if T != 1:
            raise ValueError("StaticKVCache decodes one token per step")
        return (self.pos[None, :] - self.start[:, None]).clamp_min(0)  # [B, 1]

    def _mask(self, kind: str):
        p, j = self.pos, self.slots[kind]  # [1], [S]
        ks = j if kind == FULL else ring_slots(p, j, self.ring)  # absolute slot held by each key column
        allowed = (ks <= p) & (ks >= 0) & (ks[None] >= self.start[:, None])  # [B, S]; ring slots are in-window
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(allowed, zero, torch.finfo(self.dtype).min)[:, None, None]  # [B, 1, 1, S]

    def update(self, layer_idx: int, k, v):
        """k, v: [B, KV, 1, hd] -> (k_all, v_all [B, KV, S, hd] (the whole buffer), mask [B, 1, 1, S])."""
        kind = self.layer_types[layer_idx]
        idx = self.pos if kind == FULL else self.pos % self.ring
        self.k[layer_idx].index_copy_(2, idx, k)
        self.v[layer_idx].index_copy_(2, idx, v)
        mask = self._masks.get(kind)
        if mask is None:
            mask = self._masks[kind] = self._mask(kind)
        if layer_idx == self.n_layers - 1:
            self.pos.add_(1)
            self._masks = {}
        return self.k[layer_idx], self.v[layer_idx], mask


class FanoutKVCache:
    """Decode cache for K rows per prompt that read their prompt's keys from the prefill cache itself.

    `prompt`: Engine.prefill's KVCache of the P prompts (read, never written or copied). Each of the P*K rows caches
    only the tokens it generates: k[l], v[l] [rows, KV, max_new, hd]. update() writes the step's key, then hands
    attention its own keys plus a PromptFanout (the prompt's keys and the step's masks), and
    gemma3.attend_prompt_fanout scores each prompt's K rows against its keys in one matmul. Against
    KVCache.fan_out: no [rows, KV, S, hd] copy of the prompt per row, decode attention streams each prompt cache once
    per step instead of K times, and compaction (select) copies only the rows' own tokens. Single-token steps only.
    """

    def __init__(self, prompt: KVCache, K: int, max_new: int):
        self.prompt, self.K = prompt, K
        self.layer_types, self.window, self.n_layers = prompt.layer_types, prompt.window, prompt.n_layers
        P, dev, dt = prompt.batch_size, prompt.device, prompt.dtype
        KV, hd = prompt.k[0].shape[1], prompt.k[0].shape[3]
        self.L = prompt.pos  # prompt slots (left-padded batch): the rows' tokens take slots L, L+1, ...
        self.batch_size, self.dtype, self.device = P * K, dt, dev
        self.k = [torch.zeros(P * K, KV, max_new, hd, dtype=dt, device=dev) for _ in self.layer_types]
        self.v = [torch.zeros_like(x) for x in self.k]
        self.start = prompt.start.repeat_interleave(K)  # [rows]: first real slot (RoPE positions)
        self.slot = torch.arange(P * K, device=dev)  # [rows] place in the dense [P*K] layout; compaction keeps it
        self.pos = self.L  # Python int, shared by every row (as KVCache.pos)
        self._zero, self._neg = torch.zeros((), dtype=dt, device=dev), torch.finfo(dt).min
        # absolute slot held by each column of the prompt cache: full layers [0, L), a sliding layer's ring its last
        # R prompt slots
        self._prompt_slots = {FULL: torch.arange(self.L, device=dev),
                              SLIDING: ring_slots(self.L - 1, torch.arange(prompt.ring, device=dev), prompt.ring)}
        self._real = {kind: s[None] >= prompt.start[:, None] for kind, s in self._prompt_slots.items()}  # [P, S_p]
        self._full_bias = torch.where(self._real[FULL], self._zero, self._neg)[:, None, None]  # [P, 1, 1, L]
        self._layouts = {}

    @property
    def past_len(self) -> int:
        return self.pos

    def position_ids(self, T: int):
        if T != 1:
            raise ValueError("FanoutKVCache decodes one token per step")
        return (self.pos - self.start)[:, None].clamp_min(0)  # [rows, 1]

    def _bias(self, kind: str):
        """(prompt bias [P, 1, 1, S_p], own-key bias [rows, 1, 1, n] or None) for the query at slot pos."""
        if kind == FULL:
            return self._full_bias, None
        q, W = self.pos, self.window  # a query at slot q sees slots q-W+1 .. q
        seen = self._real[SLIDING] & (self._prompt_slots[SLIDING] > q - W)[None]
        n = q - self.L + 1  # own keys after this step's write, slots L .. q
        own = None
        if n > W:  # the rows' own oldest tokens left the window too
            own = torch.where(torch.arange(n, device=self.device) + self.L > q - W, self._zero, self._neg)
            own = own.expand(self.batch_size, n)[:, None, None]
        return torch.where(seen, self._zero, self._neg)[:, None, None], own

    def update(self, layer_idx: int, k, v):
        """k, v [rows, KV, 1, hd] of this step -> (own keys, own values [rows, KV, n, hd], PromptFanout)."""
        if k.shape[2] != 1:
            raise ValueError("FanoutKVCache decodes one token per step")
        n = self.pos - self.L
        if n >= self.k[layer_idx].shape[2]:
            raise ValueError(f"FanoutKVCache overflow: {n + 1} new tokens > max_new {self.k[layer_idx].shape[2]}")
        kind = self.layer_types[layer_idx]
        self.k[layer_idx][:, :, n] = k[:, :, 0]
        self.v[layer_idx][:, :, n] = v[:, :, 0]
        if kind not in self._layouts:
            self._layouts[kind] = self._bias(kind)
        prompt_bias, own_bias = self._layouts[kind]
        pk, pv = self.prompt.k[layer_idx], self.prompt.v[layer_idx]
        if kind == FULL:
            pk, pv = pk[:, :, :self.L], pv[:, :, :self.L]
        lay = PromptFanout(pk, pv, prompt_bias, own_bias, self.slot, self.K)
        if layer_idx == self.n_layers - 1:
            self.pos += 1
            self._layouts = {}
        return self.k[layer_idx][:, :, :n + 1], self.v[layer_idx][:, :, :n + 1], lay

    def select(self, idx):
        """Keep only rows idx [n] (compaction, as KVCache.select): the rows' own tokens are copied, the prompts not."""
        self.k = [k.index_select(0, idx) for k in self.k]  # [n, KV, max_new, hd]: max_new slots, not the prompt's
        self.v = [v.index_select(0, idx) for v in self.v]
        self.start, self.slot = self.start.index_select(0, idx), self.slot.index_select(0, idx)
        self.batch_size = idx.shape[0]


# ----------------------------------------------------------------------------------------------------------------
# Sampling: one vectorised step

def sample_tokens(logits, u, temperature: float, top_k: int | None, top_p: float, banned=None):
    """logits [B, V] (any float dtype), u [B] uniforms in [0, 1) (float64 for full resolution) -> (tokens [B],
    logprobs [B], full_logprobs [B]). banned: token ids [n] (long) or a mask [V] (bool, True = banned) removed
    from the processed distribution (ids outside the tokenizer, image pieces, and the stop ids before
    min_new_tokens); full_logprobs still use the untouched distribution, which is what the trainer sees.

    Order as in HF: temperature, then top-k (one partial selection, no full-vocabulary sort), then top-p on the k
    kept (keep the smallest prefix of the sorted distribution whose mass reaches top_p; the top token always
    stays); a full sort happens only for top-p without top-k. Sampling is by inverse CDF over the kept tokens with
    the row's own uniform, in float64 (see _inverse_cdf), so no RNG state is shared between rows and every token
    of non-negligible probability can be drawn. See the module docstring for the two log-probs."""
    x = logits.float()
    if banned is not None:
        banned = banned[None] if banned.dtype == torch.bool else banned
        ban = (lambda t: t.masked_fill(banned, float("-inf"))) if banned.dtype == torch.bool else \
            (lambda t: t.index_fill(1, banned, float("-inf")))
    if temperature == 0:  # greedy: point mass
        tok = (x if banned is None else ban(x)).argmax(-1)
        full = x.gather(1, tok[:, None])[:, 0] - torch.logsumexp(x, -1)
        return tok, torch.zeros_like(full), full
    x = x / temperature  # [B, V]
    full_lse = torch.logsumexp(x, -1)  # [B]
    xs = x if banned is None else ban(x)
    idx = None
    if top_k is not None and 0 < top_k < x.shape[-1]:
        vals, idx = torch.topk(xs, top_k, dim=-1)  # [B, k], sorted descending
    elif top_p < 1.0:
        vals, idx = torch.sort(xs, dim=-1, descending=True)  # [B, V]
    else:
        vals = xs  # no truncation: inverse CDF in vocabulary order is just as exact
    tok, logp = _draw_kept(vals, idx, u, top_p)
    full = x.gather(1, tok[:, None])[:, 0] - full_lse
    return tok, logp, full


def _draw_kept(vals, idx, u, top_p: float):
    """vals [B, n] the tempered logits kept by top-k (sorted descending when top_p < 1), idx [B, n] their token ids
    (None: vals is the whole vocabulary in id order), u [B] -> (tokens [B], sampler log-probs [B]): top-p, then
    the inverse-CDF draw."""
    if top_p < 1.0:
        probs = torch.softmax(vals, -1)
        # drop a token once the mass BEFORE it already reaches top_p (so the top token is always kept)
        drop = (torch.cumsum(probs, -1) - probs) >= top_p
        vals = vals.masked_fill(drop, float("-inf"))
    lse = torch.logsumexp(vals, -1, keepdim=True)  # [B, 1]
    j = _inverse_cdf(torch.exp(vals - lse), u)  # [B, 1]
    logp = (vals.gather(1, j) - lse)[:, 0]
    tok = (idx.gather(1, j) if idx is not None else j)[:, 0]
    return tok, logp


def sample_top(top, ctop, bound, u, temperature: float, greedy, top_k: int | None, top_p: float, banned=None,
               logits=None):
    """sample_tokens' draw (and, for the rows where greedy [B] bool is True, its temperature-0 argmax), read from
    each row's candidate set instead of the whole vocabulary -> (tokens, logprobs, full_logprobs) [B] each, or
    None when some row's candidates cannot be shown to hold its answer (the caller then takes the full path).

    top [B, R]: ids of each row's R largest head outputs, ctop [B, R] their fp32 logits, bound [B]: the smallest
    of those head outputs (Engine._head: every id outside `top` has logits <= bound). logits [B, V]: only for
    full_logprobs (None: the third output is None). Why: the bf16 head already finds the REFINE_TOP candidates,
    and on a CPU each pass over [B, 262k] fp32 costs 10-40 ms per step (ban mask, top-k, argmax, logsumexp, once
    more for the greedy rows), more than the draw itself; full_logprobs alone need x = logits / T and its
    logsumexp. The answer is sample_tokens' whenever the row's k-th kept candidate (greedy: the first) beats bound
    strictly, which this checks: a tail token can then enter neither top-k nor the argmax. Ties between EQUAL
    logits may come out of top-k in another order (the draw is then between tokens of equal probability); the
    argmax keeps torch's rule (smallest id among the maxima)."""
    B = top.shape[0]
    g = greedy if greedy is not None else torch.zeros(B, dtype=torch.bool, device=top.device)
    k = 1 if temperature == 0 else top_k
    if k is None or not 0 < k <= top.shape[1]:
        return None
    t = None  # the divisor of each row, exactly as sample_tokens divides
    if temperature != 0:  # greedy rows divide by 1 (exact): their x is the logits, as in the temperature-0 call
        t = temperature if greedy is None else torch.where(g, 1.0, temperature).to(ctop.dtype)[:, None]  # [B, 1]
    cx, bx = (ctop, bound) if t is None else (ctop / t, bound / (t if greedy is None else t[:, 0]))  # [B, R], [B]
    if banned is not None:
        cb = banned[top] if banned.dtype == torch.bool else torch.isin(top, banned)
        cx = cx.masked_fill(cb, float("-inf"))
    vals, j = cx.topk(k, dim=-1)  # [B, k] sorted descending
    last = torch.where(g, 0, k - 1)[:, None]  # [B, 1]: the candidate that must beat the tail
    if not bool((vals.gather(1, last)[:, 0] > bx).all()):  # a host read: CPU only (the engine checks)
        return None
    tok_g = torch.where(cx == vals[:, :1], top, torch.iinfo(top.dtype).max).amin(-1)  # argmax: smallest id of ties
    if temperature == 0:
        tok, lp = tok_g, torch.zeros(B, device=top.device)
    else:
        tok, lp = _draw_kept(vals, top.gather(1, j), u, top_p)
        tok, lp = torch.where(g, tok_g, tok), torch.where(g, 0.0, lp)
    full = None
    if logits is not None:
        x = logits if t is None else logits / t  # [B, V]
        full = x.gather(1, tok[:, None])[:, 0] - torch.logsumexp(x, -1)
    return tok, lp, full


def _search(cdf, target):
    """cdf [B, n] float64 non-decreasing, target [B] -> first j [B, 1] with cdf[j] > target. The target is clamped
    into [0, cdf[-1]) first, so a zero-probability bin (cdf[j] == cdf[j-1]) can never be returned, whatever the
    rounding of the running sums."""
    top = cdf[:, -1]
    t = torch.minimum(target.clamp_min(0), top * (1 - 2.0 ** -50))
    return torch.searchsorted(cdf, t[:, None], right=True)


def _inverse_cdf(p, u, block: int = 1024):
    """p [B, n] fp32 probabilities (any positive scale), u [B] uniforms -> j [B, 1], drawn with P(j) = p_j / sum p.

    Why float64 and two levels: an fp32 running sum over 262,144 tokens gives every token below half an fp32 step
    of the sum (~3e-8 near 1) a zero-width bin -- on Gemma-3 at T = 1 most of the vocabulary could never be drawn.
    Here the search runs in float64 over the sums of `block`-token blocks, then over the running sum of the chosen
    block alone, so a token's bin is lost only below 2^-53 of its own block's mass (and the block's below 2^-53 of
    the total): nothing with a probability that could ever matter. Cost: one fp64 reduction over [B, n] plus a
    cumsum over [B, n / block] and [B, block], instead of a full-width cumsum."""
    B, n = p.shape
    u = u.to(torch.float64)
    if n <= block:
        cdf = p.double().cumsum(-1)
        return _search(cdf, u * cdf[:, -1])
    nb = -(-n // block)
    pb = (p if nb * block == n else F.pad(p, (0, nb * block - n))).view(B, nb, block)  # pads: probability 0
    bsum = pb.sum(-1, dtype=torch.float64)  # [B, nb]
    bcdf = bsum.cumsum(-1)
    target = u * bcdf[:, -1]
    bi = _search(bcdf, target)  # [B, 1] block index
    rem = target - (bcdf.gather(1, bi) - bsum.gather(1, bi))[:, 0]  # mass left to walk inside the block
    inner = pb[torch.arange(B, device=p.device), bi[:, 0]].double().cumsum(-1)  # [B, block]
    return bi * block + _search(inner, rem)


def _cut_after_stop(text: str, stop_strings) -> str:
    """text up to the end of its earliest-ending stop string (unchanged if none occurs)."""
    ends = [text.find(s) + len(s) for s in stop_strings if s in text]
    return text[:min(ends)] if ends else text


# ----------------------------------------------------------------------------------------------------------------
# Results

def _reason(str_stop, id_stop: bool) -> str:
    """A row's stop reason: a stop string it wrote, else a stop id, else the length limit."""
    return "stop_string" if str_stop is not None else "stop_id" if id_stop else "length"


@dataclass
class GenerationResult:
    """Rows are prompt-major: row = prompt_i * K + k. Lists are trimmed to each row's length; the *_padded tensors
    are [rows, max_new_tokens] (CPU) with mask 1 on generated tokens (stop token included), 0 after."""
    tokens: list[list[int]]
    logprobs: list[list[float]]  # sampler's, processed distribution (after temperature, top-k, top-p)
    full_logprobs: list[list[float]] | None  # untruncated log_softmax(logits / T): what the trainer computes (None:
    # generate(full_logprobs=False))
    stop_reasons: list[str]  # "stop_id" | "stop_string" | "length"
    texts: list[str] | None = None  # decoded (skip_special) when the engine has a tokenizer
    tokens_padded: torch.Tensor = field(default=None, repr=False)  # [rows, N] long, pad 0
    mask: torch.Tensor = field(default=None, repr=False)  # [rows, N] bool
    logprobs_padded: torch.Tensor = field(default=None, repr=False)  # [rows, N] fp32, 0 where mask is 0
    full_logprobs_padded: torch.Tensor = field(default=None, repr=False)  # [rows, N] fp32

    def head(self, n: int) -> "GenerationResult":
        """The first n rows (every field sliced alike)."""
        return GenerationResult(*(None if v is None else v[:n] for v in (
            self.tokens, self.logprobs, self.full_logprobs, self.stop_reasons, self.texts, self.tokens_padded,
            self.mask, self.logprobs_padded, self.full_logprobs_padded)))

    @property
    def finished(self) -> list[bool]:  # ended on a stop id/string rather than the length limit
        return [r != "length" for r in self.stop_reasons]


# ----------------------------------------------------------------------------------------------------------------
# Engine

STATIC_BUCKET = 256  # static decode: cache slots rounded up to a multiple of this (fewer shapes to compile)
REFINE_TOP = 256  # logits per row recomputed in fp32 after a bf16 head (Engine._logits); > the samplers' top_k
# Gemma-3 image pieces: a text policy must never emit them (the ids exist for the vision tower's soft tokens)
_NEVER_PIECE = re.compile(r"<start_of_image>|<end_of_image>|<image_soft_token>")


def never_sample_mask(tokenizer, n_rows: int, device="cpu"):
    """[n_rows] bool, True for ids the sampler must never draw, or None when nothing is banned (no tokenizer).
    Ids >= tokenizer.vocab_size: the embedding can be larger than the tokenizer (Gemma-3 4B: 262,208 rows vs
    262,144 pieces; the extra rows serve image soft tokens) and such an id cannot even be decoded. Image pieces
    inside the tokenizer are banned too. Nothing else: every ban truncates the policy the trainer scores over the
    full vocabulary, so decodable text-side specials (<unusedN>, <mask>, <eos>, <end_of_turn>, ...) stay drawable."""
    V = getattr(tokenizer, "vocab_size", None)
    if V is None:
        return None
    mask = torch.zeros(n_rows, dtype=torch.bool)
    mask[min(V, n_rows):] = True
    specials = getattr(tokenizer, "special_ids", ())
    bad = [i for i in specials if i < n_rows and _NEVER_PIECE.fullmatch(tokenizer.id_to_piece(i))]
    mask[bad] = True
    return mask.to(device) if bool(mask.any()) else None

class Engine:
    def __init__(self, model, tokenizer=None, prefill_chunk: int | None = None, decode: str = "eager",
                 compile: bool = False, dtype: torch.dtype | None = None, share_prompt: bool | None = None):
        """dtype: the activations' (= KV cache's) dtype; None = the weights'. Under FSDP2 with bf16 mixed precision
        the weights are fp32 masters but the forward computes bf16: pass the compute dtype.
        prefill_chunk: run prompt prefills in chunks of this many slots (bounds the [P, H, T, T] attention
        scores of long prompts; the cache attends each chunk over [ring ; chunk]). None = one pass.
        decode: "eager" (the reference: growing key views, compaction of finished rows), "static" (StaticKVCache:
        fixed shapes, no host sync in a step, no compaction) or "compiled" (the static step through
        torch.compile(mode="reduce-overhead"): CUDA graphs on GPU, inductor on CPU; compiled once per batch
        shape, so the first call pays the compilation). compile=True is shorthand for decode="compiled".
        share_prompt: an eager decode of K > 1 samples per prompt reads each prompt's cache in place
        (FanoutKVCache) instead of K copies of it (False: KVCache.fan_out, the layout it is tested against).
        None = on for bf16/fp16 caches, off for fp32. Why not always: its prompt-part matmul has K*G rows, and a
        BLAS may round a row differently at another row count, so an fp32 sample would no longer be bit-identical
        whatever the batch it sits in (KVCache.fan_out's per-row products are); in half precision rows already
        depend on their batch (left padding, `python bench/batch_invariance.py`), and the shared read pays."""
        decode = "compiled" if compile else decode
        if decode not in ("eager", "static", "compiled"):
            raise ValueError(f"Engine: decode must be eager, static or compiled (got {decode!r})")
        self.model, self.tokenizer = model, tokenizer
        self.prefill_chunk = prefill_chunk
        self.decode = decode
        self._compiled_step = None
        self.config = model.config
        w = model.embed_tokens.weight
        self.dtype, self.device = dtype or w.dtype, w.device
        self.share_prompt = self.dtype != torch.float32 if share_prompt is None else share_prompt
        self.pad_id = getattr(self.config, "pad_token_id", 0) or 0
        self.never = never_sample_mask(tokenizer, w.shape[0], self.device)  # [V] bool or None
        # eager decode draws from the head's refined candidates (sample_top) where its one host read per step is
        # free: on a CPU. On a GPU the full-vocabulary passes are cheap and a per-step sync is not.
        self.draw_from_top = self.device.type == "cpu"
        self.draws = {"top": 0, "full": 0, "declined": 0}  # decode steps by sampler (declined: sample_top had
        # candidates but could not prove them enough, so the step drew over the whole vocabulary)

    # ---- small helpers -----------------------------------------------------------------------------------
    def _logits(self, h):
        """h [B, D] final normed hidden -> fp32 logits [B, V] (tied head). Computing the head ourselves lets the
        prefill skip the [B, T, V] logits of every prompt position.

        fp32 weights: one fp32 matmul. bf16 weights: one bf16 matmul for the whole vocabulary (fp32 accumulation
        inside, bf16 output: what transformers' bf16 generate samples from), then the REFINE_TOP largest logits of
        each row recomputed exactly in fp32 from their W rows and written back. Why both: the bf16 output rounds
        each logit to 8 bits (+-0.06 at |z| = 30), which would put rounding, not policy, between the sampler's
        log-probs and the trainer's fp32 kernel (kernels/logprobs.py); but an exact fp32 head over all 262k rows
        costs 4-7x the bf16 one on CPU (no bf16 x bf16 -> fp32 matmul there; `python bench/generate.py` prints
        the head's share). Every token top-k/top-p can keep and the argmax sit in the refined set unless more than
        REFINE_TOP - top_k tokens lie within the rounding (+-2^-8 |z|) of the k-th logit, so the sampled and
        greedy tokens see exact logits; the tail outside keeps its bf16 value (it only enters the normaliser)."""
        return self._head(h)[0]

    def _head(self, h, full: bool = True):
        """_logits, plus what sample_top reads: (logits [B, V] or None when not `full`, top [B, R] the refined
        ids, their exact logits [B, R], bound [B] the largest logit any id outside `top` can have); fp32 weights:
        (logits, None, None, None), no candidate set. full=False (callers that never read full_logprobs) skips
        every fp32 pass over the vocabulary: top-k straight on the bf16 output, nothing scattered back."""
        W = self.model.embed_tokens.weight.detach()  # [V, D]; the sampler never needs a graph
        c = getattr(self.config, "final_logit_softcapping", None)
        cap = (lambda z: torch.tanh(z / c) * c) if c else (lambda z: z)  # monotone: the tail stays below the bound
        if W.dtype == torch.float32:
            return cap(F.linear(h.float(), W)), None, None, None
        z = F.linear(h.to(W.dtype), W)  # [B, V] bf16 out, fp32 accumulation inside
        logits = z.float() if full else None
        vals, top = (z if logits is None else logits).topk(min(REFINE_TOP, W.shape[0]), dim=-1)  # [B, R] descending
        bound = vals[:, -1].float()  # [B]: the tail keeps its bf16 outputs, all <= the smallest one kept
        exact = torch.bmm(W[top].float(), h.float()[:, :, None])[..., 0]  # [B, R, D] @ [B, D, 1] -> [B, R]
        if logits is not None:
            logits.scatter_(1, top, exact)
            logits = cap(logits)
        return logits, top, cap(exact), cap(bound)

    def _forward(self, ids, cache):
        """One cached forward of ids [B, T] -> final hidden [B, T, D]."""
        return self.model(ids, position_ids=cache.position_ids(ids.shape[1]), kv_cache=cache, return_hidden=True)

    def _static_step(self, ids, cache):
        """One decode step on a StaticKVCache: ids [B, 1] -> fp32 logits [B, V]. Traceable: fixed shapes, no sync."""
        return self._logits(self._forward(ids, cache)[:, -1])

    def _step_fn(self):
        if self.decode != "compiled":
            return self._static_step
        if self._compiled_step is None:
            compiled = torch.compile(self._static_step, mode="reduce-overhead", dynamic=False)
            # Under FSDP2 each fully_shard block's hooks break the graph, so dynamo traces every block's forward as a
            # frame of its own, specialised on its layer_idx (the cache slot it writes): one entry per layer. At
            # dynamo's default recompile_limit (8) layers 9+ fell back to eager and compiled rollouts ran slower
            # than eager ones (H200, bench/gpu.py --grpo-decode: 2.13 vs 1.44 s/step); with room for every layer,
            # 0.98 vs 1.38 s.
            limit = max(self.config.num_hidden_layers + 8, torch._dynamo.config.recompile_limit)

            def step(ids, cache):
                with torch._dynamo.config.patch(recompile_limit=limit):
                    return compiled(ids, cache)
            self._compiled_step = step
        return self._compiled_step

    def _left_pad(self, prompts):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate: every prompt needs at least one token (prompts must be non-empty lists)")
        L = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), L), self.pad_id, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, L - len(p):] = torch.as_tensor(p, dtype=torch.long)
        start = torch.tensor([L - len(p) for p in prompts], dtype=torch.long)
        return ids.to(self.device), start.to(self.device)

    @torch.inference_mode()  # callers may hold the cache and reuse it (generate(prefill=), score(prefix=))
    def prefill(self, prompts: list[list[int]], max_len: int | None = None):
        """Left-padded batch prefill -> (cache [P rows], last-position fp32 logits [P, V])."""
        ids, start = self._left_pad(prompts)
        P, L = ids.shape
        cache = KVCache(self.config, P, max_len or L, self.dtype, self.device, start=start)
        C = self.prefill_chunk or L
        for c in range(0, L, C):
            h = self._forward(ids[:, c:c + C], cache)  # [P, <=C, D]
        return cache, self._logits(h[:, -1])

    # ---- generation --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], num_samples: int = 1, max_new_tokens: int | list[int] = 256,
                 temperature: float | list[float] = 1.0, top_k: int | None = None, top_p: float = 1.0,
                 stop_ids=None, stop_strings=(), seeds=None, min_new_tokens: int = 0, check_every: int = 8,
                 compact: bool = True, on_done=None, prefill=None, full_logprobs: bool = True) -> GenerationResult:
        """Sample num_samples continuations of every prompt (token id lists, BOS included by the caller).

        stop_ids: default tokenizer.stop_ids or [eos, <end_of_turn>] = [1, 106]; pass [] to disable.
        stop_strings: matched on decoded text (needs a tokenizer). seeds: one int per output row, or an int s
        (row r gets s + r), or None (drawn from torch's global RNG). min_new_tokens: stop ids are banned before it.
        check_every: how often (steps) the loop syncs with the host: "all rows done", stop strings, compaction.
        compact: at those syncs, once >= 1/4 of the batch has finished, drop the finished rows from the cache
        (one index_select per layer) so later steps stop paying for them; results are unchanged.
        on_done(rows): called at those syncs (no extra one) with the output rows that finished since the last call,
        each as (row, its final token ids), and once at the end with the rest: progress as rows finish.
        Per sample slot k (row i*K + k): temperature and max_new_tokens may be lists of K values, e.g. eval's
        greedy row and its K sampled rows in ONE decode ([0.0, T, ..., T]): a greedy slot (0) ignores top_k/top_p
        and gets exactly the tokens greedy() gives it; at most one nonzero temperature per call.
        prefill: (cache, logits) = self.prefill(prompts) of these same prompts, reused instead of prefilling again
        (it is copied, never modified, so one prefill can serve several calls and score(prefix=...)).
        full_logprobs=False: the result's full_logprobs[_padded] are None, and a CPU decode skips the fp32 passes
        over the vocabulary they need (eval reads tokens only); the tokens and sampler log-probs are the same."""
        K, P = num_samples, len(prompts)
        temps = [float(x) for x in temperature] if isinstance(temperature, (list, tuple)) else [float(temperature)] * K
        limits = [int(x) for x in max_new_tokens] if isinstance(max_new_tokens, (list, tuple)) else \
            [int(max_new_tokens)] * K
        if len(temps) != K or len(limits) != K:
            raise ValueError(f"generate: {len(temps)} temperatures / {len(limits)} max_new_tokens for {K} samples")
        if min(temps) < 0 or not 0 < top_p <= 1 or len({x for x in temps if x > 0}) > 1:
            raise ValueError(f"generate: need temperatures >= 0 (at most one nonzero value) and 0 < top_p <= 1 "
                             f"(got {temperature}, {top_p})")
        if stop_strings and self.tokenizer is None:
            raise ValueError("generate: stop_strings need Engine(model, tokenizer)")
        N = max(limits)
        temperature = max(temps)  # the sampled slots' temperature (0: every slot greedy)
        mixed = len(set(temps)) > 1  # greedy and sampled slots in one decode
        rows = P * K
        if stop_ids is None:
            stop_ids = getattr(self.tokenizer, "stop_ids", None) or [1, 106]
        if seeds is None:
            seeds = torch.randint(0, 2 ** 62, (rows,)).tolist()
        elif isinstance(seeds, int):
            seeds = [seeds + r for r in range(rows)]
        if len(seeds) != rows:
            raise ValueError(f"generate: {len(seeds)} seeds for {rows} output rows ({P} prompts x {K} samples)")
        if self.decode != "eager" and (Pb := 1 << (P - 1).bit_length()) > P:
            # static shapes: the prompt count bucketed to a power of two (copies of prompt 0 fill the batch and are
            # dropped), so a compiled step serves every batch size up to its bucket instead of recompiling per size
            def real_rows_done(got):  # the padding rows are not the caller's
                if mine := [x for x in got if x[0] < rows]:
                    on_done(mine)
            done_cb = None if on_done is None else real_rows_done
            if prefill is not None:  # the same padding rows (copies of prompt 0) in the prefilled cache
                idx = list(range(P)) + [0] * (Pb - P)
                prefill = (prefill[0].fan_out(1, prefill[0].pos, rows=idx), prefill[1][idx])
            return self.generate(prompts + [prompts[0]] * (Pb - P), K, limits, temps, top_k, top_p, stop_ids,
                                 stop_strings, list(seeds) + [0] * ((Pb - P) * K), min_new_tokens, check_every,
                                 compact, done_cb, prefill, full_logprobs).head(rows)
        dev = self.device

        # all uniforms up front, one generator per row: row r's sample never depends on the batch it sits in
        u = torch.empty(rows, max(N, 1), dtype=torch.float64, device=dev)  # float64: see _inverse_cdf
        for r, s in enumerate(seeds):
            g = torch.Generator(device=dev).manual_seed(int(s))
            u[r] = torch.rand(max(N, 1), generator=g, device=dev, dtype=torch.float64)

        L = max(len(p) for p in prompts)
        static = self.decode != "eager"
        # static decode: cache length bucketed to a multiple of 256, so one compiled step serves many prompt lengths
        S = -(-(L + N) // STATIC_BUCKET) * STATIC_BUCKET if static else L + N
        share = self.share_prompt and K > 1 and not static
        with span("engine.prefill"):
            if prefill is not None:  # the caller's prefill of these prompts: read or copied, never modified
                small, logits = prefill
                if small.batch_size != P or small.pos != L or small.start.tolist() != [L - len(p) for p in prompts]:
                    raise ValueError("generate: prefill must be Engine.prefill(prompts) of these same prompts")
            elif K == 1:  # nothing to share: prefill straight into a cache with room for the new tokens
                small, (cache, logits) = None, self.prefill(prompts, max_len=S)
            else:  # each prompt once
                small, logits = self.prefill(prompts)
            if small is not None:  # its K rows read it in place (share) or get a copy of it (once)
                cache = FanoutKVCache(small, K, max(N, 1)) if share else small.fan_out(K, S)  # [rows]
                del small
        logits = logits.repeat_interleave(K, 0)  # [rows, V]
        cand = None  # (top, exact top logits, bound) of the last head for sample_top; the prefill's logits have none
        if static:  # fixed shapes from here on: finished rows stay in the batch (masked), never compacted
            cache, compact, step = StaticKVCache(cache), False, self._step_fn()
            cur = torch.empty(rows, 1, dtype=torch.long, device=dev)  # [rows, 1] the step's input tokens

        out_tok = torch.full((rows, N), self.pad_id, dtype=torch.long, device=dev)
        out_lp = torch.zeros(rows, N, device=dev)
        out_full = torch.zeros(rows, N, device=dev) if full_logprobs else None
        limit = torch.tensor(limits, dtype=torch.long, device=dev).repeat(P)  # [rows] max_new_tokens per row
        uneven = len(set(limits)) > 1
        length = limit.clone()  # tokens kept per row
        greedy_row = torch.tensor([x == 0 for x in temps], device=dev).repeat(P) if mixed else None  # [rows]
        done = torch.zeros(rows, dtype=torch.bool, device=dev)
        reason_id = torch.zeros(rows, dtype=torch.bool, device=dev)  # ended on a stop id
        stop_t = torch.tensor(list(stop_ids), dtype=torch.long, device=dev)
        ban = self.never  # [V] bool or None: ids the tokenizer cannot decode, image/placeholder ids
        ban_early = ban  # before min_new_tokens the stop ids are banned too; both masks built once per call
        if min_new_tokens > 0 and len(stop_ids):
            ban_early = torch.zeros(logits.shape[-1], dtype=torch.bool, device=dev) if ban is None else ban.clone()
            ban_early[stop_t] = True
        str_reason = [None] * rows  # host-side stop-string results: row -> kept length
        checked = [0] * rows  # tokens of each row already scanned for stop strings
        act = torch.arange(rows, device=dev)  # output rows still in the decode batch (all, until compaction)
        told = torch.zeros(rows, dtype=torch.bool, device=dev)  # rows already reported to on_done
        steps = 0
        for t in range(N):
            with span("engine.sample"):  # draw + per-row bookkeeping, all on device
                banned = ban_early if t < min_new_tokens else ban
                g = greedy_row[act] if mixed else None
                drawn = None if cand is None else sample_top(*cand, u[act, t], temperature, g, top_k, top_p,
                                                             banned, logits)
                self.draws["full" if drawn is None else "top"] += 1
                self.draws["declined"] += cand is not None and drawn is None
                if drawn is None:
                    if logits is None:  # a full=False head (the candidates failed the check): the whole row now
                        logits = self._head(h[:, -1])[0]
                    drawn = sample_tokens(logits, u[act, t], temperature, top_k, top_p, banned)
                    if mixed:  # greedy slots: the argmax (no sync: both computed, selected per row)
                        tg, lg, fg = sample_tokens(logits, u[act, t], 0.0, None, 1.0, banned)
                        drawn = tuple(torch.where(g, a, b) for a, b in zip((tg, lg, fg), drawn))
                tok, lp, full = drawn  # [n] each
                live = ~done[act]
                out_tok[act, t] = torch.where(live, tok, self.pad_id)
                out_lp[act, t] = torch.where(live, lp, 0.0)
                if out_full is not None:
                    out_full[act, t] = torch.where(live, full, 0.0)
                if len(stop_ids):
                    hit = live & torch.isin(tok, stop_t)
                    length[act] = torch.where(hit, t + 1, length[act])
                    reason_id[act] |= hit
                    done[act] |= hit
                if uneven:  # a row whose own max_new_tokens is reached ends here ("length")
                    done[act] |= limit[act] <= t + 1
            steps = t + 1
            if steps == N:
                break
            if steps % check_every == 0:  # the only host syncs of the loop
                with span("engine.sync"):
                    if stop_strings:
                        self._scan_stop_strings(out_tok, steps, done, length, stop_strings, str_reason, checked)
                    if on_done is not None:
                        told |= self._report_done(on_done, done & ~told, out_tok, length, steps, reason_id,
                                                  str_reason)
                    keep = ~done[act]
                    n_keep = int(keep.sum())
                    if n_keep == 0:
                        break
                    if compact and n_keep <= 0.75 * len(act):  # drop finished rows once a quarter has finished
                        idx = keep.nonzero()[:, 0]
                        cache.select(idx)
                        act = act[idx]
            if static:
                with span("engine.forward"):  # forward + head in one traced step
                    cur.copy_(out_tok[:, t:t + 1])  # one fixed input tensor: no recompile per N (strides)
                    logits = step(cur, cache)
                    if self.decode == "compiled":
                        logits = logits.clone()  # CUDA-graph outputs are overwritten by the next replay
                continue
            with span("engine.forward"):
                h = self._forward(out_tok[act, t:t + 1], cache)  # [n, 1, D]; finished, uncompacted rows feed pad
            with span("engine.head"):
                logits, *cand = self._head(h[:, -1], full=full_logprobs or not self.draw_from_top)
                cand = cand if self.draw_from_top and cand[0] is not None else None
        if stop_strings:  # rows can still complete a stop string in the steps since the last check
            self._scan_stop_strings(out_tok, steps, done, length, stop_strings, str_reason, checked)
        if on_done is not None:
            self._report_done(on_done, ~told, out_tok, length, steps, reason_id, str_reason)
        return self._collect(out_tok, out_lp, out_full, length, reason_id, str_reason, steps, stop_strings)

    @staticmethod
    def _report_done(on_done, new, out_tok, length, steps, reason_id, str_reason):
        """on_done([(row, final token ids, stop reason)]) for the rows in the bool mask `new` (host side, at a
        sync; the reasons as _collect gives them) -> `new`."""
        rows_ = new.nonzero()[:, 0].tolist()
        if rows_:
            lens, ids = length.clamp_max(steps)[rows_].tolist(), reason_id[rows_].tolist()
            toks = out_tok[rows_].tolist()
            on_done([(r, t[:n], _reason(str_reason[r], i)) for r, t, n, i in zip(rows_, toks, lens, ids)])
        return new

    def _scan_stop_strings(self, out_tok, steps, done, length, stop_strings, str_reason, checked):
        """Host-side: find the first token at which a stop string appears in each row's decoded text.

        Scans every row with tokens not yet scanned: live rows up to `steps`, and rows that ended on a stop id
        since the last scan up to their stop token -- a stop string written before that stop id must win (the
        earliest of stop string, stop id and length ends the row), else the text between them would be kept.
        Only a tail is decoded: a new occurrence ends after checked[r] and spans at most 4 tokens per character
        (byte-fallback pieces), plus one token of slack because decoding drops a slice's leading space."""
        end = length.clamp_max(steps).tolist()  # live rows: steps; rows ended on a stop id: their stop token
        rows_ = [r for r in range(len(end)) if str_reason[r] is None and checked[r] < end[r]]
        if not rows_:
            return
        span = 4 * max(len(s) for s in stop_strings) + 1
        lo = max(0, min(checked[r] for r in rows_) - span)
        toks = out_tok[rows_, lo:steps].tolist()
        dec = self.tokenizer.decode
        for r, row in zip(rows_, toks):
            c0, checked[r] = checked[r], end[r]
            a = max(0, c0 - span)  # absolute index where this row's tail starts
            tail = row[a - lo:end[r] - lo]
            if not any(s in dec(tail) for s in stop_strings):
                continue
            # smallest n whose prefix holds a stop string; prefixes up to c0 were already clean
            for n in range(max(c0, a + 1), end[r] + 1):
                if any(s in dec(tail[:n - a]) for s in stop_strings):
                    break
            str_reason[r] = n
            length[r] = n
            done[r] = True

    def _collect(self, out_tok, out_lp, out_full, length, reason_id, str_reason, steps, stop_strings=()):
        N = out_tok.shape[1]
        length = length.clamp_max(steps).cpu()
        mask = torch.arange(N)[None, :] < length[:, None]  # [rows, N]
        tok = out_tok.cpu().masked_fill(~mask, self.pad_id)
        lp = out_lp.float().cpu().masked_fill(~mask, 0.0)
        full = None if out_full is None else out_full.float().cpu().masked_fill(~mask, 0.0)
        reason_id = reason_id.cpu().tolist()
        lens = length.tolist()
        reasons = [_reason(str_reason[r], reason_id[r]) for r in range(len(lens))]
        tokens = [tok[r, :n].tolist() for r, n in enumerate(lens)]
        texts = [self.tokenizer.decode(t) for t in tokens] if self.tokenizer is not None else None
        for r in range(len(lens)):  # the token completing a stop string may carry more text ("m>\n"): cut it
            if str_reason[r] is not None:
                texts[r] = _cut_after_stop(texts[r], stop_strings)
        return GenerationResult(
            tokens=tokens, logprobs=[lp[r, :n].tolist() for r, n in enumerate(lens)],
            full_logprobs=None if full is None else [full[r, :n].tolist() for r, n in enumerate(lens)],
            stop_reasons=reasons, texts=texts,
            tokens_padded=tok, mask=mask, logprobs_padded=lp, full_logprobs_padded=full)

    @torch.inference_mode()
    def greedy(self, prompts: list[list[int]], max_new_tokens: int = 256, stop_ids=None,
               stop_strings=()) -> GenerationResult:
        """Batched greedy decoding (temperature 0), one row per prompt."""
        return self.generate(prompts, 1, max_new_tokens, temperature=0.0, stop_ids=stop_ids,
                             stop_strings=stop_strings, seeds=0)

    # ---- scoring -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompt: list[int], continuations: list[list[int]], per_token: bool = False,
              batch_size: int = 64, prefix=None):
        """Sum log p(continuation | prompt) for each continuation (temperature 1, full vocabulary), from ONE prompt
        prefill fanned out to the continuations, which run teacher-forced in one right-padded forward per
        `batch_size` chunk (right pads sit after every real token, so causality alone keeps them out).
        per_token=True returns the per-token log-prob lists instead of their sums.
        prefix: (cache, row, logits) from self.prefill(batch): row `row` of that batch prefill holds the first
        n = cache.pos - cache.start[row] ids of `prompt` (eval: the user's prompt; `prompt` adds the ids all
        candidates share), so only prompt[n:] runs here instead of a whole prefill. The cache is not modified."""
        if any(len(c) == 0 for c in continuations):
            raise ValueError("score: every continuation needs at least one token")
        if not continuations:
            return []
        if prefix is None:
            small, last = self.prefill([prompt])  # [1, ...], last-position logits [1, V]
        else:
            pc, row, last = prefix
            n0 = pc.pos - int(pc.start[row])  # prompt ids that row already holds
            rest = prompt[n0:]
            small = pc.fan_out(1, pc.pos + len(rest), rows=[row])  # the row alone, with room for the rest
            last = last[row:row + 1]
            if rest:
                h = self._forward(torch.tensor([rest], dtype=torch.long, device=self.device), small)
                last = self._logits(h[:, -1])
        first_lp = torch.log_softmax(last, -1)[0]  # [V]: predicts each continuation's first token
        out = []
        for c0 in range(0, len(continuations), batch_size):
            conts = continuations[c0:c0 + batch_size]
            n, Lc = len(conts), max(len(c) for c in conts)
            ids = torch.full((n, Lc), self.pad_id, dtype=torch.long)
            for i, c in enumerate(conts):
                ids[i, :len(c)] = torch.as_tensor(c, dtype=torch.long)
            ids = ids.to(self.device)
            lens = torch.tensor([len(c) for c in conts], device=self.device)
            valid = torch.arange(Lc, device=self.device)[None, :] < lens[:, None]  # [n, Lc]
            lp = torch.zeros(n, Lc, device=self.device)
            lp[:, 0] = first_lp[ids[:, 0]]
            if Lc > 1:
                cache = small.fan_out(n, small.pos + Lc)
                h = self._forward(ids, cache)[:, :-1]  # [n, Lc-1, D]: position t predicts token t+1
                lp[:, 1:] = token_logprobs(h.reshape(-1, h.shape[-1]), self.model.embed_tokens.weight,  # fused: no [n*T, V]
                                           ids[:, 1:].reshape(-1)).view(n, Lc - 1)
            lp = lp.masked_fill(~valid, 0.0).cpu()
            for i, c in enumerate(conts):
                out.append(lp[i, :len(c)].tolist() if per_token else float(lp[i, :len(c)].double().sum()))
        return out


def main(argv=None):
    """The quickstart demo: greedy or sampled continuation of a prompt with our model, tokenizer and engine alone."""
    import argparse
    import time

    from twice.gemma3 import Gemma3
    from twice.tokenizer import Tokenizer
    ap = argparse.ArgumentParser(description="python -m twice.engine --model ~/.cache/twice/gemma-3-270m --prompt 'Hi'")
    ap.add_argument("--model", required=True, help="HF-format folder (e.g. from `python -m twice.convert gemma-3-270m`)")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--chat", action="store_true", help="wrap the prompt in the Gemma-3 chat template")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ap.add_argument("--num-samples", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    model = Gemma3.from_pretrained(args.model).eval()
    tok = Tokenizer.from_pretrained(args.model)
    ids = (tok.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat
           else [tok.bos_id] + tok.encode(args.prompt))
    t0 = time.perf_counter()
    out = Engine(model, tok).generate([ids], num_samples=args.num_samples, max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, seeds=args.seed)
    dt = time.perf_counter() - t0
    for text in out.texts:
        print(repr(args.prompt), "->", repr(text))
    n = sum(len(t) for t in out.tokens)
    print(f"{n} tokens in {dt:.1f} s ({n / dt:.1f} tok/s, prompt {len(ids)} tokens)")


if __name__ == "__main__":
    main()
