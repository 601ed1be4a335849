"""The GRPO objective of TWiCE-Rec stage 3 (paper Eq. 1), as pure tensor functions.

    python -m pytest tests/test_grpo.py             # golden values, analytic gradients, micro-batch invariance

Tensor contract (B sequences = n_groups * G completions, group-major: rows g*G .. g*G+G-1 share one prompt;
T = completion length, padded; all log-probs are of the SAMPLED completion tokens only, fp32):

    rewards     [B]     float, one scalar reward per completion (twice.rewards.compute_rewards)
    advantages  [B]     float, from group_advantages; constant over a sequence's tokens
    logp        [B, T]  log pi_theta(o_t | q, o_<t), differentiable
    old_logp    [B, T]  log pi_old, no grad; None when mu = 1 (one update per rollout: pi_old == pi_theta)
    ref_logp    [B, T]  log pi_ref (frozen SFT model / adapter off), no grad; only for the KL term
    mask        [B, T]  1 for a real completion token, 0 for padding (bool or float)

Eq. 1 (per token, then aggregated):   r_t = exp(logp_t - old_logp_t)
    l_t = -min(r_t * A, clip(r_t, 1 - eps_low, 1 + eps_high) * A)  +  beta * k3_t
    k3_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1              (unbiased, always >= 0, Schulman's k3)
With old_logp None the ratio is exp(logp - logp.detach()): value 1, gradient = d logp, i.e. the plain policy
gradient -A * d logp (paper Eq. 6 with the clip inactive).

Aggregation `loss_norm` (n_i = tokens of sequence i, N = sequences, M = tokens, L = max_len):
    seq_mean_token_mean  (1/N) sum_i (1/n_i) sum_t l_it      original GRPO (DeepSeekMath's 1/G sum_i 1/|o_i| sum_t)
    token_mean           (1/M) sum_it l_it                   DAPO; also what the authors ran (TRL 0.16.1, their
                                                              pin, takes the token mean over the micro-batch)
    constant             (1/(N L)) sum_it l_it               Dr. GRPO (no length, no std bias)
None of these is "the paper's": TWiCE-Rec's Eq. 1/6 write the ratio of SEQUENCE probabilities averaged over the K
outputs, with no 1/|o| at all; a per-token clipped loss has to pick one of the above.
N and M default to this micro-batch's own counts. For gradient accumulation and data parallelism pass
global_seqs / global_tokens = the totals over ALL micro-batches of the optimizer step and ALL ranks (all-reduced):
then each call returns its exact share, and the shares SUM to the full-batch loss, whatever the split
(tests/test_grpo.py checks values and gradients). Note: FSDP/DDP AVERAGE gradients over ranks, so with global
totals the caller multiplies the loss by world_size (or reduces with a sum) to keep the sum semantics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch


@dataclass
class ObjectiveConfig:
    scale_rewards: Literal["group", "batch", "none"] = "group"  # advantage scale: group std (GRPO), batch std (Lite PPO), none (Dr. GRPO)
    adv_eps: float = 1e-6  # added to the std in the advantage denominator
    std_floor: float = 1e-3  # the std is floored at this before dividing (NeMo-RL #4161: fp32 residue blew advantages up ~4000x)
    eps_low: float = 0.2  # PPO clip: ratio >= 1 - eps_low
    eps_high: Optional[float] = None  # clip-higher (DAPO: 0.28); None = eps_low (symmetric, the paper)
    loss_norm: Literal["seq_mean_token_mean", "token_mean", "constant"] = "seq_mean_token_mean"  # see the module docstring (authors: token_mean)
    max_len: Optional[int] = None  # the constant normaliser L for loss_norm=constant (max completion tokens)
    beta: float = 0.0  # k3 KL coefficient to the reference policy; 0 = no reference forward at all


def group_advantages(rewards: torch.Tensor, G: int, scale: str = "group", eps: float = 1e-6,
                     std_floor: float = 1e-3, unbiased: bool = True) -> tuple[torch.Tensor, dict]:
    """A = (rho - mean_group(rho)) / (max(std, std_floor) + eps), in float64, returned in rewards' float dtype.

    rewards [n_groups*G] group-major -> advantages [n_groups*G], stats (python numbers, for logging).
    scale: "group" = the group's own std (the paper), "batch" = the whole batch's std (group mean still subtracted),
    "none" = no division (Dr. GRPO). std is the sample std (Bessel, as torch.std / TRL / verl) unless unbiased=False.
    A group whose rewards are all equal (zero spread, and every group when G == 1) gets advantage EXACTLY 0 and is
    counted in stats["zero_std_groups"]; it stays in the batch so every rank runs the same forward/backward passes.
    std_floor (NeMo-RL PR #4161): fp32 rounding leaves std ~1.6e-4 where the true std is 0, which multiplied one
    sample's advantage ~4000x; continuous rewards (rho_cf) make near-equal groups common here, so the floor matters.
    """
    rewards = torch.as_tensor(rewards)
    if rewards.ndim != 1 or G < 1 or rewards.numel() % G != 0 or rewards.numel() == 0:
        raise ValueError(f"group_advantages: rewards must be 1-D with a positive multiple of G={G} entries, got shape {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"group_advantages: non-finite rewards at {torch.nonzero(~torch.isfinite(rewards)).flatten().tolist()}")
    if scale not in ("group", "batch", "none") or eps < 0 or std_floor < 0:
        raise ValueError(f"group_advantages: scale={scale!r} (group|batch|none), eps={eps}, std_floor={std_floor} (>= 0)")
    r = rewards.double().view(-1, G)  # [n_groups, G]
    zero = (r.max(dim=1).values == r.min(dim=1).values)  # [n_groups] exact: all rewards in the group equal
    centred = r - r.mean(dim=1, keepdim=True)
    if scale == "none":
        std = torch.ones_like(r[:, 0])
    elif scale == "group":
        std = r.std(dim=1, unbiased=unbiased) if G > 1 else torch.zeros_like(r[:, 0])
    else:
        std = (r.std(unbiased=unbiased) if r.numel() > 1 else r.new_zeros(())).expand(r.shape[0])
    denom = torch.where(zero, 1.0, std.clamp(min=std_floor) + eps) if scale != "none" else std  # [n_groups]
    adv = torch.where(zero[:, None], 0.0, centred / denom[:, None])  # [n_groups, G]
    stats = {
        "n_groups": r.shape[0],
        "zero_std_groups": int(zero.sum()),
        "frac_zero_std": float(zero.double().mean()),
        "floored_groups": int(((std < std_floor) & ~zero).sum()) if scale != "none" else 0,
        "reward_mean": float(r.mean()),
        "reward_std": float(r.std(unbiased=unbiased)) if r.numel() > 1 else 0.0,
        "adv_abs_mean": float(adv.abs().mean()),
    }
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return adv.view(-1).to(out_dtype), stats


def policy_loss(logp: torch.Tensor, old_logp: Optional[torch.Tensor], advantages: torch.Tensor, mask: torch.Tensor, *,
                eps_low: float = 0.2, eps_high: Optional[float] = None, loss_norm: str = "seq_mean_token_mean",
                max_len: Optional[int] = None, global_tokens: Optional[float] = None, global_seqs: Optional[float] = None,
                ref_logp: Optional[torch.Tensor] = None, beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    """Eq. 1 clipped-ratio loss (to MINIMISE) + beta * k3 KL, aggregated by `loss_norm`; see the module docstring."""
    B, T = logp.shape
    if (old_logp is not None and old_logp.shape != logp.shape) or mask.shape != logp.shape or advantages.shape != (B,) \
            or (ref_logp is not None and ref_logp.shape != logp.shape):
        raise ValueError(f"policy_loss: logp/old_logp/ref_logp/mask must be [B, T]={B, T} and advantages [B], got "
                         f"{[None if x is None else tuple(x.shape) for x in (old_logp, ref_logp, mask, advantages)]}")
    if beta > 0 and ref_logp is None:
        raise ValueError("policy_loss: beta > 0 needs ref_logp")
    eps_high = eps_low if eps_high is None else eps_high
    dt = torch.promote_types(logp.dtype, torch.float32)  # bf16 -> fp32 for the loss math; fp64 stays fp64
    logp, m, A = logp.to(dt), mask.to(dt), advantages.to(dt)[:, None]  # [B,T], [B,T], [B,1]
    old = logp.detach() if old_logp is None else old_logp.to(dt)
    log_ratio = logp - old  # [B,T]
    ratio = torch.exp(log_ratio)  # [B,T]; == 1 with old None, gradient still d logp
    pg = -torch.minimum(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A)  # [B,T]
    kl = None
    if ref_logp is not None:
        d = ref_logp.to(dt) - logp
        kl = torch.exp(d) - d - 1  # [B,T] k3
    per_tok = pg + beta * kl if (beta > 0) else pg  # [B,T]

    n_seq = float(B if global_seqs is None else global_seqs)
    n_tok = m.sum() if global_tokens is None else torch.as_tensor(global_tokens, dtype=dt, device=logp.device)
    if loss_norm == "seq_mean_token_mean":
        agg = lambda x: ((x * m).sum(1) / m.sum(1).clamp(min=1)).sum() / n_seq  # an all-padding row adds 0
    elif loss_norm == "token_mean":
        agg = lambda x: (x * m).sum() / n_tok.clamp(min=1)
    elif loss_norm == "constant":
        if not max_len:
            raise ValueError("policy_loss: loss_norm='constant' (Dr. GRPO) needs max_len")
        agg = lambda x: (x * m).sum() / (n_seq * max_len)
    else:
        raise ValueError(f"policy_loss: loss_norm={loss_norm!r}, expected seq_mean_token_mean | token_mean | constant")
    loss = agg(per_tok)

    with torch.no_grad():  # logging only: means over this micro-batch's real tokens
        mt = lambda x: (x * m).sum() / m.sum().clamp(min=1)
        metrics = {
            "pg_loss": agg(pg), "loss": loss.detach(),
            "clip_frac_low": mt(((ratio < 1 - eps_low) & (A < 0)).float()),  # clipped: no gradient from these
            "clip_frac_high": mt(((ratio > 1 + eps_high) & (A > 0)).float()),
            "ratio_mean": mt(ratio),
            "ratio_min": ratio.masked_fill(m == 0, float("inf")).min(), "ratio_max": ratio.masked_fill(m == 0, float("-inf")).max(),
            "approx_kl": mt(ratio - 1 - log_ratio),  # k3 estimate of KL(pi_old || pi_theta)
            "kl": mt(kl) if kl is not None else logp.new_zeros(()),
            "adv_abs_mean": A.abs().mean(), "tokens": m.sum(),
        }
    return loss, metrics
