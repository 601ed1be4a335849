"""Stage 3 of TWiCE-Rec: collaborative-guided GRPO (paper Eq. 1-5) on FSDP2, from scratch.

    python train_grpo.py configs/quickstart/grpo.yaml                              # one process (CPU or 1 GPU)
    torchrun --nproc_per_node 8 train_grpo.py configs/amazon-gemma3-1b/grpo.yaml   # 8 ranks (gloo on CPU works too)
    python train_grpo.py cfg.yaml steps=50 rollout.group_size=8 rewards.lam=5      # dotted overrides

The objective in words: for every training user, build the T3 prompt (history + candidates + "reason, then name the
item", the same text SFT and eval read) and sample a group of K completions `<think>...</think><item>ID</item>`.
Score each completion with rho = sum_c w_c * rho_c (default rho_cg (Eq. 2: item match amplified by the frozen
SASRec's confidence, or the confidence alone above tau) + rho_fmt (Eq. 3-5)). Advantages are the group z-scores of
rho. The policy then maximises the clipped ratio objective of Eq. 1 on the completion tokens (mu updates per rollout,
pi_old = the sampling policy), optionally minus beta * KL(pi || pi_ref). Everything the objective does lives in
twice/grpo.py (pure functions) and twice/rewards.py; this file is the one visible loop:

    sample (engine, weights gathered once) -> reward -> advantages (global) -> [old / ref log-probs]
    -> mu x (micro-batches: log-probs of completion tokens (shared prompt pass) -> loss -> backward; clip; step)
    -> log (tqdm bar + log.txt + metrics.jsonl + completions.jsonl) -> checkpoint

Each arrow is a named function below (build_prompts, sample, score, plan_passes, old_and_ref_logprobs, update,
step_record); main() calls them in order, so its loop reads as this table of contents.

Run dir: config.yaml, metrics.jsonl, completions.jsonl, log.txt, checkpoints/step_XXXXXX (exact resume: weights,
AdamW, RNG streams, data cursor; rollout seeds are a pure function of (seed, step, prompt index, k)), final/ (HF
folder, LoRA merged, tokenizer.model copied).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

import torch
from tqdm import tqdm

from twice import dist, precision
from twice.checkpoint import export_hf, load_latest, rewrite_metrics, save_checkpoint
from twice.config import ConfigError, check_inputs, parse_args, save_config
from twice.data import load_dataset
from twice.engine import Engine
from twice.gemma3 import ATTN_IMPLEMENTATIONS, Gemma3, SharedPrefix
from twice.grpo import ObjectiveConfig, group_advantages, policy_loss
from twice.logsink import JsonlWriter, LogConfig, RunLog, open_sinks
from twice.lora import TARGETS, apply_lora, lora_disabled
from twice.optim import build_adamw, clip_grad_norm_, lr_at, set_lr
from twice.rewards import (RewardConfig, RewardContext, check_weights, compute_rewards, normalize_item,
                           outside_candidates)
from twice.sasrec import SASRec, check_dataset, left_pad
from twice.tasks import TaskConfig, prompt_ids, recommend_example, sample_candidates
from twice.tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    path: str = ""                      # HF folder: the SFT run's final/ (variant E) or the base model (variant C)
    dtype: str = "auto"                 # compute dtype (twice/precision.py): auto = bf16 on GPUs and AMX/AVX512-BF16
                                        #   CPUs, else fp32; float32 forces fp32 everywhere. Trainable weights and
                                        #   AdamW state stay fp32 either way (LoRA A/B; FSDP2 / MasterAdamW masters)
    gradient_checkpointing: bool = True   # recompute each block in backward (activation memory ~ one block)
    attn_implementation: str = "sdpa"   # "sdpa" (fused) | "eager" (materialised scores): train_sft.py's ModelConfig;
                                        #   rollouts' prefill, the update and the reference model all use it


@dataclass
class RolloutConfig:
    group_size: int = 16                # K completions per prompt (the paper: 16)
    prompts_per_step: int = 8           # prompts per rollout, GLOBAL (split over ranks, strided)
    max_new_tokens: Union[int, Literal["auto"]] = 300  # completion budget (the paper: 300); "auto" = the
                                        #   budget_quantile of the SFT T3 responses' token lengths in budget_from
                                        #   (rationale + tags + ID + end of turn): reasoning fits, few truncations
    budget_from: str = ""               # stage 1's rationales.jsonl (what SFT's T3 trained on), for "auto"
    budget_quantile: float = 0.95       # "auto": this quantile (nearest rank) of those lengths
    temperature: float = 1.0            # sampling temperature; the trainer's log-probs use the same temperature
    top_k: Optional[int] = None         # None = off. top-k/top-p make the sampler's policy differ from the trained
    top_p: float = 1.0                  #   one: logp_gap_sampler and is_ratio_seq_min show by how much
    stop_strings: list[str] = field(default_factory=lambda: ["</item>"])  # stop once the answer is closed
    reasoning: bool = True              # T3 prompts (<think> then <item>); False: T2 item-only prompts (RQ6 (C);
                                        #   then drop the think-tag format terms, e.g. rewards.weights={cg: 1.0})
    split: str = "train"                # which leave-one-out target the prompts ask for (train = items[-3])
    log_completions: int = 4            # completions per step dumped to completions.jsonl (rank 0's first rows)
    prefill_chunk: Optional[int] = None  # prefill prompts in chunks of this many tokens (bounds attention memory
                                        #   of long prompts, e.g. 2048 for 6k-token prompts); None = one pass
    decode: str = "eager"               # eager (the reference) | static (fixed-shape KV cache, no host sync per
                                        #   step) | compiled (static + torch.compile reduce-overhead: CUDA graphs on
                                        #   GPU; H200, 270m shape: 0.98 vs 1.38 s/step eager, bench/gpu.py)


@dataclass
class OptimConfig:
    lr: float = 2e-5                    # peak learning rate (the authors: 2e-5)
    warmup_steps: int = 0               # linear warmup, in optimizer steps
    warmup_ratio: float = 0.0           # > 0: warmup = ceil(ratio * total optimizer steps) instead (TRL's warmup_ratio)
    min_lr_ratio: float = 0.1           # cosine decays to lr * this at the last optimizer step
    max_grad_norm: float = 1.0          # global gradient-norm clip (<= 0: only measured)
    weight_decay: float = 0.0           # AdamW decoupled decay on matrices (LoRA A/B under LoRA)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    micro_batch_size: int = 16          # completions per forward/backward (>= K: whole groups, several per pass;
                                        #   < K: chunks of one group, the prompt then runs once per chunk)
    mu: int = 1                         # policy updates (optimizer steps) per rollout; > 1 recomputes pi_old first


@dataclass
class LoRAConfig:
    enabled: bool = True                # False = full fine-tuning
    r: int = 8                          # the authors' rank
    alpha: float = 16.0                 # scale = alpha / r
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))


@dataclass
class ReferenceConfig:
    source: str = "auto"                # KL reference (used only when objective.beta > 0): "auto" = the adapter
                                        #   switched off under LoRA (no second copy), else a frozen copy of the
                                        #   starting weights; or a path to another HF folder


@dataclass
class GRPORunConfig:
    run_dir: str = "runs/grpo"
    model: ModelConfig = field(default_factory=ModelConfig)
    data_dir: str = ""                  # dataset dir (python -m twice.data prepare)
    task: TaskConfig = field(default_factory=TaskConfig)   # prompt builder: identical to SFT's T3 and eval's
    sasrec_dir: str = ""                # frozen SASRec for rho_cf (SASRec.load)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    log: LogConfig = field(default_factory=LogConfig)   # optional TensorBoard / W&B mirrors (twice/logsink.py)
    shared_prefix: bool = True          # run each group's prompt once in training (False: the K-times layout)
    steps: int = 100                    # rollouts (each gives optim.mu optimizer steps)
    epochs: float = 0.0                 # > 0: steps = ceil(epochs * eligible users / rollout.prompts_per_step)
                                        #   instead (the authors train 2 epochs over the training users)
    log_every: int = 1                  # console line every N steps (metrics.jsonl gets every step)
    checkpoint_every: int = 50          # steps between checkpoints (0 = only the final one)
    keep_checkpoints: int = 3
    seed: int = 0
    threads: int = 0                    # torch CPU threads per process (0 = torch's default; 1 on a shared CPU box)
    progress: bool = True               # tqdm bar over steps on rank 0 (ETA, live reward); log.txt keeps every line
    dump_grads: bool = False            # debugging/tests: write each step's accumulated (pre-clip) gradient of the
                                        #   first update to run_dir/grads/step_XXXXXX.safetensors (full tensors)


def check_config(cfg: GRPORunConfig) -> None:
    c = cfg
    for name, ok in [("model.path", bool(c.model.path)), ("data_dir", bool(c.data_dir)), ("sasrec_dir", bool(c.sasrec_dir)),
                     ("rollout.group_size >= 1", c.rollout.group_size >= 1),
                     ("rollout.prompts_per_step >= 1", c.rollout.prompts_per_step >= 1),
                     ("rollout.prefill_chunk >= 1 or null", c.rollout.prefill_chunk is None or c.rollout.prefill_chunk >= 1),
                     ("rollout.decode in eager|static|compiled", c.rollout.decode in ("eager", "static", "compiled")),
                     ("optim.micro_batch_size >= 1", c.optim.micro_batch_size >= 1), ("optim.mu >= 1", c.optim.mu >= 1),
                     ("model.dtype in auto|bfloat16|float32", c.model.dtype in precision.CHOICES),
                     ("model.attn_implementation in sdpa|eager", c.model.attn_implementation in ATTN_IMPLEMENTATIONS),
                     ("rollout.split in train|valid", c.rollout.split in ("train", "valid")),
                     ("steps >= 1", c.steps >= 1),
                     ("rollout.max_new_tokens >= 1", c.rollout.max_new_tokens == "auto" or c.rollout.max_new_tokens >= 1),
                     ("rollout.max_new_tokens: auto needs rollout.budget_from (stage 1's rationales.jsonl)",
                      c.rollout.max_new_tokens != "auto" or bool(c.rollout.budget_from)),
                     ("0 < rollout.budget_quantile <= 1", 0 < c.rollout.budget_quantile <= 1), ("epochs >= 0", c.epochs >= 0),
                     ("0 <= optim.warmup_ratio < 1", 0 <= c.optim.warmup_ratio < 1)]:
        if not ok:
            raise ConfigError(f"config: {name} is required / violated")
    check_weights(c.rewards.weights)
    if c.rollout.max_new_tokens == "auto" and not Path(c.rollout.budget_from).expanduser().is_file():
        raise ConfigError(f"config: rollout.budget_from: {c.rollout.budget_from} does not exist (stage 1's "
                          f"rationales.jsonl, needed by rollout.max_new_tokens: auto)")
    if c.lora.enabled and c.lora.dropout != 0:
        # the sampler runs without dropout: with it the trainer's first-update ratio pi_theta/pi_old would not be 1
        raise ConfigError(f"config: lora.dropout must be 0 in GRPO (got {c.lora.dropout}): the sampler runs without "
                          f"dropout, so dropout in the trainer makes pi_old != pi_theta at the first update")


# ----------------------------------------------------------------------------------------------------------------
# Small pure helpers

def row_seed(seed: int, step: int, prompt_idx: int, k: int) -> int:
    """The sampler seed of completion k of global prompt `prompt_idx` at `step`: a pure function, so a resumed run
    draws exactly the same completions and no generator state has to be saved."""
    h = hashlib.blake2b(f"{seed}/{step}/{prompt_idx}/{k}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2


def user_at(users: list[int], seed: int, i: int) -> int:
    """Global prompt index i -> user idx: epoch i // n walks a fresh seeded permutation of the eligible users."""
    n = len(users)
    epoch, j = divmod(i, n)
    perm = users[:]
    random.Random(f"grpo-order/{seed}/{epoch}").shuffle(perm)
    return perm[j]


