"""Stage 2 of TWiCE-Rec: multi-task supervised fine-tuning (T1 item knowledge, T2 next item, T3 rationale + item).

    python train_sft.py configs/quickstart/sft.yaml                                   # one process (CPU or 1 GPU)
    torchrun --nproc_per_node 8 train_sft.py configs/amazon-gemma3-1b/sft.yaml        # 8 ranks, FSDP2 (gloo on CPU)
    python train_sft.py configs/quickstart/sft.yaml steps=10 optim.lr=1e-4 lora.enabled=false   # dotted overrides

The objective: for every example (chat prompt x, response y = y_1..y_n followed by <end_of_turn>), minimise the
cross-entropy of the response tokens only, summed over every response token of the optimizer step's GLOBAL batch and
divided by the number of those tokens (all ranks, all micro-batches):

    L = - (1 / N_resp) * sum_{examples} sum_{t in response} log p(y_t | x, y_<t)

log p comes from the model's `targets=` path (kernels.token_logprobs on the final hidden states: the [tokens x V]
logits are never built). N_resp is all-reduced before the first backward; FSDP2 AVERAGES gradients over ranks, so
each rank's loss is multiplied by world_size to make the result the gradient of L itself (twice/dist.py).

The three tasks (twice/tasks.py renders them, the same text GRPO and eval read):
    T1 describe   item title -> id, description, details          pool: the catalogue's items
    T2 recommend  history + candidates -> <item>ID</item>           pool: every user's train split (target items[-3])
    T3 reason     history + candidates -> <think>R</think><item>ID</item>
                  pool: stage 1's rationales.jsonl (`t3_source: path`) or the authors' released rationales
                  (`t3_source: official`, a dataset dir built from source "official": examples_task3.jsonl)
Mixture: weight w of a task = how many times its pool is used per epoch (1.0 = each example once, 0.5 = a seeded
half, 2.0 = twice); the epoch is the shuffled union. Training candidates (T2/T3 without released lists) are drawn
per example from a rng seeded by (seed, epoch, task, key): the true item's position is uniform, the negatives
change every epoch, and a resumed run rebuilds exactly the same examples without any saved sampler state.

One optimizer step = the next `optim.batch_size` examples of the stream (global; rank r takes every W-th). Each
rank sorts its share by length and packs it into micro-batches under `optim.micro_batch_tokens` padded tokens
(length bucketing; the number of micro-batches is the gradient accumulation, equalised over ranks with zero-weight
passes so FSDP2's collectives line up). Validation: the loss of the T2 prompts of a fixed slice of valid users
(fixed candidate sets) and HR@1 of greedy decoding on a slice of them.

The loop, each arrow a named function below that main() calls in order (so it reads as this table of contents):

    step_examples (this rank's share, skips counted) -> forward_backward (global token count, micro-batches)
    -> optimizer_step (clip, lr, step) -> step_record (global sums) -> eval_and_stop -> log_line -> checkpoint

Run dir: config.yaml, log.txt, metrics.jsonl (one line per step; eval lines carry "eval/..." keys),
checkpoints/step_XXXXXX (atomic, keep last N; exact resume: weights (LoRA adapters only when LoRA is on: the frozen
base is re-read from model.path), AdamW, LR schedule position, RNG streams of every rank, data cursor),
final/ (HF folder, LoRA merged, tokenizer.model copied; loads in transformers).

Early stopping (`eval.patience: P` > 0; 0 = off): after each eval the valid loss either improves on the best so far
by more than `eval.min_delta` (its weights are saved to best/step_XXXXXX, atomic, only that one kept) or counts as a
bad eval; P bad evals in a row end the run there, and final/ is exported from best/, not from the last step.
`steps`/`epochs` is then the cap (and still the LR schedule's length). The best loss, its step and the bad-eval count
are in every checkpoint, so a run killed mid-window resumes to the same stop step and the same final/.
"""
from __future__ import annotations

import json
import math
import os
import random
import resource
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from twice import dist, precision
from twice.checkpoint import export_hf, load_checkpoint, load_latest, rewrite_metrics, save_checkpoint, step_dirs
from twice.config import ConfigError, InputError, check_inputs, parse_args, save_config
from twice.logsink import JsonlWriter, LogConfig, RunLog, open_sinks
from twice.data import User, load_dataset
from twice.engine import Engine
from twice.gemma3 import ATTN_IMPLEMENTATIONS, Gemma3
from twice.lora import TARGETS, apply_lora
from twice.optim import build_adamw, clip_grad_norm_, lr_at, set_lr
from twice.rewards import normalize_item, parse_completion
from twice.tasks import Example, TaskConfig, describe_example, encode_example, recommend_example, sample_candidates
from twice.tokenizer import Tokenizer

TASKS = ("describe", "recommend", "reason")


