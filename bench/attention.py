"""Fused attention (SDPA, the default) vs the materialised eager path, same model, same run, this CPU.

    python bench/attention.py                     # Gemma-3-270m attention shapes, 2 layers, fp32, 1 thread
    python bench/attention.py --layers 4 --prompt 2048 --threads 2

Two workloads, each impl in its own fresh process (so one allocator state cannot flatter the other):
  * prefill: one cache-less forward of --prompt tokens (no grad), hidden states only (no LM head).
  * shared prefix: the GRPO training forward + backward with G prompts of --prefix tokens and K completions of
    --completion tokens each (Gemma3(..., shared_prefix=...) with targets: fused log-probs; sum backward).
Memory: peak resident-set growth of the process during the call (VmHWM reset after the inputs exist, as in
bench/logprobs.py). Time: wall seconds of the second call. The eager path's score tensors grow as T^2 (prefill) and
G*H*K*Tc*(P+Tc) (shared prefix); SDPA's do not exist. On a shared box compare the ratios.
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
    return 0


def worker(spec):
    import dataclasses

    import torch
    sys.path.insert(0, str(ROOT))
    from twice.gemma3 import PRESETS, Gemma3, SharedPrefix
    torch.set_num_threads(spec["threads"])
    cfg = dataclasses.replace(PRESETS["gemma-3-270m"], num_hidden_layers=spec["layers"], vocab_size=4096,
                              layer_types=None, attn_implementation=spec["impl"])
    torch.manual_seed(0)
    model = Gemma3.from_config(cfg)
    if spec["work"] == "prefill":
        ids = torch.randint(3, 4096, (1, spec["prompt"]))
        def run():
            with torch.no_grad():
                model(ids, return_hidden=True)
    else:
        G, K, P, Tc = spec["G"], spec["K"], spec["prefix"], spec["completion"]
        sp = SharedPrefix(torch.randint(3, 4096, (G, P)), torch.full((G,), P), K)
        comp = torch.randint(3, 4096, (G * K, Tc))
        def run():
            model.zero_grad(set_to_none=True)
            model(comp, shared_prefix=sp, targets=comp).sum().backward()
    run()  # warm-up (and allocator growth) outside the measurement
    model.zero_grad(set_to_none=True)
    rss0 = status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    t = time.perf_counter()
    run()
    dt = time.perf_counter() - t
    print(json.dumps({"s": dt, "peak_mib": (status_kb("VmHWM") - rss0) / 1024}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--G", type=int, default=2)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--completion", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    base = dict(layers=args.layers, prompt=args.prompt, G=args.G, K=args.K, prefix=args.prefix,
                completion=args.completion, threads=args.threads)
    print(f"Gemma-3-270m attention shapes (H=4, KV=1, hd=256, window 512), {args.layers} layers, fp32, "
          f"{args.threads} thread(s)")
    print(f"{'workload':<44} {'impl':<6} {'time':>8} {'peak +MiB':>10}")
    for work, label in (("prefill", f"prefill, {args.prompt} tokens"),
                        ("shared", f"shared prefix fwd+bwd, G={args.G} K={args.K} P={args.prefix} "
                                   f"Tc={args.completion}")):
        res = {}
        for impl in ("eager", "sdpa"):
            r = subprocess.run([sys.executable, __file__, "--worker", json.dumps(dict(base, work=work, impl=impl))],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(r.stderr[-2000:])
            res[impl] = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{label:<44} {impl:<6} {res[impl]['s']:>7.2f}s {res[impl]['peak_mib']:>10.0f}", flush=True)
        e, s = res["eager"], res["sdpa"]
        ratio = s["peak_mib"] / max(e["peak_mib"], 1)
        print(f"{'':<44} sdpa/eager: time {s['s'] / e['s']:.2f}x, peak memory {ratio:.2f}x")


if __name__ == "__main__":
    main()
