"""Is the GRPO reward's rho_cf = sigmoid(SASRec logit) a probability? Figures for one or more SASRec checkpoints.

    python bench/reward_calibration.py data/ml-100k runs/sasrec-ml100k/best runs/sasrec-ml100k-reward/best
    python bench/reward_calibration.py data/ml-100k DIR --split train --shown 5 --tau 0.3

For every user with a `split` prompt (GRPO's default split is train: history items[:-3], target items[-3]) it
prints, per checkpoint (twice.sasrec.calibration):
  share_ge_tau          mean share of the user's unseen catalogue with rho_cf >= tau
  random_unseen_median  median rho_cf of one seeded random unseen item per user
  top1_median / min     rho_cf of SASRec's own top-1 unseen item
  target_median         median rho_cf of the true next item
and the side switch of rewards.cf_history: the share of (user, item) pairs, over the target and `--items` seeded
random unseen items per user, whose rho_cf lies on the other side of tau when SASRec reads only the last `--shown`
items (what a prompt shows) instead of the full history (the last maxlen items).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twice.data import load_dataset  # noqa: E402
from twice.sasrec import SASRec, calibration, check_dataset, left_pad  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("sasrec_dirs", nargs="+")
    ap.add_argument("--split", default="train", choices=["train", "valid"])
    ap.add_argument("--tau", type=float, default=0.3)
    ap.add_argument("--shown", type=int, default=5, help="history items a prompt shows (side-switch figure)")
    ap.add_argument("--items", type=int, default=20, help="random unseen items per user for the side switch")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.set_num_threads(1)
    ds = load_dataset(a.data_dir)
    back = {"train": 4, "valid": 3}[a.split]
    users = [u.idx for u in ds.users if len(u.items) >= back]
    hists = [ds.history(u, a.split) for u in users]
    targets = [ds.target(u, a.split) for u in users]
    print(f"{a.data_dir}: {len(users)} users, {ds.n_items} items, split={a.split}, tau={a.tau}")
    for d in a.sasrec_dirs:
        m = SASRec.load(d)
        check_dataset(m, ds, d)
        c = calibration(m, hists, tau=a.tau, seed=a.seed)
        g = torch.Generator().manual_seed(a.seed)
        with torch.no_grad():
            items = [[t] + torch.randint(1, ds.n_items + 1, (a.items,), generator=g).tolist() for t in targets]
            it = torch.tensor(items)  # [U, 1 + items]
            full = torch.sigmoid(m.score(left_pad(hists, m.cfg.maxlen), it))
            shown = torch.sigmoid(m.score(left_pad([h[-a.shown:] for h in hists], m.cfg.maxlen), it))
        switch = float(((full >= a.tau) != (shown >= a.tau)).float().mean())
        print(f"{d} (loss={m.cfg.loss}, neg_sampling={m.cfg.neg_sampling}): share_ge_tau {c['share_ge_tau']:.3f} | "
              f"random_unseen_median {c['random_unseen_median']:.3f} | top1 median {c['top1_median']:.3f} "
              f"min {c['top1_min']:.3f} | target_median {float(full[:, 0].median()):.3f} | "
              f"side switch full vs last {a.shown}: {switch:.3f}")


if __name__ == "__main__":
    main()