# ----------------------------------------------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    path: str = ""                      # HF folder (python -m twice.convert ..., or google/gemma-3-1b-it downloaded)
    dtype: str = "auto"                 # compute dtype (twice/precision.py): auto = bf16 on GPUs and AMX/AVX512-BF16
                                        #   CPUs, else fp32; float32 forces fp32 everywhere. Trainable weights and
                                        #   AdamW state stay fp32 either way (LoRA A/B; FSDP2 / MasterAdamW masters)
    gradient_checkpointing: bool = True  # recompute each block in backward (activation memory ~ one block)
    attn_implementation: str = "sdpa"   # "sdpa": fused attention, no [B, H, T, T] score tensor (long contexts, GPUs);
                                        #   "eager": materialised scores (HF's eager math), faster to train on a CPU
                                        #   at ~550 tokens in bf16 (bench/sft.py --variants fused,fused+eager)
    compile: bool = False               # torch.compile each block's training forward (Gemma3.compile_blocks): GPU
                                        #   SFT step 1.47x at 1B on an H100 (bench/gpu.py); the in-loop eval decodes
                                        #   eager; the first steps (and each new sequence length) pay compilation


@dataclass
class MixtureConfig:
    describe: float = 1.0               # T1 weight: passes over the item pool per epoch (0 = task off)
    recommend: float = 1.0              # T2 weight: passes over the users' train split per epoch
    reason: float = 1.0                 # T3 weight: passes over the rationale records per epoch (needs t3_source)
    t3_source: str = ""                 # stage 1's rationales.jsonl | "official" (dataset dir's examples_task3) | ""
    t2_source: str = "users"            # "users" (train split of users.jsonl) | "official" (examples_task2.jsonl)
    describe_min_chars: int = 1         # T1 only for items whose description has at least this many characters


@dataclass
class LoRAConfig:
    enabled: bool = True                # False = full fine-tuning
    r: int = 8                          # the authors' rank
    alpha: float = 16.0                 # scale = alpha / r
    dropout: float = 0.0                # dropout on the adapter input (per-rank RNG stream)
    targets: list[str] = field(default_factory=lambda: list(TARGETS))  # q/k/v/o/gate/up/down


@dataclass
class OptimConfig:
    lr: float = 5e-5                    # peak learning rate (the authors: 5e-5)
    warmup_steps: int = 0               # linear warmup, optimizer steps
    min_lr_ratio: float = 0.1           # cosine decays to lr * this at the last step
    weight_decay: float = 0.0           # AdamW decoupled decay on matrices (LoRA A/B under LoRA)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0          # global gradient-norm clip (<= 0: only measured)
    batch_size: int = 16                # examples per optimizer step, GLOBAL (split over ranks)
    micro_batch_tokens: int = 4096      # padded tokens (rows x longest row) per forward/backward; a step's share
                                        #   is split into as many micro-batches as needed (gradient accumulation)
    defer_grad_sync: bool = True        # FSDP2: reduce-scatter only after the last micro-batch (less traffic,
                                        #   unsharded grads held meanwhile: cheap under LoRA)


@dataclass
class EvalConfig:
    every: int = 50                     # optimizer steps between evaluations (0 = only at the end)
    loss_users: int = 64                # valid users (fixed slice) whose T2 loss is measured
    hr_users: int = 32                  # the first N of them are greedily decoded for HR@1 (0 = off)
    max_new_tokens: int = 32            # greedy budget (a T2 answer is `<item>ID</item><end_of_turn>`)
    patience: int = 0                   # early stopping: stop after this many evals in a row without a valid loss
                                        #   below best - min_delta, and export final/ from the BEST eval's weights
                                        #   (kept in run_dir/best/); 0 = off: run `steps`/`epochs`, final = last step
    min_delta: float = 0.0              # an eval improves only when its valid loss < best - min_delta (nats/token)


@dataclass
class SFTConfig:
    run_dir: str = "runs/sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data_dir: str = ""                  # dataset dir (python -m twice.data prepare)
    task: TaskConfig = field(default_factory=TaskConfig)   # prompt rendering + token budget (shared with GRPO/eval)
    mix: MixtureConfig = field(default_factory=MixtureConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)     # optional TensorBoard / W&B mirrors of metrics.jsonl (twice/logsink.py)
    max_seq_len: int = 4096             # prompt + response tokens; longer examples are skipped (counted, logged)
    epochs: float = 1.0                 # length of the run in passes over the mixture ...
    steps: int = 0                      # ... or in optimizer steps when > 0 (overrides epochs)
    checkpoint_every: int = 100         # optimizer steps between checkpoints (0 = only the final one)
    keep_checkpoints: int = 3           # keep the last N checkpoint dirs
    export_dtype: str = "auto"          # dtype of final/ weights: auto (the base folder's, bf16 for Gemma-3) | float32 | bfloat16
    seed: int = 0
    threads: int = 0                    # torch CPU threads (0 = torch default)


def expand_paths(c: SFTConfig) -> None:
    """`~` in path fields (configs name ~/.cache/twice/gemma-3-270m)."""
    c.run_dir, c.data_dir = os.path.expanduser(c.run_dir), os.path.expanduser(c.data_dir)
    c.model.path = os.path.expanduser(c.model.path)
    if c.mix.t3_source not in ("", "official"):
        c.mix.t3_source = os.path.expanduser(c.mix.t3_source)


