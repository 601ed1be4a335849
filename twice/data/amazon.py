"""Amazon Reviews 2023 raw files (`<Domain>.jsonl[.gz]` + `meta_<Domain>.jsonl[.gz]`) as a streamed source.

    python -m twice.data prepare configs/data/amazon.yaml raw_dir=~/amazon2023 domain=All_Beauty

Three streamed passes, so memory is ~20 bytes per review plus the item id strings (users are 64-bit hashes until
pass 3), never the text of filtered interactions:
  1. reviews: (user_id, parent_asin, timestamp) -> int codes                    -> dedup + k-core (build.py)
  2. meta: title / description / features / details for kept items only, capped, spilled to a temp file
  3. reviews again: rating + review text (+ the user id string) for kept rows only, capped, spilled to a temp file
The spill files are read back by offset while users.jsonl / items.jsonl are written, then deleted.
Review fields: rating (float 1-5), title, text, user_id, parent_asin, asin, timestamp (ms). We key items by
parent_asin (the join key with meta; asin when it is missing) and the review text is `text` (its `title` when
`text` is empty). Item description = the meta `description` list joined, or the `features` list when empty.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
from array import array
from pathlib import Path

import numpy as np

from twice.data import DataConfig
from twice.data.build import DataError, Interactions, cap, cap_details, log

MAX_LOGGED = 20   # malformed lines printed per file (all are counted)
HASH_KEY = os.environ.get("TWICE_USER_HASH_KEY", "").encode()   # only to step around a (never seen) collision


def open_lines(path: Path):
    """Binary line iterator over a plain or gzip file (sniffed by magic bytes, not by name)."""
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def find_file(raw_dir: str, stem: str) -> Path:
    for ext in (".jsonl.gz", ".jsonl", ".json.gz", ".json"):
        p = Path(raw_dir).expanduser() / (stem + ext)
        if p.exists():
            return p
    raise DataError(f"{Path(raw_dir) / stem}.jsonl[.gz] not found")


class Malformed:
    """Counts bad lines of one file, logs the first few with file:line, fails past the configured fraction."""

    def __init__(self, path: Path, max_frac: float):
        self.path, self.max_frac, self.n = path, max_frac, 0

    def __call__(self, line_no: int, why: str) -> None:
        self.n += 1
        if self.n <= MAX_LOGGED:
            log(f"{self.path}:{line_no}: skipped malformed line: {why}")

    def check(self, n_lines: int) -> None:
        if self.n > MAX_LOGGED:
            log(f"{self.path}: {self.n} malformed lines in all ({self.n - MAX_LOGGED} more not shown)")
        if n_lines and self.n / n_lines > self.max_frac:
            raise DataError(f"{self.path}: {self.n} of {n_lines} lines malformed "
                            f"(> max_malformed_frac={self.max_frac})")


def parse_review(raw: bytes):
    """-> (record, user, item, ts) or a str saying why the line is malformed."""
    try:
        r = json.loads(raw)
    except ValueError as e:
        return f"not valid JSON ({e})"
    if not isinstance(r, dict):
        return "not a JSON object"
    user, item, ts = r.get("user_id"), r.get("parent_asin") or r.get("asin"), r.get("timestamp")
    if not isinstance(user, str) or not user:
        return "field 'user_id' missing or not a string"
    if not isinstance(item, str) or not item:
        return "fields 'parent_asin'/'asin' missing or not a string"
    if isinstance(ts, bool) or not isinstance(ts, (int, float)):
        return "field 'timestamp' missing or not a number"
    return r, user, item, int(ts)


class Spill:
    """Append-only temp file of utf-8 records, read back by (offset, length) with pread."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "wb+")
        self.pos = 0

    def put(self, text: str) -> tuple[int, int]:
        b = text.encode("utf-8")
        self.f.write(b)
        off, self.pos = self.pos, self.pos + len(b)
        return off, len(b)

    def get(self, off: int, n: int) -> str:
        if n == 0:
            return ""
        self.f.flush()
        return os.pread(self.f.fileno(), n, off).decode("utf-8")

    def close(self) -> None:
        self.f.close()
        self.path.unlink(missing_ok=True)