@dataclass
class Group:                  # one prompt and what we need to reward its K completions
    prompt_idx: int           # global index in the prompt stream
    user: int
    prompt: list[int]         # token ids (BOS + chat template)
    target_id: str
    candidate_ids: list[str]
    history: list[int]        # what SASRec reads for rho_cf (rewards.cf_history): the items the prompt shows, or
                              #   the split's full history
    candidates: list[int]     # candidate item idxs (target included), for the rho_cf probes in the log


def build_group(ds, tok, cfg: GRPORunConfig, users: list[int], i: int) -> Group:
    """Global prompt i -> Group. Raises ValueError when the prompt cannot fit the token budget (caller skips)."""
    u = user_at(users, cfg.seed, i)
    split = cfg.rollout.split
    target = ds.target(u, split)
    # negatives: seeded by (seed, prompt index), so a resumed run rebuilds the same candidate list
    cands = sample_candidates(ds, ds.user(u), target, cfg.task.n_negatives, random.Random(f"grpo-cands/{cfg.seed}/{i}"))
    ex = recommend_example(ds, ds.user(u), split, cands, cfg.task, tokenizer=tok, reasoning=cfg.rollout.reasoning,
                           with_response=False)
    history = ex.history if cfg.rewards.cf_history == "prompt" else ds.history(u, split)
    return Group(i, u, prompt_ids(tok, ex), ex.target_id, ex.candidate_ids, history, cands)


