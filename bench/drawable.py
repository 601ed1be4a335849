"""How many vocabulary tokens the untruncated T=1 draw can reach, old fp32 inverse CDF vs the float64 two-level one.

    python bench/drawable.py --model ~/.cache/twice/gemma-3-270m

One chat prompt, the next-token distribution at T = 1 (fp32 logits). A token is drawable when its inverse-CDF bin
has positive width: fp32 cumsum over the vocabulary (before, issue 10 item 2) vs float64 per-block sums and a float64
cumsum inside the chosen block (twice.engine._inverse_cdf, after). Also prints the probability mass of the
undrawable tokens (what the sampler silently moved onto their neighbours).
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twice.engine import Engine  # noqa: E402
from twice.gemma3 import Gemma3  # noqa: E402
from twice.tokenizer import Tokenizer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/twice/gemma-3-270m"))
    ap.add_argument("--prompt", default="Recommend one movie for a user who liked Toy Story and Heat. Explain why.")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = Gemma3.from_pretrained(args.model).eval()
    tok = Tokenizer.from_pretrained(args.model)
    ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}])
    with torch.inference_mode():
        _, logits = Engine(model, tok).prefill([ids])  # [1, V] fp32
    x = logits[0]
    V = x.numel()
    p32 = torch.exp(x - torch.logsumexp(x, -1))
    c32 = torch.cumsum(p32, -1)
    old = torch.diff(c32, prepend=c32.new_zeros(1)) > 0
    B = 1024
    pb = p32.view(-1, B).double()
    inner = pb.cumsum(-1)
    new = (torch.diff(inner, dim=-1, prepend=inner.new_zeros(inner.shape[0], 1)) > 0).flatten()
    new &= (pb.sum(-1) / pb.sum() > 2 ** -53).repeat_interleave(B)  # a block below 2^-53 of the total is unreachable
    p = p32.double()
    print(f"prompt {len(ids)} tokens, vocabulary {V}")
    for name, ok in (("fp32 cumsum (before)", old), ("float64 two-level (after)", new)):
        lost = p[~ok]
        med = f"{lost.median().item():.2e}" if lost.numel() else "-"
        print(f"{name:28s} drawable {int(ok.sum()):7d} / {V}   undrawable mass {lost.sum().item():.2e} "
              f"(median p of an undrawable token {med})")


if __name__ == "__main__":
    main()
