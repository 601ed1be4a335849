"""The dataset dir: what every stage reads, and the config that builds it.

    python -m twice.data prepare configs/data/ml-100k.yaml            # build (see twice/data/build.py)
    ds = load_dataset("data/ml-100k")                                  # read (this file)

A dataset dir holds (one JSON object per line; item/user indices are 1-based, 0 is padding):
    items.jsonl              line k holds item idx k+1: {"idx", "id", "title", "description", "details"[,
                             "source_id"]}; all-numeric ids are zero-padded to one width (fixed_width_ids),
                             "source_id" keeps the source's spelling
    users.jsonl              {"idx", "id", "items", "ratings", "reviews", "timestamps"[, "dropped"]}, items
                             chronological; "dropped" (max_history > 0): items of the cut-off older interactions
    candidates_valid.jsonl   {"user", "target", "candidates"}  target + N negatives, seeded order
    candidates_test.jsonl    idem
    stats.json, meta.json    counts and filtered counts; source, resolved config, text caps, version
    examples_*.jsonl         only for the authors' release (source: official), ready-made task examples

Leave-one-out: test target = items[-1] (history items[:-1]), valid target = items[-2] (history items[:-2]),
train target = items[-3] (history items[:-3]); SASRec trains on prefixes of items[:-2] only.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from twice.config import InputError

RATING_WORDS = {1: "Terrible", 2: "Bad", 3: "Okay", 4: "Good", 5: "Excellent"}
WORD_RATINGS = {w: r for r, w in RATING_WORDS.items()}
FORMAT_VERSION = 2   # 2: numeric ids zero-padded, negatives from the eligible items only, users.jsonl 'dropped'
SPLITS = ("train", "valid", "test")
# offset of the target from the end of the sequence, per split
_SPLIT_BACK = {"test": 1, "valid": 2, "train": 3}


@dataclass
class DataConfig:
    source: str = "movielens-100k"   # amazon2023 | recbole | movielens-100k | official
    raw_dir: str = ""                # folder with the raw files (amazon: <domain>.jsonl[.gz], meta_<domain>.jsonl[.gz];
                                     #   recbole: <domain>.inter [+ <domain>.item]; official: the authors' JSON files)
    domain: str = ""                 # amazon domain (e.g. All_Beauty) / recbole dataset name / official product_type
    reviews_path: str = ""           # amazon: explicit review file (overrides raw_dir/domain)
    meta_path: str = ""              # amazon: explicit meta file (overrides raw_dir/domain)
    out_dir: str = "data/ml-100k"    # dataset dir to write (replaced atomically)
    k_core: int = 5                  # users and items with < k interactions are dropped, iterated to a fixed point
    min_user_len: int = 3            # users need >= 3 interactions for train/valid/test targets (applied with k_core)
    max_history: int = 0             # keep only each user's most recent N interactions after filtering (0 = all)
    n_negatives: int = 29            # negatives per candidate set (29 -> 30 candidates, like the authors' release)
    negative_sampling: str = "uniform"   # uniform | popularity (weight = train-part count + 1)
    seed: int = 0                    # candidate sets are seeded per (seed, user idx, split)
    title_chars: int = 300           # text caps (characters), recorded in meta.json
    description_chars: int = 300
    details_chars: int = 300         # cap on the joined `"key": "value"` text of the details dict
    review_chars: int = 300
    max_malformed_frac: float = 0.001    # more malformed lines than this fraction of a file -> error
    rating_min: float = 0.0          # recbole/movielens: drop interactions with rating < this (0 = keep all)


@dataclass
class Item:
    idx: int
    id: str
    title: str
    description: str = ""
    details: dict[str, str] = field(default_factory=dict)
    source_id: str = ""          # the id as the source spells it, when `id` was zero-padded (else = id)


@dataclass
class User:
    idx: int
    id: str
    items: list[int]
    ratings: list[int | None]
    reviews: list[str]
    timestamps: list[int]
    dropped: list[int] = field(default_factory=list)   # items of interactions max_history cut off (never negatives)


@dataclass
class CandidateSet:
    user: int
    target: int
    candidates: list[int]


def _read_jsonl(path: Path) -> list[dict]:
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:   # InputError: every script prints it as one line
                raise InputError(f"{path}:{n}: not valid JSON: {e}") from None
    return out


# ---------------------------------------------------------------------------------------------------------------
# which items may be a negative: ONE rule, used by build.py / official.py (valid and test lists) and by
# tasks.sample_candidates (SFT and GRPO lists) through Dataset.negative_pool

def id_shape(item_id: str) -> tuple[str, int]:
    """An ID's format: character class (digits / alnum / other) and length. "B00A000001" -> ("alnum", 10)."""
    kind = "digits" if item_id.isdigit() else "alnum" if item_id.isalnum() else "other"
    return kind, len(item_id)


def item_kind(item_id: str, description: str, details: dict) -> tuple:
    """What a model could tell from the item's text alone: its ID format and whether it has metadata."""
    return id_shape(item_id), bool(description or details)


def negative_mask(kinds: list[tuple], targets) -> list[bool]:
    """kinds[k] = item_kind of item idx k (kinds[0] unused) -> mask[k]: item k may be a sampled negative.
    An item is eligible iff some target item has its kind. Why: on the authors' release every target has an ASIN
    and metadata while 3,259 of 6,149 vocab items have a bare-number ID and no text, so negatives drawn from the
    whole vocab let "pick the ASIN-looking ID" beat chance; candidates must differ only in what they are."""
    allowed = {kinds[t] for t in targets}
    return [False] + [k in allowed for k in kinds[1:]]


