"""Forward time of a fine-tuned folder that carries a lora_delta (twice/hf.py), three ways, measured in the same run:
fp32 merged (what `auto` used to pick), bf16 + the fp32 delta applied unmerged (what `auto` picks now), and a plain
bf16 cast of the merged weights (the speed peer: it rounds most of the fine-tune away). Prints ratios vs fp32.

    python bench/lora_delta.py runs/quickstart/sft/final --threads 1
    python bench/lora_delta.py DIR --batch 4 --seq 128 --decode 20

The folder needs lora_delta.safetensors (an export by twice.checkpoint.export_hf with this feature).
"""
from __future__ import annotations

import argparse
import time

import torch

from twice.gemma3 import Gemma3
from twice.hf import delta_meta


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--decode", type=int, default=20, help="1-token forwards timed (decode-shaped)")
    ap.add_argument("--repeats", type=int, default=2, help="prefill forwards timed")
    a = ap.parse_args()
    if delta_meta(a.folder) is None:
        raise SystemExit(f"bench/lora_delta.py: {a.folder} has no lora_delta.json (re-export it with export_hf)")
    torch.set_num_threads(a.threads)
    ids = torch.randint(0, 1000, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    res = {}
    for name, dt, mode in [("fp32 merged", torch.float32, "merged"), ("bf16 + delta", torch.bfloat16, "adapters"),
                           ("bf16 cast (rounds the update)", torch.bfloat16, "merged")]:
        m = Gemma3.from_pretrained(a.folder, dtype=dt, delta=mode).eval()
        with torch.no_grad():
            m(ids[:, :16])  # warm-up
            t = time.perf_counter()
            for _ in range(a.repeats):
                m(ids)
            pre = (time.perf_counter() - t) / a.repeats
            t = time.perf_counter()
            for _ in range(a.decode):
                m(ids[:, :1])
            dec = (time.perf_counter() - t) / a.decode
        res[name] = (pre, dec)
        del m
    p32, d32 = res["fp32 merged"]
    for name, (pre, dec) in res.items():
        print(f"{name:30s} prefill [{a.batch}, {a.seq}] {pre:7.3f} s ({p32 / pre:4.2f}x vs fp32)   "
              f"1-token forward [{a.batch}, 1] {dec * 1e3:7.1f} ms ({d32 / dec:4.2f}x)", flush=True)


if __name__ == "__main__":
    main()
