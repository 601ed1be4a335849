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
