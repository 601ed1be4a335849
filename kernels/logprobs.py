"""Fused linear -> per-token log-prob (+ entropy), forward and backward, without materialising [N, V] logits.

    from kernels import token_logprobs
    logp = token_logprobs(hidden, weight, targets, temperature=1.0)               # [N] fp32
    logp, ent = token_logprobs(hidden, weight, targets, return_entropy=True)      # [N] fp32 each

Gradient (per row i; z = h W^T / T, lse = log sum_j e^{z_j}, p = e^{z - lse}, g_lp / g_H = upstream grads):
  1. logp = z_y - lse and H = -sum_j p_j log p_j = lse - sum_j p_j z_j.
  2. d lse / d z_j = p_j, so d logp / d z_j = [j = y] - p_j.
  3. d p_k / d z_j = p_k([k = j] - p_j), so d H / d z_j = p_j - p_j - sum_k z_k p_k([k = j] - p_j)
     = -p_j (z_j - sum_k p_k z_k) = -p_j (z_j - lse + H) = -p_j (log p_j + H).
  4. dz_j = g_lp [j = y] - p_j (g_lp + g_H (log p_j + H)), with log p_j = z_j - lse recomputed from the saved lse.
  5. dh = (dz / T) W and dW = (dz / T)^T h; chunked over V, each dW slice is written once and dh accumulates in fp32.
Only lse and H ([N] fp32) are saved; the logits are recomputed tile by tile in backward.

Two implementations, same contract (memory and time against a naive log_softmax: bench/logprobs.py):
  * "torch": pure PyTorch, two-level chunked (vocab outer, tokens inner) with an online (m, s, t) logsumexp/entropy in fp32.
    Runs everywhere; it is what trains on CPU. Transient memory is a few [rows, vocab-chunk] fp32 tiles (<= ~64 MB).
  * "triton": kernels/logprobs_triton.py (split-V forward partials merged deterministically, a dz kernel per vocab slice
    in backward plus cuBLAS matmuls for dW / dh). Used on CUDA; runs on CPU tensors under TRITON_INTERPRET=1 for tests.
Selection: impl argument, else env TWICE_LOGPROBS_IMPL=torch|triton, else "triton" for bf16/fp16 CUDA tensors when triton
imports, else "torch" (fp32 on CUDA too: cuBLAS fp32 beats a non-tensor-core Triton dot that spills registers; an
explicit impl="triton" with fp32 CUDA inputs runs tf32x3 dots). triton is optional: this module imports without it.
No host syncs on the hot path: the target range check (targets.min/max) runs on CPU tensors, where it costs nothing,
and on CUDA only with TWICE_DEBUG_CHECKS=1; the target logit is gathered, not found by boolean indexing.

Tests: pytest tests/test_logprobs.py        Benchmark: python bench/logprobs.py
"""
import importlib
import math
import os

import torch

# Reference-path tile size: the logits tile [rows, vocab-chunk] holds at most this many fp32 elements (16 MB); forward
# and backward keep two such tiles plus a fp32 copy of the W chunk, so the transient stays well under 64 MB.
REF_TILE_ELEMS = 1 << 22
REF_MAX_ROWS = 1024      # token-chunk rows; big enough that each chunk matmul runs at full BLAS speed
REF_MIN_VCHUNK = 1024    # never slice the vocabulary thinner than this (small-N case widens the vocab chunk instead)
# On CPU the fp32 W chunk [vchunk, D] is also bounded by this (2 MB): a chunk that stays in cache while the token rows
# stream past it, instead of 16 MB (6553 x 640). `python bench/logprobs.py --n 64 256 --d 640 --v 262144 --impls torch
# --threads 1 --reps 1 --dtype bfloat16` (AMD EPYC; with the staging buffers below; e2487a2 -> 2ecdb2f): fwd N=256
# 1.83 -> 1.15 s, fwd+bwd (dh and dW) 5.95 -> 4.69 s, N=64 0.49 -> 0.32 s and 1.93 -> 1.55 s. On CUDA the larger chunk
# stays (fewer launches).
REF_CPU_W_CHUNK_ELEMS = 1 << 19

IMPLS = ("torch", "triton")


