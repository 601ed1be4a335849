"""How long are the T3 responses SFT trains on, and how many would a GRPO completion budget cut off?

    python bench/completion_budget.py RATIONALES.jsonl DATA_DIR TOKENIZER_DIR [--budget 64] [--q 0.95]
    python bench/completion_budget.py data/official-grocery/examples_task3.jsonl data/official-grocery \
        ~/.cache/twice/gemma-3-270m --budget 64

Each response is rendered exactly as SFT's T3 renders it (<think>clean(rationale)</think><item>ID</item>, plus the
end-of-turn the sampler stops on; train_grpo.response_lengths) and tokenized. Prints the length quantiles, the
share longer than --budget (a sampler that reproduced these responses would be truncated there, and a truncated
reasoning completion gets no <item>, so rho_cg = 0), and what `rollout.max_new_tokens: auto` picks (--q quantile).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_grpo  # noqa: E402
from twice.data import load_dataset  # noqa: E402
from twice.tasks import TaskConfig  # noqa: E402
from twice.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rationales")
    ap.add_argument("data_dir")
    ap.add_argument("tokenizer_dir")
    ap.add_argument("--budget", type=int, default=64)
    ap.add_argument("--q", type=float, default=0.95)
    a = ap.parse_args()
    ds, tok = load_dataset(a.data_dir), Tokenizer.from_pretrained(Path(a.tokenizer_dir).expanduser())
    lens, bad = train_grpo.response_lengths(Path(a.rationales), ds, tok, TaskConfig().tags)
    xs = sorted(lens)
    qs = {q: train_grpo.completion_budget(xs, q) for q in (0.05, 0.5, 0.95)}
    auto = train_grpo.completion_budget(xs, a.q)
    over = lambda b: sum(x > b for x in xs) / len(xs)  # noqa: E731
    print(f"{len(xs)} responses ({bad} lines skipped): tokens min {xs[0]} p5 {qs[0.05]} median {qs[0.5]} "
          f"p95 {qs[0.95]} max {xs[-1]}")
    print(f"budget {a.budget}: {over(a.budget):.3f} of responses longer | auto (q{a.q:g}) = {auto}: "
          f"{over(auto):.3f} longer")


if __name__ == "__main__":
    main()
