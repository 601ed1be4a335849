"""The GPU acceptance run: one command, one table, the card's name on top. Random weights at real shapes, no downloads.

    python bench/gpu.py              # one H100/H200: <= 8 min (kernel, correctness, decode, SFT MFU, GRPO step)
    python bench/gpu.py --dry-run    # CPU, toy shapes, seconds: proves the script itself runs (tests/test_bench_gpu.py)
    python bench/gpu.py --only sft --profile   # one section; --profile prints the eager SFT step's top GPU kernels

Sections (each runs inside its own try: a failing section prints its error and the others still run; the exit code
is 1 if any section failed, after the table is printed):
  1. kernel      token_logprobs (bf16, Triton) at N = 4,800, D = 1,152, V = 262,144: fwd and fwd+bwd time vs the
                 FLOP bound (fwd 2NDV, fwd+bwd 8NDV: logits, recomputed logits, dW, dh) at the bf16 GEMM rate this
                 card reaches in the same run (cuBLAS 8192^3), and vs a naive bf16 matmul + fp32 log_softmax + gather;
                 peak extra memory of each; fwd+bwd also runs under torch.cuda.set_sync_debug_mode("error") (no
                 host sync on the hot path).
  2. correctness token_logprobs vs float64 on the GPU (N = 256, full vocab): bf16 and fp32 inputs, auto route
                 (bf16 -> Triton, fp32 -> torch/cuBLAS) and fp32 forced through Triton (tf32x3): logp / entropy max
                 |err|, dh / dW max|err| / max|ref| (tolerances of tests/test_logprobs.py).
  3. decode      twice.engine.Engine.generate at the Gemma-3-1B shape (random bf16 weights), K = 16 samples of one
                 1,000-token prompt, 300 new tokens (no stop ids): generated tokens/s, eager, and compiled when the
                 engine offers a `compile` option (otherwise the row says so).
  3b. attention  which SDPA kernel each attention call lands on (causal prefill, left padding + sliding window,
                 shared-prefix forward + backward), 6 layers of the 1B shape: a math fallback is an error.
  4. sft         one SFT step (forward with fused log-probs + backward + AdamW) at the Gemma-3-1B shape on one
                 4,096-token sequence, bf16 weights, activation checkpointing: tokens/s and MFU = (6 x params x
                 tokens + 6 x L x T^2 x H x hd causal attention) / time / the measured bf16 GEMM rate (and / the
                 card's datasheet dense bf16 peak when the name is known); eager, then with compiled blocks
                 (Gemma3.compile_blocks, train_sft's model.compile).
  5. grpo        one train_grpo.py step in a subprocess on 1 rank (nccl process group, FSDP2 wrap, as torchrun gives
                 it) on the tiny tests/grpo_fixture world with a Gemma-3-270m-shaped random model: s/step and phases;
                 --grpo-decode eager compiled runs it once per rollout.decode mode (one row each).
Targets (issue 14): kernel fwd+bwd <= 2x its FLOP bound; decode >= 5k tokens/s compiled on an H100; SFT MFU >= 40%.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from kernels import token_logprobs  # noqa: E402
from twice.gemma3 import PRESETS, Gemma3  # noqa: E402

# dense bf16 tensor-core peaks from the datasheets (SXM; no sparsity), matched on the device name
DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}

ROWS: list[tuple[str, str, str, str]] = []   # (section, metric, value, note)
FAILED: list[str] = []


def row(section, metric, value, note=""):
    ROWS.append((section, metric, value, note))
    print(f"  [{section}] {metric}: {value}  {note}", flush=True)


def section(name):
    """Run fn as one section: errors become a table row, never the end of the run."""
    def wrap(fn):
        def run(*a, **k):
            t0 = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                fn(*a, **k)
            except Exception as e:  # noqa: BLE001 - a GPU is scarce: report and go on
                FAILED.append(name)
                tb = traceback.format_exc().strip().splitlines()
                row(name, "ERROR", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}",
                    "| " + " | ".join(tb[-3:])[:300])
            finally:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
        return run
    return wrap


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, dev, reps: int):
    """min wall seconds over reps calls after one warm-up call (Triton autotune / compile happen there)."""
    fn()
    sync(dev)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(dev)
        best = min(best, time.perf_counter() - t)
    return best


def peak_extra_bytes(fn, dev):
    if dev.type != "cuda":
        return None
    sync(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    base = torch.cuda.memory_allocated(dev)
    fn()
    sync(dev)
    return torch.cuda.max_memory_allocated(dev) - base


def rate(tflops: float) -> str:
    return f"{tflops:.0f} TFLOP/s" if tflops >= 10 else f"{tflops * 1e3:.1f} GFLOP/s"


def gib(b):
    return "n/a" if b is None else f"{b / 2 ** 30:.2f} GiB"


def gemm_tflops(dev, dtype, n: int) -> float:
    """Achievable dense GEMM rate on this device, measured (n x n x n)."""
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    t = timed(lambda: a @ b, dev, reps=5)
    return 2 * n ** 3 / t / 1e12


# ------------------------------------------------------------------------------------------------------------------
# 1. kernel speed

@section("kernel")
def bench_kernel(args, dev, peak):
    N, D, V = args.kernel_shape
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator(device=dev).manual_seed(0)
    h = (torch.randn(N, D, device=dev, generator=g) * 1.0).to(dt).requires_grad_()
    w = (torch.randn(V, D, device=dev, generator=g) * (2.0 / math.sqrt(D))).to(dt).requires_grad_()
    y = torch.randint(0, V, (N,), device=dev, generator=g)
    g1, g2 = torch.randn(N, device=dev, generator=g), torch.randn(N, device=dev, generator=g)

    def ours_fwd():
        with torch.no_grad():
            token_logprobs(h, w, y, 1.0, return_entropy=True)

    def ours_fwdbwd():
        lp, ent = token_logprobs(h, w, y, 1.0, return_entropy=True)
        torch.autograd.grad((lp * g1).sum() + (ent * g2).sum(), (h, w))

    def naive_fwd():
        with torch.no_grad():
            lsm = torch.log_softmax((h @ w.T).float(), -1)
            lsm.gather(1, y[:, None]), -(lsm.exp() * lsm).sum(-1)

    def naive_fwdbwd():
        lsm = torch.log_softmax((h @ w.T).float(), -1)
        lp, ent = lsm.gather(1, y[:, None])[:, 0], -(lsm.exp() * lsm).sum(-1)
        torch.autograd.grad((lp * g1).sum() + (ent * g2).sum(), (h, w))

    from kernels.logprobs import select_impl
    row("kernel", "shape / impl", f"N={N} D={D} V={V} {str(dt).removeprefix('torch.')}", f"impl={select_impl(h)}")
    flop = {"fwd": 2 * N * D * V, "fwd+bwd": 8 * N * D * V}
    for mode, ours, naive in (("fwd", ours_fwd, naive_fwd), ("fwd+bwd", ours_fwdbwd, naive_fwdbwd)):
        t_ours = timed(ours, dev, args.reps)
        bound = flop[mode] / (peak * 1e12)
        mem_ours = peak_extra_bytes(ours, dev)
        try:
            t_naive = timed(naive, dev, args.reps)
            mem_naive = peak_extra_bytes(naive, dev)
            naive_txt = f"naive {t_naive * 1e3:.1f} ms ({t_naive / t_ours:.2f}x ours), peak +{gib(mem_naive)}"
        except torch.cuda.OutOfMemoryError:
            naive_txt = "naive: out of memory"
        row("kernel", f"{mode} time", f"{t_ours * 1e3:.1f} ms",
            f"= {t_ours / bound:.2f}x the {flop[mode] / N / D / V:.0f}NDV bound ({bound * 1e3:.2f} ms at "
            f"{rate(peak)}, target <= 2x); peak +{gib(mem_ours)}; {naive_txt}")
    if dev.type == "cuda":
        torch.cuda.set_sync_debug_mode("error")
        try:
            ours_fwdbwd()
            row("kernel", "host syncs in fwd+bwd", "none", "set_sync_debug_mode('error') passed")
        finally:
            torch.cuda.set_sync_debug_mode("default")


# ------------------------------------------------------------------------------------------------------------------
# 2. correctness vs float64

@section("correctness")
def bench_correctness(args, dev):
    N, D, V = args.check_shape
    cases = [(torch.bfloat16, None), (torch.float32, None)]
    if dev.type == "cuda":
        cases.append((torch.float32, "triton"))  # forced: tf32x3 dots
    for dt, impl in cases:
        g = torch.Generator(device=dev).manual_seed(1)
        h64 = torch.randn(N, D, device=dev, generator=g, dtype=torch.float64)
        w64 = torch.randn(V, D, device=dev, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(D))
        y = torch.randint(0, V, (N,), device=dev, generator=g)
        g1 = torch.randn(N, device=dev, generator=g, dtype=torch.float64)
        g2 = torch.randn(N, device=dev, generator=g, dtype=torch.float64)
        h, w = h64.to(dt).requires_grad_(), w64.to(dt).requires_grad_()
        lp, ent = token_logprobs(h, w, y, 0.7, return_entropy=True, impl=impl)
        dh, dw = torch.autograd.grad((lp * g1.float()).sum() + (ent * g2.float()).sum(), (h, w))
        hr, wr = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()  # same (rounded) inputs
        lsm = torch.log_softmax((hr @ wr.T) / 0.7, -1)
        lp_r, ent_r = lsm.gather(1, y[:, None])[:, 0], -(lsm.exp() * lsm).sum(-1)
        dh_r, dw_r = torch.autograd.grad((lp_r * g1).sum() + (ent_r * g2).sum(), (hr, wr))
        del lsm
        e_lp = (lp.double() - lp_r).abs().max().item()
        e_ent = (ent.double() - ent_r).abs().max().item()
        e_dh = ((dh.double() - dh_r).abs().max() / dh_r.abs().max()).item()
        e_dw = ((dw.double() - dw_r).abs().max() / dw_r.abs().max()).item()
        from kernels.logprobs import select_impl
        used = impl or select_impl(h)
        tol_g = {torch.float32: 2e-5, torch.bfloat16: 1e-2 if h.is_cuda else 5e-3}[dt]
        # outputs: |err| <= 2e-5 + 5e-6 |ref| (assert_close's form). The relative term is fp32's own rounding over a
        # 262k-term sum: H ~ 12 nats here, so 5e-6 |H| ~ 40 ulps; the torch/cuBLAS fp32 route errs as much.
        over_out = lambda got, ref: ((got.double() - ref).abs() - 5e-6 * ref.abs()).max().item() > 2e-5  # noqa: E731
        ok = not over_out(lp, lp_r) and not over_out(ent, ent_r) and e_dh <= tol_g and e_dw <= tol_g
        row("correctness", f"{str(dt).removeprefix('torch.')} via {used}",
            f"logp {e_lp:.1e}, H {e_ent:.1e}, dh {e_dh:.1e}, dW {e_dw:.1e}",
            f"{'OK' if ok else 'OVER'} (tol: out 2e-5 + 5e-6 |ref|, grads {tol_g:.0e} of max; N={N} D={D} V={V})")


# ------------------------------------------------------------------------------------------------------------------
# 3. decode

def model_config(args):
    if args.dry_run:
        return PRESETS["tiny"]
    return PRESETS["gemma-3-1b"]


@section("decode")
def bench_decode(args, dev):
    from twice.engine import Engine
    cfg = model_config(args)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Gemma3.from_config(cfg, dtype=dt, device=dev).eval()
    prompt = torch.randint(3, cfg.vocab_size, (args.prompt_len,)).tolist()
    K, new = args.K, args.new_tokens
    has_compile = any("compile" in inspect.signature(f).parameters for f in (Engine.__init__, Engine.generate))
    modes = ["eager"] + (["compiled"] if has_compile else [])
    for mode in modes:
        kw_init, kw_gen = {}, {}
        if mode == "compiled":
            if "compile" in inspect.signature(Engine.__init__).parameters:
                kw_init["compile"] = True
            else:
                kw_gen["compile"] = True
        eng = Engine(model, **kw_init)
        gen = lambda: eng.generate([prompt], num_samples=K, max_new_tokens=new, temperature=1.0,  # noqa: E731
                                   stop_ids=[], seeds=0, **kw_gen)
        t_first = time.perf_counter()
        res = gen()  # warm-up (compilation happens here)
        sync(dev)
        t_first = time.perf_counter() - t_first
        t = timed(gen, dev, reps=1)
        n_tok = sum(len(r) for r in res.tokens)
        row("decode", f"{mode} tokens/s", f"{n_tok / t:,.0f}",
            f"K={K}, prompt {args.prompt_len}, {new} new, {n_tok} tokens in {t:.2f} s (first call {t_first:.1f} s); "
            f"{cfg.num_hidden_layers} layers, D={cfg.hidden_size}, {str(dt).removeprefix('torch.')}"
            + ("; target >= 5k compiled on an H100" if mode == "compiled" else ""))
    if not has_compile:
        row("decode", "compiled tokens/s", "not run", "twice.engine.Engine has no `compile` option yet: eager only")
    del model


@section("attention")
def bench_attention(args, dev):
    """Which SDPA kernels the model's attention lands on: a math fallback would materialise the scores again."""
    from torch.profiler import profile

    from twice.gemma3 import SharedPrefix
    cfg = model_config(args)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    n = min(cfg.num_hidden_layers, 6)  # the first 6 layers keep both kinds (sliding, full) of the real pattern
    model = Gemma3.from_config(dataclasses.replace(cfg, num_hidden_layers=n, layer_types=cfg.layer_types[:n]),
                               dtype=dt, device=dev).train()
    T = args.prompt_len
    ids = torch.randint(3, cfg.vocab_size, (2, T), device=dev)
    am = torch.ones_like(ids)
    am[1, : T // 4] = 0  # left padding: masks on every layer
    P, K, Tc = T // 2, 4, max(T // 8, 2)
    sp = SharedPrefix(ids[:, :P], torch.tensor([P, P - 3], device=dev), K)
    comp = torch.randint(3, cfg.vocab_size, (2 * K, Tc), device=dev)
    for name, run in (("causal, no padding", lambda: model(ids, return_hidden=True)),
                      ("left padding + window", lambda: model(ids, attention_mask=am, return_hidden=True)),
                      ("shared prefix fwd+bwd", lambda: model(comp, shared_prefix=sp).float().sum().backward())):
        with profile() as prof:
            run()
            sync(dev)
        kernels = {}
        for e in prof.events():
            if e.name.startswith("aten::_scaled_dot_product") or e.name.startswith("aten::_efficient_attention") \
                    or e.name.startswith("aten::_flash_attention"):
                kernels[e.name.removeprefix("aten::")] = kernels.get(e.name.removeprefix("aten::"), 0) + 1
        math_calls = sum(n for k, n in kernels.items() if "math" in k)
        row("attention", name, "no math fallback" if math_calls == 0 else f"{math_calls} MATH calls",
            ", ".join(f"{k} x{n}" for k, n in sorted(kernels.items())))
        if math_calls:
            raise RuntimeError(f"{name}: SDPA fell back to the math kernel {math_calls} times")
    del model


# ------------------------------------------------------------------------------------------------------------------
# 4. SFT step MFU

@section("sft")
def bench_sft(args, dev, peak):
    for compiled in (False, True):
        sft_step(args, dev, peak, compiled)


def sft_step(args, dev, peak, compiled: bool):
    cfg = model_config(args)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    model = Gemma3.from_config(cfg, dtype=dt, device=dev).train()
    model.gradient_checkpointing = True
    if compiled:
        model.compile_blocks()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=dev.type == "cuda")
    T = args.sft_tokens
    ids = torch.randint(3, cfg.vocab_size, (1, T), device=dev)
    targets = torch.cat([ids[:, 1:], torch.full((1, 1), -100, device=dev)], 1)

    def step():
        logp = model(ids, targets=targets)
        loss = -logp.sum() / (targets != -100).sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = timed(step, dev, args.reps)
    if args.profile and dev.type == "cuda" and not compiled:  # where the step's time goes: the top kernels by GPU time
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            sync(dev)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
    P = model.num_params()  # tied head counted once: it is both the lookup (no FLOPs) and the head matmul
    L, H, hd = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_dim
    flops = 6 * P * T + 6 * L * T * T * H * hd  # causal attention: half of 4 T^2 H hd forward, x3 with backward
    mfu = flops / t / (peak * 1e12)
    sheet = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in args.device_name), None)
    note = f"{P / 1e9:.3f} B params, T={T}, {t:.3f} s/step, {rate(flops / t / 1e12)}"
    if sheet:
        note += f"; {flops / t / (sheet * 1e12):.1%} of the {sheet:.0f} TFLOP/s datasheet peak"
    how = "compiled blocks" if compiled else "eager"
    row("sft", f"MFU, {how} (vs measured GEMM rate)", f"{mfu:.1%}", note + "; target >= 40%")
    row("sft", f"tokens/s, {how}", f"{T / t:,.0f}", "activation checkpointing on (recompute not counted as useful FLOPs)")
    del model, opt


