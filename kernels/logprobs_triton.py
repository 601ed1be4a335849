"""Triton kernels behind kernels.token_logprobs(impl="triton"); math and gradient in kernels/logprobs.py's docstring.

Forward: grid (row blocks, vocab splits); each program runs an online (m, s, t, z_y) over the v-tiles of its split with
an fp32 tl.dot accumulator and stores four [N, S] partials; torch merges the splits (deterministic: no locks, no
atomics). Entropy uses shifted coordinates t = sum e^{z-m}(z-m), so H = log s - t/s never cancels; HAS_ENTROPY=False
skips t for the old/ref-policy passes.
Backward: per vocab slice of BWD_SLICE columns, a dz kernel recomputes the logits tile by tile and writes dz/T (fp32
math, rounded once to the input dtype); then cuBLAS writes dW[slice] = dz^T h once and dh (fp32) += dz W[slice].

Precision: bf16/fp16 inputs use tensor-core dots with fp32 accumulation; fp32 inputs use "tf32x3" on CUDA (three tf32
products, ~fp32 accuracy on tensor cores; the plain fp32 dot spills registers and runs ~10x slower) and "ieee" in the
interpreter. On CUDA the backward rounds dz to the input dtype once (bf16: halves the [N, slice] buffer and lets cuBLAS
run bf16 GEMMs); the error this adds is bounded in tests/test_logprobs.py (test_triton_bf16_dz_rounding_bound).
Autotune keys include a power-of-two bucket of N, so the config picked for one batch size is not reused for a very
different one (and every rank of a run with equal-bucket N picks from the same candidates).
Interpreter (TRITON_INTERPRET=1, CPU tensors; must be set before this module is imported): bf16 tl.dot returns garbage
there (triton #11584), so DOT_FP32 casts tiles to fp32 first; one autotune config (benchmarking needs a GPU); blocks
stay >= 16 so the same configs compile on a GPU.
"""
import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Vocabulary split per forward program (a multiple of every BV below). 262144 / 4096 = 64 splits x ceil(N/BM) row
# blocks fills an H100 at N = 4800; in the interpreter a small split keeps the multi-split merge exercised on tiny V.
SPLIT_V = 512 if INTERPRET else 4096
# Backward vocab slice: the dz buffer is [N, BWD_SLICE] (bf16: 4800 x 16384 x 2 B = 157 MB at the Gemma GRPO shape).
BWD_SLICE = 16384

if INTERPRET:
    _CONFIGS = [triton.Config({"BM": 32, "BV": 128, "BD": 64}, num_warps=4)]
else:
    _CONFIGS = [
        triton.Config({"BM": 128, "BV": 128, "BD": 64}, num_warps=8, num_stages=3),
        triton.Config({"BM": 64, "BV": 256, "BD": 64}, num_warps=8, num_stages=3),
        triton.Config({"BM": 64, "BV": 128, "BD": 64}, num_warps=4, num_stages=4),
    ]


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, D, stride_hn, stride_hd, stride_wv, stride_wd,
                 temperature, BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, DOT_FP32: tl.constexpr,
                 PRECISION: tl.constexpr):
    """z[BM, BV] = (h[rows] @ W[cols]^T) / T with an fp32 accumulator (rows/cols already int64)."""
    acc = tl.zeros([BM, BV], dtype=tl.float32)
    for k0 in range(0, D, BD):
        ks = k0 + tl.arange(0, BD)
        k_mask = ks < D
        h = tl.load(h_ptr + rows[:, None] * stride_hn + ks[None, :] * stride_hd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)           # [BM, BD]
        w = tl.load(w_ptr + cols[None, :] * stride_wv + ks[:, None] * stride_wd,
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)           # [BD, BV]
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        if PRECISION == "default":  # bf16/fp16 tensor cores
            acc = tl.dot(h, w, acc)
        else:  # fp32 inputs: "tf32x3" on CUDA, "ieee" in the interpreter
            acc = tl.dot(h, w, acc, input_precision=PRECISION)
    return acc / temperature


