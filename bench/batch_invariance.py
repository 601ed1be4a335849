"""Does a row's result depend on the batch it is computed in? (README "Evaluation": eval's batch_size and bf16.)

    python bench/batch_invariance.py                            # real Gemma-3-270m from ~/.cache/twice (bf16, fp32)
    python bench/batch_invariance.py --compare RUN_A RUN_B      # two pipeline runs: same weights? same predictions?

1. matmul: F.linear of the first m rows of a [48, K] bf16 input (m = 1, 8, 25, 35) against the same rows computed in
   the full batch, at the 270m's projection, MLP and vocabulary shapes: max |difference|.
2. prefill: the last-position logits of one 480-token prompt prefilled alone, beside one or three prompts of the same
   length, and beside a 530-token prompt (so it is left-padded by 50), in bf16 and in fp32: max |difference| from alone.
3. --compare: md5 of each fine-tuned folder's weights (sft/final, grpo_E/final) in both runs, then per evaluated
   model the users whose sampled texts, greedy text or exact rank differ (eval/predictions_<model>.jsonl).
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F


def matmul_rows() -> None:
    torch.manual_seed(0)
    for k, n in ((640, 2048), (2048, 640), (640, 262144)):
        w, x = torch.randn(n, k).bfloat16(), torch.randn(48, k).bfloat16()
        full = F.linear(x, w)
        diffs = [(F.linear(x[:m], w) - full[:m]).abs().max().item() for m in (1, 8, 25, 35)]
        print(f"matmul [m, {k}] x [{k}, {n}] bf16, rows 1/8/25/35 vs the 48-row call: max |diff| {max(diffs):.3g}")


def prefill_rows(model_dir: Path) -> None:
    from twice.engine import Engine
    from twice.gemma3 import Gemma3
    g = torch.Generator().manual_seed(0)
    p, same, long = (torch.randint(1000, 100000, (n,), generator=g).tolist() for n in (480, 480, 530))
    for dtype in (torch.bfloat16, torch.float32):
        eng = Engine(Gemma3.from_pretrained(model_dir, dtype=dtype).eval())
        alone = eng.prefill([p])[1][0]
        for what, batch in (("one same-length prompt", [p, same]), ("three same-length prompts", [p, same, same, same]),
                            ("a 530-token prompt (50 pads)", [p, long])):
            d = (eng.prefill(batch)[1][0] - alone).abs().max().item()
            print(f"prefill {str(dtype)[6:]}: 480-token prompt beside {what}: last logits max |diff| {d:.3g} "
                  f"(|logit| <= {alone.abs().max().item():.1f})")


def md5(folder: Path) -> str:
    h = hashlib.md5()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def compare(a: Path, b: Path) -> None:
    for m in ("sft", "grpo_E"):
        if (a / m / "final").is_dir() and (b / m / "final").is_dir():
            x, y = md5(a / m / "final"), md5(b / m / "final")
            print(f"{m}/final weights: md5 {x} vs {y} ({'identical' if x == y else 'DIFFERENT'})")
    for f in sorted((a / "eval").glob("predictions_*.jsonl")):
        other = b / "eval" / f.name
        if not other.exists():
            continue
        ra = {r["user"]: r for r in map(json.loads, f.read_text().splitlines())}
        rb = {r["user"]: r for r in map(json.loads, other.read_text().splitlines())}
        users = sorted(set(ra) & set(rb))
        diff = {}
        for k, proto, field in (("samples", "sampling", "texts"), ("greedy text", "greedy", "text"),
                                ("exact rank", "exact", "rank")):
            have = [u for u in users if proto in ra[u] and proto in rb[u]]  # eval's sampling: false leaves it out
            diff[k] = sum(ra[u][proto][field] != rb[u][proto][field] for u in have) if have else "- (not in both)"
        print(f"{f.stem[len('predictions_'):]}: of {len(users)} users, differ in " +
              ", ".join(f"{k} {v}" for k, v in diff.items()))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="~/.cache/twice/gemma-3-270m")
    ap.add_argument("--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="two pipeline --out folders")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.compare:
        compare(*(Path(x).expanduser() for x in args.compare))
        return
    matmul_rows()
    prefill_rows(Path(args.model).expanduser())


if __name__ == "__main__":
    main()