def check_config(c: SFTConfig) -> None:
    rules = [("model.path is set", bool(c.model.path)), ("data_dir is set", bool(c.data_dir)),
             ("model.dtype in auto|bfloat16|float32", c.model.dtype in precision.CHOICES),
             ("model.attn_implementation in sdpa|eager", c.model.attn_implementation in ATTN_IMPLEMENTATIONS),
             ("export_dtype in auto|float32|bfloat16", c.export_dtype in ("auto", "float32", "bfloat16")),
             ("optim.batch_size >= 1", c.optim.batch_size >= 1),
             ("optim.micro_batch_tokens >= max_seq_len", c.optim.micro_batch_tokens >= c.max_seq_len),
             ("mix weights >= 0", min(c.mix.describe, c.mix.recommend, c.mix.reason) >= 0),
             ("mix.reason > 0 needs mix.t3_source", c.mix.reason == 0 or bool(c.mix.t3_source)),
             ("mix.t2_source in users|official", c.mix.t2_source in ("users", "official")),
             ("steps > 0 or epochs > 0", c.steps > 0 or c.epochs > 0),
             ("eval.patience >= 0 and eval.min_delta >= 0", c.eval.patience >= 0 and c.eval.min_delta >= 0),
             ("eval.patience > 0 needs eval.every > 0 and eval.loss_users > 0 (the valid loss it watches)",
              c.eval.patience == 0 or (c.eval.every > 0 and c.eval.loss_users > 0))]
    for name, ok in rules:
        if not ok:
            raise ConfigError(f"config: {name} is required / violated")


# ----------------------------------------------------------------------------------------------------------------
# Records -> examples

class _RecordView:
    """The dataset as `tasks.recommend_example` sees it, but with history/target taken from a record (a stage-1
    rationale, an official example) instead of a leave-one-out split of users.jsonl."""

    def __init__(self, ds, history: list[int], target: int):
        self.items, self.n_items = ds.items, ds.n_items
        self._history, self._target = history, target

    def history(self, user: int, split: str) -> list[int]:
        return self._history

    def target(self, user: int, split: str) -> int:
        return self._target


def record_user(ds, rec: dict, where: str) -> User:
    """The user whose ratings/reviews the prompt shows: the dataset's own user when the record's history is a prefix
    of that user's sequence (positions then align), else a stand-in with the record's items and no reviews."""
    hist, target = rec["history"], rec["target"]
    u = rec.get("user")
    if isinstance(u, int) and 1 <= u <= ds.n_users:
        user = ds.user(u)
        if user.items[:len(hist)] == hist and len(user.items) > len(hist):
            return user
    n = len(hist) + 1
    return User(0, f"record:{where}", list(hist) + [target], [None] * n, [""] * n, list(range(n)))


def load_records(path: Path, kind: str, ds) -> tuple[list[dict], int]:
    """T2/T3 records {history, target, [rationale], [candidates], [user]} from a JSONL file; bad lines are counted
    and logged, never fatal, never silent. -> (records, n_skipped)."""
    recs, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                hist, tgt = [int(x) for x in r["history"]], int(r["target"])
                if not hist or not all(1 <= x <= ds.n_items for x in hist + [tgt]):
                    raise ValueError("empty history or item idx out of range")
                if kind == "reason" and not str(r.get("rationale") or "").strip():
                    raise ValueError("empty rationale")
                cands = r.get("candidates")
                if cands is not None and tgt not in cands:
                    raise ValueError("target not among the candidates")
                recs.append({"history": hist, "target": tgt, "rationale": r.get("rationale"), "candidates": cands,
                             "user": r.get("user"), "where": f"{path.name}:{n}"})
            except (ValueError, KeyError, TypeError) as e:
                skipped += 1
                dist.print0(f"skip {path}:{n}: {type(e).__name__}: {e}")
    return recs, skipped


def build_pools(ds, cfg: SFTConfig) -> tuple[dict[str, list], dict]:
    """task -> list of keys (T1: item idx; T2/T3: record dicts), and load stats."""
    m, stats = cfg.mix, {}
    pools: dict[str, list] = {t: [] for t in TASKS}
    if m.describe > 0:
        pools["describe"] = [it.idx for it in ds.items[1:] if len(it.description or "") >= m.describe_min_chars]
    if m.recommend > 0:
        if m.t2_source == "official":
            pools["recommend"], stats["t2_skipped"] = load_records(ds.root / "examples_task2.jsonl", "recommend", ds)
        else:  # train split: target items[-3], history items[:-3] (non-empty)
            pools["recommend"] = [{"history": ds.history(u.idx, "train"), "target": ds.target(u.idx, "train"),
                                   "user": u.idx, "rationale": None, "candidates": None, "where": f"user {u.idx}"}
                                  for u in ds.users if len(u.items) >= 4]
    if m.reason > 0:
        path = ds.root / "examples_task3.jsonl" if m.t3_source == "official" else Path(m.t3_source)
        if not path.is_file():
            raise InputError(f"mix.t3_source: {path} does not exist")
        pools["reason"], stats["t3_skipped"] = load_records(path, "reason", ds)
    for t in TASKS:
        if getattr(m, t) > 0 and not pools[t]:
            src = (f"mix.t3_source={m.t3_source}" if t == "reason" else f"data_dir={cfg.data_dir}, " + (
                f"mix.t2_source={m.t2_source}" if t == "recommend" else f"mix.describe_min_chars={m.describe_min_chars}"))
            skipped = stats.get({"reason": "t3_skipped", "recommend": "t2_skipped"}.get(t, ""), 0)
            raise InputError(f"mix.{t}={getattr(m, t)} but its pool is empty ({src}"
                             + (f"; {skipped} bad line(s) skipped" if skipped else "") + "): "
                             + ("set mix.reason=0 to train T1 + T2 only" if t == "reason" else "set its weight to 0"))
    return pools, stats