def split_targets(seqs) -> set[int]:
    """The items that are ever a train / valid / test target (the last 3 of each sequence)."""
    return {x for s in seqs for x in s[-3:]}


def fixed_width_ids(ids: list[str]) -> list[str]:
    """All-numeric item IDs zero-padded to one width ("7" -> "0007" when the largest has 4 digits). Why: the
    exact-ranking score is a summed log-likelihood over the ID's tokens, and Gemma's tokenizer spends one token
    per digit, so a 1-digit ID would be scored over fewer tokens than a 4-digit one (a length bias, not a
    preference). Non-numeric IDs (ASINs) are returned unchanged."""
    if not ids or not all(s.isdigit() for s in ids):
        return list(ids)
    w = max(len(s) for s in ids)
    return [s.zfill(w) for s in ids]


class Dataset:
    """A loaded dataset dir. `items[idx]` is item idx (`items[0]` is None: padding). `users` is a plain list with
    `users[k].idx == k + 1` (use `user(idx)`); `history`, `target` and candidate sets take the user *idx*."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        for name in ("items.jsonl", "users.jsonl", "meta.json"):
            if not (self.root / name).exists():
                raise FileNotFoundError(f"{self.root}: not a dataset dir (missing {name}); "
                                        f"build one with `python -m twice.data prepare cfg.yaml`")
        try:
            self.meta = json.loads((self.root / "meta.json").read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{self.root / 'meta.json'}: not valid JSON ({e}); rebuild the dataset dir with "
                             f"`python -m twice.data prepare cfg.yaml`") from None
        if self.meta.get("format_version", 0) < FORMAT_VERSION:
            print(f"[twice.data] WARNING: {self.root} was built by an older twice (format_version "
                  f"{self.meta.get('format_version')} < {FORMAT_VERSION}: numeric ids unpadded, negatives from every "
                  f"item, max_history cut-offs not excluded); rebuild it with `python -m twice.data prepare`",
                  file=sys.stderr)
        stats = self.root / "stats.json"
        self.stats = json.loads(stats.read_text()) if stats.exists() else {}
        self.items: list[Item | None] = [None]
        for k, r in enumerate(_read_jsonl(self.root / "items.jsonl")):
            if r["idx"] != k + 1:
                raise ValueError(f"{self.root / 'items.jsonl'}:{k + 1}: idx {r['idx']} != {k + 1}")
            self.items.append(Item(r["idx"], r["id"], r["title"], r.get("description", ""), r.get("details", {}),
                                   r.get("source_id", r["id"])))
        self.users: list[User] = []
        for k, r in enumerate(_read_jsonl(self.root / "users.jsonl")):
            if r["idx"] != k + 1:
                raise ValueError(f"{self.root / 'users.jsonl'}:{k + 1}: idx {r['idx']} != {k + 1}")
            self.users.append(User(r["idx"], r["id"], r["items"], r["ratings"], r["reviews"], r["timestamps"],
                                   r.get("dropped", [])))
        self.item_by_id: dict[str, int] = {it.id: it.idx for it in self.items[1:]}
        self._candidates: dict[str, list[CandidateSet]] = {}
        mask = negative_mask([None] + [item_kind(it.id, it.description, it.details) for it in self.items[1:]],
                             split_targets(u.items for u in self.users))
        self.negative_pool: list[int] = [k for k, ok in enumerate(mask) if ok]   # item idx a negative may be

    @property
    def n_items(self) -> int:
        return len(self.items) - 1

    @property
    def n_users(self) -> int:
        return len(self.users)

    def user(self, idx: int) -> User:
        if not 1 <= idx <= len(self.users):
            raise IndexError(f"user idx {idx} out of range 1..{len(self.users)}")
        return self.users[idx - 1]

    def candidates(self, split: str) -> list[CandidateSet]:
        if split not in ("valid", "test"):
            raise ValueError(f"candidate sets exist for 'valid' and 'test', not {split!r}")
        if split not in self._candidates:
            path = self.root / f"candidates_{split}.jsonl"
            self._candidates[split] = [CandidateSet(r["user"], r["target"], r["candidates"])
                                       for r in _read_jsonl(path)] if path.exists() else []
        return self._candidates[split]

    def _check(self, user: int, split: str) -> list[int]:
        if split not in _SPLIT_BACK:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        seq = self.user(user).items
        if len(seq) < _SPLIT_BACK[split]:
            raise ValueError(f"user {user} has {len(seq)} items: no {split} target")
        return seq

    def history(self, user: int, split: str) -> list[int]:
        seq = self._check(user, split)
        return seq[: len(seq) - _SPLIT_BACK[split]]

    def target(self, user: int, split: str) -> int:
        seq = self._check(user, split)
        return seq[len(seq) - _SPLIT_BACK[split]]

    def examples(self, name: str) -> list[dict]:
        """Ready-made examples (source: official): name in task1, task2, task3, test."""
        return _read_jsonl(self.root / f"examples_{name}.jsonl")


def load_dataset(root: str | Path) -> Dataset:
    return Dataset(root)
