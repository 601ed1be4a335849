"""Are a dataset dir's candidate lists fair? Counts a reviewer checks before trusting a number measured on them.

    python -m twice.data audit data/ml-100k [--full data/ml-100k-full]

Prints JSON: per split, the expected HR@1 of format-only rankers (keep the candidates whose ID has the targets'
most common shape / that have metadata, pick one uniformly) against chance, the negatives that are items the user
touched (its kept sequence and the part max_history cut off; with --full, a max_history=0 build of the same source,
matched by source id, which also covers dirs built before "dropped" existed), and audit_candidates' figures.
"""
from __future__ import annotations

from collections import Counter

from twice.data import id_shape


def audit_candidates(sets: list[tuple[int, list[int], list[int]]]) -> dict:
    """How far a collection of candidate lists is from "target + uniform negatives". sets: (target, candidates,
    history) per user. Returns counts a reviewer checks before trusting a number measured on the lists:
      distinct_negatives        items ever used as a negative
      pool                      the len(candidates) most frequent negatives (sorted), and
      lists_negatives_in_pool   lists whose every negative is in that pool
      lists_target_outside_pool lists where the target is the only candidate outside it
      users_history_in_negatives  lists with one of the user's own history items among the negatives
      odd_one_out_hr1           expected HR@1 of "pick a candidate outside the pool, uniformly" (no candidate
                                outside: uniform over all), vs chance 1/len(candidates)
    On the authors' release (test file, 100 users): 30 distinct negatives, 100 lists drawn from that pool, the
    target is the odd one out in 95, 23 users have history items among the negatives, odd-one-out HR@1 0.95
    (tests/test_data_fidelity.py). So the released test lists are NOT uniform samples: never report headline
    numbers on them."""
    if not sets:
        return {}
    n_cand = len(sets[0][1])
    freq = Counter(c for t, cands, _ in sets for c in cands if c != t)
    pool = {c for c, _ in freq.most_common(n_cand)}
    hr1 = 0.0
    for t, cands, _ in sets:
        odd = [c for c in cands if c not in pool] or cands
        hr1 += (t in odd) / len(odd)
    return {"lists": len(sets), "candidates": n_cand, "distinct_negatives": len(freq), "pool": sorted(pool),
            "lists_negatives_in_pool": sum(all(c in pool for c in cands if c != t) for t, cands, _ in sets),
            "lists_target_outside_pool": sum([c for c in cands if c not in pool] == [t] for t, cands, _ in sets),
            "users_history_in_negatives": sum(bool((set(cands) - {t}) & set(h)) for t, cands, h in sets),
            "odd_one_out_hr1": hr1 / len(sets), "chance_hr1": 1 / n_cand}


def format_hr1(sets: list[tuple[int, list[int]]], keep) -> float:
    """Expected HR@1 of a ranker that keeps the candidates `keep(c)` accepts and picks one of them uniformly (all
    candidates when it accepts none). sets: (target, candidates)."""
    total = 0.0
    for t, cands in sets:
        pool = [c for c in cands if keep(c)] or cands
        total += (t in pool) / len(pool)
    return total / max(1, len(sets))


def audit(ds, full=None) -> dict:
    """-> {"items", "negative_pool", split: {...}} for a loaded Dataset (full: the max_history=0 Dataset)."""
    out = {"items": ds.n_items, "negative_pool": len(ds.negative_pool)}
    src = lambda d, i: d.items[i].source_id or d.items[i].id            # noqa: E731
    touched_full = None if full is None else {u.id: {src(full, i) for i in u.items} for u in full.users}
    for split in ("valid", "test"):
        sets = ds.candidates(split)
        if not sets:
            continue
        shape = Counter(id_shape(ds.items[cs.target].id) for cs in sets).most_common(1)[0][0]
        pairs = [(cs.target, cs.candidates) for cs in sets]
        bad = bad_users = 0
        for cs in sets:
            u = ds.user(cs.user)
            seen = ({src(ds, i) for i in u.items} | {src(ds, i) for i in u.dropped} if touched_full is None
                    else touched_full[u.id])
            n = sum(src(ds, c) in seen for c in cs.candidates if c != cs.target)
            bad, bad_users = bad + n, bad_users + (n > 0)
        a = audit_candidates([(cs.target, cs.candidates, ds.history(cs.user, split)) for cs in sets])
        a.pop("pool")
        neg = [c for cs in sets for c in cs.candidates if c != cs.target]
        out[split] = {"format_hr1": format_hr1(pairs, lambda c: id_shape(ds.items[c].id) == shape),
                      "metadata_hr1": format_hr1(pairs, lambda c: bool(ds.items[c].description or ds.items[c].details)),
                      "negatives_off_target_shape": sum(id_shape(ds.items[c].id) != shape for c in neg) / len(neg),
                      "touched_negatives": bad, "users_with_touched_negatives": bad_users, **a}
    return out