# ------------------------------------------------------------------------------------------------------------------
# 5. GRPO step (subprocess: its own process group)

GRPO_WORKER = r"""
import json, sys, dataclasses, torch
sys.path[:0] = [sys.argv[1], sys.argv[1] + '/tests']
from pathlib import Path
from grpo_fixture import build, overrides
from twice.gemma3 import PRESETS, Gemma3
from twice.tokenizer import Tokenizer
import train_grpo
work, dry = Path(sys.argv[2]), sys.argv[3] == '1'
paths = build(work / 'world', warm_steps=0)
tok = Tokenizer(Path(paths['model']) / 'tokenizer.model')
base = PRESETS['tiny'] if dry else PRESETS['gemma-3-270m']
cfg = dataclasses.replace(base, vocab_size=tok.vocab_size)
torch.manual_seed(0)
Gemma3.from_config(cfg).save_pretrained(work / 'bench_model', tokenizer_path=Path(paths['model']) / 'tokenizer.model')
paths['bench_model'] = str(work / 'bench_model')
ov = overrides(paths, work / 'run', model='bench_model', steps=2, **json.loads(sys.argv[4]))
train_grpo.main(ov)
m = [json.loads(l) for l in open(work / 'run' / 'metrics.jsonl')]
print('RESULT', json.dumps(m[-1]))
"""


