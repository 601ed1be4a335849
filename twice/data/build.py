"""Interactions -> dataset dir: dedup, k-core, chronological sequences, fixed candidate sets, atomic write.

    python -m twice.data prepare configs/data/ml-100k.yaml [out_dir=... k_core=10 ...]

Every source (amazon.py, recbole.py, movielens.py) hands over the same thing: a `Source` whose `interactions()`
returns int arrays (user code, item code, timestamp) in file order (row = position in that order, the stable
tie-break), and which can then give rating/review per kept row and metadata per kept item. Only ints are held
for the filtering, so text is read (and held, or spilled to disk) for the interactions that survive.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from twice.config import to_dict
from twice.data import FORMAT_VERSION, DataConfig, fixed_width_ids, item_kind, negative_mask, split_targets

SPLIT_CODES = {"valid": 1, "test": 2}


class DataError(ValueError):
    pass


def log(msg: str) -> None:
    print(f"[twice.data] {msg}", file=sys.stderr, flush=True)


@dataclass
class Interactions:
    user_ids: list[str] | None  # code -> original user id (None: ask source.user_id(code) after load_details)
    item_ids: list[str]        # code -> original item id
    u: np.ndarray              # [R] int user code per row (row = position in the source's order)
    i: np.ndarray              # [R] int item code per row
    ts: np.ndarray             # [R] int64 timestamp per row
    counts: dict = field(default_factory=dict)   # source-side counts (lines, malformed, ...), copied into stats


def natural_order(ids: list[str]) -> list[int]:
    """Codes sorted by original id: numerically when every id is an integer (ml-100k "2" < "10"), else as text."""
    if ids and all(s.isdigit() for s in ids):
        return sorted(range(len(ids)), key=lambda c: (int(ids[c]), ids[c]))
    return sorted(range(len(ids)), key=lambda c: ids[c])


# ----------------------------------------------------------------------------------------------------------------
# filtering: pure functions on int arrays

def dedup_earliest(u: np.ndarray, i: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Rows to keep so that each (user, item) appears once: the earliest timestamp, ties -> earliest row."""
    order = np.argsort(ts, kind="stable")                 # by time, file row breaking ties ...
    key = u.astype(np.int64)[order] * (int(i.max()) + 1 if len(i) else 1) + i[order]   # (user, item) as one int
    perm = np.argsort(key, kind="stable")                 # ... then by (user, item): the first of a group wins
    order, key = order[perm], key[perm]
    del perm
    first = np.ones(len(order), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    return np.sort(order[first])


def k_core(rows: np.ndarray, u: np.ndarray, i: np.ndarray, k: int, min_user_len: int) -> tuple[np.ndarray, int]:
    """Drop users with < max(k, min_user_len) and items with < k interactions, repeated until nothing changes
    (dropping a user can push an item under k and the other way round, so one pass is not enough).
    Returns the kept rows and the number of passes."""
    umin = max(k, min_user_len)
    passes = 0
    while len(rows):
        passes += 1
        uc = np.bincount(u[rows])
        ic = np.bincount(i[rows])
        keep = (uc[u[rows]] >= umin) & (ic[i[rows]] >= k)
        if keep.all():
            break
        rows = rows[keep]
    return rows, passes


def chronological(rows: np.ndarray, u: np.ndarray, ts: np.ndarray, max_history: int) -> np.ndarray:
    """Rows grouped by user, each user's rows by time with file order breaking ties; keep the last `max_history`."""
    rows = rows[np.lexsort((rows, ts[rows], u[rows]))]
    if max_history > 0 and len(rows):
        uu = u[rows]
        starts = np.r_[0, np.flatnonzero(uu[1:] != uu[:-1]) + 1]
        ends = np.r_[starts[1:], len(rows)]
        end_of_row = np.repeat(ends, ends - starts)
        rows = rows[end_of_row - np.arange(len(rows)) <= max_history]
    return rows


# ----------------------------------------------------------------------------------------------------------------
# candidate sets

def sample_negatives(rng: np.random.Generator, pool, exclude: set[int], n: int,
                     cum_weights: np.ndarray | None) -> list[int]:
    """n distinct item idx from `pool` (the eligible items, data.negative_mask; an int N means all of 1..N), none in
    `exclude`; uniform, or popularity via integer cumulative weights aligned with the pool (ints only, so the draw
    is bit-identical on every machine). Rejection in vectorised rounds; exact fallback. With every item eligible
    the draws equal those of sampling 1..N directly (pool[k] = k + 1)."""
    pool = np.arange(1, pool + 1) if isinstance(pool, (int, np.integer)) else np.asarray(pool)
    free = len(pool) - len(exclude)           # a lower bound; count exactly only when it is short
    if free < n:
        free = len(set(pool.tolist()) - set(exclude))
    if free < n:
        raise DataError(f"only {free} eligible items outside a user's sequence, need {n} negatives")
    out: list[int] = []
    seen = set(exclude)
    if n == 0:
        return out
    for _ in range(64):
        m = 2 * (n - len(out)) + 8
        if cum_weights is None:
            draw = pool[rng.integers(0, len(pool), size=m)]
        else:
            draw = pool[np.searchsorted(cum_weights, rng.integers(0, int(cum_weights[-1]), size=m), side="right")]
        for x in draw.tolist():
            if x not in seen:
                seen.add(x)
                out.append(x)
                if len(out) == n:
                    return out
    # the user covers most of the (weighted) pool: draw exactly from what is left
    keep = np.array([x not in seen for x in pool.tolist()])
    allowed = pool[keep]
    if cum_weights is None:
        p = None
    else:
        w = np.diff(np.r_[0, cum_weights])[keep].astype(np.float64)
        p = w / w.sum()
    out += rng.choice(allowed, size=n - len(out), replace=False, p=p).tolist()
    return out


def candidate_set(seed: int, user: int, split: str, seq: list[int], pool, n_neg: int,
                  cum_weights: np.ndarray | None, exclude=()) -> dict:
    """Target + n_neg negatives from `pool` (see sample_negatives) never in the user's whole sequence nor in
    `exclude` (items of the user's interactions that max_history cut off), shuffled with the target's slot
    uniform. The generator is seeded from (seed, user idx, split) alone, so a set does not depend on the other
    users."""
    back = {"valid": 2, "test": 1}[split]
    target = seq[len(seq) - back]
    rng = np.random.default_rng([seed, user, SPLIT_CODES[split]])
    negs = sample_negatives(rng, pool, set(seq) | set(exclude), n_neg, cum_weights)
    pos = int(rng.integers(0, n_neg + 1))
    return {"user": user, "target": target, "candidates": negs[:pos] + [target] + negs[pos:]}


# ----------------------------------------------------------------------------------------------------------------
# text helpers shared by the sources

def cap(text: str, n: int) -> str:
    return text if n <= 0 or len(text) <= n else text[:n]


def cap_details(details: dict, n: int) -> dict[str, str]:
    """Values as strings; keys kept in order until the joined `"k": "v"` text reaches n chars (last value cut)."""
    out: dict[str, str] = {}
    used = 0
    for k, v in details.items():
        v = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
        k = str(k)
        room = n - used - len(k) - 6 if n > 0 else len(v)
        if room <= 0:
            break
        out[k] = v[:room]
        used += len(k) + 6 + len(out[k])
    return out


# ----------------------------------------------------------------------------------------------------------------
# the build

def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def commit_dir(tmp: Path, out: Path) -> None:
    """tmp -> out by rename (same filesystem): out either is the old complete dir or the new complete one."""
    old = out.with_name(out.name + f".old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    if old.exists():
        shutil.rmtree(old)


def build(cfg: DataConfig, source, out_dir: str | Path | None = None) -> Path:
    """Run the whole pipeline for an opened source; write the dataset dir atomically. Returns its path."""
    out = Path(out_dir or cfg.out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        _build_into(cfg, source, tmp)
        commit_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _build_into(cfg: DataConfig, source, tmp: Path) -> None:
    t0 = time.time()
    if cfg.negative_sampling not in ("uniform", "popularity"):   # fail before the long passes, not after
        raise DataError(f"negative_sampling must be 'uniform' or 'popularity', got {cfg.negative_sampling!r}")
    source.workdir = tmp                      # sources may spill text there (removed before the rename)
    inter = source.interactions()
    u, i, ts = inter.u, inter.i, inter.ts
    filtered: dict[str, int] = dict(inter.counts)
    name = getattr(source, "describe", lambda: cfg.source)()
    if len(u) == 0:
        raise DataError(f"{name}: no interactions left after reading (counts: {filtered}); every line was "
                        f"malformed or dropped by the reader's filter (rating_min={cfg.rating_min})")

    rows = dedup_earliest(u, i, ts)
    filtered["duplicate_interactions"] = len(u) - len(rows)
    n0 = len(rows)
    users0, items0 = len(np.unique(u[rows])), len(np.unique(i[rows]))
    rows, passes = k_core(rows, u, i, cfg.k_core, cfg.min_user_len)
    if len(rows) == 0:
        raise DataError(f"{name}: the k-core filter (k_core={cfg.k_core}, min_user_len={cfg.min_user_len}) "
                        f"removed all {n0} interactions ({users0} users, {items0} items); lower k_core")
    filtered["kcore_interactions"] = n0 - len(rows)
    filtered["kcore_users"] = users0 - len(np.unique(u[rows]))
    filtered["kcore_items"] = items0 - len(np.unique(i[rows]))
    filtered["kcore_passes"] = passes
    n1 = len(rows)
    rows_kcore = rows
    rows = chronological(rows, u, ts, cfg.max_history)
    filtered["max_history_interactions"] = n1 - len(rows)

    # item indices by natural order of their original ids
    icodes = np.unique(i[rows])
    iorder = natural_order([inter.item_ids[c] for c in icodes])
    item_idx = np.zeros(len(inter.item_ids), dtype=np.int64)
    item_idx[icodes[iorder]] = np.arange(1, len(icodes) + 1)
    n_items = len(icodes)

    # items: metadata for kept items only
    kept_item_ids = [inter.item_ids[c] for c in icodes[iorder]]     # position k -> item idx k+1
    shown_ids = fixed_width_ids(kept_item_ids)                      # numeric ids at one width ("0007")
    source.load_meta(kept_item_ids, cfg)
    no_meta = 0
    kinds: list = [None]                                            # item idx -> item_kind (negative eligibility)
    with open(tmp / "items.jsonl", "w", encoding="utf-8") as f:
        for k, iid in enumerate(kept_item_ids):
            m = source.item(iid)
            if m is None:
                no_meta += 1
                m = {"title": iid, "description": "", "details": {}}
            kinds.append(item_kind(shown_ids[k], m.get("description", ""), m.get("details", {})))
            rec = {"idx": k + 1, "id": shown_ids[k], **m}
            if shown_ids[k] != iid:
                rec["source_id"] = iid                              # the id as the source spells it
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    filtered["items_without_meta"] = no_meta
    if no_meta:
        log(f"{no_meta} of {n_items} items have no metadata: title = their id")

    # users: rows grouped by user in chronological order, users written in idx order (natural order of ids;
    # a source may only know the id strings of kept users after load_details)
    source.load_details(rows, cfg)
    user_id = (lambda c: inter.user_ids[c]) if inter.user_ids is not None else source.user_id
    ucodes = np.unique(u[rows])
    uorder = natural_order([user_id(c) for c in ucodes])
    user_idx = np.zeros(int(u.max()) + 1, dtype=np.int64)
    user_idx[ucodes[uorder]] = np.arange(1, len(ucodes) + 1)
    n_users = len(ucodes)
    uu = user_idx[u[rows]]
    by_user = np.argsort(uu, kind="stable")
    rows_u = rows[by_user]
    bounds = np.r_[0, np.cumsum(np.bincount(uu, minlength=n_users + 1)[1:])]
    lengths = np.diff(bounds)
    flat = item_idx[i[rows_u]].astype(np.int32)          # [interactions] every user's sequence, back to back
    dropped = dropped_items(rows_kcore, rows, u, i, ts, user_idx, item_idx)   # user idx -> items cut by max_history
    train_counts = np.zeros(n_items + 1, dtype=np.int64)
    with open(tmp / "users.jsonl", "w", encoding="utf-8") as f:
        for k in range(n_users):
            r = rows_u[bounds[k]:bounds[k + 1]]
            items = flat[bounds[k]:bounds[k + 1]].tolist()
            train_counts[items[:-2]] += 1                 # items are distinct within a user (dedup)
            rec = {"idx": k + 1, "id": user_id(ucodes[uorder[k]]), "items": items,
                   "ratings": [source.rating(x) for x in r.tolist()],
                   "reviews": [source.review(x) for x in r.tolist()],
                   "timestamps": ts[r].tolist()}
            if cfg.max_history > 0:
                rec["dropped"] = dropped.get(k + 1, [])
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    source.close()
    filtered.update({k: v for k, v in getattr(source, "counts", {}).items() if k not in filtered})

    # candidate sets: negatives from the eligible items only (data.negative_mask: the targets' ID format and
    # metadata), never an item of the user's whole sequence, including what max_history cut off
    mask = negative_mask(kinds, split_targets(flat[bounds[k]:bounds[k + 1]].tolist() for k in range(n_users)))
    pool = np.flatnonzero(mask)
    filtered["negative_pool"] = len(pool)
    cum = None if cfg.negative_sampling == "uniform" else np.cumsum(train_counts[pool] + 1)
    # ^ popularity weight = train-part count + 1, so items never in a train part can still be drawn
    for split in ("valid", "test"):
        _write_jsonl(tmp / f"candidates_{split}.jsonl",
                     (candidate_set(cfg.seed, k + 1, split, flat[bounds[k]:bounds[k + 1]].tolist(), pool,
                                    cfg.n_negatives, cum, dropped.get(k + 1, ())) for k in range(n_users)))

    n_inter = int(lengths.sum())
    stats = {"users": n_users, "items": n_items, "interactions": n_inter,
             "sparsity": 1.0 - n_inter / (n_users * n_items),
             "seq_len": {"min": int(lengths.min()), "max": int(lengths.max()), "mean": float(lengths.mean()),
                         "median": float(np.median(lengths))},
             "candidates_per_set": cfg.n_negatives + 1,
             "filtered": filtered}
    (tmp / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    write_meta(tmp, cfg, extra=getattr(source, "meta_info", lambda: {})())
    log(f"{name}: {n_users} users, {n_items} items, {n_inter} interactions in {time.time() - t0:.1f}s")


def dropped_items(rows_all: np.ndarray, rows_kept: np.ndarray, u, i, ts, user_idx, item_idx) -> dict[int, list[int]]:
    """user idx -> the catalog items (idx) of that user's interactions that max_history cut off, oldest first.
    Why: they are items the user touched, so they must not be sampled as negatives either."""
    cut = np.setdiff1d(rows_all, rows_kept)
    if not len(cut):
        return {}
    cut = cut[np.lexsort((cut, ts[cut], u[cut]))]
    out: dict[int, list[int]] = {}
    for uu, ii in zip(user_idx[u[cut]].tolist(), item_idx[i[cut]].tolist()):
        if ii:                                   # 0: the item is not in the catalog (only in cut interactions)
            out.setdefault(uu, []).append(ii)
    return out


def write_meta(tmp: Path, cfg: DataConfig, extra: dict | None = None) -> None:
    """meta.json is written last: a dir with meta.json was completed (and renamed into place in one step)."""
    meta = {"format_version": FORMAT_VERSION, "source": cfg.source, "domain": cfg.domain,
            "text_caps": {"title_chars": cfg.title_chars, "description_chars": cfg.description_chars,
                          "details_chars": cfg.details_chars, "review_chars": cfg.review_chars},
            "config": to_dict(cfg), **(extra or {})}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
