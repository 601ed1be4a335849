"""Group sampling throughput: twice.engine in bf16 and fp32 vs transformers `generate` in the same dtype, one process.

    python bench/generate.py                    # K=16, 1024-token prompt, 64 new, real ~/.cache/twice/gemma-3-270m
    python bench/generate.py --quick            # K=4, 128-token prompt, 8 new: a smoke run of every line below
    python bench/generate.py --dtypes bfloat16 --skip-hf --threads 1
    python bench/generate.py --quick --skip-hf --compiled     # + eager vs compiled decode (Engine(decode=...))
    python bench/generate.py --dtypes bfloat16 --skip-hf --threads 1 --k 48 --prompt-len 512 --new 32 --mixed \
        --full-vocab     # eval's decode (8 users x 6 rows), candidate-set draw vs whole-vocabulary draw

The GRPO workload: one prompt, K samples of exactly `--new` tokens (stops disabled on our side, min_new_tokens =
max_new_tokens on HF's), temperature 1, top-k 64, top-p 0.95 (Gemma's generation_config). Every dtype and side runs
with the same torch thread count, one warm-up call each (first-use kernel/primitive creation stays out of the
timing), then `--repeats` timed calls (best reported). tokens/s = K * new / wall time of one whole generate call
(prefill included: sharing the prompt prefill across the group pays there). Also prints our K=1 decode tokens/s
(time(prompt + 1 + new) - time(prompt + 1)).

Where the time goes (ours, per dtype): one extra generate call under torch.profiler, split by the engine's named
phases (engine.prefill / .forward / .head / .sample / .sync: twice/engine.py), plus the number of aten ops per decode
step (aten ops called from Python inside one step's forward + head + sample) and the top ops by self time inside
decode steps.
If the converted 270m folder is absent, a randomly initialised model with the 270m preset shape is saved with
save_pretrained into a temp dir and used by both sides (the timing does not depend on the weights' values).
"""
from __future__ import annotations

import argparse
import bisect
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twice.engine import Engine  # noqa: E402
from twice.gemma3 import PRESETS, Gemma3  # noqa: E402