def _triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:  # ImportError, or a broken install: fall back to torch
        return False
    return True


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def select_impl(hidden: torch.Tensor, impl: str | None = None) -> str:
    """Pick "torch" or "triton": explicit argument > TWICE_LOGPROBS_IMPL > CUDA+triton > torch."""
    if impl is None:
        impl = os.environ.get("TWICE_LOGPROBS_IMPL") or None
        if impl is not None and impl not in IMPLS:
            raise ValueError(f"TWICE_LOGPROBS_IMPL={impl!r}: expected one of {IMPLS}")
    if impl is None:
        auto_ok = hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16) and _triton_available()
        return "triton" if auto_ok else "torch"
    if impl not in IMPLS:
        raise ValueError(f"token_logprobs impl={impl!r}: expected one of {IMPLS}")
    if impl == "triton":
        if not _triton_available():
            raise RuntimeError("token_logprobs impl='triton' but triton is not installed (pip install -e '.[triton]')")
        if not hidden.is_cuda and not _interpret():
            raise RuntimeError("token_logprobs impl='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before import "
                               "for the CPU interpreter")
    return impl


def _check_inputs(hidden, weight, targets, temperature):
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"token_logprobs: hidden must be [N, D] and weight [V, D], got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"token_logprobs: hidden dim {hidden.shape[1]} != weight dim {weight.shape[1]}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"token_logprobs: targets must be [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"token_logprobs: targets must be int64/int32, got {targets.dtype}")
    if hidden.dtype != weight.dtype or hidden.device != weight.device or targets.device != hidden.device:
        raise ValueError(f"token_logprobs: hidden ({hidden.dtype}, {hidden.device}), weight ({weight.dtype}, "
                         f"{weight.device}) and targets ({targets.device}) must share dtype/device")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"token_logprobs: temperature must be a positive finite number, got {temperature}")
    # the range check reads targets on the host: free on CPU, a device sync on CUDA (debug mode only there)
    check_range = not targets.is_cuda or os.environ.get("TWICE_DEBUG_CHECKS", "0") == "1"
    if check_range and targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= weight.shape[0]):
        raise ValueError(f"token_logprobs: targets must lie in [0, V={weight.shape[0]}) (pack out ignored tokens "
                         f"before calling), got range [{int(targets.min())}, {int(targets.max())}]")


# ----------------------------------------------------------------------------------------------------------------------
# Reference path (pure PyTorch)

def _acc_dtype(hidden):
    # fp32 math for fp32/bf16/fp16 inputs; fp64 inputs stay fp64 (reference only: lets gradcheck run on this path)
    return torch.float64 if hidden.dtype == torch.float64 else torch.float32