def epoch_plan(pools: dict[str, list], weights: dict[str, float], seed: int, epoch: int) -> list[tuple[str, int]]:
    """The epoch's examples as (task, index into the pool), shuffled. A weight w uses floor(w) full passes plus a
    seeded sample of the rest; the length is the same every epoch (round(w * |pool|) summed)."""
    rng = random.Random(f"sft-plan/{seed}/{epoch}")
    plan = []
    for t in TASKS:
        n_pool, w = len(pools[t]), weights[t]
        if n_pool == 0 or w <= 0:
            continue
        n = int(round(w * n_pool))
        full, rest = divmod(n, n_pool)
        plan += [(t, k) for _ in range(full) for k in range(n_pool)]
        plan += [(t, k) for k in sorted(rng.sample(range(n_pool), rest))]
    rng.shuffle(plan)
    return plan


def render(ds, tok, cfg: SFTConfig, task: str, key, epoch: int, split: str = "train") -> Example:
    """One example; T2/T3 candidates from a rng seeded by (seed, epoch, task, key) unless the record has a list."""
    if task == "describe":
        return describe_example(ds, key, cfg.task)
    rec = key
    view = _RecordView(ds, rec["history"], rec["target"])
    user = record_user(ds, rec, rec["where"])
    cands = rec["candidates"]
    if cands is None:
        rng = random.Random(f"sft-cands/{cfg.seed}/{epoch}/{task}/{rec['where']}")
        cands = sample_candidates(ds, user, rec["target"], cfg.task.n_negatives, rng)
    return recommend_example(view, user, split, cands, cfg.task, tokenizer=tok, reasoning=task == "reason",
                             rationale=rec["rationale"])


class Stream:
    """Global example index i -> encoded example; epochs are planned lazily (cached) so resume is a cursor."""

    def __init__(self, ds, tok, cfg: SFTConfig, pools):
        self.ds, self.tok, self.cfg, self.pools = ds, tok, cfg, pools
        self.weights = {t: getattr(cfg.mix, t) for t in TASKS}
        self.epoch_len = len(epoch_plan(pools, self.weights, cfg.seed, 0))
        self._plans: dict[int, list] = {}

    def get(self, i: int):
        """-> (task, ids, loss_mask, truncated) or (task, None, reason, 0) for a counted skip."""
        epoch, j = divmod(i, self.epoch_len)
        if epoch not in self._plans:
            self._plans = {epoch: epoch_plan(self.pools, self.weights, self.cfg.seed, epoch)}
        task, k = self._plans[epoch][j]
        try:
            ex = render(self.ds, self.tok, self.cfg, task, self.pools[task][k], epoch)
            ids, mask = encode_example(self.tok, ex, max_len=self.cfg.max_seq_len)
        except ValueError as e:  # prompt over budget even fully truncated, or example over max_seq_len
            return task, None, str(e), 0
        return task, ids, mask, ex.truncated


# ----------------------------------------------------------------------------------------------------------------
# Batches and the loss

def make_targets(ids: list[int], mask: list[int]) -> list[int]:
    """Position t predicts token t+1: targets[t] = ids[t+1] where that token is a response token, else -100."""
    return [ids[t + 1] if mask[t + 1] else -100 for t in range(len(ids) - 1)] + [-100]


def pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Length bucketing: indices sorted longest first, cut greedily into micro-batches whose padded size
    (rows x longest) stays within `budget` tokens. A row longer than the budget goes alone."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    out, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[cur[0]] > budget:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


