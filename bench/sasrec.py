"""Our SASRec vs RecBole's SASRec on MovieLens-100k, side by side in one run (full ranking, same test users).

    python -m venv /work/bench-venv                       # RecBole lives in its own venv, never in ours
    echo /work/main/.venv/lib/python3.11/site-packages > /work/bench-venv/lib/python3.11/site-packages/zz_main.pth
    /work/bench-venv/bin/pip install recbole==1.2.1 "numpy<2" "pandas<2.3" "scipy<1.14"
    python bench/sasrec.py --recbole-python /work/bench-venv/bin/python --recbole-max-s 1500 --ours-max-s 600

(the .pth line reuses our CPU torch 2.13.0 in the bench venv instead of downloading a CUDA torch from PyPI;
numpy<2 because recbole 1.2.1 aliases np.float_, removed in numpy 2.)

Both models: hidden 64, 2 blocks, 2 heads, FFN 256, maxlen 50, full-softmax CE (`train_neg_sample_args: ~`),
dropout 0.2, Adam lr 1e-3, same torch thread count. Both data sets are ml-100k with no filtering (RecBole's
default for ml-100k; ours: `python -m twice.data prepare configs/data/ml-100k.yaml k_core=1`), leave-one-out by
time. Both are evaluated on the TEST split after every epoch by full ranking with the history excluded; only the
training time is counted (evaluation time excluded for both). Both processes run at the same time, one torch
thread each. Time is measured twice: CPU seconds of the training process (time.process_time; with one thread
this is what the run costs on an idle core, and it is robust to other jobs on a shared machine) and wall seconds
(what the brief asks, but on a loaded 2-core box it mostly measures the other jobs). Reported:
  - each side's best test NDCG@10 / HR@10 / MRR@10 over the epochs it ran, and ours at the valid-selected model
    (the honest number: test is never used for selection in train_sasrec.py);
  - CPU and wall time to reach RecBole's best test NDCG@10 (RecBole: training time at its best epoch; ours: training
    time at the first epoch whose test NDCG@10 >= that value);
  - ours under the 100-sampled-negative protocol next to the published SASRec figures (which are on other data);
  - how many test users have the same (user, target) in both splits.
RecBole is capped at --recbole-max-s CPU seconds of training (its epochs are slow on CPU), stated in the output;
the worker writes one line per epoch, so it can also be stopped by hand and the report made with --report-only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = dict(hidden=64, blocks=2, heads=2, inner=256, maxlen=50, dropout=0.2)


# ------------------------------------------------------------------------------------------ RecBole side
def recbole_worker(args) -> None:
    """Runs inside the bench venv: RecBole's own data pipeline, model and trainer; one JSON line per epoch."""
    import torch
    from recbole.config import Config
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    torch.set_num_threads(args.threads)
    cfg = Config(model="SASRec", dataset="ml-100k", config_dict={
        "train_neg_sample_args": None, "loss_type": "CE",
        "hidden_size": MODEL["hidden"], "inner_size": MODEL["inner"], "n_layers": MODEL["blocks"],
        "n_heads": MODEL["heads"], "hidden_dropout_prob": MODEL["dropout"], "attn_dropout_prob": MODEL["dropout"],
        "MAX_ITEM_LIST_LENGTH": MODEL["maxlen"], "learning_rate": 1e-3, "seed": args.seed,
        "epochs": args.recbole_epochs, "device": "cpu", "use_gpu": False,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
        "metrics": ["Hit", "NDCG", "MRR"], "topk": [10], "valid_metric": "NDCG@10", "show_progress": False,
        "checkpoint_dir": str(Path(args.out) / "recbole_ckpt"), "log_wandb": False,
    })
    init_seed(cfg["seed"], cfg["reproducibility"])
    ds = create_dataset(cfg)
    train_data, valid_data, test_data = data_preparation(cfg, ds)
    # the test users and targets RecBole evaluates, as original tokens, for the same-users check
    inter = test_data.dataset.inter_feat
    users = ds.id2token("user_id", inter["user_id"].numpy())
    tgts = ds.id2token("item_id", inter["item_id"].numpy())
    (Path(args.out) / "recbole_test_targets.json").write_text(json.dumps(dict(zip(users.tolist(), tgts.tolist()))))
    model = SASRec(cfg, train_data.dataset)
    trainer = Trainer(cfg, model)
    train_s = train_cpu_s = 0.0
    with open(Path(args.out) / "recbole.jsonl", "w") as f:
        for epoch in range(args.recbole_epochs):
            t0, c0 = time.perf_counter(), time.process_time()
            loss = trainer._train_epoch(train_data, epoch, show_progress=False)
            train_s += time.perf_counter() - t0
            train_cpu_s += time.process_time() - c0
            res = trainer.evaluate(test_data, load_best_model=False, show_progress=False)
            row = {"epoch": epoch + 1, "train_s": train_s, "train_cpu_s": train_cpu_s, "loss": float(loss),
                   **{f"test/full/{k}": float(v) for k, v in res.items()}}
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps(row), flush=True)
            if train_cpu_s >= args.recbole_max_s:
                break


