"""The study's RQ3 table with paired tests (issue 13): GRPO variants C / D / E against +SFT and SASRec, per protocol.

    python -m twice.study runs/study                  # reads OUT/eval/{results.json, predictions_*.jsonl}
    python -m twice.study runs/study runs/x/eval       # models missing from OUT/eval read from more
                                                      #   eval run_dirs (same data, split and users: checked)
    python -m twice.pipeline --preset study           # runs every stage, then prints this table

Every model is evaluated on the same users and candidate lists (eval.py), so differences are PAIRED per user: for a
metric m (HR@k is 0/1 per user, NDCG@k a gain), d_u = m_A(u) - m_B(u); the table gives mean(d) with a 95% interval
(mean +- 1.96 sd/sqrt(n), n users) and the two-sided exact sign-test p-value over the users with d_u != 0 (for a 0/1
metric that is the exact McNemar test). SASRec's per-user ranks are recomputed here from OUT/sasrec/best on the same
candidate lists (eval.py only stores its aggregate).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from twice.metrics import ndcg_gains, sign_test_p

RQ3_ROWS = (("sasrec", "SASRec"), ("base", "(A) base"), ("sft", "(B) +SFT"), ("grpo_C", "(C) GRPO from base"),
            ("grpo_D", "(D) +SFT+GRPO match+format"), ("grpo_E", "(E) +SFT+GRPO cg+format"))
PROTOCOLS = ("sampling", "exact")
# (A, B) pairs of the paired table, A - B: each stage against the one it builds on (the paper's RQ3 claims B > A,
# C > A, D and E > B, E > D), then every GRPO variant against SASRec.
PAIRS = (("sft", "base"), ("grpo_C", "base"), ("grpo_C", "sft"), ("grpo_D", "sft"), ("grpo_E", "sft"),
         ("grpo_E", "grpo_D"), ("grpo_C", "sasrec"), ("grpo_D", "sasrec"), ("grpo_E", "sasrec"))


def hits(ranks: list[int], k: int) -> list[float]:
    """Per-user HR@k (0/1) from 1-based ranks."""
    return [1.0 if r <= k else 0.0 for r in ranks]


def gains(ranks: list[int], k: int) -> list[float]:
    """Per-user NDCG@k gains (twice.metrics.ndcg_gains: the one place the formula lives)."""
    return ndcg_gains(ranks, k).tolist()


def paired(a: list[float], b: list[float]) -> dict:
    """Per-user paired difference a - b -> {mean, lo, hi, p, n}."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired: need two equal-length non-empty lists, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1)) if n > 1 else 0.0
    half = 1.96 * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n,
            "p": sign_test_p(sum(x > 0 for x in d), sum(x < 0 for x in d))}


def load_ranks(eval_dir: Path, name: str) -> dict[str, dict[int, int]] | None:
    """predictions_<name>.jsonl -> {protocol: {user: rank}} (None when the model was not evaluated)."""
    f = eval_dir / f"predictions_{name}.jsonl"
    if not f.exists():
        return None
    out: dict[str, dict[int, int]] = {p: {} for p in PROTOCOLS}
    for ln, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        r = json.loads(line)
        for p in PROTOCOLS:
            if isinstance(r.get(p), dict) and "rank" in r[p]:
                out[p][int(r["user"])] = int(r[p]["rank"])
    return out


def sasrec_ranks(data_dir: str, sasrec_dir: str, users: list[int], split: str = "test") -> dict[int, int]:
    from twice.data import load_dataset
    from twice.sasrec import SASRec, rank_candidates
    ds = load_dataset(data_dir)
    sets = {c.user: c for c in ds.candidates(split)}
    sas = SASRec.load(sasrec_dir)
    ranks = rank_candidates(sas, [ds.history(u, split) for u in users], [list(sets[u].candidates) for u in users],
                            [sets[u].target for u in users]).tolist()
    return dict(zip(users, (int(r) for r in ranks)))


def rq3_table(out: str | Path, k: int = 5, extra: list[str | Path] = ()) -> str:
    """Markdown: per model HR@1 / HR@k / NDCG@k under both protocols and the greedy valid / format rates, then the
    paired differences in HR@k and NDCG@k of PAIRS. A model absent from OUT/eval is read from the first `extra`
    eval run_dir that holds it (its split, n_candidates and user list must equal OUT/eval's)."""
    out = Path(out)
    ev = out / "eval"
    res = json.loads((ev / "results.json").read_text())
    dirs = {name: ev for name in res["models"]}
    for d in map(Path, extra):
        r = json.loads((d / "results.json").read_text())
        if (r.get("split"), r.get("n_candidates")) != (res.get("split"), res.get("n_candidates")):
            raise ValueError(f"{d}: split / n_candidates differ from {ev}'s")
        for name, block in r["models"].items():
            if name not in res["models"]:
                res["models"][name], dirs[name] = block, d
    ranks = {name: load_ranks(dirs.get(name, ev), name) for name, _ in RQ3_ROWS if name != "sasrec"}
    users = sorted(next((r["exact"] or r["sampling"] for r in ranks.values() if r), {}))
    for name, r in ranks.items():
        got = set(r["exact"] or r["sampling"]) if r else set(users)
        if got != set(users):
            raise ValueError(f"{name}: predictions cover other users than the rest ({len(got)} vs {len(users)})")
    sas = None
    if (out / "sasrec" / "best").exists() and users:
        sas = sasrec_ranks(res.get("data_dir", str(out / "data")), str(out / "sasrec" / "best"), users,
                           res.get("split", "test"))
    C = res.get("n_candidates", 0)
    labels = dict(RQ3_ROWS)

    def per_user(name: str, proto: str, fn) -> list[float] | None:
        r = sas if name == "sasrec" else (ranks.get(name) or {}).get(proto)
        if not r or any(u not in r for u in users):
            return None
        return fn([r[u] for u in users], k)

    head = ["model"] + [f"{p} {m}" for p in PROTOCOLS for m in ("HR@1", f"HR@{k}", f"NDCG@{k}")] + [
        "greedy valid", "greedy format"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, label in RQ3_ROWS:
        m = res["models"].get(name)
        if not m:
            continue
        cells = []
        for p in PROTOCOLS:
            for key in ("hr@1", f"hr@{k}", f"ndcg@{k}"):
                v = m.get(p, {}).get(key)
                cells.append(f"{v['value']:.3f}" if v else "-")
        for key in ("valid", "format"):
            v = m.get("greedy", {}).get(key)
            cells.append(f"{v['value']:.3f}" if v else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Paired differences per user, A - B (95% interval; exact sign-test p), {len(users)} users x {C} "
                  f"candidates:", "",
              "| A | B | protocol | d HR@%d | p | d NDCG@%d | p |" % (k, k), "|---|---|---|---|---|---|---|"]
    for a, b in PAIRS:
        for p in PROTOCOLS:
            a_h, b_h = per_user(a, p, hits), per_user(b, p, hits)
            if a_h is None or b_h is None:
                continue
            h = paired(a_h, b_h)
            g = paired(per_user(a, p, gains), per_user(b, p, gains))
            lines.append(f"| {labels[a]} | {labels[b]} | {p} | {h['mean']:+.3f} [{h['lo']:+.3f}, {h['hi']:+.3f}] | "
                         f"{h['p']:.3g} | {g['mean']:+.3f} [{g['lo']:+.3f}, {g['hi']:+.3f}] | {g['p']:.3g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 1:
        print(__doc__, file=sys.stderr)
        return 2
    text = rq3_table(argv[0], extra=argv[1:])
    (Path(argv[0]) / "rq3.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
