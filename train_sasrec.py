"""Train SASRec on a dataset dir's train part, early-stop on valid, evaluate the best model on three protocols.

    python train_sasrec.py configs/quickstart/sasrec.yaml
    python train_sasrec.py configs/quickstart/sasrec.yaml sasrec.loss=bce train.epochs=50
    torchrun --nproc_per_node 2 train_sasrec.py configs/quickstart/sasrec.yaml      # DDP (gloo on CPU, nccl on GPU)

Data: each user's train part is items[:-2] (valid target items[-2], test target items[-1]). Training is packed
(the original SASRec way): a window of up to maxlen+1 consecutive train items gives inputs w[:-1] and shifted
targets w[1:], so one forward trains every prefix of the window at once. With `train.windows: all` a long
sequence is cut into consecutive windows from its end, so every train interaction is a target once per epoch
(RecBole instead makes one sample per prefix: ~maxlen times the compute per epoch for the same targets).

Evaluation of the best (by valid) model, written to out_dir/results.json:
  (a) candidates: the dataset's fixed candidate sets (the paper's protocol: HR@1, HR@5, NDCG@5)
  (b) full: rank over all items, the user's history excluded (HR/NDCG/MRR@10, RecBole's `mode: full`)
  (c) sampled100: the target against 100 uniform negatives the user never interacted with (original SASRec)
Ties count against the target (twice/metrics.py). out_dir also gets config.yaml (resolved), metrics.jsonl (one
line per epoch), best/ (model.safetensors + config.json, loadable with SASRec.load).
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from twice.config import ConfigError, check_inputs, parse_args, save_config
from twice.data import load_dataset
from twice.dist import cleanup, init_distributed
from twice.fileio import write_json_atomic
from twice.metrics import summarize
from twice.sasrec import (SASRec, SASRecConfig, calibration, item_ids_sha, left_pad, rank_candidates, rank_full,
                          rank_sampled)


@dataclass
class TrainConfig:
    data_dir: str = "data/ml-100k"  # dataset dir written by `python -m twice.data prepare`
    out_dir: str = "runs/sasrec"  # run dir (config.yaml, metrics.jsonl, best/, results.json)
    seed: int = 0  # model init, shuffling and negative sampling
    threads: int = 0  # torch CPU threads (0 = torch default)
    batch_size: int = 128  # windows per optimizer step (per process)
    lr: float = 1e-3  # Adam learning rate (constant, as RecBole and the original)
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    grad_clip: float = 0.0  # max grad norm (0 = off)
    epochs: int = 200  # upper bound; early stopping usually ends sooner
    patience: int = 10  # stop after this many evaluations without a better valid metric
    eval_every: int = 1  # epochs between valid evaluations
    valid_metric: str = "full/ndcg@10"  # protocol/metric used for early stopping ("candidates/ndcg@5", ...)
    windows: str = "all"  # all: every train interaction is a target once per epoch | last: last window only
    eval_batch_size: int = 512  # users per scoring batch
    n_sampled_negatives: int = 100  # negatives for protocol (c)
    eval_seed: int = 0  # seed of protocol (c)'s negatives
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])  # cut-offs reported for every protocol
    track_test: bool = False  # also log full-ranking TEST metrics each evaluation (benchmarks only; never
    #                           used for model selection)
    max_train_s: float = 0.0  # stop after this much training wall time (0 = no limit)
    max_train_cpu_s: float = 0.0  # stop after this much training CPU time of this process (0 = no limit)
    calibration_tau: float = 0.3  # results.json "calibration": share of unseen items with sigmoid(logit) >= this
    #                               (the GRPO reward's tau), median sigmoid of a random unseen item, top-1's sigmoid


@dataclass
class Config:
    sasrec: SASRecConfig = field(default_factory=SASRecConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ------------------------------------------------------------------------------------------ data
def train_windows(sequences: list[list[int]], maxlen: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train parts -> (inputs [W, maxlen], targets [W, maxlen]) left-padded; targets[t] is the item after inputs[t];
    and owner [W]: the index in `sequences` each window was cut from (for negatives outside that user's sequence).

    Windows are cut from the END of each sequence with stride maxlen, so each train item except a user's first
    is a target exactly once ("all"), or only the most recent window is kept ("last")."""
    inputs, targets, owner = [], [], []
    for n, seq in enumerate(sequences):
        end = len(seq)
        while end >= 2:  # a window needs at least one (input, target) pair
            start = max(0, end - 1 - maxlen)
            w = seq[start:end]  # <= maxlen + 1 items
            inp, tgt = [0] * (maxlen - len(w) + 1) + w[:-1], [0] * (maxlen - len(w) + 1) + w[1:]
            inputs.append(inp)
            targets.append(tgt)
            owner.append(n)
            if mode == "last":
                break
            end = start + 1  # the next window's last target is this window's first input item
    if not inputs:
        raise ValueError("no training windows: every user's train part has fewer than 2 items")
    return torch.tensor(inputs, dtype=torch.long), torch.tensor(targets, dtype=torch.long), torch.tensor(owner)


