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


# ---------------------------------------------------------------------------------------------------------------
# Baselines in closed form: what a model that knows nothing scores under each protocol (exact expectations, no
# simulation), so every table row can be read against chance.

def _dcg(r: int) -> float:
    return 1.0 / math.log2(r + 1)


def random_ranker(n_candidates: int, ks=(1, 5, 10)) -> dict[str, float]:
    """A uniformly random ranking of C candidates: the target's rank is uniform on 1..C, so
    HR@k = min(k, C)/C, NDCG@k = (1/C) * sum_{r <= min(k, C)} 1/log2(r+1), MRR = H_C / C."""
    C = n_candidates
    out = {}
    for k in ks:
        out[f"hr@{k}"] = min(k, C) / C
        out[f"ndcg@{k}"] = sum(_dcg(r) for r in range(1, min(k, C) + 1)) / C
    out["mrr"] = sum(1.0 / r for r in range(1, C + 1)) / C
    return out


def uniform_sampler_rank_probs(n_candidates: int, n_samples: int) -> list[float]:
    """P(rank = r), r = 1..n_samples, for n samples drawn uniformly with replacement from C candidates, read in
    sample order with duplicates dropped (the paper's sampling protocol). The target has rank r when it first
    appears after exactly r-1 distinct other items; a chain over (distinct non-targets seen) gives it exactly.
    The remaining mass 1 - sum is 'never sampled'."""
    C, K = n_candidates, n_samples
    state = {0: 1.0}           # d distinct non-targets seen, target not yet seen -> probability
    p_rank = [0.0] * K
    for _ in range(K):
        nxt: dict[int, float] = {}
        for d, p in state.items():
            p_rank[d] += p / C                                         # the target now: rank d + 1
            if d:
                nxt[d] = nxt.get(d, 0.0) + p * d / C                   # a non-target seen before
            if C - 1 - d > 0:
                nxt[d + 1] = nxt.get(d + 1, 0.0) + p * (C - 1 - d) / C  # a new non-target
        state = nxt
    return p_rank


def uniform_sampler(n_candidates: int, n_samples: int, ks=(1, 5)) -> dict[str, float]:
    """HR@k and NDCG@k of the uniform n-sample sampler under the sample-order protocol (exact expectation)."""
    p = uniform_sampler_rank_probs(n_candidates, n_samples)
    out = {}
    for k in ks:
        out[f"hr@{k}"] = sum(p[:k])
        out[f"ndcg@{k}"] = sum(pr * _dcg(r) for r, pr in enumerate(p[:k], 1))
    return out


def set_expectation(in_set: bool, n_distinct: int, k: int) -> tuple[float, float]:
    """(HR@k, NDCG@k) of one user when the answers pass through a Python set (the authors' evaluation_vllm.py):
    the order of a set of D distinct IDs is arbitrary (string hashing), so report the expectation over the D!
    orderings: the target is at each rank 1..D with probability 1/D. HR@k = 1[t in D] min(k, D)/D,
    NDCG@k = 1[t in D] * (1/D) sum_{r <= min(k, D)} 1/log2(r+1). (HR@k with k >= D does not depend on order.)"""
    if not in_set or n_distinct == 0:
        return 0.0, 0.0
    D = n_distinct
    return min(k, D) / D, sum(_dcg(r) for r in range(1, min(k, D) + 1)) / D


def uniform_sampler_set(n_candidates: int, n_samples: int, ks=(1, 5)) -> dict[str, float]:
    """The uniform n-sample sampler under the set protocol (set_expectation averaged over the draws, exactly):
    P(D distinct, target among them) = C(C-1, D-1) * surj(n, D) / C^n, surj = onto maps of n samples onto D items."""
    C, K = n_candidates, n_samples

    def surj(n: int, d: int) -> int:
        return sum((-1) ** i * math.comb(d, i) * (d - i) ** n for i in range(d + 1))

    out = {f"{m}@{k}": 0.0 for k in ks for m in ("hr", "ndcg")}
    for D in range(1, min(K, C) + 1):
        p = math.comb(C - 1, D - 1) * surj(K, D) / C ** K
        for k in ks:
            hr, nd = set_expectation(True, D, k)
            out[f"hr@{k}"] += p * hr
            out[f"ndcg@{k}"] += p * nd
    return out


# ---------------------------------------------------------------------------------------------------------------
# Paired comparisons: two models on the SAME users. Differences are tested on per-user pairs, which removes the
# between-user variance that makes two overlapping marginal intervals uninformative.

def paired_bootstrap(a, b, n_boot: int = 2000, alpha: float = 0.05, seed: int = 0) -> dict:
    """Mean of a - b over users and its percentile bootstrap interval, users resampled WITH their pairs (one index
    draw shared by a and b). -> {'diff', 'ci95', 'n'}."""
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1)
    b = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
    if a.shape != b.shape or a.numel() == 0:
        raise ValueError(f"paired_bootstrap needs two equally long non-empty lists, got {a.numel()} and {b.numel()}")
    d = a - b
    lo, hi = bootstrap_interval(d, n_boot=n_boot, alpha=alpha, seed=seed)
    return {"diff": float(d.mean()), "ci95": [lo, hi], "n": int(d.numel())}


def sign_test_p(n_pos: int, n_neg: int) -> float:
    """Two-sided exact binomial (p = 1/2) test on the non-tied pairs: min(1, 2 * P(X <= min(n_pos, n_neg)))."""
    n = n_pos + n_neg
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(n_pos, n_neg) + 1)) / 2 ** n)


def mcnemar_exact(a_hits, b_hits) -> dict:
    """McNemar's exact test for two paired hit/miss vectors (e.g. HR@1 per user): only the discordant users
    count, b10 = a hit & b miss, b01 = a miss & b hit; under H0 b10 ~ Binomial(b10 + b01, 1/2), two-sided
    p = min(1, 2 * P(X <= min(b10, b01))). -> {'a_only', 'b_only', 'p'}."""
    a_hits, b_hits = [bool(x) for x in a_hits], [bool(x) for x in b_hits]
    if len(a_hits) != len(b_hits):
        raise ValueError("mcnemar_exact needs paired vectors of the same length")
    n10 = sum(x and not y for x, y in zip(a_hits, b_hits))
    n01 = sum(y and not x for x, y in zip(a_hits, b_hits))
    return {"a_only": n10, "b_only": n01, "p": sign_test_p(n10, n01)}   # McNemar = sign test on discordant


def spearman(x, y) -> float | None:
    """Spearman rank correlation (Pearson on average ranks, ties averaged); None when either side is constant."""
    def ranks(v):
        v = [float(t) for t in v]
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2 + 1
            i = j + 1
        return r
    if len(x) != len(y):
        raise ValueError("spearman needs two equally long lists")
    rx, ry = ranks(x), ranks(y)
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)