def _ref_chunks(n: int, v: int, d: int, cpu: bool = False) -> tuple[int, int]:
    """Token rows and vocab columns per tile: [rows, vchunk] and the [vchunk, D] W / dW chunk both <= REF_TILE_ELEMS
    (the W chunk <= REF_CPU_W_CHUNK_ELEMS on CPU), never under REF_MIN_VCHUNK columns."""
    rows = max(1, min(n, REF_MAX_ROWS))
    w_elems = min(REF_TILE_ELEMS, REF_CPU_W_CHUNK_ELEMS) if cpu else REF_TILE_ELEMS
    vchunk = max(REF_MIN_VCHUNK, REF_TILE_ELEMS // rows)
    vchunk = min(vchunk, max(REF_MIN_VCHUNK, w_elems // max(d, 1)))
    return rows, max(1, min(v, vchunk))


def _tile(flat, r: int, c: int):
    """An [r, c] contiguous view at the start of a flat staging buffer (reused chunk after chunk)."""
    return flat[:r * c].view(r, c)


def _staging(n_elems: int, acc, dev):
    """A flat fp32 buffer that every chunk of one call reuses. Why not a fresh tensor per chunk: on CPU a block of a
    few MB may come straight from the OS and be page-faulted in on first touch, chunk after chunk; reusing one cut
    eval's exact phase for 8 users from 7.3 to 6.7 s (README, "Main job time"), results bit-identical."""
    return torch.empty(n_elems, dtype=acc, device=dev)


def _ref_forward(hidden, weight, targets, temperature, with_entropy):
    """-> lse, logp, entropy (or None), each [N] in the accumulation dtype (fp32; fp64 for fp64 inputs)."""
    n, v = hidden.shape[0], weight.shape[0]
    dev, acc = hidden.device, _acc_dtype(hidden)
    rows, vchunk = _ref_chunks(n, v, hidden.shape[1], cpu=hidden.device.type == "cpu")
    h32 = hidden.to(acc)                                       # [N, D]; a no-op for fp32, O(N*D) for bf16
    m = torch.full((n,), -1e30, dtype=acc, device=dev)         # finite init: alpha = 0 and 0 * (m - m') = 0 on chunk 1
    s = torch.zeros(n, dtype=acc, device=dev)
    t = torch.zeros(n, dtype=acc, device=dev) if with_entropy else None
    zy = torch.zeros(n, dtype=acc, device=dev)
    d = hidden.shape[1]
    wbuf = None if weight.dtype == acc else _staging(vchunk * d, acc, dev)  # fp32 weight: its slices are used as-is
    zbuf, ebuf = (_staging(min(n, rows) * vchunk, acc, dev) for _ in range(2))
    for v0 in range(0, v, vchunk):
        v1 = min(v, v0 + vchunk)
        w32 = weight[v0:v1] if wbuf is None else _tile(wbuf, v1 - v0, d).copy_(weight[v0:v1])  # [Vc, D] fp32
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            z = torch.mm(h32[n0:n1], w32.T, out=_tile(zbuf, n1 - n0, v1 - v0))  # [Nc, Vc] fp32
            if temperature != 1.0:
                z.div_(temperature)                             # divide (not * 1/T) exactly as the sampler does
            y = targets[n0:n1] - v0                             # target column in this chunk (if it lies here)
            here = (y >= 0) & (y < v1 - v0)                     # [Nc] no boolean indexing: no host sync on CUDA
            zy[n0:n1] += torch.where(here, z.gather(1, y.clamp(0, v1 - v0 - 1)[:, None])[:, 0], 0.0)
            mc = m[n0:n1]
            m_new = torch.maximum(mc, z.amax(dim=1))            # [Nc]
            alpha = torch.exp(mc - m_new)
            z.sub_(m_new[:, None])                              # shifted coordinates: z - m' <= 0
            e = torch.exp(z, out=_tile(ebuf, n1 - n0, v1 - v0))
            s_tile = e.sum(dim=1)
            if with_entropy:
                t_tile = torch.linalg.vecdot(e, z)              # sum e^{z-m'} (z-m'), no [Nc, Vc] temporary
                t[n0:n1] = alpha * (t[n0:n1] + s[n0:n1] * (mc - m_new)) + t_tile
            s[n0:n1] = alpha * s[n0:n1] + s_tile
            m[n0:n1] = m_new
    log_s = torch.log(s)
    lse = m + log_s
    logp = zy - lse
    ent = (log_s - t / s) if with_entropy else None
    return lse, logp, ent


def _ref_backward(hidden, weight, targets, temperature, lse, ent, g_lp, g_h, need_dh, need_dw):
    """dz = g_lp [j=y] - p (g_lp + g_H (log p + H)), then dh = (dz/T) W, dW = (dz/T)^T h; vocab outer loop."""
    n, v = hidden.shape[0], weight.shape[0]
    rows, vchunk = _ref_chunks(n, v, hidden.shape[1], cpu=hidden.device.type == "cpu")
    acc = _acc_dtype(hidden)
    if n == 0:                                                  # no tokens: zero gradients (the loops would not write dW)
        return (torch.zeros_like(hidden) if need_dh else None), (torch.zeros_like(weight) if need_dw else None)
    h32 = hidden.to(acc)
    dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    dw_direct = need_dw and weight.dtype == acc                 # fp32 weight: accumulate straight into dW's slice
    inv_t = 1.0 / temperature
    g_lp = torch.zeros(n, dtype=acc, device=hidden.device) if g_lp is None else g_lp.to(acc)
    # per-row coefficients so that dz = p * (a * log p + c), plus g_lp / T at the target:
    #   a = -g_H / T,  c = -(g_lp + g_H * H) / T
    if g_h is not None:
        g_h = g_h.to(acc)
        a_all = (-inv_t * g_h)[:, None]                         # [N, 1]
        c_all = (-inv_t * (g_lp + g_h * ent))[:, None]
    else:
        c_all = (-inv_t * g_lp)[:, None]
    neg_lse = -lse[:, None]                                     # [N, 1]
    d, dev = hidden.shape[1], hidden.device
    wbuf = None if weight.dtype == acc else _staging(vchunk * d, acc, dev)  # staging buffers: see _staging
    dwbuf = _staging(vchunk * d, acc, dev) if need_dw and not dw_direct else None
    zbuf, ebuf = (_staging(min(n, rows) * vchunk, acc, dev) for _ in range(2))
    for v0 in range(0, v, vchunk):
        v1 = min(v, v0 + vchunk)
        w32 = weight[v0:v1] if wbuf is None else _tile(wbuf, v1 - v0, d).copy_(weight[v0:v1])  # [Vc, D] fp32
        dw_acc = dw[v0:v1] if dw_direct else (_tile(dwbuf, v1 - v0, d) if need_dw else None)
        for n0 in range(0, n, rows):
            n1 = min(n, n0 + rows)
            logp = torch.addmm(neg_lse[n0:n1], h32[n0:n1], w32.T, alpha=inv_t,  # [Nc, Vc] log p, recomputed
                               out=_tile(zbuf, n1 - n0, v1 - v0))
            dz = torch.exp(logp, out=_tile(ebuf, n1 - n0, v1 - v0))  # p
            if g_h is not None:
                dz.mul_(logp.mul_(a_all[n0:n1]).add_(c_all[n0:n1]))
            else:
                dz.mul_(c_all[n0:n1])
            y = targets[n0:n1] - v0
            here = (y >= 0) & (y < v1 - v0)
            dz.scatter_add_(1, y.clamp(0, v1 - v0 - 1)[:, None],  # + g_lp / T at the target (0 if not here)
                            torch.where(here, inv_t * g_lp[n0:n1], 0.0)[:, None])
            if need_dw:
                if n0 == 0:
                    torch.mm(dz.T, h32[n0:n1], out=dw_acc)      # [Vc, D]
                else:
                    dw_acc.addmm_(dz.T, h32[n0:n1])
            if need_dh:
                dh[n0:n1].addmm_(dz, w32)                       # [Nc, D]
        if need_dw and not dw_direct:
            dw[v0:v1] = dw_acc                                  # each dW slice written once
    return (dh.to(hidden.dtype) if need_dh else None), dw


# ----------------------------------------------------------------------------------------------------------------------
# autograd glue

class TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, with_entropy, impl):
        if impl == "triton":
            from kernels import logprobs_triton
            lse, logp, ent = logprobs_triton.forward(hidden, weight, targets, temperature, with_entropy)
        else:
            lse, logp, ent = _ref_forward(hidden, weight, targets, temperature, with_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, ent if with_entropy else lse)
        ctx.temperature, ctx.with_entropy, ctx.impl = temperature, with_entropy, impl
        ctx.set_materialize_grads(False)                       # an unused output's grad arrives as None: skip its term
        if with_entropy:
            return logp, ent
        return logp

    @staticmethod
    def backward(ctx, g_lp, g_h=None):
        hidden, weight, targets, lse, ent = ctx.saved_tensors
        if not ctx.with_entropy:
            g_h = None
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if (g_lp is None and g_h is None) or not (need_dh or need_dw):
            return None, None, None, None, None, None
        if ctx.impl == "triton":
            from kernels import logprobs_triton
            dh, dw = logprobs_triton.backward(hidden, weight, targets, ctx.temperature, lse, ent, g_lp, g_h,
                                              need_dh, need_dw)
        else:
            dh, dw = _ref_backward(hidden, weight, targets, ctx.temperature, lse, ent, g_lp, g_h, need_dh, need_dw)
        return dh, dw, None, None, None, None


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, impl: str | None = None):
    """log softmax(hidden @ weight.T / temperature)[i, targets[i]] for each row i, without the [N, V] logits.

    hidden [N, D] and weight [V, D] (same dtype: fp32 or bf16; the tied embedding for Gemma), targets [N] int in [0, V)
    (pack out ignored positions first). Returns logp [N] fp32, or (logp, entropy) [N] fp32 each when return_entropy
    (fp64 inputs, torch path only, give fp64: that is for gradcheck).
    Differentiable w.r.t. hidden and weight (grads in their dtypes, accumulated in fp32). impl: None (auto),
    "torch" or "triton"; see the module docstring.
    """
    temperature = float(temperature)
    _check_inputs(hidden, weight, targets, temperature)
    impl = select_impl(hidden, impl)
    if impl == "triton" and hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"token_logprobs impl='triton' supports fp32/bf16/fp16 inputs, got {hidden.dtype} "
                         "(fp64 runs on impl='torch')")
    if hidden.shape[0] == 0:
        impl = "torch"                                         # nothing to launch; the reference handles N = 0
    return TokenLogprobs.apply(hidden, weight, targets.long().contiguous(), temperature, bool(return_entropy), impl)