class AmazonSource:
    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.reviews_path = (Path(cfg.reviews_path).expanduser() if cfg.reviews_path
                             else find_file(cfg.raw_dir, cfg.domain))
        self.meta_path = (Path(cfg.meta_path).expanduser() if cfg.meta_path
                          else find_file(cfg.raw_dir, f"meta_{cfg.domain}"))
        self.workdir = Path(".")
        self.counts: dict[str, int] = {}

    def describe(self) -> str:
        return str(self.reviews_path)

    def meta_info(self) -> dict:
        return {"files": {"reviews": str(self.reviews_path), "meta": str(self.meta_path)},
                "review_text": "text (title when text is empty)", "item_key": "parent_asin"}

    # pass 1 --------------------------------------------------------------------------------------------------
    def interactions(self) -> Interactions:
        # Users are the big set (Clothing: 22.6M), so they are held as 8-byte hashes, not as a dict of strings;
        # the id strings of *kept* users are read back in pass 3, which also checks that no two kept users share
        # a hash (a collision is an error, never a silent merge; p ~ n^2 / 2^65).
        items: dict[str, int] = {}
        uh, i, ts = array("q"), array("i"), array("q")  # 20 bytes per review
        bad = Malformed(self.reviews_path, self.cfg.max_malformed_frac)
        n = 0
        with open_lines(self.reviews_path) as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                p = parse_review(raw)
                if isinstance(p, str):
                    bad(n, p)
                    continue
                _, user, item, t = p
                uh.append(user_hash(user))
                i.append(items.setdefault(item, len(items)))
                ts.append(t)
        bad.check(n)
        self.n_rows = len(uh)
        self.counts = {"review_lines": n, "malformed_review_lines": bad.n}
        hashes, u = np.unique(np.frombuffer(uh, dtype=np.int64), return_inverse=True)
        del uh
        self.u = u.astype(np.int32)
        self.user_str: dict[int, str] = {}
        return Interactions(None, list(items), self.u, np.frombuffer(i, dtype=np.int32),
                            np.frombuffer(ts, dtype=np.int64), dict(self.counts))

    def user_id(self, code: int) -> str:
        return self.user_str[int(code)]

    # pass 2: meta for kept items ------------------------------------------------------------------------------
    def load_meta(self, item_ids: list[str], cfg: DataConfig) -> None:
        want = {iid: k for k, iid in enumerate(item_ids)}
        self.meta_at = np.full((len(item_ids), 2), -1, dtype=np.int64)     # [items, (offset, length)]
        self.meta_spill = Spill(self.workdir / "meta.spill")
        self.item_pos = want
        bad = Malformed(self.meta_path, cfg.max_malformed_frac)
        n = dup = 0
        with open_lines(self.meta_path) as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    r = json.loads(raw)
                except ValueError as e:
                    bad(n, f"not valid JSON ({e})")
                    continue
                if not isinstance(r, dict) or not isinstance(r.get("parent_asin"), str):
                    bad(n, "field 'parent_asin' missing or not a string")
                    continue
                k = want.get(r["parent_asin"])
                if k is None:
                    continue
                if self.meta_at[k, 0] >= 0:
                    dup += 1
                    continue
                self.meta_at[k] = self.meta_spill.put(json.dumps(item_record(r, cfg), ensure_ascii=False))
        bad.check(n)
        self.counts.update(meta_lines=n, malformed_meta_lines=bad.n, duplicate_meta=dup)

    def item(self, iid: str) -> dict | None:
        off, ln = self.meta_at[self.item_pos[iid]]
        return json.loads(self.meta_spill.get(int(off), int(ln))) if off >= 0 else None

    # pass 3: rating + review for kept rows --------------------------------------------------------------------
    def load_details(self, rows: np.ndarray, cfg: DataConfig) -> None:
        # slot of a row = its rank among kept rows (-1: filtered out); 8 bytes per review + 17 per kept one
        srt = np.sort(rows)
        self.rank = np.full(self.n_rows, -1, dtype=np.int64)
        self.rank[srt] = np.arange(len(srt))
        self.rev_at = np.zeros((len(srt), 2), dtype=np.int64)                   # [kept, (offset, length)]
        self.ratings = np.zeros(len(self.rev_at), dtype=np.int8)                # 0 = no rating
        self.rev_spill = Spill(self.workdir / "reviews.spill")
        row = -1
        with open_lines(self.reviews_path) as f:
            for raw in f:
                if not raw.strip():
                    continue
                p = parse_review(raw)
                if isinstance(p, str):
                    continue
                row += 1
                if row >= self.n_rows:
                    break
                slot = self.rank[row]
                if slot < 0:
                    continue
                r, user = p[0], p[1]
                code = int(self.u[row])
                if self.user_str.setdefault(code, user) != user:
                    raise DataError(f"{self.reviews_path}: users {self.user_str[code]!r} and {user!r} share a "
                                    f"64-bit id hash; rerun with another TWICE_USER_HASH_KEY")
                text = r.get("text") if isinstance(r.get("text"), str) and r.get("text").strip() else r.get("title")
                self.rev_at[slot] = self.rev_spill.put(cap(clean(text if isinstance(text, str) else ""),
                                                           cfg.review_chars))
                self.ratings[slot] = rating_int(r.get("rating"))
        if row + 1 != self.n_rows:
            raise DataError(f"{self.reviews_path}: changed between passes ({self.n_rows} rows, then {row + 1})")

    def _slot(self, row: int) -> int:
        return int(self.rank[row])

    def rating(self, row: int) -> int | None:
        r = int(self.ratings[self._slot(row)])
        return r or None

    def review(self, row: int) -> str:
        off, n = self.rev_at[self._slot(row)]
        return self.rev_spill.get(int(off), int(n))

    def close(self) -> None:
        for s in ("meta_spill", "rev_spill"):
            if hasattr(self, s):
                getattr(self, s).close()


def user_hash(user: str) -> int:
    """Stable signed 64-bit hash of a user id (blake2b: the same on every run and machine)."""
    d = hashlib.blake2b(user.encode("utf-8"), digest_size=8, key=HASH_KEY).digest()
    return int.from_bytes(d, "little", signed=True)


def clean(text: str) -> str:
    """One line of text: Amazon reviews carry <br /> tags and newlines."""
    return " ".join(text.replace("<br />", " ").replace("<br/>", " ").split())


def rating_int(x) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return 0
    r = int(round(x))
    return r if 1 <= r <= 5 else 0


def item_record(r: dict, cfg: DataConfig) -> dict:
    title = r.get("title") if isinstance(r.get("title"), str) else ""
    desc = r.get("description") or []
    desc = " ".join(x for x in desc if isinstance(x, str)) if isinstance(desc, list) else str(desc)
    if not desc.strip():
        feats = r.get("features") or []
        desc = " ".join(x for x in feats if isinstance(x, str)) if isinstance(feats, list) else str(feats)
    details = r.get("details") if isinstance(r.get("details"), dict) else {}
    return {"title": cap(clean(title), cfg.title_chars) or r["parent_asin"],
            "description": cap(clean(desc), cfg.description_chars),
            "details": cap_details(details, cfg.details_chars)}