@section("grpo")
def bench_grpo(args, dev):
    for decode in args.grpo_decode:
        grpo_step(args, dev, decode)


def grpo_step(args, dev, decode):
    extra = {"rollout.group_size": args.grpo_K, "rollout.max_new_tokens": args.grpo_new, "rollout.decode": decode,
             "optim.micro_batch_size": args.grpo_K, "rollout.stop_strings": "[]", "rollout.log_completions": 0}
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryDirectory() as work:
        r = subprocess.run([sys.executable, "-c", GRPO_WORKER, str(ROOT), work, "1" if args.dry_run else "0",
                            json.dumps(extra)], capture_output=True, text=True, env=env, timeout=args.grpo_timeout)
    if r.returncode:
        raise RuntimeError((r.stderr or r.stdout).strip().splitlines()[-1] if (r.stderr or r.stdout) else
                           f"exit {r.returncode}")
    m = json.loads(r.stdout.split("RESULT", 1)[1])
    group = "nccl 1-rank group + FSDP2" if dev.type == "cuda" else "CPU, no process group (dry run)"
    row("grpo", f"s/step (2nd step), {decode} decode", f"{m['time/step']:.2f}",
        f"{group}; sample {m['time/sample']:.2f} s, logprobs {m['time/logprobs']:.2f} s, update "
        f"{m['time/update']:.2f} s; K={args.grpo_K}, {args.grpo_new} new, "
        f"{'tiny' if args.dry_run else 'gemma-3-270m'} shape, fixture vocab")


