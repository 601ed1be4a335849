"""bf16 vs fp32 matmul throughput on this machine: what `dtype: auto` can gain at most (twice/precision.py).

    python bench/gemm.py                    # the shapes below, torch's default threads
    python bench/gemm.py --threads 1

Shapes: a 270m projection over 512 tokens, a 1B MLP over 2048 tokens, and the 270m LM head at decode (8 rows x the
262k vocabulary). GFLOP/s = 2 m k n / best-of-reps seconds, one warm-up call each (kernel/primitive creation stays
out of the timing). The CPU flags that decide `auto` (amx_bf16, avx512_bf16) are printed with the figures.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twice.precision import cpu_bf16_flags  # noqa: E402

SHAPES = ((512, 640, 2048), (2048, 1152, 6912), (8, 640, 262144))


def gflops(m: int, k: int, n: int, dtype: torch.dtype, reps: int) -> float:
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    a @ b                                   # warm-up
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * m * k * n / best / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU bf16 flags: {cpu_bf16_flags() or 'none'}")
    print("| m x k x n | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |\n|---|---|---|---|")
    for m, k, n in SHAPES:
        f32, b16 = gflops(m, k, n, torch.float32, args.reps), gflops(m, k, n, torch.bfloat16, args.reps)
        print(f"| {m} x {k} x {n} | {f32:.0f} | {b16:.0f} | {b16 / f32:.2f}x |")


if __name__ == "__main__":
    main()
