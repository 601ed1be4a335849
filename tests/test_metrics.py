"""twice.metrics on hand-computed cases (ranks, ties broken pessimistically, HR/NDCG/MRR, intervals)."""
import math

import pytest
import torch

from twice.metrics import (bootstrap_interval, hit_rate, mrr, ndcg, ndcg_gains, rank_of_target, summarize,
                           wilson_interval)

INF = float("inf")


def test_rank_of_target_orders_and_ties_pessimistic():
    s = torch.tensor([[3.0, 1.0, 2.0]])
    assert rank_of_target(s, 0).tolist() == [1]
    assert rank_of_target(s, 2).tolist() == [2]
    assert rank_of_target(s, 1).tolist() == [3]
    # all tied: the target ranks last (a collapsed model gets no credit), not first
    assert rank_of_target(torch.ones(1, 4), 0).tolist() == [4]
    assert rank_of_target(torch.ones(1, 4), 3).tolist() == [4]
    # one tie with the target: it is counted above the target, whichever column the target is in
    s = torch.tensor([[2.0, 1.0, 2.0, 0.0]])
    assert rank_of_target(s, 0).tolist() == [2]
    assert rank_of_target(s, 2).tolist() == [2]
    # per-row targets
    s = torch.tensor([[0.1, 0.9, 0.5], [0.7, 0.7, 0.2]])
    assert rank_of_target(s, torch.tensor([2, 1])).tolist() == [2, 2]


def test_rank_of_target_excluded_items_and_errors():
    s = torch.tensor([[-INF, 1.0, -INF, 0.5]])
    assert rank_of_target(s, 1).tolist() == [1]
    assert rank_of_target(s, 3).tolist() == [2]
    assert rank_of_target(s, 0).tolist() == [4]  # a -inf target ties with every excluded item: last
    with pytest.raises(ValueError, match="NaN"):
        rank_of_target(torch.tensor([[1.0, float("nan")]]), 0)
    with pytest.raises(ValueError):
        rank_of_target(torch.tensor([[1.0, 2.0]]), 2)


def test_hr_ndcg_mrr_hand_computed():
    ranks = [1, 2, 3, 11]
    assert hit_rate(ranks, 1) == pytest.approx(0.25)
    assert hit_rate(ranks, 3) == pytest.approx(0.75)
    assert hit_rate(ranks, 10) == pytest.approx(0.75)
    assert hit_rate(ranks, 11) == pytest.approx(1.0)
    assert ndcg(ranks, 10) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 4)
    assert ndcg(ranks, 1) == pytest.approx(0.25)
    assert ndcg(ranks, 2) == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert mrr(ranks) == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 11) / 4)
    assert mrr(ranks, 10) == pytest.approx((1 + 1 / 2 + 1 / 3) / 4)
    assert ndcg_gains(ranks, 2).tolist() == pytest.approx([1.0, 1 / math.log2(3), 0.0, 0.0])
    # tensor input gives the same numbers
    assert ndcg(torch.tensor(ranks), 10) == ndcg(ranks, 10)


def test_metrics_from_scores_with_ties_end_to_end():
    # 3 users, 4 candidates, target in column 0; user 2 is a full tie -> rank 4 (pessimistic)
    s = torch.tensor([[0.9, 0.1, 0.2, 0.3], [0.5, 0.5, 0.1, 0.0], [1.0, 1.0, 1.0, 1.0]])
    r = rank_of_target(s, 0)
    assert r.tolist() == [1, 2, 4]
    assert hit_rate(r, 1) == pytest.approx(1 / 3)
    assert ndcg(r, 5) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(5)) / 3)


def test_bad_ranks_rejected():
    with pytest.raises(ValueError):
        hit_rate([], 10)
    with pytest.raises(ValueError):
        ndcg([0, 1], 10)
    with pytest.raises(ValueError):
        mrr([1.5])