@triton.autotune(configs=_CONFIGS, key=["N_BUCKET", "D", "HAS_ENTROPY", "DOT_FP32", "PRECISION"])
@triton.jit
def _fwd_partials_kernel(h_ptr, w_ptr, y_ptr, m_ptr, s_ptr, t_ptr, zy_ptr, N, V, D,
                         stride_hn, stride_hd, stride_wv, stride_wd, temperature, n_splits, N_BUCKET,
                         SPLIT: tl.constexpr, HAS_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr,
                         PRECISION: tl.constexpr, BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    pid_n = tl.program_id(0)            # row block: fastest axis, so neighbouring programs share one W split in L2
    pid_s = tl.program_id(1)            # vocab split
    rows = (pid_n * BM + tl.arange(0, BM)).to(tl.int64)
    row_mask = rows < N
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    m = tl.full([BM], -1e30, dtype=tl.float32)   # finite: alpha = 0 and 0 * (m - m') = 0 on the first tile
    s = tl.zeros([BM], dtype=tl.float32)
    t = tl.zeros([BM], dtype=tl.float32)
    zy = tl.zeros([BM], dtype=tl.float32)
    v_begin = pid_s.to(tl.int64) * SPLIT
    for dv in range(0, SPLIT, BV):
        cols = v_begin + dv + tl.arange(0, BV)
        col_mask = cols < V
        z = _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, D, stride_hn, stride_hd, stride_wv,
                         stride_wd, temperature, BM, BV, BD, DOT_FP32, PRECISION)
        z = tl.where(col_mask[None, :], z, -1e30)
        m_new = tl.maximum(m, tl.max(z, 1))
        alpha = tl.exp(m - m_new)
        zs = tl.where(col_mask[None, :], z - m_new[:, None], 0.0)    # clamp padded columns: no 0 * inf
        e = tl.where(col_mask[None, :], tl.exp(zs), 0.0)
        if HAS_ENTROPY:
            t = alpha * (t + s * (m - m_new)) + tl.sum(e * zs, 1)
        s = alpha * s + tl.sum(e, 1)
        m = m_new
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)  # target logit from the same tile
    out = rows * n_splits + pid_s
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(zy_ptr + out, zy, mask=row_mask)
    if HAS_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_mask)


