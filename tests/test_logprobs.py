"""kernels.token_logprobs against float64 torch (log_softmax -> gather, -sum p log p, autograd for dh / dW).

    pytest tests/test_logprobs.py        (~35 s of CPU on 2 cores; the Triton cases run under TRITON_INTERPRET=1)

Tolerances (measured errors are ~10x below each):
  * logp / entropy, fp32 math: atol 2e-5. Inputs are exact in fp32 (bf16 inputs are upcast exactly), so the only error
    is fp32 rounding in a D-term dot (~sqrt(D) * 6e-8 * |z|) plus the logsumexp over V terms; |lse| ~ 10 here gives
    ~1e-6 measured (the survey's prototype measured <= 1.2e-6 on the same shapes).
  * gradients, fp32 results: max|err| / max|ref| <= 2e-5 (same fp32 rounding; measured ~1e-6).
  * gradients returned in bf16 (dh, dW take their input's dtype): rounding the result to bf16 (unit roundoff
    u = 2^-8 ~ 3.9e-3) costs up to u of each value, so <= 5e-3 relative to the largest value.
  * Triton on CUDA, bf16: the backward also rounds dz to bf16 before the cuBLAS GEMMs, adding up to u * sum_i |dz_i h_i|
    per dW entry (and u * sum_j |dz_j W_j| per dh entry), which cancellation can make larger than u * max|dW|: 1e-2
    there (CCE uses the same), and test_triton_bf16_dz_rounding_bound checks the elementwise bound itself.
"""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels.logprobs as L
from kernels import token_logprobs

ROOT = Path(__file__).resolve().parents[1]
HAS_TRITON = L._triton_available()
TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON or (TRITON_DEV == "cpu" and os.environ.get("TRITON_INTERPRET") != "1"),
                                  reason="triton (CUDA, or TRITON_INTERPRET=1 set by conftest) not available")