def collate(rows: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[(ids, mask)] -> input_ids [B, L], targets [B, L] (-100 = no loss), right-padded: pads sit after every real
    token, so causality alone keeps them out of attention and no attention mask is needed."""
    L = max(len(ids) for ids, _ in rows)
    x = torch.full((len(rows), L), pad_id, dtype=torch.long)
    y = torch.full((len(rows), L), -100, dtype=torch.long)
    for r, (ids, mask) in enumerate(rows):
        x[r, :len(ids)] = torch.tensor(ids)
        y[r, :len(ids)] = torch.tensor(make_targets(ids, mask))
    return x, y


def response_nll(model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-row summed negative log-likelihood of the target tokens [B] fp32, via the fused targets= path."""
    logp = model(x, targets=y)  # [B, L] fp32, 0 where y == -100
    return -logp.sum(1)


# ----------------------------------------------------------------------------------------------------------------
# Validation

def valid_examples(ds, tok, cfg: SFTConfig) -> list[tuple[Example, list[int], list[int]]]:
    """T2 prompts of the first `eval.loss_users` valid users, with the dataset's fixed candidate sets."""
    out = []
    for cs in ds.candidates("valid")[:cfg.eval.loss_users]:
        user = ds.user(cs.user)
        if len(user.items) < 3:
            continue
        try:
            ex = recommend_example(ds, user, "valid", list(cs.candidates), cfg.task, tokenizer=tok)
            ids, mask = encode_example(tok, ex, max_len=cfg.max_seq_len)
        except ValueError as e:
            dist.print0(f"valid: skip user {cs.user}: {e}")
            continue
        out.append((ex, ids, mask))
    return out


@torch.no_grad()
def evaluate(model, tok, cfg: SFTConfig, val, info) -> dict:
    """Valid T2 loss (token mean, global) and greedy HR@1 on the first hr_users prompts; collective."""
    R, W = info.rank, info.world_size
    model.eval()
    mine = val[R::W]
    budget = cfg.optim.micro_batch_tokens
    mbs = pack([len(ids) for _, ids, _ in mine], budget)
    n_pass = int(dist.all_reduce_max(torch.tensor([len(mbs)])))
    sums = torch.zeros(4, dtype=torch.float64)  # nll, tokens, hits, asked
    for j in range(n_pass):
        if j < len(mbs):
            x, y = collate([(mine[i][1], mine[i][2]) for i in mbs[j]], tok.pad_id)
        else:  # zero-work pass so every FSDP unit runs the same collectives on every rank
            x, y = torch.full((1, 2), tok.bos_id), torch.tensor([[-100, -100]])
        nll = response_nll(model, x.to(info.device), y.to(info.device))
        sums[0] += float(nll.sum())
        sums[1] += float((y != -100).sum())
    hr = val[:cfg.eval.hr_users][R::W]
    with dist.unsharded(model):  # weights gathered once; ranks may decode different numbers of prompts
        if hr:
            res = Engine(model, tok).greedy([tok.apply_chat_template(ex.messages) for ex, _, _ in hr],
                                            max_new_tokens=cfg.eval.max_new_tokens,
                                            stop_strings=[f"</{cfg.task.item_tag}>"])
            for (ex, _, _), text in zip(hr, res.texts):
                item = parse_completion(text, cfg.task.think_tag, cfg.task.item_tag).item
                sums[2] += float(item is not None and normalize_item(item) == normalize_item(ex.target_id))
                sums[3] += 1
    sums = dist.all_reduce_sum(sums)
    model.train()
    out = {"eval/loss": float(sums[0]) / max(float(sums[1]), 1.0), "eval/examples": len(val)}
    if sums[3] > 0:
        out["eval/hr@1"] = float(sums[2]) / float(sums[3])
        out["eval/hr_users"] = int(sums[3])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Early stopping on the valid loss (eval.patience > 0)

@dataclass
class EarlyStop:
    """The early-stopping state. It lives in every checkpoint's data (JSON), so a resumed run decides the same."""
    best_loss: float | None = None      # lowest valid loss so far (None before the first eval)
    best_step: int = 0                  # the step it was measured after; its weights are best/step_XXXXXX
    bad_evals: int = 0                  # evals since then without an improvement > min_delta
    stopped_at: int = 0                 # the step early stopping ended the run at (0 = not stopped)


def improves(es: EarlyStop, loss: float, min_delta: float) -> bool:
    return es.best_loss is None or loss < es.best_loss - min_delta


def track_best(es: EarlyStop, rec: dict, step: int, model, run_dir: Path, cfg: SFTConfig) -> bool:
    """After an eval: update `es` from rec["eval/loss"], save the weights to best/step_XXXXXX when it improved
    (atomic, trainable part only under LoRA; collective), add eval/best_* to rec. -> stop now?"""
    loss = rec["eval/loss"]
    if improves(es, loss, cfg.eval.min_delta):
        es.best_loss, es.best_step, es.bad_evals = loss, step, 0
        save_checkpoint(run_dir / "best", step, model, None, data={"eval/loss": loss}, config=cfg, keep_last=0,
                        trainable_only=cfg.lora.enabled)
    else:
        es.bad_evals += 1
    rec.update({"eval/best_loss": es.best_loss, "eval/best_step": es.best_step, "eval/bad_evals": es.bad_evals})
    if es.bad_evals >= cfg.eval.patience:
        es.stopped_at = step
    return es.stopped_at > 0


def prune_best(best_dir: Path, keep_step: int) -> None:
    """Rank 0, once a checkpoint has committed best_step = keep_step: drop every other best/ weights, i.e. older
    bests, and bests a killed run saved after its last checkpoint (the resumed run redoes those steps)."""
    for p in step_dirs(best_dir):
        if p.name != f"step_{keep_step:06d}":
            shutil.rmtree(p)


def peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------------------------
# The run's phases, in the order main() calls them

@dataclass
class Ctx:                      # what every phase reads: set up once, never mutated by the loop
    cfg: SFTConfig
    info: object                # dist.init_distributed(): rank, world_size, device, is_main
    run_dir: Path
    log: RunLog
    compute: torch.dtype        # the compute dtype (precision.training_load), logged on every step
    tok: Tokenizer
    stream: Stream              # global example index -> encoded example
    load_stats: dict            # bad record lines skipped while building the pools
    val: list                   # valid_examples(): [(Example, ids, mask)]
    total: int                  # optimizer steps of the run (the cap under early stopping; the LR schedule's length)


def parse_and_check(argv: list[str]) -> SFTConfig:
    """The config (unknown keys, bad values: one-line errors), and the inputs it names, checked before any model
    load (a missing folder or an empty rationales file fails in one line, not after minutes of loading)."""
    cfg = parse_args(SFTConfig, argv)
    expand_paths(cfg)
    check_config(cfg)
    check_inputs(("model.path", cfg.model.path, "model"), ("data_dir", cfg.data_dir, "dataset"),  # before the model
                 ("mix.t3_source", cfg.mix.t3_source if cfg.mix.reason > 0 and cfg.mix.t3_source != "official"
                  else "", "file"))
    if cfg.mix.reason > 0 and cfg.mix.t3_source != "official" and not any(
            ln.strip() for ln in open(cfg.mix.t3_source, encoding="utf-8", errors="replace")):
        raise InputError(f"mix.t3_source: {cfg.mix.t3_source} has no records (stage 1 kept no rationale?): "
                         f"set mix.reason=0 to train T1 + T2 only")
    return cfg


def open_run(cfg: SFTConfig, info) -> tuple[Path, RunLog]:
    """Run dir and resolved config.yaml (rank 0; the others wait for the dir), and the logger."""
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    dist.barrier()
    return run_dir, RunLog(run_dir / "log.txt", info.is_main)


def build_model(cfg: SFTConfig, dev):
    """Model (+ LoRA, + compiled blocks, + FSDP2) and AdamW: the SAME seed on every rank before wrapping (FSDP2 never
    syncs initial weights). -> (model, opt, compute dtype)"""
    dist.seed_everything(cfg.seed)
    compute, delta = precision.training_load(cfg.model.dtype, dev, cfg.model.path,
                                             lora_targets=tuple(cfg.lora.targets) if cfg.lora.enabled else ())
    model = Gemma3.from_pretrained(cfg.model.path, dtype=precision.param_dtype(compute, dist.is_distributed()),
                                   device=dev, delta=delta)  # the frozen base for resume; a fine-tune's
    # lora_delta is either frozen fp32 adapters under this run's LoRA (bf16) or rides along merged (fp32): the
    # export records it plus this run's LoRA either way
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    model.set_attn_implementation(cfg.model.attn_implementation)
    if cfg.lora.enabled:
        apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets),
                   dropout=cfg.lora.dropout, seed=cfg.seed)
    if cfg.model.compile:  # after LoRA (its adapters are in the traced blocks), before FSDP (its hooks stay eager)
        model.compile_blocks()
    model = dist.wrap_fsdp(model, mixed_precision=precision.fsdp_mixed(compute))
    model.train()
    opt = build_adamw(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas)
    return model, opt, compute


