"""Group sampling throughput: twice.engine vs transformers `generate`, same weights, same process, same threads.

    python -m twice.convert gemma-3-270m && python bench/generate.py     # weights in ~/.cache/twice/gemma-3-270m
    python bench/generate.py --model DIR --prompt-len 1024 --new 64 --k 16 --threads 2

The GRPO workload: one ~1k-token prompt, K=16 samples of exactly 64 new tokens (stops disabled on our side,
min_new_tokens = max_new_tokens on HF's), temperature 1, top-k 64, top-p 0.95 (Gemma's generation_config).
Both sides run fp32 on CPU with the same torch thread count, one warm-up call each, then `--repeats` timed calls.
tokens/s = K * new / wall time of one whole generate call (prefill included: that is where sharing the prompt
prefill across the group pays). Also prints our K=1 decode tokens/s (time(prompt + 1 + new) - time(prompt + 1)).
transformers expands the prompt to K rows before its prefill (num_return_sequences); we prefill it once and copy
the cache. If the converted 270m folder is absent, a randomly initialised model with the 270m preset shape is saved
with save_pretrained into a temp dir and used by both sides (the timing does not depend on the weights' values).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twice.engine import Engine  # noqa: E402
from twice.gemma3 import PRESETS, Gemma3  # noqa: E402


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/twice/gemma-3-270m"))
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--repeats", type=int, default=1, help="timed calls per side (best is reported)")
    ap.add_argument("--skip-hf", action="store_true", help="only time our engine")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tmp = None
    path = Path(args.model)
    if not (path / "config.json").exists():
        tmp = tempfile.TemporaryDirectory(prefix="bench-gemma270m-")
        path = Path(tmp.name)
        print(f"NOTE: {args.model} not found -> RANDOM weights with the gemma-3-270m shape (saved to {path})")
        Gemma3.from_config(PRESETS["gemma-3-270m"]).save_pretrained(path)
    ours = Gemma3.from_pretrained(path, dtype=torch.float32).eval()
    eng = Engine(ours)
    cfg = ours.config
    print(f"model {path}: {ours.num_params() / 1e6:.0f}M params, {cfg.num_hidden_layers} layers, window "
          f"{cfg.sliding_window}; fp32; torch {torch.__version__}, {torch.get_num_threads()} threads")

    g = torch.Generator().manual_seed(0)
    prompt = [2] + torch.randint(1000, 200000, (args.prompt_len - 1,), generator=g).tolist()
    K, N = args.k, args.new
    sample = dict(temperature=1.0, top_k=64, top_p=0.95)

    def ours_group():
        return eng.generate([prompt], num_samples=K, max_new_tokens=N, stop_ids=[], seeds=0, **sample)

    eng.generate([prompt[:32]], num_samples=2, max_new_tokens=4, stop_ids=[], seeds=0)  # warm-up
    t_ours, res = timed(ours_group, args.repeats)
    assert all(len(t) == N for t in res.tokens), "fixed-length run produced a short row"
    tps_ours = K * N / t_ours
    print(f"ours          K={K:<3d} prompt {len(prompt)} + {N} new: {t_ours:7.2f} s  {tps_ours:8.1f} tok/s",
          flush=True)

    # our K=1 decode speed: the prefill (+1 token) cancels out
    t_pre, _ = timed(lambda: eng.generate([prompt], 1, 1, stop_ids=[], seeds=0, **sample), args.repeats)
    t_all, _ = timed(lambda: eng.generate([prompt], 1, N + 1, stop_ids=[], seeds=0, **sample), args.repeats)
    print(f"ours          K=1   decode: {N / (t_all - t_pre):8.1f} tok/s   (prefill {len(prompt)} tokens: "
          f"{t_pre:.2f} s = {len(prompt) / t_pre:.0f} tok/s)", flush=True)

    if args.skip_hf:
        return
    from transformers import Gemma3ForCausalLM
    hf = Gemma3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])

    def hf_group():
        with torch.inference_mode():
            return hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, num_return_sequences=K,
                               max_new_tokens=N, min_new_tokens=N, pad_token_id=0, **sample)

    with torch.inference_mode():  # warm-up
        hf.generate(ids[:, :32], attention_mask=torch.ones_like(ids[:, :32]), do_sample=True,
                    num_return_sequences=2, max_new_tokens=4, pad_token_id=0)
    t_hf, out = timed(hf_group, args.repeats)
    assert out.shape == (K, len(prompt) + N), out.shape
    tps_hf = K * N / t_hf
    print(f"transformers  K={K:<3d} prompt {len(prompt)} + {N} new: {t_hf:7.2f} s  {tps_hf:8.1f} tok/s  "
          f"(attn_implementation={hf.config._attn_implementation})")
    print(f"ratio ours / transformers: {tps_ours / tps_hf:.2f}x")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