PHASES = ("engine.prefill", "engine.forward", "engine.head", "engine.sample", "engine.sync")
STEP = ("engine.forward", "engine.head", "engine.sample")  # one decode step = these three ranges


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def phase_profile(fn, steps: int):
    """Profile one call -> (seconds per phase, {phase: aten ops per decode step}, [(op, ms per step)] top self time).
    Ops are the aten ops called from Python (top level: an op's own internal aten calls are not counted again)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ev = prof.events()
    spans = defaultdict(list)
    for e in ev:
        if e.name in PHASES:
            spans[e.name].append((e.time_range.start, e.time_range.end))
    secs = {k: sum(b - a for a, b in v) / 1e6 for k, v in spans.items()}
    step_spans = sorted((a, b, k) for k in STEP for a, b in spans.get(k, []))
    starts = [a for a, _, _ in step_spans]
    ops, self_us = Counter(), Counter()
    for e in ev:
        if not e.name.startswith("aten::"):
            continue
        i = bisect.bisect_right(starts, e.time_range.start) - 1
        if i < 0 or e.time_range.end > step_spans[i][1]:
            continue
        self_us[e.name] += e.self_cpu_time_total
        parent = e.cpu_parent
        if parent is None or not parent.name.startswith("aten::"):
            ops[step_spans[i][2]] += 1
    top = [(k, v / 1e3 / steps) for k, v in self_us.most_common(6)]
    return secs, {k: ops[k] / steps for k in STEP}, top


def run_ours(path, dtype, prompt, K, N, sample, repeats, decode="eager", with_profile=True, draw_from_top=True):
    model = Gemma3.from_pretrained(path, dtype=dtype).eval()
    eng = Engine(model, decode=decode)
    eng.draw_from_top &= draw_from_top  # False: every step samples over the whole vocabulary (the peer)

    def group():
        return eng.generate([prompt], num_samples=K, max_new_tokens=N, stop_ids=[], seeds=0, **sample)

    eng.generate([prompt[:32]], num_samples=2, max_new_tokens=4, stop_ids=[], seeds=0)  # warm-up
    t0 = time.perf_counter()
    group()  # warm-up at the timed shapes (compiled: this call compiles the step for this batch shape)
    t_first = time.perf_counter() - t0
    t, res = timed(group, repeats)
    assert all(len(r) == N for r in res.tokens), "fixed-length run produced a short row"
    one = {**sample, "temperature": max(sample["temperature"])} if isinstance(sample["temperature"], list) else sample
    eng.generate([prompt], 1, 2, stop_ids=[], seeds=0, **one)  # warm-up at K=1 shapes (compiled: compiles)
    t_pre, _ = timed(lambda: eng.generate([prompt], 1, 1, stop_ids=[], seeds=0, **one), repeats)
    t_all, _ = timed(lambda: eng.generate([prompt], 1, N + 1, stop_ids=[], seeds=0, **one), repeats)
    secs, ops, top = phase_profile(group, N - 1) if with_profile else ({}, {}, [])  # N-1 decode steps
    draws = eng.draws
    del model, eng
    return dict(t=t, tps=K * N / t, k1=N / max(t_all - t_pre, 1e-9), t_pre=t_pre, secs=secs, ops=ops, top=top,
                t_first=t_first, draws=draws, res=res)


def run_hf(path, dtype, prompt, K, N, sample, repeats):
    from transformers import Gemma3ForCausalLM
    hf = Gemma3ForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor([prompt])

    def group():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, num_return_sequences=K,
                               max_new_tokens=N, min_new_tokens=N, pad_token_id=0, **sample)

    with torch.inference_mode():  # warm-up
        hf.generate(ids[:, :32], attention_mask=torch.ones_like(ids[:, :32]), do_sample=True,
                    num_return_sequences=2, max_new_tokens=4, pad_token_id=0)
    t, out = timed(group, repeats)
    assert out.shape == (K, len(prompt) + N), out.shape
    return dict(t=t, tps=K * N / t, attn=hf.config._attn_implementation)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/twice/gemma-3-270m"))
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="small shapes: K=4, 128-token prompt, 8 new")
    ap.add_argument("--dtypes", default="bfloat16,float32", help="comma list, compared in this order")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per side (best is reported)")
    ap.add_argument("--skip-hf", action="store_true", help="only time our engine")
    ap.add_argument("--mixed", action="store_true",
                    help="eval's decode instead of GRPO's: slot 0 greedy + K-1 slots at T 1.5, top-k 120, top-p 0.95, "
                         "no full_logprobs")
    ap.add_argument("--full-vocab", action="store_true",
                    help="also time our eager decode sampling over the whole vocabulary every step (the peer of "
                         "the candidate-set draw, Engine.draw_from_top) and check both give the same tokens")
    ap.add_argument("--compiled", action="store_true",
                    help="also time Engine(decode='compiled') (torch.compile of the static decode step) per dtype")
    args = ap.parse_args()
    if args.quick:
        args.prompt_len, args.new, args.k = 128, 8, 4
    if args.mixed and not args.skip_hf:
        print("NOTE: --mixed has no transformers peer (one generate call cannot mix greedy and sampled rows): "
              "--skip-hf")
        args.skip_hf = True
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tmp = None
    path = Path(args.model)
    if not (path / "config.json").exists():
        tmp = tempfile.TemporaryDirectory(prefix="bench-gemma270m-")
        path = Path(tmp.name)
        print(f"NOTE: {args.model} not found -> RANDOM weights with the gemma-3-270m shape (saved to {path})")
        Gemma3.from_config(PRESETS["gemma-3-270m"]).save_pretrained(path)
    g = torch.Generator().manual_seed(0)
    prompt = [2] + torch.randint(1000, 200000, (args.prompt_len - 1,), generator=g).tolist()
    K, N = args.k, args.new
    sample = dict(temperature=1.0, top_k=64, top_p=0.95)
    if args.mixed:  # configs/quickstart/eval.yaml: the greedy row and the sampled rows of a user in one decode
        sample = dict(temperature=[0.0] + [1.5] * (args.k - 1), top_k=120, top_p=0.95, full_logprobs=False)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    print(f"model {path}; K={K}, prompt {len(prompt)} + {N} new; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, cpu capability {torch.backends.cpu.get_cpu_capability()}")

    ours, hf = {}, {}
    for dt in dtypes:
        name = str(dt).replace("torch.", "")
        r = ours[name] = run_ours(path, dt, prompt, K, N, sample, args.repeats)
        print(f"ours {name:9s} K={K:<3d}: {r['t']:7.2f} s {r['tps']:8.1f} tok/s | K=1 decode {r['k1']:6.1f} tok/s, "
              f"prefill {r['t_pre']:.2f} s", flush=True)
        ph = "  ".join(f"{k.split('.')[1]} {r['secs'].get(k, 0.0):.2f}s" for k in PHASES)
        print(f"     phases (one profiled call): {ph}")
        print(f"     decode step: {sum(r['ops'].values()):.0f} aten ops/step ("
              + ", ".join(f"{k.split('.')[1]} {v:.0f}" for k, v in r["ops"].items()) + "); top self time per step: "
              + ", ".join(f"{k.replace('aten::', '')} {v:.1f}ms" for k, v in r["top"]), flush=True)
        print(f"     decode steps drawn from the head's candidates / over the whole vocabulary (the first of each "
              f"call) / declined by sample_top, all calls: {r['draws']['top']} / {r['draws']['full']} / "
              f"{r['draws']['declined']}")
        if args.full_vocab:
            f = run_ours(path, dt, prompt, K, N, sample, args.repeats, with_profile=False, draw_from_top=False)
            same = f["res"].tokens == r["res"].tokens and torch.equal(f["res"].logprobs_padded, r["res"].logprobs_padded)
            if r["res"].full_logprobs_padded is not None:
                same &= torch.equal(f["res"].full_logprobs_padded, r["res"].full_logprobs_padded)
            print(f"ours {name:9s} full-vocabulary draw: {f['t']:7.2f} s {f['tps']:8.1f} tok/s; candidate draw / "
                  f"full = {r['tps'] / f['tps']:.2f}x; same tokens and log-probs: {same}", flush=True)
        if args.compiled:
            c = run_ours(path, dt, prompt, K, N, sample, args.repeats, decode="compiled", with_profile=False)
            print(f"ours {name:9s} compiled: {c['t']:7.2f} s {c['tps']:8.1f} tok/s | K=1 decode {c['k1']:6.1f} tok/s"
                  f" (first call, compiling: {c['t_first']:.1f} s); compiled / eager = {c['tps'] / r['tps']:.2f}x "
                  f"(group), {c['k1'] / r['k1']:.2f}x (K=1 decode)", flush=True)
        if not args.skip_hf:
            h = hf[name] = run_hf(path, dt, prompt, K, N, sample, args.repeats)
            print(f"transformers {name:9s} K={K:<3d}: {h['t']:7.2f} s {h['tps']:8.1f} tok/s "
                  f"(attn_implementation={h['attn']}); ours / transformers = {r['tps'] / h['tps']:.2f}x", flush=True)
    names = list(ours)
    if len(names) > 1:
        a, b = names[0], names[1]
        print(f"ours {a} / ours {b}: {ours[a]['tps'] / ours[b]['tps']:.2f}x (group), "
              f"{ours[a]['k1'] / ours[b]['k1']:.2f}x (K=1 decode)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