def load_inputs(cfg: SFTConfig, info, run_dir: Path, log: RunLog, compute: torch.dtype) -> Ctx:
    """Tokenizer, dataset, the task pools (bad record lines counted), the example stream, the run's length in steps
    (`steps`, else `epochs` over the mixture) and the fixed valid slice."""
    tok = Tokenizer.from_pretrained(cfg.model.path)
    ds = load_dataset(cfg.data_dir)
    pools, load_stats = build_pools(ds, cfg)
    stream = Stream(ds, tok, cfg, pools)
    total = cfg.steps if cfg.steps > 0 else max(1, math.ceil(cfg.epochs * stream.epoch_len / cfg.optim.batch_size))
    val = valid_examples(ds, tok, cfg) if (cfg.eval.loss_users > 0) else []
    return Ctx(cfg, info, run_dir, log, compute, tok, stream, load_stats, val, total)


def resume(c: Ctx, model, opt) -> tuple[int, EarlyStop, int]:
    """Latest checkpoint (weights, AdamW, RNG streams, data cursor, early-stop state) -> (start step, early-stop
    state, end step); per-rank RNG streams either way; metrics.jsonl lines of steps to redo dropped."""
    cfg, R, G = c.cfg, c.info.rank, c.cfg.optim.batch_size
    state = load_latest(c.run_dir / "checkpoints", model, opt)
    start = state["step"] if state else 0
    if state:
        if state["data"].get("cursor") != start * G:
            raise ValueError(f"{state['path']}: data cursor {state['data']} != step {start} x batch_size {G} "
                             f"(was optim.batch_size changed?)")
        c.log(f"resumed from {state['path']} at step {start}")
        if state["world_size"] != c.info.world_size:  # its RNG streams were not restored: fresh, distinct per rank
            dist.seed_everything(cfg.seed + R + 1_000_003 * start)
        if c.info.is_main:
            rewrite_metrics(c.run_dir / "metrics.jsonl", start)
    else:  # per-rank streams from here on (adapter dropout); a resume restored each rank's own streams instead
        dist.seed_everything(cfg.seed + R)
    es = EarlyStop(**state["data"].get("early_stop", {})) if state else EarlyStop()
    stop_on = cfg.eval.patience > 0
    if not stop_on or es.bad_evals < cfg.eval.patience:  # started again with more patience (or none): train on
        es.stopped_at = 0
    if stop_on and c.info.is_main:
        prune_best(c.run_dir / "best", es.best_step)
    end = es.stopped_at or c.total  # a run that stopped early and is started again as it was does not train on
    return start, es, end


def summary_line(c: Ctx, model) -> str:
    cfg, G = c.cfg, c.cfg.optim.batch_size
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    pools = c.stream.pools
    return ("SFT: pools " + ", ".join(f"{t} {len(pools[t])} (w {getattr(cfg.mix, t)})" for t in TASKS)
            + f" | epoch {c.stream.epoch_len} examples, {G}/step, {c.total} steps, {c.info.world_size} rank(s) | "
            f"lora={cfg.lora.enabled} trainable {n_train:,} | valid {len(c.val)} | skipped records {c.load_stats}"
            + (f" | early stop: patience {cfg.eval.patience} evals (every {cfg.eval.every} steps), min_delta "
               f"{cfg.eval.min_delta}" if cfg.eval.patience > 0 else ""))


