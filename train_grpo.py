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
    -> log (console + metrics.jsonl + completions.jsonl) -> checkpoint

Run dir: config.yaml, metrics.jsonl, completions.jsonl, log.txt, checkpoints/step_XXXXXX (exact resume: weights,
AdamW, RNG streams, data cursor; rollout seeds are a pure function of (seed, step, prompt index, k)), final/ (HF
folder, LoRA merged, tokenizer.model copied).
"""
from __future__ import annotations

import copy
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from twice import dist
from twice.checkpoint import export_hf, load_latest, rewrite_metrics, save_checkpoint
from twice.config import ConfigError, parse_args, save_config
from twice.data import load_dataset
from twice.engine import Engine
from twice.gemma3 import Gemma3, SharedPrefix
from twice.grpo import ObjectiveConfig, group_advantages, policy_loss
from twice.lora import TARGETS, apply_lora, lora_disabled
from twice.optim import build_adamw, clip_grad_norm_, lr_at, set_lr
from twice.rewards import RewardConfig, RewardContext, check_weights, compute_rewards, normalize_item
from twice.sasrec import SASRec, left_pad
from twice.tasks import TaskConfig, prompt_ids, recommend_example, sample_candidates
from twice.tokenizer import Tokenizer


# ----------------------------------------------------------------------------------------------------------------
# Config

@dataclass
class ModelConfig:
    path: str = ""                      # HF folder: the SFT run's final/ (variant E) or the base model (variant C)
    dtype: str = "float32"              # parameter dtype; keep float32 under FSDP2 (bf16 compute comes from its
                                        # mixed-precision policy on GPU, fp32 master weights); bfloat16 for 1-proc runs
    gradient_checkpointing: bool = False  # recompute each block in backward (activation memory ~ one block)


@dataclass
class RolloutConfig:
    group_size: int = 16                # K completions per prompt (the paper: 16)
    prompts_per_step: int = 8           # prompts per rollout, GLOBAL (split over ranks, strided)
    max_new_tokens: int = 300           # completion budget (the paper: 300)
    temperature: float = 1.0            # sampling temperature; the trainer's log-probs use the same temperature
    top_k: Optional[int] = None         # None = off. top-k/top-p make the sampler's policy differ from the trained
    top_p: float = 1.0                  #   one (grpo.md 9.6): the canary metric logp_gap shows by how much
    stop_strings: list[str] = field(default_factory=lambda: ["</item>"])  # stop once the answer is closed
    reasoning: bool = True              # T3 prompts (<think> then <item>); False: T2 item-only prompts (RQ6 (C);
                                        #   then drop the think-tag format terms, e.g. rewards.weights={cg: 1.0})
    split: str = "train"                # which leave-one-out target the prompts ask for (train = items[-3])
    log_completions: int = 4            # completions per step dumped to completions.jsonl (rank 0's first rows)
    prefill_chunk: Optional[int] = None  # prefill prompts in chunks of this many tokens (bounds attention memory
                                        #   of long prompts, e.g. 2048 for 6k-token prompts); None = one pass


@dataclass
class OptimConfig:
    lr: float = 2e-5                    # peak learning rate (the authors: 2e-5)
    warmup_steps: int = 0               # linear warmup, in optimizer steps
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
    shared_prefix: bool = True          # run each group's prompt once in training (False: the K-times layout)
    steps: int = 100                    # rollouts (each gives optim.mu optimizer steps)
    log_every: int = 1                  # console line every N steps (metrics.jsonl gets every step)
    checkpoint_every: int = 50          # steps between checkpoints (0 = only the final one)
    keep_checkpoints: int = 3
    seed: int = 0
    threads: int = 0                    # torch CPU threads per process (0 = torch's default; 1 on a shared CPU box)
    dump_grads: bool = False            # debugging/tests: write each step's accumulated (pre-clip) gradient of the
                                        #   first update to run_dir/grads/step_XXXXXX.safetensors (full tensors)


def check_config(cfg: GRPORunConfig) -> None:
    c = cfg
    for name, ok in [("model.path", bool(c.model.path)), ("data_dir", bool(c.data_dir)), ("sasrec_dir", bool(c.sasrec_dir)),
                     ("rollout.group_size >= 1", c.rollout.group_size >= 1),
                     ("rollout.prompts_per_step >= 1", c.rollout.prompts_per_step >= 1),
                     ("rollout.prefill_chunk >= 1 or null", c.rollout.prefill_chunk is None or c.rollout.prefill_chunk >= 1),
                     ("optim.micro_batch_size >= 1", c.optim.micro_batch_size >= 1), ("optim.mu >= 1", c.optim.mu >= 1),
                     ("model.dtype in float32|bfloat16", c.model.dtype in ("float32", "bfloat16")),
                     ("rollout.split in train|valid", c.rollout.split in ("train", "valid")),
                     ("steps >= 1", c.steps >= 1)]:
        if not ok:
            raise ConfigError(f"config: {name} is required / violated")
    check_weights(c.rewards.weights)


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
    history: list[int]        # the user's full history for this split (SASRec input)


def build_group(ds, tok, cfg: GRPORunConfig, users: list[int], i: int) -> Group:
    """Global prompt i -> Group. Raises ValueError when the prompt cannot fit the token budget (caller skips)."""
    u = user_at(users, cfg.seed, i)
    split = cfg.rollout.split
    target = ds.target(u, split)
    # negatives: seeded by (seed, prompt index), so a resumed run rebuilds the same candidate list
    cands = sample_candidates(ds, ds.user(u), target, cfg.task.n_negatives, random.Random(f"grpo-cands/{cfg.seed}/{i}"))
    ex = recommend_example(ds, ds.user(u), split, cands, cfg.task, tokenizer=tok, reasoning=cfg.rollout.reasoning,
                           with_response=False)
    return Group(i, u, prompt_ids(tok, ex), ex.target_id, ex.candidate_ids, ds.history(u, split))


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


class JsonlWriter:
    """Append-only JSONL on rank 0, flushed per line (a kill loses at most the line being written)."""

    def __init__(self, path: Path, enabled: bool):
        self.f = open(path, "a", encoding="utf-8") if enabled else None

    def write(self, rec: dict) -> None:
        if self.f:
            self.f.write(json.dumps(rec) + "\n")
            self.f.flush()


# ----------------------------------------------------------------------------------------------------------------
# The run

def main(argv: list[str]) -> dict:
    cfg = parse_args(GRPORunConfig, argv)
    check_config(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    info = dist.init_distributed()
    dev, R, W = info.device, info.rank, info.world_size
    run_dir = Path(cfg.run_dir)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log_f = open(run_dir / "log.txt", "a") if info.is_main else None

    def log(msg: str) -> None:
        if info.is_main:
            print(msg, flush=True)
            log_f.write(msg + "\n")
            log_f.flush()

    # ---- model (+ LoRA, + FSDP2), reference, optimizer: same seed on every rank before wrapping
    dist.seed_everything(cfg.seed)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.model.dtype]
    model = Gemma3.from_pretrained(cfg.model.path, dtype=dtype, device=dev)
    model.gradient_checkpointing = cfg.model.gradient_checkpointing
    ref_model = None
    if cfg.objective.beta > 0 and (cfg.reference.source != "auto" or not cfg.lora.enabled):
        ref_model = (copy.deepcopy(model) if cfg.reference.source == "auto"
                     else Gemma3.from_pretrained(cfg.reference.source, dtype=dtype, device=dev))
        ref_model.requires_grad_(False).eval()
        ref_model = dist.wrap_fsdp(ref_model)
    if cfg.lora.enabled:
        apply_lora(model, r=cfg.lora.r, alpha=cfg.lora.alpha, targets=tuple(cfg.lora.targets),
                   dropout=cfg.lora.dropout, seed=cfg.seed)
    model = dist.wrap_fsdp(model)
    opt = build_adamw(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, betas=cfg.optim.betas)
    tok = Tokenizer.from_pretrained(cfg.model.path)
    ds = load_dataset(cfg.data_dir)
    sasrec = SASRec.load(cfg.sasrec_dir, device=dev)
    back = {"train": 4, "valid": 3}[cfg.rollout.split]  # need a non-empty history before the target
    users = [u.idx for u in ds.users if len(u.items) >= back]
    if not users:
        raise ValueError(f"{cfg.data_dir}: no user has >= {back} items (needed for a {cfg.rollout.split} prompt)")
    K, P_step, mu = cfg.rollout.group_size, cfg.rollout.prompts_per_step, cfg.optim.mu
    total_opt_steps = cfg.steps * mu
    loss_scale = W if dist.is_fsdp(model) else 1  # FSDP averages grads over ranks; our loss uses global totals
    obj = cfg.objective
    max_len = obj.max_len or cfg.rollout.max_new_tokens

    # ---- resume
    state = load_latest(run_dir / "checkpoints", model, opt)
    start = state["step"] if state else 0
    if state:
        if state["data"].get("prompt_cursor") != start * P_step:
            raise ValueError(f"{state['path']}: data cursor {state['data']} does not match step {start} x "
                             f"prompts_per_step {P_step} (was prompts_per_step changed?)")
        log(f"resumed from {state['path']} at step {start}")
        if info.is_main:  # steps logged after the checkpoint are redone: drop their lines
            for name in ("metrics.jsonl", "completions.jsonl"):
                rewrite_metrics(run_dir / name, start)
    if not state:  # per-rank streams from here on (a resume restored each rank's own streams instead)
        dist.seed_everything(cfg.seed + 1000 * R)
    metrics_f = JsonlWriter(run_dir / "metrics.jsonl", info.is_main)
    comp_f = JsonlWriter(run_dir / "completions.jsonl", info.is_main)
    log(f"GRPO: {len(users)} users, K={K}, {P_step} prompts/step over {W} rank(s), {cfg.steps} steps, "
        f"lora={cfg.lora.enabled}, shared_prefix={cfg.shared_prefix}, mu={mu}, beta={obj.beta}")

    last = {}
    for step in range(start, cfg.steps):
        t_step = now()
        # ---- 1. prompts: this rank's strided share of the step's global prompt indices
        groups, skipped = [], 0
        for i in range(step * P_step + R, (step + 1) * P_step, W):
            try:
                groups.append(build_group(ds, tok, cfg, users, i))
            except ValueError as e:  # the prompt cannot fit the budget: a counted, logged skip
                skipped += 1
                log(f"skip prompt {i}: {e}") if info.is_main else print(f"[rank {R}] skip prompt {i}: {e}")
        # ---- 2. sample: weights gathered ONCE for the whole rollout (collective: every rank enters)
        t0 = now()
        model.eval()
        with torch.no_grad(), dist.unsharded(model):
            res = None
            if groups:
                seeds = [row_seed(cfg.seed, step, g.prompt_idx, k) for g in groups for k in range(K)]
                res = Engine(model, tok, prefill_chunk=cfg.rollout.prefill_chunk).generate(
                    [g.prompt for g in groups], num_samples=K, max_new_tokens=cfg.rollout.max_new_tokens,
                    temperature=cfg.rollout.temperature, top_k=cfg.rollout.top_k, top_p=cfg.rollout.top_p,
                    stop_strings=cfg.rollout.stop_strings, seeds=seeds)
        model.train()
        t_sample = now() - t0

        # ---- 3. rewards (local), then advantages over the GLOBAL batch (all_gather: batch-std needs every group)
        t0 = now()
        texts = [res.texts[g * K:(g + 1) * K] for g in range(len(groups))] if res else []
        rc = cfg.rewards
        logits = cf_logits(sasrec, ds, groups, texts, rc.item_tag, rc.think_tag)
        ctxs = [RewardContext(texts[g][k], grp.target_id, frozenset(grp.candidate_ids), logits[g * K + k], rc.lam,
                              rc.tau, rc.think_tag, rc.item_tag) for g, grp in enumerate(groups) for k in range(K)]
        rewards, parts = compute_rewards(ctxs, rc.weights) if ctxs else ([], {})
        gathered = [(R, rewards, parts)]
        if dist.is_distributed() and W > 1:
            gathered = [None] * W
            torch.distributed.all_gather_object(gathered, (R, rewards, parts))
        all_rewards = [x for _, r, _ in gathered for x in r]
        mine = sum(len(r) for rr, r, _ in gathered if rr < R)  # offset of this rank's rows in the global list
        if all_rewards:
            adv_all, adv_stats = group_advantages(torch.tensor(all_rewards, dtype=torch.float64), K,
                                                  obj.scale_rewards, obj.adv_eps, obj.std_floor)
        else:
            adv_all, adv_stats = torch.zeros(0, dtype=torch.float64), {"zero_std_groups": 0, "n_groups": 0}
        adv = adv_all[mine:mine + len(rewards)].float()  # [G*K] this rank's rows
        t_reward = now() - t0

        # ---- 4. micro-batches; every rank runs the SAME number of passes (FSDP2 would hang otherwise)
        n_rows = len(groups) * K
        mbs = micro_batches(len(groups), K, cfg.optim.micro_batch_size)
        n_pass = torch.tensor([len(mbs)], dtype=torch.long)
        n_pass = int(dist.all_reduce_max(n_pass))
        mask_all = res.mask if res else torch.zeros(0, 1, dtype=torch.bool)  # [G*K, N]
        tok_all = res.tokens_padded if res else torch.zeros(0, 1, dtype=torch.long)
        totals = torch.tensor([float(n_rows), float(mask_all.sum())], dtype=torch.float64)
        dist.all_reduce_sum(totals)  # global sequences and completion tokens of this step (policy_loss shares)
        global_seqs, global_tokens = float(totals[0]), float(totals[1])

        def batch(j: int):
            """Pass j -> (prompts, completion tokens [r, Tc], mask, rows, k_per, weight); weight 0 = a padding pass."""
            if j < len(mbs):
                gi, k0, kp = mbs[j]
                rows = [g * K + k0 + k for g in gi for k in range(kp)]
                m = mask_all[rows]
                Tc = max(1, int(m.sum(1).max()))
                return [groups[g].prompt for g in gi], tok_all[rows, :Tc], m[:, :Tc], rows, kp, 1.0
            # a padding pass: a real forward/backward with loss * 0, so every FSDP unit runs its collectives
            return [[tok.bos_id, tok.bos_id]], torch.full((1, 1), tok.bos_id), torch.ones(1, 1, dtype=torch.bool), [], 1, 0.0

        def logprobs_pass(b, m_=None, entropy=False):
            prompts, comp, m, rows, kp, w = b
            return completion_logprobs(model if m_ is None else m_, prompts, comp, m, kp, cfg.rollout.temperature, cfg.shared_prefix,
                                       entropy, dev)

        # ---- 5. old / reference log-probs (no grad), only when needed
        t0 = now()
        old_lp, ref_lp = {}, {}
        if mu > 1 or obj.beta > 0:
            with torch.no_grad():
                for j in range(n_pass):
                    b = batch(j)
                    if mu > 1:
                        old_lp[j] = logprobs_pass(b)
                    if obj.beta > 0:
                        if ref_model is not None:
                            ref_lp[j] = logprobs_pass(b, ref_model)
                        else:
                            with lora_disabled(model):
                                ref_lp[j] = logprobs_pass(b)
        t_logprobs = now() - t0

        # ---- 6. mu policy updates, each one optimizer step over all passes (gradient accumulation)
        t0 = now()
        sums = torch.zeros(8, dtype=torch.float64)  # token-weighted sums, all-reduced for logging
        gap_sum = torch.zeros(2, dtype=torch.float64)  # sum |sampler full_logprob - trainer logp|, tokens
        for it in range(mu):
            opt_step = step * mu + it
            for j in range(n_pass):
                b = batch(j)
                prompts, comp, m, rows, kp, w = b
                first = it == 0
                out = logprobs_pass(b, entropy=first)
                logp, ent = out if first else (out, None)
                m_dev = m.to(dev)
                a = adv[rows].to(dev) if rows else torch.zeros(1, device=dev)
                loss, met = policy_loss(logp, old_lp.get(j), a, m_dev, eps_low=obj.eps_low, eps_high=obj.eps_high,
                                        loss_norm=obj.loss_norm, max_len=max_len, global_tokens=global_tokens,
                                        global_seqs=global_seqs, ref_logp=ref_lp.get(j), beta=obj.beta)
                (loss * (loss_scale * w)).backward()
                if w > 0:
                    ntok = float(m.sum())
                    sums += torch.tensor([float(met["clip_frac_low"]) * ntok, float(met["clip_frac_high"]) * ntok,
                                          float(met["kl"]) * ntok, float(met["approx_kl"]) * ntok,
                                          float(loss.detach()), float(met["pg_loss"]),
                                          float((ent.detach() * m_dev).sum()) if ent is not None else 0.0, ntok],
                                         dtype=torch.float64)
                    if first and res is not None:
                        sampler = res.full_logprobs_padded[rows, :m.shape[1]].to(dev)
                        gap_sum += torch.tensor([float(((sampler - logp.detach()).abs() * m_dev).sum()), ntok],
                                                dtype=torch.float64)
            if cfg.dump_grads and it == 0:
                dump_grads(model, run_dir / "grads" / f"step_{step + 1:06d}.safetensors", info.is_main)
            gnorm = clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.optim.max_grad_norm)
            lr = lr_at(opt_step, total_opt_steps, cfg.optim.warmup_steps, cfg.optim.lr, cfg.optim.min_lr_ratio)
            set_lr(opt, lr)
            opt.step()
            opt.zero_grad(set_to_none=True)
        t_update = now() - t0

        # ---- 7. log: global means (sums all-reduced), reward components from the gathered rows
        dist.all_reduce_sum(sums)
        dist.all_reduce_sum(gap_sum)
        ntok = max(float(sums[7]), 1.0)
        comp_names = sorted({n for _, _, p in gathered for n in p})
        comp_vals = {n: [x for _, _, p in gathered for x in p.get(n, [])] for n in comp_names}
        mean = lambda xs: float(sum(xs) / len(xs)) if xs else 0.0
        lens = [int(x) for x in mask_all.sum(1).tolist()]
        len_max = int(dist.all_reduce_max(torch.tensor([max(lens, default=0)], dtype=torch.long)))
        lens_t = torch.tensor([float(sum(lens)), float(len(lens)), 0.0,
                               float(skipped), float(res.mask.shape[0] if res else 0),
                               float(sum(r == "length" for r in res.stop_reasons) if res else 0)], dtype=torch.float64)
        dist.all_reduce_sum(lens_t)
        dt_step = now() - t_step
        rec = {
            "step": step + 1, "lr": lr, "grad_norm": float(gnorm),
            "reward": mean(all_rewards), **{f"reward/{n}": mean(v) for n, v in comp_vals.items()},
            "match_rate": mean(comp_vals.get("match", [])), "cf_mean": mean(comp_vals.get("cf", [])),
            "format_rate": mean(comp_vals.get("struct", [])),
            "zero_std_groups": adv_stats["zero_std_groups"], "groups": adv_stats["n_groups"],
            "adv_abs_mean": float(adv_all.abs().mean()) if adv_all.numel() else 0.0,
            "clip_frac_low": float(sums[0]) / ntok, "clip_frac_high": float(sums[1]) / ntok,
            "kl": float(sums[2]) / ntok, "approx_kl_old": float(sums[3]) / ntok,
            "loss": float(sums[4]) / mu, "pg_loss": float(sums[5]) / mu, "entropy": float(sums[6]) / ntok * mu,
            "logp_gap": float(gap_sum[0]) / max(float(gap_sum[1]), 1.0),
            "completion_len_mean": float(lens_t[0]) / max(float(lens_t[1]), 1.0),
            "completion_len_max": len_max, "truncated_frac": float(lens_t[5]) / max(float(lens_t[4]), 1.0),
            "skipped_prompts": int(lens_t[3]),
            "time/sample": t_sample, "time/reward": t_reward, "time/logprobs": t_logprobs, "time/update": t_update,
            "time/step": dt_step, "tokens_per_s/sample": float(lens_t[0]) / max(t_sample, 1e-9),
            "tokens_per_s/step": float(lens_t[0]) / max(dt_step, 1e-9),
        }
        # entropy was summed once (first update) but ntok counts mu passes: the "* mu" above undoes that
        metrics_f.write(rec)
        for r in range(min(cfg.rollout.log_completions, n_rows)):
            g = groups[r // K]
            comp_f.write({"step": step + 1, "user": g.user, "prompt_idx": g.prompt_idx, "k": r % K,
                          "target": g.target_id, "reward": rewards[r], "adv": float(adv[r]),
                          **{n: parts[n][r] for n in ("match", "cf", "cg", "format")}, "text": res.texts[r]})
        if (step + 1) % cfg.log_every == 0 or step == start:
            log(f"step {step + 1:5d}/{cfg.steps} | reward {rec['reward']:.3f} match {rec['match_rate']:.3f} "
                f"cf {rec['cf_mean']:.3f} fmt {rec['format_rate']:.2f} | zero-std {rec['zero_std_groups']}/"
                f"{rec['groups']} |adv| {rec['adv_abs_mean']:.3f} clip {rec['clip_frac_low']:.3f}/"
                f"{rec['clip_frac_high']:.3f} kl {rec['kl']:.4f} ent {rec['entropy']:.3f} gap {rec['logp_gap']:.2e} "
                f"| len {rec['completion_len_mean']:.0f} | lr {lr:.2e} gnorm {rec['grad_norm']:.3f} | "
                f"t sample {t_sample:.1f}s reward {t_reward:.1f}s logp {t_logprobs:.1f}s update {t_update:.1f}s "
                f"| {rec['tokens_per_s/step']:.0f} tok/s")
        last = rec

        # ---- 8. checkpoint (collective)
        done = step + 1 == cfg.steps
        if (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0) or done:
            save_checkpoint(run_dir / "checkpoints", step + 1, model, opt, data={"prompt_cursor": (step + 1) * P_step},
                            config=cfg, keep_last=cfg.keep_checkpoints, trainable_only=cfg.lora.enabled)

    # ---- final policy as an HF folder (LoRA merged), tokenizer copied
    export_hf(model, run_dir / "final", tokenizer_path=Path(cfg.model.path) / "tokenizer.model")
    log(f"done: {run_dir / 'final'}")
    dist.cleanup()
    return last


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"train_grpo.py: config error: {e}")