def split_lists(ds, split: str):
    """(users, histories, targets) for users that have a `split` target, in user order."""
    back = {"valid": 2, "test": 1}[split]
    users = [u for u in ds.users if len(u.items) >= 3]
    return users, [u.items[: len(u.items) - back] for u in users], [u.items[len(u.items) - back] for u in users]


def evaluate(model: SASRec, ds, split: str, tc: TrainConfig, protocols=("candidates", "full", "sampled100")) -> dict:
    """All protocols on one split -> {protocol: summarize(ranks)} (empty protocols are left out)."""
    model.eval()
    out = {}
    users, hists, tgts = split_lists(ds, split)
    if "candidates" in protocols and ds.candidates(split):
        by_user = {u.idx: u for u in ds.users}
        cs = ds.candidates(split)
        back = {"valid": 2, "test": 1}[split]
        c_hist = [by_user[c.user].items[: len(by_user[c.user].items) - back] for c in cs]
        ranks = rank_candidates(model, c_hist, [c.candidates for c in cs], [c.target for c in cs],
                                tc.eval_batch_size)
        out["candidates"] = summarize(ranks, tc.ks)
    if "full" in protocols:
        out["full"] = summarize(rank_full(model, hists, tgts, tc.eval_batch_size), tc.ks)
    if "sampled100" in protocols:
        ranks = rank_sampled(model, hists, tgts, [u.items for u in users], tc.n_sampled_negatives,
                             tc.eval_seed, tc.eval_batch_size)
        out["sampled100"] = summarize(ranks, tc.ks)
    return out


def metric_value(res: dict, name: str) -> float:
    proto, metric = name.split("/")
    if proto not in res or metric not in res[proto]:
        raise ConfigError(f"train.valid_metric '{name}' not available; have "
                          f"{[f'{p}/{m}' for p in res for m in res[p] if '@' in m]}")
    return res[proto][metric]


@dataclass
class Run:                      # what every phase reads: set up once by `setup`
    cfg: Config
    ds: object                  # twice.data.Dataset
    out_dir: Path
    info: object                # init_distributed(): rank, world_size, device, is_main
    model: torch.nn.Module      # DDP-wrapped when world > 1
    raw_model: SASRec
    opt: torch.optim.Optimizer
    gen: torch.Generator        # negatives (differ per rank)
    shuffle_gen: torch.Generator  # the epoch permutation (identical on every rank, strided)
    inputs: torch.Tensor        # [W, L] packed windows
    targets: torch.Tensor       # [W, L] shifted targets (0 = pad)
    owner: torch.Tensor         # [W] the user of each window
    seen: torch.Tensor          # [U, E] each user's whole train part, 0-padded: never a negative
    steps_per_epoch: int


@dataclass
class Progress:                 # the loop's running state
    step: int = 0
    train_s: float = 0.0
    train_cpu_s: float = 0.0    # CPU seconds of this process: robust to a shared, loaded CPU
    best: float = -1.0
    best_epoch: int = 0
    bad_evals: int = 0