def step_examples(c: Ctx, step: int) -> tuple[list, list[str], torch.Tensor]:
    """This rank's strided share of the step's global examples, encoded; a bad one is a counted, logged skip.
    -> (rows [(ids, loss mask)], their tasks, counts [skipped, truncated prompts, input tokens, examples])"""
    G, R, W = c.cfg.optim.batch_size, c.info.rank, c.info.world_size
    rows, tasks_of = [], []
    counts = torch.zeros(4, dtype=torch.float64)  # skipped, truncated prompts, input tokens, examples
    for i in range(step * G + R, (step + 1) * G, W):
        task, ids, mask, truncated = c.stream.get(i)
        if ids is None:
            counts[0] += 1  # a counted, logged skip (the reason names the user / example)
            msg = f"[rank {R}] skip example {i} ({task}): {mask}"
            c.log(msg) if c.info.is_main else print(msg, file=sys.stderr, flush=True)
            continue
        rows.append((ids, mask))
        tasks_of.append(task)
        counts[1] += truncated > 0
        counts[2] += len(ids)
        counts[3] += 1
    return rows, tasks_of, counts


def forward_backward(c: Ctx, model, rows: list, tasks_of: list[str]) -> tuple[torch.Tensor, int]:
    """Gradient accumulation over this rank's length-bucketed micro-batches; the loss is divided by the GLOBAL
    response-token count. Collective: every rank runs the same number of passes. -> (per-task sums, passes)"""
    cfg, tok, dev = c.cfg, c.tok, c.info.device
    loss_scale = c.info.world_size if dist.is_fsdp(model) else 1  # FSDP2 averages grads over ranks; loss: totals
    mbs = pack([len(ids) for ids, _ in rows], cfg.optim.micro_batch_tokens)
    # global response-token count FIRST (the loss divides by it), and the pass count every rank runs
    n_resp = torch.tensor([float(sum(sum(m[1:]) for _, m in rows))], dtype=torch.float64)
    n_resp = dist.all_reduce_sum(n_resp)
    n_pass = int(dist.all_reduce_max(torch.tensor([len(mbs)])))
    denom = max(float(n_resp), 1.0)
    task_sums = torch.zeros(2 * len(TASKS), dtype=torch.float64)  # per task: nll, response tokens
    for j in range(n_pass):
        if j < len(mbs):
            x, y = collate([rows[i] for i in mbs[j]], tok.pad_id)
            w = 1.0
        else:  # zero-weight pass: FSDP2 needs the same collectives on every rank
            x, y, w = torch.full((1, 2), tok.bos_id), torch.tensor([[tok.bos_id, -100]]), 0.0
        if dist.is_fsdp(model) and cfg.optim.defer_grad_sync:
            dist.set_grad_sync(model, j == n_pass - 1)
        nll = response_nll(model, x.to(dev), y.to(dev))  # [B]
        (nll.sum() * (w * loss_scale / denom)).backward()
        if w > 0:
            ntok = (y != -100).sum(1)
            for r, i in enumerate(mbs[j]):
                k = TASKS.index(tasks_of[i])
                task_sums[2 * k] += float(nll[r].detach())
                task_sums[2 * k + 1] += float(ntok[r])
    return task_sums, n_pass


def optimizer_step(c: Ctx, model, opt, step: int) -> tuple[torch.Tensor, float]:
    """Clip the global gradient norm (collective), set the step's LR, step, drop the grads. -> (grad norm, lr)"""
    o = c.cfg.optim
    gnorm = clip_grad_norm_([p for p in model.parameters() if p.requires_grad], o.max_grad_norm)
    lr = lr_at(step, c.total, o.warmup_steps, o.lr, o.min_lr_ratio)
    set_lr(opt, lr)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return gnorm, lr


def step_record(c: Ctx, step: int, task_sums, counts, n_pass: int, gnorm, lr: float, t0: float) -> dict:
    """One metrics.jsonl line: global sums (all-reduced), per-task losses, throughput, memory."""
    task_sums, counts = dist.all_reduce_sum(task_sums), dist.all_reduce_sum(counts)
    dt = time.time() - t0
    tot_nll, tot_tok = float(task_sums[0::2].sum()), float(task_sums[1::2].sum())
    return {"step": step + 1, "epoch": (step + 1) * c.cfg.optim.batch_size / c.stream.epoch_len,
            "loss": tot_nll / max(tot_tok, 1.0),
            **{f"loss/{t}": float(task_sums[2 * k]) / float(task_sums[2 * k + 1])
               for k, t in enumerate(TASKS) if task_sums[2 * k + 1] > 0},
            "lr": lr, "grad_norm": float(gnorm), "examples": int(counts[3]), "skipped": int(counts[0]),
            "truncated": int(counts[1]), "response_tokens": int(tot_tok), "tokens": int(counts[2]),
            "micro_batches": n_pass, "time": dt, "tokens_per_s": float(counts[2]) / max(dt, 1e-9),
            "peak_mem_mb": peak_memory_mb(c.info.device), "compute_dtype": precision.dtype_name(c.compute)}


