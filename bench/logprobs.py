"""Benchmark token_logprobs: naive (full logits) vs the chunked torch reference vs Triton (CUDA only), same run.

    python bench/logprobs.py                                   # CPU: N = 512 and the Gemma-3-270m shape N = 16 x 300
    python bench/logprobs.py --n 512 4800 --d 640 --v 262144 --reps 2
    python bench/logprobs.py --threads 1      # on an oversubscribed box: OpenMP spin-waits punish many mid-size ops

Each (shape, impl, mode) runs in its own subprocess, so one impl's allocator state cannot flatter another's.
  * fwd    = forward only under no_grad (the old/ref-policy log-prob pass): logp + entropy.
  * fwdbwd = forward + backward of sum(g1 * logp) + sum(g2 * entropy) w.r.t. hidden and weight (random g1, g2).
Memory, CPU: peak resident-set growth of the worker process during the first call: VmHWM is reset to the current RSS
(write "5" to /proc/self/clear_refs) after the inputs exist, and the op's peak is VmHWM - RSS before the call. It counts
every byte the op touches (logits, temporaries, the gradients, BLAS/OpenMP buffers), not allocator bookkeeping.
"excl dW" subtracts the [V, D] weight gradient, which every implementation must return (the irreducible part).
Memory, CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before the call.
Time: min over the first (measuring) call and --reps more; wall clock, synchronised on CUDA. On a shared CPU box the
spread between calls is large (other processes), so compare ratios from the same run and read "first" too.
naive is skipped where its extrapolated peak (linear in N from the smallest N measured, else 5 x N x V x 4 B) would not
fit in half of MemAvailable; the extrapolation is then printed instead, marked "est".
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_kb(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])
    raise KeyError(key)


def mem_available_bytes():
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable"):
            return int(line.split()[1]) * 1024
    return 0


def naive(h, w, y, temperature, return_entropy=True):
    logits = (h @ w.T).float() / temperature                 # [N, V]: the tensor the fused kernels never build
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(1, y[:, None]).squeeze(1)
    ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def make_inputs(n, d, v, dtype, device, requires_grad):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(n, d, generator=g).to(dtype)
    w = torch.empty(v, d, dtype=dtype)
    for v0 in range(0, v, 16384):                            # fill in slices: no [V, D] fp32 temporary in the peak
        w[v0:v0 + 16384] = (torch.randn(min(16384, v - v0), d, generator=g) * d ** -0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    h, w, y = h.to(device), w.to(device), y.to(device)
    g1, g2 = torch.randn(n, generator=g).to(device), torch.randn(n, generator=g).to(device)
    return h.requires_grad_(requires_grad), w.requires_grad_(requires_grad), y, g1, g2


def worker(impl, mode, n, d, v, dtype_name, reps, temperature):
    """Run one (impl, mode) and print a JSON line {peak, times}."""
    dtype = getattr(torch, dtype_name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    h, w, y, g1, g2 = make_inputs(n, d, v, dtype, device, requires_grad=(mode == "fwdbwd"))
    if impl == "naive":
        fn = lambda: naive(h, w, y, temperature)  # noqa: E731
    else:
        fn = lambda: token_logprobs(h, w, y, temperature, return_entropy=True,  # noqa: E731
                                   impl="torch" if impl.startswith("torch") else "triton")

    def call():
        if mode == "fwd":
            with torch.no_grad():
                out = fn()
            return out
        logp, ent = fn()
        dh, dw = torch.autograd.grad((logp * g1).sum() + (ent * g2).sum(), (h, w))
        return dh, dw

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    import gc
    gc.collect()
    if device == "cuda":
        sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = status_kb("VmRSS") * 1024
        open("/proc/self/clear_refs", "w").write("5")         # reset VmHWM to the current RSS
    t0 = time.perf_counter()
    out = call()
    sync()
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else status_kb("VmHWM") * 1024) - base
    del out
    times = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        out = call()
        sync()
        times.append(time.perf_counter() - t0)
        del out
    print(json.dumps({"peak": peak, "first": first, "times": times}))


def run_worker(impl, mode, n, args):
    cmd = [sys.executable, __file__, "--worker", impl, mode, str(n), str(args.d), str(args.v), args.dtype,
           str(args.reps), str(args.temperature), str(args.threads)]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc={r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def fmt_bytes(b):
    return f"{b / 2**20:9.1f} MiB"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[512, 4800], help="token counts (4800 = 16 x 300)")
    ap.add_argument("--d", type=int, default=640, help="hidden size (640 = Gemma-3-270m, 1152 = 1B)")
    ap.add_argument("--v", type=int, default=262144, help="vocabulary size")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=2, help="timed calls after the first (measuring) one")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads in each worker (0 = torch default)")
    ap.add_argument("--modes", nargs="+", default=["fwd", "fwdbwd"])
    ap.add_argument("--impls", nargs="+", default=None, help="naive torch triton (triton needs CUDA)")
    args = ap.parse_args()
    impls = args.impls or (["naive", "torch", "triton"] if torch.cuda.is_available() else ["naive", "torch"])
    elem = 2 if args.dtype == "bfloat16" else 4
    print(f"# token_logprobs bench: D={args.d} V={args.v} dtype={args.dtype} T={args.temperature} reps={args.reps} "
          f"torch={torch.__version__} threads={args.threads or torch.get_num_threads()} "
          f"device={'cuda:' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}")
    print(f"# peak = memory growth during the op (see module docstring); dW alone = {fmt_bytes(args.v * args.d * elem)}")
    naive_per_token = {}                                     # mode -> measured naive peak bytes per token
    for n in sorted(args.n):
        for mode in args.modes:
            res = {}
            for impl in impls:
                if impl == "naive":
                    est = naive_per_token.get(mode, 5 * args.v * 4) * n
                    if est > mem_available_bytes() / 2:
                        res[impl] = {"skipped": est}
                        continue
                res[impl] = run_worker(impl, mode, n, args)
                if impl == "naive" and "peak" in res[impl]:
                    naive_per_token[mode] = res[impl]["peak"] / n
            dw_bytes = args.v * args.d * elem if mode == "fwdbwd" else 0
            base = res.get("naive", {})
            for impl, r in res.items():
                head = f"N={n:5d} {mode:6s} {impl:6s}"
                if "skipped" in r:
                    print(f"{head} skipped: est. peak {fmt_bytes(r['skipped'])} (linear in N) > MemAvailable/2")
                    continue
                if "error" in r:
                    print(f"{head} error: {r['error']}")
                    continue
                t = min([r["first"]] + r["times"])
                line = (f"{head} peak {fmt_bytes(r['peak'])} (excl dW {fmt_bytes(max(0, r['peak'] - dw_bytes))})"
                        f"  time {t:8.3f} s (calls: {', '.join(f'{x:.2f}' for x in [r['first']] + r['times'])})")
                if impl != "naive":
                    if "peak" in base:
                        tb = min([base["first"]] + base["times"])
                        line += (f"  | vs naive: mem {r['peak'] / base['peak']:.3f}x"
                                 f" (excl dW {max(1, r['peak'] - dw_bytes) / max(1, base['peak'] - dw_bytes):.4f}x)"
                                 f", time {t / tb:.2f}x")
                    elif "skipped" in base:
                        line += f"  | vs naive est.: mem {r['peak'] / base['skipped']:.4f}x"
                print(line, flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    import torch

    from kernels import token_logprobs
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, impl, mode, n, d, v, dtype_name, reps, temperature, threads = sys.argv
        if int(threads) > 0:
            torch.set_num_threads(int(threads))
        worker(impl, mode, int(n), int(d), int(v), dtype_name, int(reps), float(temperature))
    else:
        main()