def setup(argv: list[str]) -> Run:
    """Config and inputs checked, run dir, packed windows, model and optimizer (seeded), one summary line."""
    cfg = parse_args(Config, argv)
    tc = cfg.train
    check_inputs(("train.data_dir", tc.data_dir, "dataset"))  # one line naming the field, not a traceback
    info = init_distributed()  # torchrun env -> process group (gloo on CPU, nccl on GPU); world 1 without it
    if tc.threads:
        torch.set_num_threads(tc.threads)
    if tc.windows not in ("all", "last"):
        raise ConfigError(f"train.windows must be 'all' or 'last', got {tc.windows!r}")

    ds = load_dataset(tc.data_dir)
    cfg.sasrec.n_items = ds.n_items  # the dataset decides the vocabulary; a YAML value is overridden
    cfg.sasrec.item_ids_sha = item_ids_sha(ds)  # and the id map: SASRec.check_dataset refuses another catalogue
    out_dir = Path(tc.out_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
        (out_dir / "metrics.jsonl").write_text("")

    train_parts = [u.items[:-2] for u in ds.users if len(u.items) >= 3]
    inputs, targets, owner = train_windows(train_parts, cfg.sasrec.maxlen, tc.windows)  # [W, L], [W, L], [W]
    seen = left_pad(train_parts, max(map(len, train_parts)))  # [U, E]

    device, world = info.device, info.world_size
    torch.manual_seed(tc.seed)
    raw_model = SASRec(cfg.sasrec).to(device)
    model = raw_model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        raw_model, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    r = Run(cfg, ds, out_dir, info, model, raw_model, opt,
            gen=torch.Generator(device=device).manual_seed(tc.seed + 1000 * info.rank),
            shuffle_gen=torch.Generator().manual_seed(tc.seed), inputs=inputs, targets=targets, owner=owner,
            seen=seen, steps_per_epoch=math.ceil(math.ceil(len(inputs) / world) / tc.batch_size))
    if info.is_main:
        n_params = sum(p.numel() for p in raw_model.parameters())
        print(f"{ds.n_users} users ({len(ds.users) - len(train_parts)} with < 3 items skipped), {ds.n_items} items, "
              f"{len(inputs)} windows, {int((targets != 0).sum())} train targets, {n_params:,} params, "
              f"loss={cfg.sasrec.loss}, device={device}, world={world}")
    return r


def train_epoch(r: Run, pr: Progress, epoch: int) -> float:
    """One epoch of packed training over this rank's stride of a fresh permutation -> the summed batch losses."""
    tc, dev = r.cfg.train, r.info.device
    r.model.train()
    t0, c0 = time.perf_counter(), time.process_time()
    perm = torch.randperm(len(r.inputs), generator=r.shuffle_gen)[r.info.rank::r.info.world_size]
    total = 0.0
    for s in tqdm(range(0, len(perm), tc.batch_size), total=r.steps_per_epoch, disable=not r.info.is_main,
                  desc=f"epoch {epoch}", leave=False):
        idx = perm[s : s + tc.batch_size]
        seq, tgt = r.inputs[idx].to(dev), r.targets[idx].to(dev)
        loss = r.model(seq, tgt, generator=r.gen, exclude=r.seen[r.owner[idx]].to(dev))
        r.opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(r.model.parameters(), tc.grad_clip)
        r.opt.step()
        total += loss.item()
        pr.step += 1
    pr.train_s += time.perf_counter() - t0
    pr.train_cpu_s += time.process_time() - c0
    return total


def validate(r: Run, pr: Progress, epoch: int, total: float) -> bool:
    """Rank 0: valid metric (+ test if tracked), best/ saved on improvement, one metrics.jsonl line -> patience
    exhausted?"""
    tc = r.cfg.train
    te = time.perf_counter()
    value = metric_value(evaluate(r.raw_model, r.ds, "valid", tc, protocols=(tc.valid_metric.split("/")[0],)),
                         tc.valid_metric)
    row = {"epoch": epoch, "step": pr.step, "loss": total / max(1, r.steps_per_epoch), "train_s": pr.train_s,
           "train_cpu_s": pr.train_cpu_s, f"valid/{tc.valid_metric}": value}
    if tc.track_test:
        test = evaluate(r.raw_model, r.ds, "test", tc, protocols=("full",))["full"]
        row.update({f"test/full/{k}": v for k, v in test.items() if k.startswith(("ndcg@", "hr@", "mrr@"))
                    and not k.endswith("ci95")})
    row["eval_s"] = time.perf_counter() - te
    improved = value > pr.best
    if improved:
        pr.best, pr.best_epoch, pr.bad_evals = value, epoch, 0
        r.raw_model.save(r.out_dir / "best")
    else:
        pr.bad_evals += 1
    row["best"] = improved
    with open(r.out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"epoch {epoch:3d} | loss {row['loss']:.4f} | valid {tc.valid_metric} {value:.4f}"
          f"{' *' if improved else ''} | train {pr.train_s:.1f}s"
          + (f" | test ndcg@10 {row.get('test/full/ndcg@10', float('nan')):.4f}" if tc.track_test else ""))
    return pr.bad_evals >= tc.patience


def final_results(r: Run, pr: Progress, epochs_run: int) -> dict:
    """Rank 0: the best model on every protocol + the reward's calibration -> results.json, and a summary."""
    tc = r.cfg.train
    best_model = SASRec.load(r.out_dir / "best", device=r.info.device)
    results = {
        "dataset": str(tc.data_dir), "n_users": r.ds.n_users, "n_items": r.ds.n_items,
        "n_train_targets": int((r.targets != 0).sum()), "best_epoch": pr.best_epoch, "epochs_run": epochs_run,
        "train_s": pr.train_s, "train_cpu_s": pr.train_cpu_s, "loss": r.cfg.sasrec.loss,
        "valid": evaluate(best_model, r.ds, "valid", tc),
        "test": evaluate(best_model, r.ds, "test", tc),
        "tie_break": "pessimistic (a tie with the target ranks it lower)",
        # sigmoid(logit) as the GRPO reward reads it (rho_cf), on the valid histories: is it a probability?
        "calibration": calibration(best_model, split_lists(r.ds, "valid")[1], tau=tc.calibration_tau),
    }
    write_json_atomic(r.out_dir / "results.json", results)
    t = results["test"]
    line = [f"best epoch {pr.best_epoch}, train {pr.train_s:.1f}s"]
    if "candidates" in t:
        c = t["candidates"]
        line.append(f"candidates HR@1 {c['hr@1']:.4f} HR@5 {c['hr@5']:.4f} NDCG@5 {c['ndcg@5']:.4f}")
    for p in ("full", "sampled100"):
        if 10 in tc.ks:
            line.append(f"{p} HR@10 {t[p]['hr@10']:.4f} NDCG@10 {t[p]['ndcg@10']:.4f}")
    print("test: " + " | ".join(line))
    c = results["calibration"]
    print(f"calibration (valid histories, sigmoid of the logit): share of unseen items >= {c['tau']}: "
          f"{c['share_ge_tau']:.3f} | random unseen item median {c['random_unseen_median']:.3f} | "
          f"top-1 median {c['top1_median']:.3f} (min {c['top1_min']:.3f})")
    return results


def main(argv: list[str]) -> dict:
    r = setup(argv)
    tc, info = r.cfg.train, r.info
    pr = Progress()
    for epoch in range(1, tc.epochs + 1):
        total = train_epoch(r, pr, epoch)
        # valid evaluation on rank 0; the early-stopping decision is broadcast to every rank
        stop = torch.zeros(1, device=info.device)
        if info.is_main and (epoch % tc.eval_every == 0 or epoch == tc.epochs):
            stop[0] = float(validate(r, pr, epoch, total))
        if (tc.max_train_s and pr.train_s >= tc.max_train_s) or (
                tc.max_train_cpu_s and pr.train_cpu_s >= tc.max_train_cpu_s):
            stop[0] = 1.0
        if info.world_size > 1:
            dist.broadcast(stop, src=0)
        if stop.item():
            break

    results = final_results(r, pr, epoch) if info.is_main else {}
    if info.world_size > 1:
        dist.barrier()  # rank 0 evaluates while the others wait, then everyone leaves the group together
    cleanup()
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"config error: {e}")
