"""Synthetic Amazon-2023-shaped raw files, and the peak-RSS measurement of the streamed reader on them.

    python -m twice.data.synthetic /tmp/synth --reviews 1000000          # write + measure peak RSS of a prepare

Users and items are drawn from Zipf-like distributions (a few heavy users/items, a long tail, like the real
domains), review texts are ~`text_chars` characters, ids look like the real ones. The measurement runs
`python -m twice.data prepare` in a child process and reads its peak RSS (ru_maxrss of the child).
"""
from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

WORDS = ("good great love taste quality price product flavor would buy again really nice bad fresh bag box "
         "smell skin hair works well size color small large perfect not worth money recommend").split()


def _ids(rng, n: int, prefix: str, length: int) -> list[str]:
    alphabet = np.array(list("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"))
    chars = alphabet[rng.integers(0, len(alphabet), size=(n, length))]
    return [prefix + "".join(row) + f"{k:x}" for k, row in enumerate(chars)]   # suffix keeps them unique


def write_synthetic(out: Path, domain: str, n_reviews: int, n_users: int, n_items: int, text_chars: int = 300,
                    seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    users = _ids(rng, n_users, "AG", 20)
    items = _ids(rng, n_items, "B0", 6)
    # Zipf-like popularity over users and items (exponent ~1.1 on ranks)
    pu = 1.0 / np.arange(1, n_users + 1) ** 0.8
    pi = 1.0 / np.arange(1, n_items + 1) ** 0.9
    cu, ci = np.cumsum(pu / pu.sum()), np.cumsum(pi / pi.sum())
    words = np.array(WORDS)
    rpath, mpath = out / f"{domain}.jsonl.gz", out / f"meta_{domain}.jsonl.gz"
    n_words = max(1, text_chars // 6)
    chunk = 100_000
    with gzip.open(rpath, "wt", compresslevel=1) as f:
        for start in range(0, n_reviews, chunk):
            m = min(chunk, n_reviews - start)
            uu = np.minimum(np.searchsorted(cu, rng.random(m)), n_users - 1)
            ii = np.minimum(np.searchsorted(ci, rng.random(m)), n_items - 1)
            ts = 1_500_000_000_000 + rng.integers(0, 200_000_000_000, size=m)
            rt = rng.integers(1, 6, size=m)
            txt = words[rng.integers(0, len(words), size=(m, n_words))]
            lines = []
            for k in range(m):
                lines.append(json.dumps({
                    "rating": float(rt[k]), "title": "Review title", "text": " ".join(txt[k]), "images": [],
                    "asin": items[ii[k]], "parent_asin": items[ii[k]], "user_id": users[uu[k]],
                    "timestamp": int(ts[k]), "helpful_vote": 0, "verified_purchase": True}))
            f.write("\n".join(lines) + "\n")
    with gzip.open(mpath, "wt", compresslevel=1) as f:
        for k, iid in enumerate(items):
            f.write(json.dumps({"main_category": domain, "title": f"Product {k} " + " ".join(words[:8]),
                                "features": ["feature one", "feature two"], "description": [" ".join(words)],
                                "details": {"Brand": f"Brand{k % 97}", "Weight": "1 pound"},
                                "parent_asin": iid}) + "\n")
    return rpath, mpath


def measure(raw_dir: Path, domain: str, out_dir: Path) -> dict:
    """Peak RSS (MiB) and wall time of one prepare on the files, in a fresh child process. The peak is the child's
    VmHWM read at its exit (ru_maxrss of a child would include the pages it shared with this process at fork)."""
    t0 = time.time()
    code = ("import sys; from twice.data.__main__ import main; rc = main(sys.argv[1:]); "
            "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]); sys.exit(rc)")
    cmd = [sys.executable, "-c", code, "prepare", "source=amazon2023", f"raw_dir={raw_dir}", f"domain={domain}",
           f"out_dir={out_dir}"]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    peak_kib = int(res.stdout.strip().splitlines()[-1])
    stats = json.loads((out_dir / "stats.json").read_text())
    return {"peak_rss_mib": peak_kib / 1024, "wall_s": time.time() - t0, "users": stats["users"],
            "items": stats["items"], "interactions": stats["interactions"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--reviews", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=0, help="default reviews // 4")
    ap.add_argument("--items", type=int, default=0, help="default reviews // 20")
    args = ap.parse_args()
    n_users = args.users or args.reviews // 4
    n_items = args.items or args.reviews // 20
    t0 = time.time()
    write_synthetic(args.out, "Synthetic", args.reviews, n_users, n_items)
    print(f"wrote {args.reviews} reviews ({n_users} users, {n_items} items) in {time.time() - t0:.0f}s", flush=True)
    r = measure(args.out, "Synthetic", args.out / "dataset")
    r["peak_rss_mib_per_million_reviews"] = r["peak_rss_mib"] / (args.reviews / 1e6)
    print(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