@torch.no_grad()
def cf_logits(sasrec, ds, groups: list[Group], texts: list[list[str]], item_tag: str, think_tag: str):
    """SASRec logit of the item each completion names (None: no <item> or not in the catalogue), in one batch."""
    from twice.rewards import parse_completion
    out, rows = [], []
    for g, grp in enumerate(groups):
        for k, text in enumerate(texts[g]):
            item = parse_completion(text, think_tag, item_tag).item
            idx = ds.item_by_id.get(normalize_item(item)) if item is not None else None
            out.append(None)
            if idx is not None:
                rows.append((len(out) - 1, grp.history, idx))
    if rows:
        dev = next(sasrec.parameters()).device
        hist = left_pad([r[1] for r in rows], sasrec.cfg.maxlen).to(dev)
        items = torch.tensor([[r[2]] for r in rows], device=dev)
        z = sasrec.score(hist, items)[:, 0].float().cpu().tolist()  # [n]
        for (j, _, _), zj in zip(rows, z):
            out[j] = zj
    return out


@torch.no_grad()
def cf_probe(sasrec, groups: list[Group], ds) -> tuple[list[float], list[float]]:
    """rho_cf of each group's target and of its other (randomly drawn, unseen) candidates, on the history the reward
    reads: the calibration the log shows next to the policy's answers ([n_groups], [sum of negatives])."""
    dev = next(sasrec.parameters()).device
    target, others = [], []
    for g in groups:  # a few groups per step: one tiny SASRec call each (candidate counts may differ)
        hist = left_pad([g.history], sasrec.cfg.maxlen).to(dev)
        p = torch.sigmoid(sasrec.score(hist, torch.tensor([g.candidates], device=dev)).float())[0].cpu().tolist()
        t = ds.item_by_id[g.target_id]
        target += [x for c, x in zip(g.candidates, p) if c == t]
        others += [x for c, x in zip(g.candidates, p) if c != t]
    return target, others


def response_lengths(path: Path, ds, tok, tags) -> tuple[list[int], int]:
    """Token lengths of the T3 responses SFT trains on (twice.tasks.recommend_example: <think>clean(rationale)</think>
    <item>ID</item>, + the closing end-of-turn the sampler stops on) for every usable record of a stage-1
    rationales.jsonl. Bad lines (no JSON, no rationale, target out of range) are counted, not fatal. -> (lengths, skipped)"""
    from twice.prompts import clean
    out, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                rat, tgt = str(r.get("rationale") or "").strip(), int(r["target"])
                if not rat or not 1 <= tgt <= ds.n_items:
                    raise ValueError
            except (ValueError, KeyError, TypeError):
                skipped += 1
                continue
            out.append(len(tok.encode(tags.wrap_think(clean(rat)) + tags.wrap_item(ds.items[tgt].id))) + 1)
    return out, skipped


def completion_budget(lengths: list[int], q: float) -> int:
    """The q-quantile of the lengths, nearest rank (the smallest length with at least a q share at or below it)."""
    if not lengths:
        raise ValueError("no usable T3 response to size the completion budget from")
    xs = sorted(lengths)
    return xs[max(0, math.ceil(q * len(xs)) - 1)]


def micro_batches(n_groups: int, K: int, mbs: int) -> list[tuple[list[int], int, int]]:
    """Split the rank's G*K rows into passes: (group indices, first k, rows per group). mbs >= K packs whole groups
    (mbs // K per pass); mbs < K cuts each group into chunks of mbs rows (sizes differ by at most the remainder)."""
    if mbs >= K:
        per = mbs // K
        return [(list(range(g, min(g + per, n_groups))), 0, K) for g in range(0, n_groups, per)]
    return [([g], k0, min(mbs, K - k0)) for g in range(n_groups) for k0 in range(0, K, mbs)]