# ------------------------------------------------------------------------------------------ our side
def run(cmd: list[str], log: Path, timeout: float | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, timeout=timeout)
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}); see {log}:\n" + log.read_text()[-3000:])


def time_to_reach(rows: list[dict], key: str, value: float, clock: str) -> float | None:
    for r in rows:
        if r.get(key, -1.0) >= value:
            return r[clock]
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recbole-python", default="/work/bench-venv/bin/python")
    ap.add_argument("--recbole-epochs", type=int, default=300)
    ap.add_argument("--recbole-max-s", type=float, default=900.0, help="cap on RecBole training CPU seconds")
    ap.add_argument("--ours-max-s", type=float, default=600.0, help="cap on our training CPU seconds")
    ap.add_argument("--ours-extra", nargs="*", default=[], help="extra overrides for train_sasrec.py")
    ap.add_argument("--data-dir", default="data/ml-100k-nofilter")
    ap.add_argument("--out", default="runs/bench-sasrec")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-recbole", action="store_true", help="reuse OUT/recbole.jsonl from an earlier run")
    ap.add_argument("--report-only", action="store_true", help="only print the comparison for an existing OUT")
    ap.add_argument("--recbole-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.recbole_worker:
        return recbole_worker(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return report(args, out, Path(args.data_dir))

    data = Path(args.data_dir)
    if not (data / "users.jsonl").exists():
        run([sys.executable, "-m", "twice.data", "prepare", "configs/data/ml-100k.yaml", "k_core=1",
             f"out_dir={data}"], out / "prepare.log")

    # Both run AT THE SAME TIME with the same thread count: on a shared CPU this gives both the same contention,
    # which sequential runs would not (other jobs come and go).
    rb_proc = None
    if not args.skip_recbole:
        env = dict(os.environ, PYTHONPATH="")
        cmd = [args.recbole_python, __file__, "--recbole-worker", "--out", str(out.resolve()),
               "--threads", str(args.threads), "--seed", str(args.seed), "--recbole-epochs", str(args.recbole_epochs),
               "--recbole-max-s", str(args.recbole_max_s)]
        print("$ " + " ".join(cmd), flush=True)
        rb_log = open(out / "recbole.log", "w")
        rb_proc = subprocess.Popen(cmd, stdout=rb_log, stderr=subprocess.STDOUT, cwd="/tmp", env=env)
    ours = out / "ours"
    run([sys.executable, "train_sasrec.py", f"train.data_dir={data}", f"train.out_dir={ours}",
         f"train.seed={args.seed}", f"train.threads={args.threads}", "train.track_test=true",
         f"train.max_train_cpu_s={args.ours_max_s}", "train.batch_size=128", "train.lr=0.001", "train.patience=10",
         "train.valid_metric=full/ndcg@10", "sasrec.loss=ce", *[f"sasrec.{k}={v}" for k, v in MODEL.items()],
         *args.ours_extra], out / "ours.log")
    if rb_proc is not None and rb_proc.wait() != 0:
        sys.exit(f"RecBole failed ({rb_proc.returncode}); see {out / 'recbole.log'}:\n"
                 + (out / "recbole.log").read_text()[-3000:])
    report(args, out, data)


def report(args, out: Path, data: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from twice.data import load_dataset

    rb = [json.loads(l) for l in (out / "recbole.jsonl").read_text().splitlines() if l.strip()]
    us = [json.loads(l) for l in (out / "ours" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    res = json.loads((out / "ours" / "results.json").read_text())
    key = "test/full/ndcg@10"
    rb_best = max(rb, key=lambda r: r[key])
    us_best = max(us, key=lambda r: r[key])
    cpu_rb, wall_rb = rb_best["train_cpu_s"], rb_best["train_s"]
    cpu_us = time_to_reach(us, key, rb_best[key], "train_cpu_s")
    wall_us = time_to_reach(us, key, rb_best[key], "train_s")

    ds = load_dataset(data)
    rb_t = json.loads((out / "recbole_test_targets.json").read_text())
    ours_t = {u.id: ds.items[u.items[-1]].id for u in ds.users}
    same = sum(1 for u, t in ours_t.items() if rb_t.get(u) == t)

    sel = res["test"]["full"]
    s100 = res["test"]["sampled100"]
    ratio = lambda a, b: f"{a / b:.3f}" if a is not None else "never reached"
    lines = [
        f"MovieLens-100k, full ranking (history excluded), {len(ours_t)} test users; same (user, target) in both "
        f"splits: {same}/{len(ours_t)} (the rest differ by timestamp-tie order); torch threads {args.threads}",
        f"RecBole 1.2.1 SASRec: {len(rb)} epochs run (cap {args.recbole_max_s:.0f} training CPU-s, or stopped by "
        f"hand), {rb[-1]['train_cpu_s'] / len(rb):.1f} CPU-s/epoch ({rb[-1]['train_s'] / len(rb):.1f} wall-s/epoch)",
        "",
        "| model | NDCG@10 | HR@10 | MRR@10 | training CPU-s (wall-s) to this point |",
        "|---|---|---|---|---|",
        f"| RecBole SASRec, best test epoch ({rb_best['epoch']}) | {rb_best[key]:.4f} | {rb_best['test/full/hit@10']:.4f} "
        f"| {rb_best['test/full/mrr@10']:.4f} | {cpu_rb:.1f} ({wall_rb:.1f}) |",
        f"| ours, best test epoch ({us_best['epoch']}) | {us_best[key]:.4f} | {us_best['test/full/hr@10']:.4f} "
        f"| {us_best['test/full/mrr@10']:.4f} | {us_best['train_cpu_s']:.1f} ({us_best['train_s']:.1f}) |",
        f"| ours, valid-selected (epoch {res['best_epoch']}) | {sel['ndcg@10']:.4f} | {sel['hr@10']:.4f} "
        f"| {sel['mrr@10']:.4f} | whole run {res['train_cpu_s']:.1f} ({res['train_s']:.1f}), {res['epochs_run']} epochs |",
        "",
        f"time to reach RecBole's best test NDCG@10 ({rb_best[key]:.4f}): RecBole {cpu_rb:.1f} CPU-s ({wall_rb:.1f} wall-s), "
        f"ours {cpu_us if cpu_us is None else round(cpu_us, 1)} CPU-s ({wall_us if wall_us is None else round(wall_us, 1)} "
        f"wall-s) -> ours/RecBole = {ratio(cpu_us, cpu_rb)} (CPU), {ratio(wall_us, wall_rb)} (wall)",
        "",
        f"ours, 100 sampled negatives (original SASRec protocol): HR@10 {s100['hr@10']:.4f} NDCG@10 {s100['ndcg@10']:.4f}"
        " (published SASRec, ICDM'18, same protocol on ML-1M: HR@10 0.8245 NDCG@10 0.5905; no ml-100k figure published)",
    ]
    text = "\n".join(lines)
    print(text)
    (out / "bench.md").write_text(text + "\n")
    (out / "bench.json").write_text(json.dumps({
        "recbole_best": rb_best, "ours_best_test_epoch": us_best, "ours_valid_selected": res["test"],
        "recbole_time_to_best_cpu_s": cpu_rb, "ours_time_to_recbole_best_cpu_s": cpu_us,
        "recbole_time_to_best_wall_s": wall_rb, "ours_time_to_recbole_best_wall_s": wall_us, "same_test_targets": same,
        "n_test_users": len(ours_t), "recbole_epochs_run": len(rb), "recbole_max_s": args.recbole_max_s,
        "threads": args.threads}, indent=2))


if __name__ == "__main__":
    main()
