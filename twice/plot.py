"""Learning curves as pictures: PNGs from the metrics.jsonl of one or more runs (SFT, GRPO, stage 1, the bench).

    python -m twice.plot RUN_DIR [RUN_DIR ...] [--out DIR]       # needs matplotlib: pip install -e ".[plot]"

A RUN_DIR is a folder holding metrics.jsonl (or the file itself). Every numeric key that exists is plotted against
"step" (or "epoch", else the line number); several runs overlay, labelled by their folder name. Keys are grouped
into one PNG per panel below (first matching pattern wins; a panel without any key is not drawn), one subplot per
key; numeric keys no panel claims go to other.png. Missing keys, sparse eval lines ("eval/...", every N steps),
non-numeric values and a torn last line (a run still writing) are all fine. Output: DIR (default RUN_DIR/plots for
one run, ./plots for several), one <panel>.png each; the paths are printed.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import sys
from pathlib import Path

# panel -> key patterns (fnmatch), in the order they claim keys. Names are what train_grpo.py / train_sft.py /
# eval.py / twice.ablate write; a new key lands in other.png until a pattern names it.
PANELS: list[tuple[str, list[str]]] = [
    ("reward", ["reward", "reward/*"]),
    ("rates", ["match_rate", "format_rate", "*valid_rate*", "*well_formed*", "*truncat*", "zero_std_groups"]),
    ("rho_cf", ["cf_mean", "*rho_cf*", "*cf_target*"]),
    ("entropy", ["entropy", "*/entropy"]),
    ("clip", ["clip_frac*"]),
    ("kl", ["kl", "approx_kl*", "*/kl"]),
    ("sft_loss", ["loss/*", "eval/loss*", "valid/loss*"]),
    ("loss", ["loss", "pg_loss"]),
    ("hit_rate", ["*hr@*", "*ndcg@*", "*mrr*"]),
    ("optim", ["lr", "grad_norm", "logp_gap"]),
    ("lengths", ["completion_len*", "response_tokens", "examples"]),
]
SKIP = {"step", "epoch", "seed"}                 # x axes and identifiers, never plotted as curves
SKIP_PATTERNS = ["time/*", "tokens_per_s*", "peak_mem*", "seconds", "*_s", "*ci95*"]   # timings: not learning


def read_metrics(path: Path) -> list[dict]:
    """Lines of a metrics.jsonl; a torn or non-JSON line is skipped and counted on stderr (a run may be writing)."""
    rows, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(r, dict):
            rows.append(r)
        else:
            bad += 1
    if bad:
        print(f"twice.plot: {path}: skipped {bad} unreadable line(s)", file=sys.stderr)
    return rows


def series(rows: list[dict]) -> dict[str, tuple[list[float], list[float]]]:
    """key -> (x, y) over the lines that carry a finite number for it; x = step | epoch | line index."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for i, r in enumerate(rows):
        x = r.get("step", r.get("epoch", i))
        if not isinstance(x, (int, float)) or isinstance(x, bool):
            x = i
        for k, v in r.items():
            if k in SKIP or any(fnmatch.fnmatch(k, p) for p in SKIP_PATTERNS):
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            xs, ys = out.setdefault(k, ([], []))
            xs.append(float(x))
            ys.append(float(v))
    return out


def assign(keys: list[str]) -> dict[str, list[str]]:
    """Panel name -> its keys (in PANELS order, then sorted); unclaimed keys -> "other"."""
    panels: dict[str, list[str]] = {}
    left = sorted(keys)
    for name, pats in PANELS:
        mine = [k for p in pats for k in left if fnmatch.fnmatch(k, p)]
        mine = list(dict.fromkeys(mine))
        if mine:
            panels[name] = mine
            left = [k for k in left if k not in mine]
    if left:
        panels["other"] = left
    return panels


def plot_runs(run_paths: list[Path], out: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit('twice.plot needs matplotlib: pip install -e ".[plot]" (or pip install matplotlib)') from None
    runs = {}
    for p in run_paths:
        f = p / "metrics.jsonl" if p.is_dir() else p
        if not f.is_file():
            raise SystemExit(f"twice.plot: {f} does not exist (pass a run dir holding metrics.jsonl, or the file)")
        label = (p if p.is_dir() else p.parent).name
        runs[label if label not in runs else str(p)] = series(read_metrics(f))
    keys = sorted({k for s in runs.values() for k in s})
    if not keys:
        raise SystemExit(f"twice.plot: no numeric metrics in {[str(p) for p in run_paths]}")
    out.mkdir(parents=True, exist_ok=True)
    color = {label: f"C{i}" for i, label in enumerate(runs)}   # one colour per run in every panel of every figure
    written = []
    for panel, pkeys in assign(keys).items():
        n = len(pkeys)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
        for ax, k in zip(axes.flat, pkeys):
            for label, s in runs.items():
                if k in s:
                    xs, ys = s[k]
                    ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=label,
                            color=color[label])
            ax.set_title(k, fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        if len(runs) > 1:   # every run in the legend, even one absent from the first panel (SFT has no pg_loss)
            from matplotlib.lines import Line2D
            axes.flat[0].legend([Line2D([], [], color=color[r]) for r in runs], list(runs), fontsize=7)
        fig.suptitle(panel)
        fig.tight_layout()
        path = out / f"{panel}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twice.plot", description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run dirs holding metrics.jsonl (or metrics.jsonl files)")
    ap.add_argument("--out", default=None, help="output dir (default RUN_DIR/plots for one run, ./plots for several)")
    args = ap.parse_args(argv)
    paths = [Path(r).expanduser() for r in args.runs]
    if args.out:
        out = Path(args.out)
    elif len(paths) == 1:
        out = (paths[0] if paths[0].is_dir() else paths[0].parent) / "plots"
    else:
        out = Path("plots")
    for p in plot_runs(paths, out):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
