"""Ranking metrics shared by every evaluation (SASRec and the LLM): HR@K, NDCG@K, MRR over 1-based ranks.

    from twice.metrics import rank_of_target, hit_rate, ndcg, mrr, wilson_interval
    ranks = rank_of_target(scores, target_index)          # scores [B, C], target_index [B] -> ranks [B] (1 = best)
    hit_rate(ranks, 10), ndcg(ranks, 10), mrr(ranks)

Conventions (the design contract):
  - A rank is 1-based: rank 1 means the ground-truth item scored highest.
  - Ties are broken PESSIMISTICALLY: every other candidate whose score equals the target's score is counted as
    ranked above it. A model that gives all candidates the same score therefore gets rank C (the worst), not 1
    and not a random rank; an optimistic rule would reward a collapsed model. RecBole's full-ranking evaluation
    (torch.topk) and most research code break ties arbitrarily, so they can differ from ours only on exact ties.
  - Excluded candidates (e.g. history items in full ranking) are given score -inf by the caller; they never
    count as above the target unless the target itself is -inf (then it is ranked last among them: pessimistic).
  - NaN scores are an error, not a silent rank.
  - HR@K = mean(rank <= K); NDCG@K = mean(1/log2(rank+1) if rank <= K else 0) (one relevant item, so IDCG = 1);
    MRR = mean(1/rank), or with k given, MRR@K = mean(1/rank if rank <= K else 0) (RecBole's MRR@10).
All functions are pure and return Python floats (or a LongTensor of ranks) so results are JSON-ready.
"""
from __future__ import annotations

import math

import torch


def _as_ranks(ranks) -> torch.Tensor:
    r = torch.as_tensor(ranks)
    if r.numel() == 0:
        raise ValueError("metrics need at least one rank (got an empty list)")
    if r.dtype.is_floating_point:
        if not torch.all(r == r.round()):
            raise ValueError("ranks must be integers (1-based)")
        r = r.long()
    if (r < 1).any():
        raise ValueError(f"ranks are 1-based; got a rank < 1 (min {int(r.min())})")
    return r.reshape(-1)


def rank_of_target(scores: torch.Tensor, target_index) -> torch.Tensor:
    """1-based rank of the target column in each row of `scores` [B, C]; ties count against the target.

    target_index: int (same column for every row) or LongTensor [B]. Returns LongTensor [B].
    rank = 1 + #{j != t : s_j > s_t} + #{j != t : s_j == s_t}   (pessimistic tie-break)
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [B, C], got shape {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; refusing to rank them")
    B, C = scores.shape
    t = torch.as_tensor(target_index, device=scores.device).long()
    if t.dim() == 0:
        t = t.expand(B)
    if t.shape != (B,) or (t < 0).any() or (t >= C).any():
        raise ValueError(f"target_index must be in [0, {C}) with shape [{B}]")
    target = scores.gather(1, t[:, None])  # [B, 1]
    at_least = (scores >= target).sum(dim=1)  # [B], includes the target itself
    return at_least.long()


def hit_rate(ranks, k: int) -> float:
    """HR@K: fraction of rows whose target is in the top K."""
    r = _as_ranks(ranks)
    return float((r <= k).double().mean())


def ndcg_gains(ranks, k: int) -> torch.Tensor:
    """Per-row NDCG@K gains [B] (float64) with a single relevant item: 1/log2(rank+1) inside the top K, 0 outside."""
    r = _as_ranks(ranks).double()
    return torch.where(r <= k, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r))


def ndcg(ranks, k: int) -> float:
    """NDCG@K: the mean of ndcg_gains."""
    return float(ndcg_gains(ranks, k).mean())


def mrr(ranks, k: int | None = None) -> float:
    """Mean reciprocal rank; with k, MRR@K (reciprocal rank counted only inside the top K)."""
    r = _as_ranks(ranks).double()
    rr = 1.0 / r
    if k is not None:
        rr = torch.where(r <= k, rr, torch.zeros_like(rr))
    return float(rr.mean())


def wilson_interval(successes: int | float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z=1.96) Wilson score interval for a rate successes/n (e.g. HR@K = hits / users).

    Wilson instead of the normal approximation because HR@1 on small test sets sits near 0 or 1, where
    p +- z*sqrt(p(1-p)/n) leaves [0, 1] or collapses to zero width.
    """
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must be in [0, n]; got {successes} of {n}")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values, n_boot: int = 1000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval for the mean of per-user values (e.g. per-user NDCG gains), seeded."""
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if v.numel() == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, v.numel(), (n_boot, v.numel()), generator=g)
    means = v[idx].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)).tolist()
    return lo, hi


def summarize(ranks, ks=(1, 5, 10)) -> dict[str, float]:
    """{'hr@k', 'ndcg@k', 'mrr@k' for each k, 'mrr', 'n'} for one protocol, plus 95% Wilson CIs on HR@K."""
    r = _as_ranks(ranks)
    out: dict[str, float] = {"n": int(r.numel())}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(r, k)
        lo, hi = wilson_interval(int((r <= k).sum()), r.numel())
        out[f"hr@{k}_ci95"] = [lo, hi]
        out[f"ndcg@{k}"] = ndcg(r, k)
        out[f"mrr@{k}"] = mrr(r, k)
    out["mrr"] = mrr(r)
    return out