def eval_and_stop(c: Ctx, model, es: EarlyStop, rec: dict, step: int) -> bool:
    """Eval when due (and after the last step; collective), then the early-stopping rule on its valid loss; adds the
    eval keys to rec. -> done: the run's last step (the cap, or patience ran out)"""
    cfg = c.cfg
    done = step + 1 == c.total
    if (cfg.eval.every and (step + 1) % cfg.eval.every == 0) or done:
        if c.val:
            rec.update(evaluate(model, c.tok, cfg, c.val, c.info))
    if cfg.eval.patience > 0 and "eval/loss" in rec:
        done = track_best(es, rec, step + 1, model, c.run_dir, cfg) or done
        if done:  # the run's summary: which weights final/ holds, and whether patience ended it
            rec.update({"best_step": es.best_step, "best_loss": es.best_loss, "stopped_at": es.stopped_at})
    return done


def log_line(rec: dict, total: int) -> str:
    return (f"step {rec['step']:5d}/{total} | loss {rec['loss']:.4f} "
            + " ".join(f"{t[:3]} {rec[f'loss/{t}']:.3f}" for t in TASKS if f"loss/{t}" in rec)
            + f" | lr {rec['lr']:.2e} gnorm {rec['grad_norm']:.3f} | {rec['examples']} ex {rec['response_tokens']} "
            f"resp tok" + (f" skip {rec['skipped']}" if rec["skipped"] else "")
            + (f" trunc {rec['truncated']}" if rec["truncated"] else "")
            + f" | {rec['micro_batches']} mb {rec['time']:.2f}s {rec['tokens_per_s']:.0f} tok/s "
            f"{rec['peak_mem_mb']:.0f} MB"
            + (f" | eval loss {rec['eval/loss']:.4f}" if "eval/loss" in rec else "")
            + (f" hr@1 {rec['eval/hr@1']:.3f}" if "eval/hr@1" in rec else "")
            + (f" (best {rec['eval/best_loss']:.4f} at step {rec['eval/best_step']})" if "eval/best_step" in rec
               else ""))


def checkpoint(c: Ctx, model, opt, es: EarlyStop, step: int) -> None:
    """Weights (trainable part under LoRA), AdamW, every rank's RNG streams, the data cursor and the early-stop
    state, atomically (collective); then rank 0 drops best/ weights no checkpoint refers to."""
    stop_on = c.cfg.eval.patience > 0
    save_checkpoint(c.run_dir / "checkpoints", step + 1, model, opt,
                    data={"cursor": (step + 1) * c.cfg.optim.batch_size,
                          **({"early_stop": asdict(es)} if stop_on else {})},
                    config=c.cfg, keep_last=c.cfg.keep_checkpoints, trainable_only=c.cfg.lora.enabled)
    if stop_on and c.info.is_main:
        prune_best(c.run_dir / "best", es.best_step)


def export_final(c: Ctx, model, es: EarlyStop) -> None:
    """final/: an HF folder (LoRA merged, tokenizer copied) of the best eval's weights under early stopping, else of
    the last step's."""
    cfg = c.cfg
    if cfg.eval.patience > 0 and es.best_step:
        load_checkpoint(c.run_dir / "best" / f"step_{es.best_step:06d}", model)
        c.log(f"final = step {es.best_step} (best valid loss {es.best_loss:.4f}"
              + (f"; early stop at step {es.stopped_at})" if es.stopped_at else f"; ran to the cap, {c.total} steps)"))
    export_hf(model, c.run_dir / "final", tokenizer_path=Path(cfg.model.path) / "tokenizer.model",
              dtype={"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.export_dtype])
    c.log(f"done: {c.run_dir / 'final'}")


# ----------------------------------------------------------------------------------------------------------------
# The run

def main(argv: list[str]) -> dict:
    cfg = parse_and_check(argv)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    info = dist.init_distributed()
    run_dir, log = open_run(cfg, info)
    model, opt, compute = build_model(cfg, info.device)
    c = load_inputs(cfg, info, run_dir, log, compute)
    start, es, end = resume(c, model, opt)
    metrics_f = JsonlWriter(run_dir / "metrics.jsonl", info.is_main)
    sink = open_sinks(cfg.log, run_dir, cfg, enabled=info.is_main)
    log(summary_line(c, model))

    bar = tqdm(total=c.total, initial=start, disable=not info.is_main, desc="sft", dynamic_ncols=True)
    rec = {}
    for step in range(start, end):
        t0 = time.time()
        rows, tasks_of, counts = step_examples(c, step)                     # 1. this rank's examples, skips counted
        task_sums, n_pass = forward_backward(c, model, rows, tasks_of)      # 2. micro-batches, same count per rank
        gnorm, lr = optimizer_step(c, model, opt, step)                     # 3. clip, lr, step
        rec = step_record(c, step, task_sums, counts, n_pass, gnorm, lr, t0)  # 4. global sums
        done = eval_and_stop(c, model, es, rec, step)                       # 5. eval + early stopping
        metrics_f.write(rec)
        sink.write(rec)
        log(log_line(rec, c.total))
        bar.update(1)
        if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or done:
            checkpoint(c, model, opt, es, step)                             # 6. save (collective)
        if es.stopped_at:
            log(f"early stop at step {es.stopped_at}: no improvement > min_delta {cfg.eval.min_delta} for "
                f"{cfg.eval.patience} evals; final = step {es.best_step} (valid loss {es.best_loss:.4f})")
            break
    bar.close()
    metrics_f.close()
    sink.close()

    export_final(c, model, es)  # the best eval's weights under early stopping, else the last step's
    log.close()
    dist.cleanup()
    return rec


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"train_sft.py: config error: {e}")