# ------------------------------------------------------------------------------------------------------------------

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy shapes (CI): proves the script runs")
    ap.add_argument("--only", nargs="*", default=None, help="sections to run (default: all)")
    ap.add_argument("--profile", action="store_true", help="print the SFT step's top GPU kernels (torch.profiler)")
    ap.add_argument("--grpo-decode", nargs="+", default=["eager"], choices=["eager", "static", "compiled"],
                    help="rollout.decode of the grpo section's step, one row each (compiled: CUDA graphs)")
    args = ap.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() and not args.dry_run else "cpu")
    if dev.type == "cpu" and not args.dry_run:
        raise SystemExit("bench/gpu.py: no CUDA device; run with --dry-run on CPU")
    if args.dry_run:
        torch.set_num_threads(1)
        args.kernel_shape, args.check_shape = (64, 32, 1000), (16, 32, 1000)
        args.prompt_len, args.K, args.new_tokens, args.sft_tokens = 16, 2, 8, 64
        args.grpo_K, args.grpo_new, args.grpo_timeout, args.reps = 2, 6, 300, 1
        args.device_name = "CPU (dry run, toy shapes: numbers mean nothing)"
    else:
        args.kernel_shape, args.check_shape = (4800, 1152, 262144), (256, 1152, 262144)
        args.prompt_len, args.K, args.new_tokens, args.sft_tokens = 1000, 16, 300, 4096
        args.grpo_K, args.grpo_new, args.grpo_timeout, args.reps = 8, 64, 240, 3
        args.device_name = torch.cuda.get_device_name(dev)
    t0 = time.perf_counter()
    print(f"bench/gpu.py on {args.device_name} (torch {torch.__version__})", flush=True)
    cuda = dev.type == "cuda"
    peak = gemm_tflops(dev, torch.bfloat16 if cuda else torch.float32, 8192 if cuda else 256)
    row("device", "bf16 GEMM rate" if dev.type == "cuda" else "fp32 GEMM rate", rate(peak),
        "measured here (n^3 matmul); the FLOP bounds below use it")
    only = set(args.only or ["kernel", "correctness", "decode", "attention", "sft", "grpo"])
    if "kernel" in only:
        bench_kernel(args, dev, peak)
    if "correctness" in only:
        bench_correctness(args, dev)
    if "decode" in only:
        bench_decode(args, dev)
    if "attention" in only:
        bench_attention(args, dev)
    if "sft" in only:
        bench_sft(args, dev, peak)
    if "grpo" in only:
        bench_grpo(args, dev)

    w = [max(len(r[i]) for r in ROWS + [("section", "metric", "value", "")]) for i in range(3)]
    print(f"\n{args.device_name} -- bench/gpu.py{' --dry-run' if args.dry_run else ''}, "
          f"{time.perf_counter() - t0:.0f} s total")
    print(f"{'section':<{w[0]}}  {'metric':<{w[1]}}  {'value':<{w[2]}}  note")
    for s, m, v, n in ROWS:
        print(f"{s:<{w[0]}}  {m:<{w[1]}}  {v:<{w[2]}}  {n}")
    if FAILED:
        print(f"\nFAILED sections: {', '.join(FAILED)}")
    return 1 if FAILED else 0


if __name__ == "__main__":
    sys.exit(main())