@triton.autotune(configs=_CONFIGS, key=["N_BUCKET", "D", "HAS_ENTROPY", "DOT_FP32", "PRECISION"])
@triton.jit
def _dz_kernel(h_ptr, w_ptr, y_ptr, lse_ptr, ent_ptr, glp_ptr, gh_ptr, dz_ptr, N, v_begin, v_end, D,
               stride_hn, stride_hd, stride_wv, stride_wd, stride_dzn, temperature, N_BUCKET,
               HAS_ENTROPY: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
               BM: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = (pid_n * BM + tl.arange(0, BM)).to(tl.int64)
    row_mask = rows < N
    local = pid_v.to(tl.int64) * BV + tl.arange(0, BV)              # column within the slice
    cols = v_begin + local
    col_mask = cols < v_end
    z = _logits_tile(h_ptr, w_ptr, rows, cols, row_mask, col_mask, D, stride_hn, stride_hd, stride_wv, stride_wd,
                     temperature, BM, BV, BD, DOT_FP32, PRECISION)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    glp = tl.load(glp_ptr + rows, mask=row_mask, other=0.0)
    y = tl.load(y_ptr + rows, mask=row_mask, other=-1)
    logp = tl.where(col_mask[None, :], z - lse[:, None], 0.0)        # [BM, BV] log p_j
    p = tl.where(col_mask[None, :], tl.exp(logp), 0.0)
    if HAS_ENTROPY:
        ent = tl.load(ent_ptr + rows, mask=row_mask, other=0.0)
        gh = tl.load(gh_ptr + rows, mask=row_mask, other=0.0)
        dz = -p * (glp[:, None] + gh[:, None] * (logp + ent[:, None]))
    else:
        dz = -p * glp[:, None]
    dz = tl.where(cols[None, :] == y[:, None], dz + glp[:, None], dz)  # fp32 before rounding: no cancellation at y
    dz = dz / temperature
    tl.store(dz_ptr + rows[:, None] * stride_dzn + local[None, :], dz.to(dz_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


_MM_OUT_DTYPE = None  # does torch.mm take out_dtype= here? probed once (see _mm_f32), never per slice


def _mm_out_dtype_supported(a) -> bool:
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE is None:
        try:  # one tiny probe; a real failure later (e.g. CUDA OOM) must surface, not fall back silently
            torch.mm(a[:1, :1], a[:1, :1].T, out_dtype=torch.float32)
            _MM_OUT_DTYPE = True
        except (TypeError, RuntimeError, NotImplementedError):  # older torch: no mm(out_dtype=)
            _MM_OUT_DTYPE = False
    return _MM_OUT_DTYPE


def _mm_f32(a, b):
    """a @ b with an fp32 result; bf16 CUDA operands accumulate in fp32 inside cuBLAS and skip the bf16 rounding."""
    if a.dtype != torch.float32 and a.is_cuda and _mm_out_dtype_supported(a):
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _n_bucket(n: int) -> int:
    """Power-of-two bucket of the row count for the autotune key (1, 2, 4, ... >= n)."""
    return 1 << max(0, (n - 1).bit_length())


def _dz_dtype(hidden):
    """dz buffer dtype: the input dtype on GPU (formed in fp32, rounded once), fp32 off-GPU (fp32 matmuls anyway)."""
    return hidden.dtype if hidden.is_cuda else torch.float32


def _dot_flags(hidden):
    dot_fp32 = INTERPRET or not hidden.is_cuda
    if hidden.dtype != torch.float32:
        return dot_fp32, "default"  # bf16/fp16 tensor cores (fp32 casts in the interpreter)
    # fp32: exact products in the interpreter (matches the reference to ~1e-6); tf32x3 on a GPU (see docstring)
    return dot_fp32, "ieee" if (INTERPRET or not hidden.is_cuda) else "tf32x3"


def forward(hidden, weight, targets, temperature, with_entropy):
    """-> lse, logp, entropy (or None), each [N] fp32."""
    n, d = hidden.shape
    v = weight.shape[0]
    n_splits = triton.cdiv(v, SPLIT_V)
    part = torch.empty((4, n, n_splits), dtype=torch.float32, device=hidden.device)   # m, s, t, zy
    dot_fp32, precision = _dot_flags(hidden)
    grid = lambda meta: (triton.cdiv(n, meta["BM"]), n_splits)  # noqa: E731
    _fwd_partials_kernel[grid](hidden, weight, targets, part[0], part[1], part[2], part[3], n, v, d,
                               hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                               temperature, n_splits, _n_bucket(n), SPLIT=SPLIT_V, HAS_ENTROPY=with_entropy,
                               DOT_FP32=dot_fp32, PRECISION=precision)
    m, s, t, zy = part
    # deterministic merge of the splits, same formula as the online update: rescale each split to the global max
    m_all = m.amax(dim=1)                                      # [N]
    scale = torch.exp(m - m_all[:, None])                      # [N, S]
    s_all = (s * scale).sum(dim=1)
    log_s = torch.log(s_all)
    lse = m_all + log_s
    logp = zy.sum(dim=1) - lse                                 # only the split holding y contributes (others add 0)
    ent = None
    if with_entropy:
        t_all = (scale * (t + s * (m - m_all[:, None]))).sum(dim=1)
        ent = log_s - t_all / s_all
    return lse, logp, ent


def backward(hidden, weight, targets, temperature, lse, ent, g_lp, g_h, need_dh, need_dw):
    n, d = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    dot_fp32, precision = _dot_flags(hidden)
    g_lp = torch.zeros(n, dtype=torch.float32, device=dev) if g_lp is None else g_lp.float().contiguous()
    has_ent = g_h is not None
    g_h = g_h.float().contiguous() if has_ent else g_lp       # dummy pointer when HAS_ENTROPY is False
    dz_dtype = _dz_dtype(hidden)
    mm_dtype = dz_dtype
    h_mm = hidden.to(mm_dtype)
    slice_v = min(BWD_SLICE, v)
    dz = torch.empty((n, slice_v), dtype=dz_dtype, device=dev)
    dh = torch.zeros((n, d), dtype=torch.float32, device=dev) if need_dh else None
    dw = torch.empty_like(weight) if need_dw else None
    for v0 in range(0, v, slice_v):
        v1 = min(v, v0 + slice_v)
        dz_s = dz[:, : v1 - v0]
        grid = lambda meta: (triton.cdiv(n, meta["BM"]), triton.cdiv(v1 - v0, meta["BV"]))  # noqa: E731
        _dz_kernel[grid](hidden, weight, targets, lse, ent, g_lp, g_h, dz_s, n, v0, v1, d,
                         hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), dz_s.stride(0),
                         temperature, _n_bucket(n), HAS_ENTROPY=has_ent, DOT_FP32=dot_fp32, PRECISION=precision)
        w_s = weight[v0:v1].to(mm_dtype)
        if need_dw:
            dw[v0:v1] = dz_s.T @ h_mm                           # [Vc, D]: written once; cuBLAS accumulates in fp32
        if need_dh:
            dh += _mm_f32(dz_s, w_s)                             # [N, D] fp32 accumulator across slices
    return (dh.to(hidden.dtype) if need_dh else None), dw