ATOL_OUT = 2e-5
RTOL_GRAD = {torch.float32: 2e-5, torch.bfloat16: 5e-3, torch.float64: 1e-10}
RTOL_GRAD_CUDA_BF16_DZ = 1e-2  # dz rounded to bf16 on CUDA (see the module docstring); measured 7.5e-3 emulated
U_BF16 = 2.0 ** -8             # bf16 unit roundoff (8 significant bits)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several token and vocab chunks (and splits / backward slices on the Triton path), none of which divide
    the shapes below, so the online merge, the partial last chunk and the per-slice dW write are all exercised."""
    monkeypatch.setattr(L, "REF_TILE_ELEMS", 16 * 300)
    monkeypatch.setattr(L, "REF_MAX_ROWS", 16)
    monkeypatch.setattr(L, "REF_MIN_VCHUNK", 16)             # -> 16-row x 300-column tiles
    if HAS_TRITON:
        import kernels.logprobs_triton as LT
        monkeypatch.setattr(LT, "BWD_SLICE", 384)            # 1000 = 384 + 384 + 232
        if LT.INTERPRET:
            monkeypatch.setattr(LT, "SPLIT_V", 512)          # 2 splits, the second one partial


def make_case(n, v, d, dtype, seed=0, scale=1.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g) * scale
    w = torch.randn(v, d, generator=g) * (2.0 / math.sqrt(d))  # logits std ~2: a peaked but not one-hot softmax
    y = torch.randint(0, v, (n,), generator=g)
    y[0], y[1], y[2] = 0, v - 1, v - 5                        # first column, last column, inside the last chunk
    return h.to(dtype).to(device), w.to(dtype).to(device), y.to(device)


def truth(h, w, y, temperature):
    """fp64 logp, entropy from the (exactly upcast) inputs; differentiable w.r.t. h and w."""
    logp_all = torch.log_softmax((h @ w.T) / temperature, dim=-1)  # [N, V] fp64
    p = logp_all.exp()
    return logp_all.gather(1, y[:, None]).squeeze(1), -(p * logp_all).sum(-1)


def run_and_grad(fn, h, w, y, temperature, which, g_lp, g_h):
    """Forward (logp, H) and torch.autograd.grad of sum(g_lp*logp) and/or sum(g_h*H) w.r.t. (h, w)."""
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    logp, ent = fn(h, w, y, temperature)
    loss = 0
    if which in ("lp", "both"):
        loss = loss + (logp * g_lp.to(logp.dtype)).sum()
    if which in ("H", "both"):
        loss = loss + (ent * g_h.to(ent.dtype)).sum()
    dh, dw = torch.autograd.grad(loss, (h, w))
    return logp.detach(), ent.detach(), dh, dw


def check_against_fp64(impl, n, v, d, dtype, temperature, which, device="cpu", scale=1.0, rtol_out=0.0):
    h, w, y = make_case(n, v, d, dtype, scale=scale, device=device)
    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    ours = run_and_grad(lambda *a: token_logprobs(*a, return_entropy=True, impl=impl), h, w, y, temperature, which,
                        g_lp, g_h)
    ref = run_and_grad(truth, h.double(), w.double(), y, temperature, which, g_lp.double(), g_h.double())
    logp, ent, dh, dw = ours
    assert logp.dtype == torch.float32 and ent.dtype == torch.float32
    assert logp.shape == (n,) and ent.shape == (n,)
    assert dh.dtype == dtype and dw.dtype == dtype
    torch.testing.assert_close(logp.double(), ref[0], atol=ATOL_OUT, rtol=rtol_out)
    torch.testing.assert_close(ent.double(), ref[1], atol=ATOL_OUT, rtol=rtol_out)
    rtol = RTOL_GRAD[dtype]
    if impl == "triton" and device == "cuda" and dtype == torch.bfloat16:
        rtol = RTOL_GRAD_CUDA_BF16_DZ
    for name, got, want in (("dh", dh, ref[2]), ("dW", dw, ref[3])):
        err = (got.double() - want).abs().max().item() / want.abs().max().item()
        assert err <= rtol, f"{impl} {name}: max err / max |ref| = {err:.2e} > {rtol:.0e}"


# ---------------------------------------------------------------------------------------------------------------------
# reference (pure torch) path

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("which", ["lp", "H", "both"])
def test_reference_matches_fp64(small_chunks, dtype, temperature, which):
    check_against_fp64("torch", 37, 1000, 72, dtype, temperature, which)


def test_reference_default_chunks_and_large_logits():
    # default chunking (one chunk at this size) and logits x30 (|z| ~ 60, logp ~ -100): the shifted online update must
    # not overflow. fp32 rounding of z itself is now ~|z| * 6e-8 * sqrt(D), so the output tolerance becomes relative
    # (5e-6; measured 7e-7).
    check_against_fp64("torch", 37, 1000, 72, torch.float32, 1.0, "both", scale=30.0, rtol_out=5e-6)


def test_reference_gradcheck_fp64(monkeypatch):
    # tiny, so the 2 x (5*8 + 40*8) finite differences stay fast; chunks of 3 rows x 16 columns (40 = 16 + 16 + 8)
    monkeypatch.setattr(L, "REF_TILE_ELEMS", 3 * 16)
    monkeypatch.setattr(L, "REF_MAX_ROWS", 3)
    monkeypatch.setattr(L, "REF_MIN_VCHUNK", 16)
    h, w, y = make_case(5, 40, 8, torch.float64)
    h.requires_grad_()
    w.requires_grad_()
    fn = lambda h_, w_: token_logprobs(h_, w_, y, 0.7, return_entropy=True, impl="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Triton path (interpreter on CPU; the real kernels on CUDA)

@needs_triton
@pytest.mark.parametrize("dtype,temperature,which", [
    # each dtype x temperature x upstream-grad value appears (the interpreter costs ~1-2 s per case, so not the full grid)
    (torch.float32, 1.0, "both"), (torch.float32, 0.7, "lp"), (torch.float32, 0.7, "H"),
    (torch.bfloat16, 0.7, "both"), (torch.bfloat16, 1.0, "lp"), (torch.bfloat16, 1.0, "H"),
])
def test_triton_matches_fp64(small_chunks, dtype, temperature, which):
    check_against_fp64("triton", 37, 1000, 72, dtype, temperature, which, device=TRITON_DEV)


@needs_triton
def test_triton_forward_only_no_entropy_matches_reference(small_chunks):
    # HAS_ENTROPY=False variant (old/ref-policy passes): logp identical in meaning to the entropy variant
    h, w, y = make_case(33, 700, 40, torch.float32, seed=3, device=TRITON_DEV)
    with torch.no_grad():
        lp_t = token_logprobs(h, w, y, 0.7, impl="triton")
        lp_r, _ = truth(h.double(), w.double(), y, 0.7)
    assert lp_t.shape == (33,) and lp_t.dtype == torch.float32
    torch.testing.assert_close(lp_t.double(), lp_r, atol=ATOL_OUT, rtol=0)


@needs_triton
def test_triton_bf16_dz_rounding_bound(small_chunks, monkeypatch):
    """The CUDA backward's bf16 dz, emulated in the interpreter: every dW / dh entry is within
    u |ref| (the result's rounding) + 2u * sum |dz||h| (dz's rounding; the second u covers the CPU emulation's bf16
    GEMM output per slice) of the fp64 truth, u = 2^-8. This is the math behind RTOL_GRAD_CUDA_BF16_DZ."""
    import kernels.logprobs_triton as LT
    monkeypatch.setattr(LT, "_dz_dtype", lambda hidden: hidden.dtype)   # what CUDA does
    n, v, d, temperature = 37, 1000, 72, 0.7
    h, w, y = make_case(n, v, d, torch.bfloat16, device=TRITON_DEV)
    g = torch.Generator().manual_seed(1)
    g_lp, g_h = torch.randn(n, generator=g).to(TRITON_DEV), torch.randn(n, generator=g).to(TRITON_DEV)
    _, _, dh, dw = run_and_grad(lambda *a: token_logprobs(*a, return_entropy=True, impl="triton"), h, w, y,
                                temperature, "both", g_lp, g_h)
    h64, w64 = h.double().cpu(), w.double().cpu()
    z = (h64 @ w64.T).requires_grad_()                                   # [N, V]
    logp_all = torch.log_softmax(z / temperature, -1)
    lp, ent = logp_all.gather(1, y.cpu()[:, None])[:, 0], -(logp_all.exp() * logp_all).sum(-1)
    (gz,) = torch.autograd.grad((lp * g_lp.double().cpu()).sum() + (ent * g_h.double().cpu()).sum(), z)  # dz / T, exact
    ref_dh, ref_dw = gz @ w64, gz.T @ h64
    for name, got, ref, mass in (("dh", dh, ref_dh, gz.abs() @ w64.abs()), ("dW", dw, ref_dw, gz.abs().T @ h64.abs())):
        err = (got.double().cpu() - ref).abs()
        bound = U_BF16 * ref.abs() + 2 * U_BF16 * mass + 1e-6 * ref.abs().max()
        assert (err <= bound).all(), f"{name}: worst err / bound {(err / bound).max().item():.2f}"
        assert (err > 0).any()  # the emulation really rounds


@needs_triton
def test_triton_autotune_key_buckets_n():
    """The autotune cache is keyed on a power-of-two bucket of N: one config per N range, not one for all N."""
    import kernels.logprobs_triton as LT
    for kernel in (LT._fwd_partials_kernel, LT._dz_kernel):
        assert "N_BUCKET" in kernel.keys and "D" in kernel.keys
    assert [LT._n_bucket(n) for n in (1, 2, 3, 4800, 4096, 4097)] == [1, 2, 4, 8192, 4096, 8192]


def test_fp32_on_cuda_routes_to_torch(monkeypatch):
    """Auto selection: bf16/fp16 CUDA inputs take Triton; fp32 CUDA inputs take the torch path (cuBLAS), not the
    Triton fp32 dot. (select_impl only reads .is_cuda and .dtype, so a stand-in works without a GPU.)"""
    from types import SimpleNamespace
    monkeypatch.delenv("TWICE_LOGPROBS_IMPL", raising=False)
    monkeypatch.setattr(L, "_triton_available", lambda: True)
    cuda = lambda dt: SimpleNamespace(is_cuda=True, dtype=dt)  # noqa: E731
    assert L.select_impl(cuda(torch.bfloat16)) == "triton"
    assert L.select_impl(cuda(torch.float16)) == "triton"
    assert L.select_impl(cuda(torch.float32)) == "torch"
    assert L.select_impl(cuda(torch.float64)) == "torch"


@needs_triton
def test_mm_out_dtype_probed_once(monkeypatch):
    """Whether torch.mm takes out_dtype= is probed once; later calls don't wrap the real GEMM in a try/except
    (which used to swallow any RuntimeError, CUDA OOM included, per slice)."""
    import kernels.logprobs_triton as LT
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(LT, "_MM_OUT_DTYPE", None)
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(k) or real_mm(*a, **k))
    a = torch.zeros(3, 4, dtype=torch.bfloat16)
    assert LT._mm_out_dtype_supported(a) in (True, False) and len(calls) == 1
    LT._mm_out_dtype_supported(a)
    assert len(calls) == 1


def test_target_gather_without_boolean_indexing(small_chunks):
    """Targets in the first, a middle and the last (partial) vocab chunk: the gathered target logit and the
    scattered target gradient land in the right chunk only (torch.where + gather/scatter_add, no nonzero()).
    (That no host sync remains on CUDA is checked by bench/gpu.py under torch.cuda.set_sync_debug_mode('error').)"""
    check_against_fp64("torch", 37, 1000, 72, torch.float32, 0.7, "lp")


# ---------------------------------------------------------------------------------------------------------------------
# analytic cases (both paths)

IMPLS = ["torch", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("impl", IMPLS)
def test_zero_weight_is_uniform(small_chunks, impl):
    dev = TRITON_DEV if impl == "triton" else "cpu"
    n, v, d = 20, 1000, 32
    h, _, y = make_case(n, v, d, torch.float32, device=dev)
    w = torch.zeros(v, d, device=dev, requires_grad=True)
    logp, ent = token_logprobs(h, w, y, 0.7, return_entropy=True, impl=impl)
    torch.testing.assert_close(logp.cpu(), torch.full((n,), -math.log(v)), atol=1e-6, rtol=0)
    torch.testing.assert_close(ent.cpu(), torch.full((n,), math.log(v)), atol=1e-6, rtol=0)
    # uniform p: d logp / d z = onehot - 1/V and d H / d z = -p (log p + H) = 0, so dW = (onehot - 1/V)^T h / T
    (dw,) = torch.autograd.grad(logp.sum() + ent.sum(), (w,))
    dz = torch.nn.functional.one_hot(y.cpu(), v).double() - 1.0 / v
    torch.testing.assert_close(dw.cpu().double(), dz.T @ h.cpu().double() / 0.7, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_dominant_logit_has_zero_entropy(small_chunks, impl):
    dev = TRITON_DEV if impl == "triton" else "cpu"
    n, v, d = 17, 600, 16
    h, w, y = make_case(n, v, d, torch.float32, device=dev)
    w = w * 0.01
    w[y] += 40.0 * h / h.norm(dim=1, keepdim=True)           # target logit ~ 40 |h| = ~160 above the rest
    logp, ent = token_logprobs(h, w, y, 1.0, return_entropy=True, impl=impl)
    assert torch.all(logp <= 0) and torch.all(logp > -1e-6)
    assert torch.all(ent >= -1e-6) and torch.all(ent < 1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# contract: selection, validation, empty input, optional triton

def test_selection_rules(monkeypatch):
    h = torch.zeros(2, 4)
    monkeypatch.delenv("TWICE_LOGPROBS_IMPL", raising=False)
    assert L.select_impl(h) == "torch"                        # CPU tensors: the reference, even with triton installed
    monkeypatch.setenv("TWICE_LOGPROBS_IMPL", "torch")
    assert L.select_impl(h) == "torch"
    assert L.select_impl(h, "torch") == "torch"
    monkeypatch.setenv("TWICE_LOGPROBS_IMPL", "cuda")
    with pytest.raises(ValueError, match="TWICE_LOGPROBS_IMPL"):
        L.select_impl(h)
    with pytest.raises(ValueError, match="impl="):
        L.select_impl(h, "numpy")
    if HAS_TRITON and os.environ.get("TRITON_INTERPRET") == "1":
        monkeypatch.setenv("TWICE_LOGPROBS_IMPL", "triton")
        assert L.select_impl(h) == "triton"                   # env override selects the interpreter on CPU
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="CUDA"):
            L.select_impl(h, "triton")


def test_imports_and_runs_without_triton():
    code = ("import sys; sys.modules['triton'] = None\n"          # makes `import triton` raise ImportError
            "import torch, kernels.logprobs as L\nfrom kernels import token_logprobs\n"
            "assert L.select_impl(torch.zeros(1, 1)) == 'torch'\n"
            "lp = token_logprobs(torch.zeros(3, 4), torch.zeros(10, 4), torch.tensor([0, 5, 9]))\n"
            "assert torch.allclose(lp, torch.full((3,), -torch.log(torch.tensor(10.))))\n"
            "try:\n    L.select_impl(torch.zeros(1, 1), 'triton')\nexcept RuntimeError as e:\n"
            "    assert 'not installed' in str(e)\nelse:\n    raise SystemExit('impl=triton without triton did not raise')\n")
    env = {k: val for k, val in os.environ.items() if k != "TWICE_LOGPROBS_IMPL"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_bad_inputs_raise_clear_errors():
    h, w = torch.zeros(3, 4), torch.zeros(10, 4)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, V=10\)"):
        token_logprobs(h, w, torch.tensor([0, -100, 2]))
    with pytest.raises(ValueError, match="targets must be"):
        token_logprobs(h, w, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="hidden dim"):
        token_logprobs(h, torch.zeros(10, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="dtype/device"):
        token_logprobs(h, w.bfloat16(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="temperature"):
        token_logprobs(h, w, torch.tensor([0, 1, 2]), temperature=0.0)


def test_empty_batch_gives_empty_outputs_and_zero_grads():
    h = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(10, 4, requires_grad=True)
    logp, ent = token_logprobs(h, w, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert logp.shape == (0,) and ent.shape == (0,)
    dh, dw = torch.autograd.grad(logp.sum() + ent.sum(), (h, w))
    assert dh.shape == (0, 4) and torch.equal(dw, torch.zeros_like(w))


def test_cpu_weight_chunk_stays_cache_sized():
    """On CPU the fp32 copy of each W chunk is bounded by REF_CPU_W_CHUNK_ELEMS (the matmul of a 16 MB chunk ran
    1.5x slower than of a 2.6 MB one here); on CUDA the chunk stays as large as REF_TILE_ELEMS allows."""
    for n in (1, 64, 256, 4800):
        rows, vc = L._ref_chunks(n, 262144, 640, cpu=True)
        assert vc == L.REF_MIN_VCHUNK or vc * 640 <= L.REF_CPU_W_CHUNK_ELEMS, (n, vc)
        rows_gpu, vc_gpu = L._ref_chunks(n, 262144, 640, cpu=False)
        assert rows_gpu == rows and vc * 640 <= vc_gpu * 640 <= L.REF_TILE_ELEMS and vc_gpu > vc, (n, vc_gpu)
