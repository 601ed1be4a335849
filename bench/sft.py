"""SFT step throughput (tokens/s) and peak memory (RSS) on CPU: Gemma-3-270m + LoRA (r 8, q/k/v/o/gate/up/down) at a
fixed batch, our training step (fused response-only loss, per-block activation checkpointing) against peers measured
in the same run: the same step without checkpointing, with the materialised eager attention instead of SDPA
(`fused+eager`), and the naive loss (full [B, T, V] logits + F.cross_entropy).
Every variant runs in each compute dtype (--dtypes, default fp32 and bf16: frozen base in that dtype, fp32 LoRA
adapters and AdamW state, twice/precision.py), same threads, and the bf16 / fp32 ratios are printed side by side.
Each (variant, dtype) runs in its own child process so its peak RSS (ru_maxrss) is its own.

    python bench/sft.py                                  # real 270m from ~/.cache/twice/gemma-3-270m if converted
    python bench/sft.py --batch 4 --seq 256 --resp 64 --steps 3 --threads 2 --variants fused+ckpt,fused
    python bench/sft.py --mfu-only                       # just print the GPU MFU formula (Gemma-3-1B, 4k prompts)
    python bench/sft.py --batch 4 --seq 550 --resp 62 --variants fused,fused+eager --dtypes bfloat16   # attention

Converting the real model first: `python -m twice.convert gemma-3-270m`. Without it a random model of the 270m
preset shape is used, and the output says so (throughput is the same; only the loss values differ).

MFU on a GPU (printed below for Gemma-3-1B at 4k-token prompts): MFU = tokens/s x model FLOPs per token / peak FLOPs,
model FLOPs per token (PaLM convention, recompute not counted, eager attention over the full context):
    forward  F = 2 * N_linear + 4 * sum_layers(H * hd * ctx_l) + 2 * D * V * resp_frac
             (N_linear = projection weights of all blocks; ctx_l = T for global layers, min(T, window) for local ones;
              the LM head runs on response tokens only: the fused kernel)
    training = 3F for full fine-tuning; with LoRA the frozen weights need no weight gradient: 2 * (2 N_linear + head)
             + 3 * attention (the adapters' own FLOPs are < 1% and left out).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

H100_BF16_DENSE = 989e12  # FLOP/s, SXM, dense (no sparsity)


def flops_per_token(cfg, T: int, resp_frac: float, lora: bool) -> dict:
    """Model FLOPs per token of a training step on prompts of T tokens (see the module docstring)."""
    D, H, KV, hd, I, V = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.intermediate_size, cfg.vocab_size)
    n_linear_layer = D * H * hd + 2 * D * KV * hd + H * hd * D + 3 * D * I
    n_linear = n_linear_layer * cfg.num_hidden_layers
    attn = sum(4 * H * hd * (T if kind == "full_attention" else min(T, cfg.sliding_window)) for kind in cfg.layer_types)
    head = 2 * D * V * resp_frac
    fwd = 2 * n_linear + attn + head
    train = 2 * (2 * n_linear + head) + 3 * attn if lora else 3 * fwd
    return {"n_linear": n_linear, "fwd": fwd, "train": train, "attn_share": attn / fwd}


def print_mfu_formula() -> None:
    from twice.gemma3 import PRESETS
    cfg = PRESETS["gemma-3-1b"]
    T, resp = 4096, 256 / 4096
    print("\nGPU MFU (Gemma-3-1B, 4096-token sequences, 256 response tokens each), model FLOPs per token:")
    for lora in (True, False):
        f = flops_per_token(cfg, T, resp, lora)
        need = 0.40 * H100_BF16_DENSE / f["train"]
        print(f"  {'LoRA' if lora else 'full'}: N_linear {f['n_linear'] / 1e6:.0f}M, "
              f"forward {f['fwd'] / 1e9:.2f} GFLOP, "
              f"train {f['train'] / 1e9:.2f} GFLOP/token (attention {100 * f['attn_share']:.0f}% of forward) -> "
              f"40% MFU on one H100 (989 TFLOP/s bf16 dense) = {need:,.0f} tokens/s/GPU")
    print("  MFU = tokens_per_s (metrics.jsonl: global, all ranks) / n_gpus * train FLOPs/token / 989e12 "
          "(tokens = real, unpadded prompt + response tokens)")


# ----------------------------------------------------------------------------------------------------------------
# one variant, in a child process

def child(args) -> dict:
    import torch
    import torch.nn.functional as F

    from twice.gemma3 import PRESETS, Gemma3
    from twice.lora import apply_lora
    from twice.precision import NAMES
    from twice.optim import build_adamw, clip_grad_norm_
    import train_sft as S

    torch.set_num_threads(args.threads)
    path = Path(os.path.expanduser(args.model))
    real = (path / "config.json").is_file()
    torch.manual_seed(0)
    dt = NAMES[args.dtype]
    model = Gemma3.from_pretrained(path, dtype=dt) if real else Gemma3.from_config(PRESETS["gemma-3-270m"], dtype=dt)
    apply_lora(model, r=8, alpha=16)  # adapters fp32 whatever the base dtype
    model.gradient_checkpointing = args.variant == "fused+ckpt"
    if args.variant == "fused+eager":  # materialised attention (train_sft.py model.attn_implementation: eager)
        model.set_attn_implementation("eager")
    model.train()
    opt = build_adamw(model, lr=1e-5)
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    g = torch.Generator().manual_seed(0)
    B, T, R = args.batch, args.seq, args.resp
    x = torch.randint(3, min(model.config.vocab_size, 200_000), (B, T), generator=g)  # [B, T] fixed batch
    y = torch.full((B, T), -100, dtype=torch.long)
    y[:, T - R - 1:T - 1] = x[:, T - R:]  # the last R tokens of each row are the "response"
    n = (y != -100).sum()
    times, cpu, losses = [], [], []
    for step in range(args.steps + 1):  # step 0 warms up (allocator, first-call overheads)
        t0, c0 = time.perf_counter(), time.process_time()
        if args.variant == "naive":
            logits = model(x)  # [B, T, V]: 4 x 256 x 262144 fp32 = 1 GiB, plus its gradient
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                                   reduction="sum") / n
        else:
            loss = S.response_nll(model, x, y).sum() / n
        loss.backward()
        clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step > 0:
            times.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)  # CPU seconds: less sensitive to a shared box than wall time
        losses.append(float(loss.detach()))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": args.variant, "dtype": args.dtype, "real_model": real,
            "tokens_per_s": B * T / statistics.median(times), "step_s": statistics.median(times),
            "step_cpu_s": statistics.median(cpu), "peak_rss_mb": peak, "rss_after_load_mb": rss_loaded,
            "train_peak_over_load_mb": peak - rss_loaded, "losses": losses}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="~/.cache/twice/gemma-3-270m")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--resp", type=int, default=64, help="response (loss) tokens at the end of each row")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--variants", default="fused+ckpt,fused,naive")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes of the frozen base, side by side")
    ap.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    ap.add_argument("--mfu-only", action="store_true")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.variant, args.dtype = args.child.split(":")
        print("RESULT " + json.dumps(child(args)), flush=True)
        return
    if args.mfu_only:
        print_mfu_formula()
        return
    print(f"SFT step on CPU: Gemma-3-270m + LoRA r8 (7 projections), batch {args.batch} x {args.seq} tokens "
          f"({args.resp} response tokens per row), {args.threads} threads, median of {args.steps} steps after 1 "
          f"warm-up; dtypes {args.dtypes}", flush=True)
    res, by_dtype = {}, {}
    dtypes = args.dtypes.split(",")
    for v in args.variants.split(","):
        for d in dtypes:
            cmd = [sys.executable, __file__, "--child", f"{v}:{d}"] + [a for a in sys.argv[1:]]
            p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if p.returncode != 0 or line is None:
                print(f"{v} {d}: FAILED\n{p.stderr[-3000:]}")
                continue
            r = by_dtype[(v, d)] = json.loads(line[7:])
            if d == dtypes[0]:
                res[v] = r  # the vs-naive comparisons below use the first dtype
            print(f"  {v:11s} {d:9s} {r['tokens_per_s']:8.1f} tok/s  step {r['step_s']:6.2f}s "
                  f"({r['step_cpu_s']:6.2f} CPU-s)  "
              f"peak RSS {r['peak_rss_mb']:7.0f} MB "
              f"(+{r['train_peak_over_load_mb']:.0f} MB over the loaded model)  loss {r['losses'][0]:.4f} -> "
                  f"{r['losses'][-1]:.4f}{'' if r['real_model'] else '  [RANDOM 270m-shaped model: not converted]'}",
                  flush=True)
    if len(dtypes) > 1:
        a, b = dtypes[1], dtypes[0]
        print(f"  {a} vs {b}, same threads (target for bf16 vs fp32: >= 3x tokens/s, peak RSS not above):")
        for v in args.variants.split(","):
            if (v, a) in by_dtype and (v, b) in by_dtype:
                ra, rb = by_dtype[(v, a)], by_dtype[(v, b)]
                print(f"    {v:11s} {ra['tokens_per_s'] / rb['tokens_per_s']:5.2f}x tokens/s "
                      f"({rb['step_cpu_s'] / ra['step_cpu_s']:.2f}x in CPU seconds), peak RSS "
                      f"{ra['peak_rss_mb']:.0f} vs {rb['peak_rss_mb']:.0f} MB "
                      f"({ra['peak_rss_mb'] / rb['peak_rss_mb']:.2f}x), "
                      f"step-0 loss {ra['losses'][0]:.4f} vs {rb['losses'][0]:.4f}")
    if "fused" in res and "fused+eager" in res:
        f, e = res["fused"], res["fused+eager"]
        print(f"  eager vs SDPA attention (no checkpointing): {f['step_s'] / e['step_s']:.2f}x step time "
              f"({f['step_cpu_s'] / e['step_cpu_s']:.2f}x in CPU seconds), peak RSS {e['peak_rss_mb']:.0f} vs "
              f"{f['peak_rss_mb']:.0f} MB, step-0 loss {e['losses'][0]:.6f} vs {f['losses'][0]:.6f}")
    if "naive" in res:
        base = res["naive"]
        for v, r in res.items():
            if v != "naive":
                print(f"  {v} vs naive full-logits CE: {r['tokens_per_s'] / base['tokens_per_s']:.2f}x tokens/s, "
                      f"{r['train_peak_over_load_mb'] / max(base['train_peak_over_load_mb'], 1):.2f}x training "
                      f"memory over the loaded model")
        if "fused" in res:  # same math, different memory path: the first losses must agree
            print(f"  loss check (step 0): fused {res['fused']['losses'][0]:.6f} vs naive {base['losses'][0]:.6f}")
    print_mfu_formula()


if __name__ == "__main__":
    main()
