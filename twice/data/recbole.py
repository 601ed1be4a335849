"""RecBole atomic files (`<name>.inter` + optional `<name>.item`) as a source.

    python -m twice.data prepare configs/data/recbole.yaml raw_dir=path/to/ml-1m domain=ml-1m

Format: tab-separated, first line is the header of `field:type` columns (type token | token_seq | float |
float_seq), token_seq values are space-separated. .inter needs user_id, item_id and (for the chronological order)
timestamp; rating is optional. Item text from .item: title = movie_title | title | item_name | name (plus
" (release_year)" when that column exists), description = class | genre | categories | description (token_seq
joined with ", "), details = every other column. No reviews in RecBole files: review = "".
"""
from __future__ import annotations

from array import array
from pathlib import Path

import numpy as np

from twice.data import DataConfig
from twice.data.amazon import Malformed
from twice.data.build import DataError, Interactions, cap, cap_details

TITLE_FIELDS = ("movie_title", "title", "item_name", "name")
DESC_FIELDS = ("class", "genre", "categories", "description")


def read_header(path: Path, line: str) -> list[tuple[str, str]]:
    cols = []
    for k, col in enumerate(line.rstrip("\r\n").split("\t")):
        if ":" not in col:
            raise DataError(f"{path}:1: header column {k + 1} {col!r} is not 'name:type'")
        name, typ = col.rsplit(":", 1)
        cols.append((name, typ))
    return cols


class RecBoleSource:
    def __init__(self, cfg: DataConfig, inter_path: Path | None = None, item_path: Path | None = None):
        self.cfg = cfg
        root = Path(cfg.raw_dir).expanduser()
        self.inter_path = inter_path or root / f"{cfg.domain}.inter"
        self.item_path = item_path or root / f"{cfg.domain}.item"
        if not self.inter_path.exists():
            raise DataError(f"{self.inter_path} not found (RecBole atomic files: <raw_dir>/<domain>.inter)")
        self.workdir = Path(".")

    def describe(self) -> str:
        return str(self.inter_path)

    def meta_info(self) -> dict:
        return {"files": {"inter": str(self.inter_path),
                          "item": str(self.item_path) if self.item_path.exists() else None}}

    def interactions(self) -> Interactions:
        users: dict[str, int] = {}
        items: dict[str, int] = {}
        u, i, ts, rt = array("q"), array("q"), array("q"), array("b")
        bad = Malformed(self.inter_path, self.cfg.max_malformed_frac)
        below = 0
        with open(self.inter_path, encoding="utf-8") as f:
            header = read_header(self.inter_path, f.readline())
            names = [n for n, _ in header]
            for need in ("user_id", "item_id"):
                if need not in names:
                    raise DataError(f"{self.inter_path}:1: header has no '{need}' column (has {names})")
            cu, ci = names.index("user_id"), names.index("item_id")
            ct = names.index("timestamp") if "timestamp" in names else None
            cr = names.index("rating") if "rating" in names else None
            n = 1
            for n, line in enumerate(f, 2):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) != len(names):
                    bad(n, f"{len(parts)} fields, header has {len(names)}")
                    continue
                try:
                    t = int(float(parts[ct])) if ct is not None else 0
                    r = float(parts[cr]) if cr is not None and parts[cr] != "" else None
                except ValueError as e:
                    bad(n, f"field 'timestamp'/'rating' not a number ({e})")
                    continue
                if r is not None and r < self.cfg.rating_min:
                    below += 1
                    continue
                u.append(users.setdefault(parts[cu], len(users)))
                i.append(items.setdefault(parts[ci], len(items)))
                ts.append(t)
                rr = int(round(r)) if r is not None else 0
                rt.append(rr if 1 <= rr <= 5 else 0)
        bad.check(n - 1)
        self.ratings = np.frombuffer(rt, dtype=np.int8)
        counts = {"inter_lines": n - 1, "malformed_inter_lines": bad.n, "rating_below_min": below}
        if ct is None:
            counts["no_timestamp_column"] = 1     # file order is the chronological order then
        return Interactions(list(users), list(items), np.frombuffer(u, dtype=np.int64),
                            np.frombuffer(i, dtype=np.int64), np.frombuffer(ts, dtype=np.int64), counts)

    def load_meta(self, item_ids: list[str], cfg: DataConfig) -> None:
        self.meta: dict[str, dict] = {}
        if not self.item_path.exists():
            return
        want = set(item_ids)
        bad = Malformed(self.item_path, cfg.max_malformed_frac)
        with open(self.item_path, encoding="utf-8") as f:
            header = read_header(self.item_path, f.readline())
            names = [n for n, _ in header]
            types = dict(header)
            if "item_id" not in names:
                raise DataError(f"{self.item_path}:1: header has no 'item_id' column (has {names})")
            n = 1
            for n, line in enumerate(f, 2):
                if not line.strip():
                    continue
                parts = line.rstrip("\r\n").split("\t")
                if len(parts) != len(names):
                    bad(n, f"{len(parts)} fields, header has {len(names)}")
                    continue
                row = dict(zip(names, parts))
                if row["item_id"] in want and row["item_id"] not in self.meta:
                    self.meta[row["item_id"]] = item_record(row, types, cfg)
        bad.check(n - 1)

    def item(self, iid: str) -> dict | None:
        return self.meta.get(iid)

    def load_details(self, rows: np.ndarray, cfg: DataConfig) -> None:
        pass

    def rating(self, row: int) -> int | None:
        return int(self.ratings[row]) or None

    def review(self, row: int) -> str:
        return ""

    def close(self) -> None:
        pass


def item_record(row: dict[str, str], types: dict[str, str], cfg: DataConfig) -> dict:
    def text(name):
        v = row[name].strip()
        return ", ".join(v.split()) if types[name] == "token_seq" and name in DESC_FIELDS else v

    title_f = next((f for f in TITLE_FIELDS if f in row and row[f].strip()), None)
    title = text(title_f) if title_f else ""
    if title and row.get("release_year", "").strip():
        title = f"{title} ({row['release_year'].strip()})"
    desc_f = [f for f in DESC_FIELDS if f in row and row[f].strip()]
    desc = ". ".join(text(f) for f in desc_f)
    used = {"item_id", "release_year", title_f, *desc_f}
    details = {k: v.strip() for k, v in row.items() if k not in used and v.strip()}
    return {"title": cap(title, cfg.title_chars) or row["item_id"], "description": cap(desc, cfg.description_chars),
            "details": cap_details(details, cfg.details_chars)}