def test_wilson_interval_known_values():
    # textbook values for the 95% Wilson score interval
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(0.7225, abs=1e-4) and hi == pytest.approx(1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_bootstrap_interval():
    assert bootstrap_interval([0.5] * 20) == (pytest.approx(0.5), pytest.approx(0.5))
    v = torch.rand(500, generator=torch.Generator().manual_seed(0))
    lo, hi = bootstrap_interval(v, seed=1)
    assert lo < float(v.mean()) < hi
    assert (lo, hi) == bootstrap_interval(v, seed=1)  # seeded: reproducible
    # the mean of 500 U(0,1) has sd ~ 0.0129 -> a 95% interval about 0.05 wide
    assert 0.03 < hi - lo < 0.07


def test_summarize_keys():
    out = summarize([1, 3, 20], ks=(1, 10))
    assert out["n"] == 3
    assert out["hr@1"] == pytest.approx(1 / 3) and out["hr@10"] == pytest.approx(2 / 3)
    assert out["hr@10_ci95"] == list(wilson_interval(2, 3))
    assert out["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 20) / 3)


# ---------------------------------------------------------------------------------------------------------------
# closed-form baselines (issue 11 item 6), paired tests (item 7), the set protocol (item 8), Spearman (item 4)

import itertools  # noqa: E402

from twice.metrics import (mcnemar_exact, paired_bootstrap, random_ranker, set_expectation, spearman,  # noqa: E402
                           uniform_sampler, uniform_sampler_rank_probs, uniform_sampler_set)


def _brute_sampler(C, K, ks):
    """Every one of the C^K equally likely sample sequences (target = item 0), read in sample order / as a set."""
    order = {f"{m}@{k}": 0.0 for k in ks for m in ("hr", "ndcg")}
    as_set = dict(order)
    for seq in itertools.product(range(C), repeat=K):
        ranked = list(dict.fromkeys(seq))                       # sample order, duplicates dropped
        r = ranked.index(0) + 1 if 0 in ranked else None
        for k in ks:
            if r is not None and r <= k:
                order[f"hr@{k}"] += 1
                order[f"ndcg@{k}"] += 1 / math.log2(r + 1)
            # the set protocol: average over every ordering of the distinct IDs
            perms = list(itertools.permutations(ranked))
            for p in perms:
                if 0 in p[:k]:
                    as_set[f"hr@{k}"] += 1 / len(perms)
                    as_set[f"ndcg@{k}"] += 1 / math.log2(p.index(0) + 2) / len(perms)
    n = C ** K
    return {k: v / n for k, v in order.items()}, {k: v / n for k, v in as_set.items()}


def test_random_baselines_issue_numbers_30_candidates():
    # a random ranker on 30 candidates: HR@1 3.33, HR@5 16.67, NDCG@5 9.83 (issue 11 item 6)
    r = random_ranker(30, (1, 5))
    assert round(100 * r["hr@1"], 2) == 3.33 and round(100 * r["hr@5"], 2) == 16.67
    assert round(100 * r["ndcg@5"], 2) == 9.83
    assert r["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4) + 1 / math.log2(5)
                                         + 1 / math.log2(6)) / 30)
    assert r["mrr"] == pytest.approx(sum(1 / k for k in range(1, 31)) / 30)
    # the uniform 5-sample sampler: HR@5 = P(target drawn at least once) = 1 - (29/30)^5; HR@1 = 1/30 exactly (the
    # first sample is uniform). The issue's 3.30 / 15.58 / 9.39 are a simulation's estimates of 3.33 / 15.59 / 9.41.
    s = uniform_sampler(30, 5, (1, 5))
    assert s["hr@5"] == pytest.approx(1 - (29 / 30) ** 5)
    assert s["hr@1"] == pytest.approx(1 / 30)
    assert (round(100 * s["hr@1"], 2), round(100 * s["hr@5"], 2), round(100 * s["ndcg@5"], 2)) == (3.33, 15.59, 9.41)
    assert abs(100 * s["hr@1"] - 3.30) < 0.05 and abs(100 * s["hr@5"] - 15.58) < 0.05
    assert abs(100 * s["ndcg@5"] - 9.39) < 0.05
    assert sum(uniform_sampler_rank_probs(30, 5)) == pytest.approx(1 - (29 / 30) ** 5)
    # the set protocol gives the same expectations for a uniform sampler (symmetry), computed independently
    a = uniform_sampler_set(30, 5, (1, 5))
    assert a["hr@1"] == pytest.approx(1 / 30) and a["hr@5"] == pytest.approx(s["hr@5"])
    assert a["ndcg@5"] == pytest.approx(s["ndcg@5"])


@pytest.mark.parametrize("C,K", [(4, 3), (5, 4), (3, 5)])
def test_sampler_closed_forms_equal_enumeration(C, K):
    ks = (1, 2, 5)
    order, as_set = _brute_sampler(C, K, ks)
    got, got_set = uniform_sampler(C, K, ks), uniform_sampler_set(C, K, ks)
    for k in order:
        assert got[k] == pytest.approx(order[k], abs=1e-12), k
        assert got_set[k] == pytest.approx(as_set[k], abs=1e-12), k


def test_set_expectation_hand_computed():
    # D = {t, x, y}: t is first in 2 of the 6 orderings -> HR@1 = 1/3; HR@5 = 1 whatever the order
    assert set_expectation(True, 3, 1) == (pytest.approx(1 / 3), pytest.approx(1 / 3))
    hr5, nd5 = set_expectation(True, 3, 5)
    assert hr5 == 1.0 and nd5 == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert set_expectation(False, 3, 5) == (0.0, 0.0) and set_expectation(True, 0, 5) == (0.0, 0.0)
    # 7 distinct IDs, top 5: HR@5 = 5/7
    assert set_expectation(True, 7, 5)[0] == pytest.approx(5 / 7)


def test_mcnemar_exact_hand_computed():
    # discordant 3 vs 1: p = 2 * (C(4,0) + C(4,1)) / 2^4 = 0.625
    r = mcnemar_exact([1, 1, 1, 0, 0, 1], [0, 0, 0, 1, 0, 1])
    assert (r["a_only"], r["b_only"]) == (3, 1) and r["p"] == pytest.approx(0.625)
    # 6 vs 0: p = 2 / 2^6 = 0.03125; no discordant pairs: p = 1
    assert mcnemar_exact([1] * 6 + [0], [0] * 6 + [0])["p"] == pytest.approx(0.03125)
    assert mcnemar_exact([1, 0], [1, 0])["p"] == 1.0
    with pytest.raises(ValueError):
        mcnemar_exact([1], [1, 0])


def test_paired_bootstrap_uses_the_pairs():
    a, b = [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.0]
    r = paired_bootstrap(a, b)
    assert r["diff"] == pytest.approx(0.5) and r["n"] == 4
    assert r["ci95"] == list(bootstrap_interval([1.0, 0.0, 0.0, 1.0], n_boot=2000))
    # b = a - 0.03 with large between-user spread: the paired interval is exactly [0.03, 0.03] while the two marginal
    # intervals overlap (an unpaired reading would call it no difference)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(200, generator=g).tolist()
    y = [v - 0.03 for v in x]
    lo, hi = paired_bootstrap(x, y)["ci95"]
    assert lo == pytest.approx(0.03) and hi == pytest.approx(0.03)
    assert bootstrap_interval(y)[1] > bootstrap_interval(x)[0]
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 2.0])


def test_spearman_hand_computed():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [10, 20, 30]) == pytest.approx(1.0)
    # ties take average ranks: x ranks [1, 2.5, 2.5, 4], y ranks [1, 3, 2, 4] -> 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([2, 2, 2], [1, 2, 3]) is None