def completion_logprobs(model, prompts: list[list[int]], comp: torch.Tensor, mask: torch.Tensor, k_per: int,
                        temperature: float, shared: bool, return_entropy: bool, device):
    """log pi(completion token | prompt, earlier tokens) [R, Tc] fp32 (and entropy) for R = len(prompts) * k_per rows
    (row r belongs to prompts[r // k_per]). shared=True: each prompt runs once (Gemma3 shared_prefix path); False:
    the K-times layout [prompt ; completion] per row. Both go through the fused kernel (no [tokens x V] logits)."""
    R, Tc = comp.shape
    targets = comp.masked_fill(~mask, -100).to(device)
    if shared:
        P = max(len(p) for p in prompts)
        pids = torch.zeros(len(prompts), P, dtype=torch.long)
        for g, p in enumerate(prompts):
            pids[g, :len(p)] = torch.as_tensor(p)
        sp = SharedPrefix(pids.to(device), torch.tensor([len(p) for p in prompts], device=device), k_per)
        return model(comp.to(device), shared_prefix=sp, targets=targets, temperature=temperature,
                     return_entropy=return_entropy)
    lens = [len(prompts[r // k_per]) for r in range(R)]
    L = max(lens) + Tc
    ids = torch.zeros(R, L, dtype=torch.long)
    tg = torch.full((R, L), -100, dtype=torch.long)
    for r in range(R):  # right-padded: pads after every real token need no attention mask
        pl = lens[r]
        ids[r, :pl] = torch.as_tensor(prompts[r // k_per])
        ids[r, pl:pl + Tc] = comp[r]
        tg[r, pl - 1:pl - 1 + Tc] = targets[r].cpu()  # position pl-1+t predicts completion token t
    out = model(ids.to(device), targets=tg.to(device), temperature=temperature, return_entropy=return_entropy)
    idx = (torch.tensor(lens)[:, None] - 1 + torch.arange(Tc)[None]).to(device)  # [R, Tc]
    if return_entropy:
        return out[0].gather(1, idx), out[1].gather(1, idx)
    return out.gather(1, idx)


def now() -> float:
    """Wall clock for the phase timings; on GPU, after the queued kernels finished (else phases blur)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


def dump_grads(model, path: Path, is_main: bool) -> None:
    """Full gradients of the trainable parameters (collective under FSDP2: every rank gathers)."""
    from safetensors.torch import save_file
    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad and p.grad is not None:
            g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[n] = g.detach().float().cpu().contiguous()
    if is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(grads, str(path))


# ----------------------------------------------------------------------------------------------------------------
# The run's phases, in the order main() calls them

@dataclass
class Ctx:                      # what every phase reads: set up once, never mutated by the loop
    cfg: GRPORunConfig
    info: object                # dist.init_distributed(): rank, world_size, device, is_main
    run_dir: Path
    log: RunLog                 # log(msg): rank 0 -> console + log.txt
    tok: Tokenizer
    ds: object                  # twice.data.Dataset
    sasrec: SASRec
    users: list[int]            # users with a prompt for rollout.split
    total_opt_steps: int
    warmup: int


def open_run(cfg: GRPORunConfig, info):
    """Run dir, resolved config.yaml and the logger (rank 0 writes; the bar, when on, prints above itself)."""
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    return run_dir, RunLog(run_dir / "log.txt", info.is_main)


def policy_load(cfg: GRPORunConfig, dev) -> tuple[torch.dtype, str]:
    """(compute dtype, delta load mode) of the policy: twice/precision.py training_load."""
    return precision.training_load(cfg.model.dtype, dev, cfg.model.path,
                                   lora_targets=tuple(cfg.lora.targets) if cfg.lora.enabled else ())


def build_policy(cfg: GRPORunConfig, dev):
    """Model (+ LoRA, + FSDP2), reference, optimizer: same seed on every rank before wrapping."""
    dist.seed_everything(cfg.seed)
    compute, delta = policy_load(cfg, dev)
    dtype = precision.param_dtype(compute, dist.is_distributed())
    # SFT's final/ carries its lora_delta: "adapters" = exact bf16 base + frozen fp32 delta, the new LoRA stacked on
    # it (bf16 compute); "merged" = the fp32 path, the delta riding along (model.lora_delta). Either way the export
    # writes the total delta (twice/checkpoint.py export_hf)
    model = Gemma3.from_pretrained(cfg.model.path, dtype=dtype, device=dev, delta=delta)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    model.set_attn_implementation(cfg.model.attn_implementation)
    ref_model = None
    if cfg.objective.beta > 0 and (cfg.reference.source != "auto" or not cfg.lora.enabled):
        # a separate reference folder with a delta: in bf16 its delta stays exact as frozen adapters
        ref_delta = "merged" if compute == torch.float32 else "adapters"
        ref_model = (copy.deepcopy(model) if cfg.reference.source == "auto"
                     else Gemma3.from_pretrained(cfg.reference.source, dtype=dtype, device=dev, delta=ref_delta))
        ref_model.set_attn_implementation(cfg.model.attn_implementation).requires_grad_(False).eval()
        ref_model = dist.wrap_fsdp(ref_model, mixed_precision=precision.fsdp_mixed(compute))
    if cfg.lora.enabled:
        apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets),
                   dropout=cfg.lora.dropout, seed=cfg.seed)
    model = dist.wrap_fsdp(model, mixed_precision=precision.fsdp_mixed(compute))
    opt = build_adamw(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas)
    return model, ref_model, opt


def load_inputs(cfg: GRPORunConfig, info, run_dir: Path, log) -> Ctx:
    """Tokenizer, dataset, reward model (refused if it belongs to another catalogue), eligible users; resolves
    rollout.max_new_tokens: auto, epochs -> steps and warmup_ratio -> warmup steps."""
    tok = Tokenizer.from_pretrained(cfg.model.path)
    ds = load_dataset(cfg.data_dir)
    sasrec = SASRec.load(cfg.sasrec_dir, device=info.device)
    check_dataset(sasrec, ds, cfg.sasrec_dir)  # one line, before any rollout: another catalogue's scores are wrong
    back = {"train": 4, "valid": 3}[cfg.rollout.split]  # need a non-empty history before the target
    users = [u.idx for u in ds.users if len(u.items) >= back]
    if not users:
        raise ValueError(f"{cfg.data_dir}: no user has >= {back} items (needed for a {cfg.rollout.split} prompt)")
    if cfg.rollout.max_new_tokens == "auto":  # sized from the data SFT trained on, not a guess
        path = Path(cfg.rollout.budget_from).expanduser()
        lens, bad = response_lengths(path, ds, tok, cfg.task.tags)
        if not lens:
            raise ConfigError(f"rollout.max_new_tokens: auto: {path} has no usable T3 response ({bad} bad lines); "
                              f"give rollout.max_new_tokens a number")
        cfg.rollout.max_new_tokens = completion_budget(lens, cfg.rollout.budget_quantile)
        log(f"rollout.max_new_tokens auto = {cfg.rollout.max_new_tokens}: q{cfg.rollout.budget_quantile:g} of "
            f"{len(lens)} SFT T3 response lengths in {path} (min {min(lens)}, max {max(lens)}; {bad} lines skipped)")
    if cfg.epochs > 0:  # one epoch = every eligible user prompted once (user_at walks a fresh permutation per epoch)
        cfg.steps = math.ceil(cfg.epochs * len(users) / cfg.rollout.prompts_per_step)
    total_opt_steps = cfg.steps * cfg.optim.mu
    warmup = math.ceil(cfg.optim.warmup_ratio * total_opt_steps) if cfg.optim.warmup_ratio > 0 else cfg.optim.warmup_steps
    return Ctx(cfg, info, run_dir, log, tok, ds, sasrec, users, total_opt_steps, warmup)


def resume(c: Ctx, model, opt) -> int:
    """Latest checkpoint -> the step to start at (0 when none); per-rank RNG streams either way."""
    P_step = c.cfg.rollout.prompts_per_step
    state = load_latest(c.run_dir / "checkpoints", model, opt)
    start = state["step"] if state else 0
    if state:
        if state["data"].get("prompt_cursor") != start * P_step:
            raise ValueError(f"{state['path']}: data cursor {state['data']} does not match step {start} x "
                             f"prompts_per_step {P_step} (was prompts_per_step changed?)")
        c.log(f"resumed from {state['path']} at step {start}")
        if c.info.is_main:  # steps logged after the checkpoint are redone: drop their lines
            for name in ("metrics.jsonl", "completions.jsonl"):
                rewrite_metrics(c.run_dir / name, start)
    if not state:  # per-rank streams from here on (a resume restored each rank's own streams instead)
        dist.seed_everything(c.cfg.seed + 1000 * c.info.rank)
    return start


def build_prompts(c: Ctx, step: int) -> tuple[list[Group], int]:
    """This rank's strided share of the step's global prompt indices; a prompt that cannot fit is a counted skip."""
    P_step, R, W = c.cfg.rollout.prompts_per_step, c.info.rank, c.info.world_size
    groups, skipped = [], 0
    for i in range(step * P_step + R, (step + 1) * P_step, W):
        try:
            groups.append(build_group(c.ds, c.tok, c.cfg, c.users, i))
        except ValueError as e:  # the prompt cannot fit the budget: a counted, logged skip
            skipped += 1
            c.log(f"skip prompt {i}: {e}") if c.info.is_main else print(f"[rank {R}] skip prompt {i}: {e}")
    return groups, skipped


def sample(c: Ctx, model, engine: Engine, groups: list[Group], step: int):
    """K completions per prompt; weights gathered ONCE for the whole rollout (collective: every rank enters). One
    engine for the run: a compiled decode step (rollout.decode) is traced once, not once per rollout."""
    ro, K = c.cfg.rollout, c.cfg.rollout.group_size
    model.eval()
    with torch.no_grad(), dist.unsharded(model):
        res = None
        if groups:
            seeds = [row_seed(c.cfg.seed, step, g.prompt_idx, k) for g in groups for k in range(K)]
            res = engine.generate(
                [g.prompt for g in groups], num_samples=K, max_new_tokens=ro.max_new_tokens,
                temperature=ro.temperature, top_k=ro.top_k, top_p=ro.top_p, stop_strings=ro.stop_strings, seeds=seeds)
    model.train()
    return res


@dataclass
class Scored:                   # the rollout's rewards: this rank's rows, and every rank's (for the log)
    rewards: list[float]        # [G*K] this rank's totals
    parts: dict                 # reward name -> [G*K] this rank's components
    adv: torch.Tensor           # [G*K] this rank's advantages
    adv_all: torch.Tensor       # [global rows]
    adv_stats: dict
    gathered: list              # [(rank, rewards, parts, diag)] over all ranks


def score(c: Ctx, groups: list[Group], res) -> Scored:
    """Rewards (local), calibration probes, then advantages over the GLOBAL batch (all_gather: batch-std needs every
    group)."""
    rc, obj, K, R, W = c.cfg.rewards, c.cfg.objective, c.cfg.rollout.group_size, c.info.rank, c.info.world_size
    texts = [res.texts[g * K:(g + 1) * K] for g in range(len(groups))] if res else []
    logits = cf_logits(c.sasrec, c.ds, groups, texts, rc.item_tag, rc.think_tag)
    ctxs = [RewardContext(texts[g][k], grp.target_id, frozenset(grp.candidate_ids), logits[g * K + k], rc.lam,
                          rc.tau, rc.think_tag, rc.item_tag, rc.cf_outside_candidates)
            for g, grp in enumerate(groups) for k in range(K)]
    rewards, parts = compute_rewards(ctxs, rc.weights) if ctxs else ([], {})
    # calibration probes for the log: rho_cf of the target and of the random candidates (same history as the
    # reward), of the answers that name a catalogue item, and how often an answer leaves the candidate list
    cf_target, cf_random = cf_probe(c.sasrec, groups, c.ds)
    diag = {"cf_target": cf_target, "cf_random": cf_random, "outside": [float(outside_candidates(x)) for x in ctxs],
            "cf_named": [parts["cf"][r] for r, x in enumerate(ctxs) if x.cf_logit is not None]}
    gathered = [(R, rewards, parts, diag)]
    if dist.is_distributed() and W > 1:
        gathered = [None] * W
        torch.distributed.all_gather_object(gathered, (R, rewards, parts, diag))
    all_rewards = [x for _, r, _, _ in gathered for x in r]
    mine = sum(len(r) for rr, r, _, _ in gathered if rr < R)  # offset of this rank's rows in the global list
    if all_rewards:
        adv_all, adv_stats = group_advantages(torch.tensor(all_rewards, dtype=torch.float64), K,
                                              obj.scale_rewards, obj.adv_eps, obj.std_floor)
    else:
        adv_all, adv_stats = torch.zeros(0, dtype=torch.float64), {"zero_std_groups": 0, "n_groups": 0}
    adv = adv_all[mine:mine + len(rewards)].float()  # [G*K] this rank's rows
    return Scored(rewards, parts, adv, adv_all, adv_stats, gathered)


@dataclass
class Passes:                   # the rollout cut into forward/backward passes, the same count on every rank
    groups: list[Group]
    mbs: list                   # micro_batches(): (group indices, first k, rows per group)
    n_pass: int                 # max over ranks (FSDP2 would hang on unequal counts): extra passes are padding
    mask: torch.Tensor          # [G*K, N] bool completion tokens
    tokens: torch.Tensor        # [G*K, N]
    global_seqs: float          # sequences and completion tokens of this step over ALL ranks (policy_loss shares)
    global_tokens: float


def plan_passes(c: Ctx, groups: list[Group], res) -> Passes:
    K = c.cfg.rollout.group_size
    mbs = micro_batches(len(groups), K, c.cfg.optim.micro_batch_size)
    n_pass = int(dist.all_reduce_max(torch.tensor([len(mbs)], dtype=torch.long)))
    mask = res.mask if res else torch.zeros(0, 1, dtype=torch.bool)  # [G*K, N]
    tokens = res.tokens_padded if res else torch.zeros(0, 1, dtype=torch.long)
    totals = torch.tensor([float(len(groups) * K), float(mask.sum())], dtype=torch.float64)
    dist.all_reduce_sum(totals)
    return Passes(groups, mbs, n_pass, mask, tokens, float(totals[0]), float(totals[1]))


def pass_batch(c: Ctx, ps: Passes, j: int):
    """Pass j -> (prompts, completion tokens [r, Tc], mask, rows, k_per, weight); weight 0 = a padding pass."""
    K, tok = c.cfg.rollout.group_size, c.tok
    if j < len(ps.mbs):
        gi, k0, kp = ps.mbs[j]
        rows = [g * K + k0 + k for g in gi for k in range(kp)]
        m = ps.mask[rows]
        Tc = max(1, int(m.sum(1).max()))
        return [ps.groups[g].prompt for g in gi], ps.tokens[rows, :Tc], m[:, :Tc], rows, kp, 1.0
    # a padding pass: a real forward/backward with loss * 0, so every FSDP unit runs its collectives
    return [[tok.bos_id, tok.bos_id]], torch.full((1, 1), tok.bos_id), torch.ones(1, 1, dtype=torch.bool), [], 1, 0.0


def pass_logprobs(c: Ctx, model, b, entropy: bool = False):
    prompts, comp, m, rows, kp, w = b
    return completion_logprobs(model, prompts, comp, m, kp, c.cfg.rollout.temperature, c.cfg.shared_prefix, entropy,
                               c.info.device)


def old_and_ref_logprobs(c: Ctx, model, ref_model, ps: Passes) -> tuple[dict, dict]:
    """pi_old (only when mu > 1) and pi_ref (only when beta > 0) per pass, no grad."""
    mu, beta = c.cfg.optim.mu, c.cfg.objective.beta
    old_lp, ref_lp = {}, {}
    if mu > 1 or beta > 0:
        with torch.no_grad():
            for j in range(ps.n_pass):
                b = pass_batch(c, ps, j)
                if mu > 1:
                    old_lp[j] = pass_logprobs(c, model, b)
                if beta > 0:
                    if ref_model is not None:
                        ref_lp[j] = pass_logprobs(c, ref_model, b)
                    else:
                        with lora_disabled(model):
                            ref_lp[j] = pass_logprobs(c, model, b)
    return old_lp, ref_lp


def update(c: Ctx, model, opt, ps: Passes, sc: Scored, res, old_lp: dict, ref_lp: dict, step: int) -> dict:
    """mu policy updates, each one optimizer step over all passes (gradient accumulation) -> all-reduced statistics."""
    cfg, obj, mu, dev = c.cfg, c.cfg.objective, c.cfg.optim.mu, c.info.device
    loss_scale = c.info.world_size if dist.is_fsdp(model) else 1  # FSDP averages grads over ranks; loss uses totals
    max_len = obj.max_len or cfg.rollout.max_new_tokens
    sums = torch.zeros(8, dtype=torch.float64)  # token-weighted sums, all-reduced for logging
    gap_sum = torch.zeros(3, dtype=torch.float64)  # sum |sampler full / truncated logprob - trainer logp|, tokens
    seq_is = []  # per sequence: pi_theta(o) / pi_sampler(o), the truncated sampler's (first update)
    ratio_ext = [float("inf"), float("-inf")]  # first update: min/max token ratio pi_theta / pi_old
    gnorms, lr = [], cfg.optim.lr
    for it in range(mu):
        first = it == 0
        for j in range(ps.n_pass):
            b = pass_batch(c, ps, j)
            prompts, comp, m, rows, kp, w = b
            out = pass_logprobs(c, model, b, entropy=first)
            logp, ent = out if first else (out, None)
            m_dev = m.to(dev)
            a = sc.adv[rows].to(dev) if rows else torch.zeros(1, device=dev)
            loss, met = policy_loss(logp, old_lp.get(j), a, m_dev, eps_low=obj.eps_low, eps_high=obj.eps_high,
                                    loss_norm=obj.loss_norm, max_len=max_len, global_tokens=ps.global_tokens,
                                    global_seqs=ps.global_seqs, ref_logp=ref_lp.get(j), beta=obj.beta)
            (loss * (loss_scale * w)).backward()
            if w == 0:
                continue
            if first and j in old_lp:
                ratio_ext = [min(ratio_ext[0], float(met["ratio_min"])), max(ratio_ext[1], float(met["ratio_max"]))]
            ntok = float(m.sum())
            sums += torch.tensor([float(met["clip_frac_low"]) * ntok, float(met["clip_frac_high"]) * ntok,
                                  float(met["kl"]) * ntok, float(met["approx_kl"]) * ntok,
                                  float(loss.detach()), float(met["pg_loss"]),
                                  float((ent.detach() * m_dev).sum()) if ent is not None else 0.0, ntok],
                                 dtype=torch.float64)
            if first and res is not None:
                full = res.full_logprobs_padded[rows, :m.shape[1]].to(dev)
                trunc = res.logprobs_padded[rows, :m.shape[1]].to(dev)  # top-k/top-p renormalised
                lp = logp.detach().float()
                gap_sum += torch.tensor([float(((full - lp).abs() * m_dev).sum()),
                                         float(((trunc - lp).abs() * m_dev).sum()), ntok], dtype=torch.float64)
                seq_is += torch.exp(((lp - trunc) * m_dev).sum(1)).double().cpu().tolist()
        if cfg.dump_grads and first:
            dump_grads(model, c.run_dir / "grads" / f"step_{step + 1:06d}.safetensors", c.info.is_main)
        gnorms.append(float(clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.max_grad_norm)))
        lr = lr_at(step * mu + it, c.total_opt_steps, c.warmup, cfg.optim.lr, cfg.optim.min_lr_ratio)
        set_lr(opt, lr)
        opt.step()
        opt.zero_grad(set_to_none=True)
    dist.all_reduce_sum(sums)
    dist.all_reduce_sum(gap_sum)
    is_t = torch.tensor([float(sum(seq_is)), float(len(seq_is))], dtype=torch.float64)
    dist.all_reduce_sum(is_t)
    ext = torch.tensor([-min(seq_is, default=float("inf")), -ratio_ext[0], ratio_ext[1]], dtype=torch.float64)
    dist.all_reduce_max(ext)  # max of negated = min over ranks
    ntok = max(float(sums[7]), 1.0)
    u = {
        "lr": lr, "grad_norm": sum(gnorms) / len(gnorms), "grad_norm_max": max(gnorms),  # over all mu optimizer steps
        "clip_frac_low": float(sums[0]) / ntok, "clip_frac_high": float(sums[1]) / ntok,
        **({"kl": float(sums[2]) / ntok} if obj.beta > 0 else {}),  # no reference pass at beta = 0: nothing to log
        "approx_kl_old": float(sums[3]) / ntok,
        # entropy was summed once (first update) but ntok counts mu passes: the "* mu" undoes that
        "loss": float(sums[4]) / mu, "pg_loss": float(sums[5]) / mu, "entropy": float(sums[6]) / ntok * mu,
        # trainer vs sampler, first update: mean |logp diff| to the untruncated distribution (numerics only) and to
        # the truncated one the tokens were drawn from (top-k/top-p mismatch), and pi_theta(o)/pi_sampler(o)
        "logp_gap": float(gap_sum[0]) / max(float(gap_sum[2]), 1.0),
        "logp_gap_sampler": float(gap_sum[1]) / max(float(gap_sum[2]), 1.0),
        "is_ratio_seq_mean": float(is_t[0]) / max(float(is_t[1]), 1.0), "is_ratio_seq_min": -float(ext[0]),
    }
    if mu > 1:  # pi_old is recomputed: at the first update pi_theta == pi_old, every token ratio exactly 1
        u["ratio_first_update_min"], u["ratio_first_update_max"] = -float(ext[1]), float(ext[2])
    return u


def step_record(c: Ctx, step: int, sc: Scored, ps: Passes, res, skipped: int, upd: dict, times: dict) -> dict:
    """One metrics.jsonl line: global means (sums all-reduced), reward components from the gathered rows."""
    tau = c.cfg.rewards.tau
    mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0  # noqa: E731
    comp_names = sorted({n for _, _, p, _ in sc.gathered for n in p})
    comp_vals = {n: [x for _, _, p, _ in sc.gathered for x in p.get(n, [])] for n in comp_names}
    dg = {n: [x for _, _, _, d in sc.gathered for x in d[n]] for n in sc.gathered[0][3]}
    all_rewards = [x for _, r, _, _ in sc.gathered for x in r]
    lens = [int(x) for x in ps.mask.sum(1).tolist()]
    len_max = int(dist.all_reduce_max(torch.tensor([max(lens, default=0)], dtype=torch.long)))
    lens_t = torch.tensor([float(sum(lens)), float(len(lens)), float(skipped),
                           float(sum(r == "length" for r in res.stop_reasons) if res else 0)], dtype=torch.float64)
    dist.all_reduce_sum(lens_t)
    n_rows = max(float(lens_t[1]), 1.0)
    return {
        "step": step + 1, "lr": upd.pop("lr"),
        "reward": mean(all_rewards), **{f"reward/{n}": mean(v) for n, v in comp_vals.items()},
        "match_rate": mean(comp_vals.get("match", [])), "cf_mean": mean(comp_vals.get("cf", [])),
        # rho_cf calibration (is tau meaningful?): target, random candidates, the answers naming a catalogue item
        "cf/target": mean(dg["cf_target"]), "cf/random_candidate": mean(dg["cf_random"]),
        "cf/answer": mean(dg["cf_named"]), "cf/answer_ge_tau": mean([float(x >= tau) for x in comp_vals.get("cf", [])]),
        "cf/target_ge_tau": mean([float(x >= tau) for x in dg["cf_target"]]),
        "cf/random_candidate_ge_tau": mean([float(x >= tau) for x in dg["cf_random"]]),
        "outside_candidates_rate": mean(dg["outside"]),
        "format_rate": mean(comp_vals.get("struct", [])),
        "zero_std_groups": sc.adv_stats["zero_std_groups"], "groups": sc.adv_stats["n_groups"],
        "adv_abs_mean": float(sc.adv_all.abs().mean()) if sc.adv_all.numel() else 0.0,
        **upd,
        "completion_len_mean": float(lens_t[0]) / n_rows, "completion_len_max": len_max,
        "truncated_frac": float(lens_t[3]) / n_rows,  # ended on the length limit: no </item>, usually cg = 0
        "skipped_prompts": int(lens_t[2]),
        **{f"time/{k}": v for k, v in times.items()},
        "tokens_per_s/sample": float(lens_t[0]) / max(times["sample"], 1e-9),
        "tokens_per_s/step": float(lens_t[0]) / max(times["step"], 1e-9),
        "compute_dtype": precision.dtype_name(policy_load(c.cfg, c.info.device)[0]),
    }


def log_line(rec: dict, steps: int) -> str:
    return (f"step {rec['step']:5d}/{steps} | reward {rec['reward']:.3f} match {rec['match_rate']:.3f} "
            f"cf {rec['cf_mean']:.3f} (target {rec['cf/target']:.2f} random {rec['cf/random_candidate']:.2f} "
            f">=tau {rec['cf/answer_ge_tau']:.2f}) outside {rec['outside_candidates_rate']:.2f} "
            f"fmt {rec['format_rate']:.2f} trunc {rec['truncated_frac']:.2f} | zero-std {rec['zero_std_groups']}/"
            f"{rec['groups']} |adv| {rec['adv_abs_mean']:.3f} clip {rec['clip_frac_low']:.3f}/"
            f"{rec['clip_frac_high']:.3f}" + (f" kl {rec['kl']:.4f}" if "kl" in rec else "") +
            f" ent {rec['entropy']:.3f} gap {rec['logp_gap']:.2e}/{rec['logp_gap_sampler']:.2e} "
            f"is_min {rec['is_ratio_seq_min']:.3f} | len {rec['completion_len_mean']:.0f} | lr {rec['lr']:.2e} "
            f"gnorm {rec['grad_norm']:.3f} | t sample {rec['time/sample']:.1f}s reward {rec['time/reward']:.1f}s "
            f"logp {rec['time/logprobs']:.1f}s update {rec['time/update']:.1f}s | {rec['tokens_per_s/step']:.0f} tok/s")


def log_completions(cfg: GRPORunConfig, comp_f, step: int, groups: list[Group], sc: Scored, res) -> None:
    K = cfg.rollout.group_size
    for r in range(min(cfg.rollout.log_completions, len(groups) * K)):
        g = groups[r // K]
        comp_f.write({"step": step + 1, "user": g.user, "prompt_idx": g.prompt_idx, "k": r % K,
                      "target": g.target_id, "reward": sc.rewards[r], "adv": float(sc.adv[r]),
                      **{n: sc.parts[n][r] for n in ("match", "cf", "cg", "format")}, "text": res.texts[r]})


# ----------------------------------------------------------------------------------------------------------------
# The run

def main(argv: list[str]) -> dict:
    cfg = parse_args(GRPORunConfig, argv)
    check_config(cfg)
    check_inputs(("model.path", cfg.model.path, "model"), ("data_dir", cfg.data_dir, "dataset"),
                 ("sasrec_dir", cfg.sasrec_dir, "sasrec"))  # before any model load: one line naming the field
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    info = dist.init_distributed()
    run_dir, log = open_run(cfg, info)
    model, ref_model, opt = build_policy(cfg, info.device)
    c = load_inputs(cfg, info, run_dir, log)
    start = resume(c, model, opt)
    engine = Engine(model, c.tok, prefill_chunk=cfg.rollout.prefill_chunk, decode=cfg.rollout.decode,
                    dtype=policy_load(cfg, info.device)[0])  # FSDP2 bf16: fp32 masters, bf16 activations + cache
    metrics_f = JsonlWriter(run_dir / "metrics.jsonl", info.is_main)
    sink = open_sinks(cfg.log, run_dir, cfg, enabled=info.is_main)
    comp_f = JsonlWriter(run_dir / "completions.jsonl", info.is_main)
    log(f"GRPO: {len(c.users)} users, K={cfg.rollout.group_size}, {cfg.rollout.prompts_per_step} prompts/step over "
        f"{info.world_size} rank(s), {cfg.steps} steps (warmup {c.warmup}), lora={cfg.lora.enabled}, "
        f"shared_prefix={cfg.shared_prefix}, mu={cfg.optim.mu}, beta={cfg.objective.beta}")

    last = {}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="GRPO", unit="step", dynamic_ncols=True,
               disable=not info.is_main or not cfg.progress)  # ETA + live reward; the full line goes to log.txt
    for step in bar:
        t_step = now()
        groups, skipped = build_prompts(c, step)                            # 1. this rank's prompts
        t0 = now()
        res = sample(c, model, engine, groups, step)                        # 2. K completions each
        t_sample, t0 = now() - t0, now()
        sc = score(c, groups, res)                                          # 3. rewards -> global advantages
        ps = plan_passes(c, groups, res)                                    # 4. micro-batches, same count per rank
        t_reward, t0 = now() - t0, now()
        old_lp, ref_lp = old_and_ref_logprobs(c, model, ref_model, ps)      # 5. pi_old / pi_ref when needed
        t_logprobs, t0 = now() - t0, now()
        upd = update(c, model, opt, ps, sc, res, old_lp, ref_lp, step)      # 6. mu optimizer steps
        times = {"sample": t_sample, "reward": t_reward, "logprobs": t_logprobs, "update": now() - t0,
                 "step": now() - t_step}
        rec = step_record(c, step, sc, ps, res, skipped, upd, times)        # 7. log
        metrics_f.write(rec)
        sink.write(rec)
        log_completions(cfg, comp_f, step, groups, sc, res)
        if (step + 1) % cfg.log_every == 0 or step == start:
            log(log_line(rec, cfg.steps))
        bar.set_postfix(reward=f"{rec['reward']:.3f}", match=f"{rec['match_rate']:.2f}", refresh=False)
        last = rec
        if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or step + 1 == cfg.steps:  # 8. save
            save_checkpoint(run_dir / "checkpoints", step + 1, model, opt,
                            data={"prompt_cursor": (step + 1) * cfg.rollout.prompts_per_step},
                            config=cfg, keep_last=cfg.keep_checkpoints, trainable_only=cfg.lora.enabled)
    bar.close()
    for f in (metrics_f, comp_f, sink):
        f.close()

    # ---- final policy as an HF folder (LoRA merged), tokenizer copied
    export_hf(model, run_dir / "final", tokenizer_path=Path(cfg.model.path) / "tokenizer.model")
    log(f"done: {run_dir / 'final'}")
    log.close()
    dist.cleanup()
    return last


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"train_grpo.py: config error: {e}")
