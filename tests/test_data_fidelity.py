"""Data fidelity on the authors' release and on ml-100k-like data (issue 11, items 1-4, 12, 14): SFT and eval
prompts of one user agree, negatives share the targets' ID format, truncated histories still exclude the whole
sequence from negatives, numeric IDs render at one width, the release's test candidates are audited."""
import json
import random
from pathlib import Path

import pytest
import torch

from twice.data import DataConfig, load_dataset
from twice.data.__main__ import prepare
from twice.tasks import TaskConfig, recommend_example

DOMAIN = "Grocery_and_Gourmet_Food"


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """The authors' sample imported once per module (read-only for the tests)."""
    from conftest import OFFICIAL_SAMPLE
    if not OFFICIAL_SAMPLE.is_dir():
        pytest.skip("../shared/data/twice_official_sample is absent")
    cfg = DataConfig(source="official", raw_dir=str(OFFICIAL_SAMPLE), domain=DOMAIN,
                     out_dir=str(tmp_path_factory.mktemp("official") / "off"))
    return load_dataset(prepare(cfg))


def history_blocks(ex) -> list[str]:
    text = ex.messages[-1]["content"]
    hist = text[text.index("[Purchase History]\n") + len("[Purchase History]\n"):text.index("\n\n[Candidate List]")]
    return hist.split("\n\n")


# -- item 1: SFT prompts of the release show the user's reviews and ratings ----------------------------------------

def test_official_sft_prompt_shows_the_eval_history_block(official):
    import train_sft as S
    ds = official
    cfg = S.SFTConfig(data_dir=str(ds.root), task=TaskConfig(max_history=20, desc_chars=200, review_chars=200))
    cfg.mix.t2_source, cfg.mix.t3_source, cfg.mix.describe = "official", "official", 0.0
    pools, stats = S.build_pools(ds, cfg)
    assert stats == {"t2_skipped": 0, "t3_skipped": 0}
    tests = {cs.user: cs for cs in ds.candidates("test")}
    n_reviews = 0
    for task in ("recommend", "reason"):
        for rec in pools[task]:
            sft = S.render(ds, None, cfg, task, rec, epoch=0)
            cs = tests[rec.get("user") or int(rec["where"].split(":")[1])]   # unjoined (today's main): by line
            ev = recommend_example(ds, ds.user(cs.user), "test", list(cs.candidates), cfg.task, reasoning=True,
                                   with_response=False)
            a, b = history_blocks(sft), history_blocks(ev)
            assert len(a) == len(rec["history"]) < len(b) and a == b[:len(a)], rec["where"]
            n_reviews += sum("- review:" in blk and not blk.split("- review:")[1].startswith("\n") for blk in a)
            assert all("- rating:" in blk for blk in a)
    assert n_reviews > 0.9 * sum(len(r["history"]) for t in ("recommend", "reason") for r in pools[t])
    assert ds.stats["filtered"]["task2_joined_users"] == ds.stats["filtered"]["task3_joined_users"] == 100
    assert ds.stats["filtered"]["task3_review_mismatch"] == 0    # the record's own blocks carry the same reviews
    # the authors' training lists are near-uniform, but 5 negatives (in 5 lists) are items of the user's sequence
    assert ds.stats["filtered"]["task2_touched_negatives"] == ds.stats["filtered"]["task3_touched_negatives"] == 5


# -- item 2: no format shortcut in sampled negatives ---------------------------------------------------------------

def heuristic_hr1(sets, keep) -> float:
    """Expected HR@1 of a format-only ranker: keep the candidates `keep` says look like a target, pick one of them
    uniformly (all of them when none does). sets = [(target, candidates)]."""
    total = 0.0
    for target, cands in sets:
        pool = [c for c in cands if keep(c)] or cands
        total += (target in pool) / len(pool)
    return total / len(sets)


def test_negative_mask_rule():
    from twice.data import item_kind, negative_mask
    kinds = [None, item_kind("B00A000001", "d", {}), item_kind("4711", "", {}), item_kind("B00A000002", "", {}),
             item_kind("B00A000003", "", {"k": "v"}), item_kind("12", "x", {})]
    assert negative_mask(kinds, {1}) == [False, True, False, False, True, False]   # ASIN + metadata only
    assert negative_mask(kinds, {1, 3}) == [False, True, False, True, True, False]  # a text-less ASIN target


def test_format_only_heuristic_is_at_chance_on_the_release(official):
    """On the release 3,259 of 6,149 vocab items have a bare-number ID and no text, every target has an ASIN.
    Today's main sampled valid negatives from all of them: "pick the ASIN-looking ID" scored HR@1 0.073 (chance
    1/30). Every sampled list (valid lists, and the SFT/GRPO lists of tasks.sample_candidates) must leave a
    format-only ranker at chance, and every negative must come from the one pool (ds.negative_pool)."""
    from twice.data import id_shape
    from twice.tasks import sample_candidates
    ds = official
    pool = set(ds.negative_pool)
    assert len(pool) == ds.stats["filtered"]["negative_pool"] < ds.n_items
    asin = lambda c: id_shape(ds.items[c].id) == ("alnum", 10)                      # noqa: E731
    has_text = lambda c: bool(ds.items[c].description or ds.items[c].details)      # noqa: E731
    valid = [(cs.target, cs.candidates) for cs in ds.candidates("valid")]
    rng = random.Random(0)
    train = [(ds.target(u.idx, "train"), sample_candidates(ds, u, ds.target(u.idx, "train"), 29, rng))
             for u in ds.users for _ in range(5)]
    for sets in (valid, train):
        assert all(len(c) == 30 for _, c in sets)
        assert all(c in pool for t, cands in sets for c in cands if c != t)
        assert heuristic_hr1(sets, asin) == pytest.approx(1 / 30)
        assert heuristic_hr1(sets, has_text) == pytest.approx(1 / 30, abs=0.004)


# -- item 3: max_history keeps the whole sequence out of the negatives ---------------------------------------------

def test_max_history_excludes_the_whole_sequence(tmp_path):
    """Users touch ~30 of 40 items, max_history keeps the last 5: the negatives must avoid all ~30 (today's main
    avoided only the 5 kept, so most negatives were items the user had touched)."""
    from test_data import recbole_cfg, write_recbole
    from twice.tasks import sample_candidates
    raw = write_recbole(tmp_path / "raw", n_users=30, n_items=40, per_user=(25, 32))
    ds = load_dataset(prepare(recbole_cfg(raw, tmp_path / "ds", k_core=1, max_history=5, n_negatives=5)))
    touched: dict[str, set[str]] = {}
    for line in (raw / "toy.inter").read_text().splitlines()[1:]:
        uid, iid = line.split("\t")[:2]
        touched.setdefault(uid, set()).add(iid)
    by_source = {it.source_id: it.idx for it in ds.items[1:]}
    n_checked = 0
    for split in ("valid", "test"):
        for cs in ds.candidates(split):
            user = ds.user(cs.user)
            assert len(user.items) == 5 and len(user.dropped) >= 15
            seen = {by_source[i] for i in touched[user.id] if i in by_source}   # (not all survive the cut)
            assert set(user.items) | set(user.dropped) == seen
            assert set(cs.candidates) & seen == {cs.target}, (split, user.id)
            n_checked += 1
    for user in ds.users:                                         # the SFT / GRPO lists too
        cands = sample_candidates(ds, user, user.items[-3], 5, random.Random(user.idx))
        assert set(cands) & (set(user.items) | set(user.dropped)) == {user.items[-3]}
    assert n_checked == 2 * ds.n_users
    from twice.data.audit import audit                           # the `python -m twice.data audit` figures
    a = audit(ds)
    assert a["test"]["touched_negatives"] == a["valid"]["touched_negatives"] == 0
    assert a["test"]["format_hr1"] == pytest.approx(1 / 6)       # one ID width: a format ranker is at chance


# -- item 4: numeric IDs at one width; the length/score diagnostic -------------------------------------------------

def test_numeric_ids_render_at_one_width(tmp_path):
    """ml-100k-style numeric IDs 1..40: every `<item>ID</item>` must be the same number of tokens (Gemma-style
    tokenizers split digits, so "7" was 1 token and "40" 2 before), and the prompt, the answer, the rewards' parse
    and the dataset's lookup must agree on the padded spelling."""
    from test_data import recbole_cfg, write_recbole
    from test_tokenizer import CORPUS
    from twice.rewards import parse_completion
    from twice.tokenizer import Tokenizer
    raw = write_recbole(tmp_path / "raw", n_users=40, n_items=40, per_user=(8, 15))
    ds = load_dataset(prepare(recbole_cfg(raw, tmp_path / "ds", k_core=1)))
    ids = [it.id for it in ds.items[1:]]
    assert {len(i) for i in ids} == {2} and "07" in ids and ds.items[ds.item_by_id["07"]].source_id == "7"
    tok = Tokenizer.train_tiny(tmp_path / "tok", CORPUS, vocab_size=512)
    assert len({len(tok.encode(f"<item>{i}</item>")) for i in ids}) == 1
    cs = ds.candidates("test")[0]
    ex = recommend_example(ds, ds.user(cs.user), "test", list(cs.candidates), TaskConfig())
    assert all(f"- item_id:{ds.items[c].id}\n" in ex.messages[-1]["content"] for c in cs.candidates)
    assert ex.target_id == ds.items[cs.target].id and ex.candidate_ids == [ds.items[c].id for c in cs.candidates]
    item = parse_completion(f"<think>x</think><item>{ex.target_id}</item>").item
    assert ds.item_by_id[item] == cs.target


def test_fixed_width_ids():
    from twice.data import fixed_width_ids
    assert fixed_width_ids(["1", "10", "1682"]) == ["0001", "0010", "1682"]
    assert fixed_width_ids(["B00A000001", "12"]) == ["B00A000001", "12"]           # ASINs: left alone
    assert fixed_width_ids([]) == []


# -- item 12: the authors' released test candidates are not uniform ------------------------------------------------

def test_release_test_candidates_are_not_uniform(official):
    """Verifies the figures configs/README quote: 95 of 100 released test lists are the target + 29 items of one
    fixed 30-item pool (the other 5: a pool item as target + the other 29), 23 users have their own history items
    among the negatives, and "pick the odd one out" gets HR@1 95/100. Our own sampled lists pass the same audit."""
    from twice.data.audit import audit_candidates
    ds = official
    a = audit_candidates([(cs.target, cs.candidates, ds.history(cs.user, "test")) for cs in ds.candidates("test")])
    assert (a["lists"], a["distinct_negatives"], a["lists_negatives_in_pool"]) == (100, 30, 100)
    assert (a["lists_target_outside_pool"], a["users_history_in_negatives"]) == (95, 23)
    assert a["odd_one_out_hr1"] == pytest.approx(0.95 + 5 / 30 / 100)      # 95 sure hits + 5 uniform guesses
    ours = audit_candidates([(cs.target, cs.candidates, ds.history(cs.user, "valid")) for cs in ds.candidates("valid")])
    assert ours["distinct_negatives"] > 1500 and ours["users_history_in_negatives"] == 0
    assert ours["odd_one_out_hr1"] < 0.1
    from twice.data.audit import audit
    full = audit(ds)
    assert (full["test"]["users_with_touched_negatives"], full["test"]["touched_negatives"]) == (23, 25)
    assert full["negative_pool"] == ds.stats["filtered"]["negative_pool"] == 2890
    assert ds.stats["test_candidates_audit"]["odd_one_out_hr1"] == pytest.approx(a["odd_one_out_hr1"])


# -- item 14: the paper-fidelity configs render what the authors' instruction promises ------------------------------

PAPER_TASK_CONFIGS = ["configs/amazon-gemma3-1b/sft.yaml", "configs/amazon-gemma3-1b/eval.yaml",
                      "configs/amazon-gemma3-1b/grpo.yaml", "configs/ablations/rq3_E_full.yaml"]


def test_paper_configs_render_candidate_descriptions_and_details(official, official_sample_dir):
    """The authors' instruction promises each candidate's description and details; their record 0 is 22,121
    characters, main's configs rendered 7,221 (candidate_desc_chars=0, details_chars=0). SFT, GRPO and eval must
    read one task block, and it must show every candidate's text at ~300 characters."""
    from pathlib import Path

    import yaml

    from twice.config import from_dict
    root = Path(__file__).resolve().parents[1]
    blocks = [yaml.safe_load((root / p).read_text())["task"] for p in PAPER_TASK_CONFIGS]
    assert all({k: v for k, v in b.items() if k != "n_negatives"} ==
               {k: v for k, v in blocks[0].items() if k != "n_negatives"} for b in blocks), "SFT/GRPO/eval differ"
    cfg = from_dict(TaskConfig, blocks[1])
    ds = official
    raw = json.loads((official_sample_dir / f"amazon_{DOMAIN}_llm_test_sample.json").read_text())
    from twice.prompts import clean, render_details
    assert cfg.candidate_desc_chars >= 300 and cfg.details_chars >= 300
    ratios, n_text = [], 0
    for cs, r in zip(ds.candidates("test"), raw):
        ex = recommend_example(ds, ds.user(cs.user), "test", list(cs.candidates), cfg, reasoning=True,
                               with_response=False)
        text = ex.messages[-1]["content"]
        start = text.index("[Candidate List]\n") + len("[Candidate List]\n")
        cand = text[start:text.index("\n\n***Instruction***")].split("\n\n")
        assert len(cand) == 30
        for c, blk in zip(cs.candidates, cand):
            it = ds.items[c]
            assert f"- description:{clean(it.description, cfg.candidate_desc_chars)}\n" in blk
            assert f"- details:{render_details(it.details, cfg.details_chars)}" in blk
            n_text += bool(it.description) + bool(it.details)
        ratios.append(len(text) / len(r["input"]))
    assert n_text > 100 * 30                       # most candidates have both texts, and they are shown
    assert min(ratios) > 0.85, min(ratios)         # as long as the authors' prompt of the same user


def test_authors_verbatim_prompts(official, official_sample_dir):
    from twice.rewards import parse_completion
    from twice.tasks import AUTHORS_TAGS, authors_prompts
    ds = official
    raw = json.loads((official_sample_dir / f"amazon_{DOMAIN}_llm_test_sample.json").read_text())
    prompts = authors_prompts(ds)
    assert sorted(prompts) == [cs.user for cs in ds.candidates("test")]
    for cs, r in zip(ds.candidates("test"), raw):
        ex = prompts[cs.user]
        assert ex.messages == [{"role": "system", "content": r["system_prompt"]},
                               {"role": "user", "content": r["input"]}]
        assert ex.candidate_ids == [ds.items[c].id for c in cs.candidates] and ex.target_id == ds.items[cs.target].id
        assert all(f"item_id:{i}\n" in r["input"] for i in ex.candidate_ids)
        # the authors' own answer parses with AUTHORS_TAGS to the target
        assert parse_completion(r["output"], AUTHORS_TAGS.think, AUTHORS_TAGS.item).item.strip() == ex.target_id


def test_build_samples_negatives_only_from_target_like_items(tmp_path):
    """build.py path: items 31-40 have no metadata (title = id, no text) and are never a target; the valid/test
    lists must not use them as negatives (today's main drew them like any other item: ~1/4 of the negatives)."""
    rng = random.Random(0)
    raw = tmp_path / "raw"
    raw.mkdir()
    lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
    for u in range(1, 41):
        hist = rng.sample(range(1, 41), 8)
        seq = hist + rng.sample([x for x in range(1, 31) if x not in hist], 3)   # the 3 targets have metadata
        lines += [f"{u}\t{it}\t4\t{1000 + t}" for t, it in enumerate(seq)]
    (raw / "toy.inter").write_text("\n".join(lines) + "\n")
    items = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    items += [f"{k}\tMovie {k}\t1995\tDrama" for k in range(1, 31)]                # 31-40: no metadata row
    (raw / "toy.item").write_text("\n".join(items) + "\n")
    from test_data import recbole_cfg
    ds = load_dataset(prepare(recbole_cfg(raw, tmp_path / "ds", k_core=1, n_negatives=9)))
    bare = {it.idx for it in ds.items[1:] if int(it.id) > 30}
    assert len(bare) == 10 and not bare & {x for u in ds.users for x in u.items[-3:]}
    negs = [c for split in ("valid", "test") for cs in ds.candidates(split) for c in cs.candidates if c != cs.target]
    assert len(negs) == 2 * 40 * 9 and not set(negs) & bare
    assert set(ds.negative_pool) == set(range(1, 41)) - bare          # the SFT/GRPO sampler reads the same pool


def test_eval_prompts_authors_feeds_the_verbatim_prompts(official, tmp_path, monkeypatch):
    """eval.py prompts=authors: each user's released test prompt reaches the model verbatim and the answer is parsed
    with the authors' <item_id> tag (default prompts=ours renders our own prompt, which differs)."""
    import sys
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import eval as ev
    from twice import gemma3, tokenizer
    from twice.tasks import authors_prompts
    seen = []

    class Tok:                          # records the messages; one "token" per message character
        def apply_chat_template(self, messages, add_generation_prompt=True):
            seen.append(messages)
            return list(range(sum(len(m["content"]) for m in messages)))

    class Model:
        def eval(self):
            return self

    class Engine:                       # answers every prompt with the user's target in the authors' tags
        def __init__(self, model, tok, **kw):
            pass

        def prefill(self, pids):        # eval.py: one prefill per batch, handed to generate (and score)
            return ("cache", "logits")

        def generate(self, pids, num_samples, prefill, **kw):   # sampling off: num_samples = 1, the greedy row
            assert num_samples == 1 and prefill == ("cache", "logits") and kw["temperature"] == [0.0]
            texts = [f"<think>x</think><item_id>{target}</item_id>" for target in targets[:len(pids)]]
            del targets[:len(pids)]
            return type("G", (), {"texts": texts, "stop_reasons": ["stop"] * len(pids)})

    monkeypatch.setattr(tokenizer.Tokenizer, "from_pretrained", classmethod(lambda cls, *a, **k: Tok()))
    monkeypatch.setattr(gemma3.Gemma3, "from_pretrained", classmethod(lambda cls, *a, **k: Model()))
    monkeypatch.setattr(ev, "Engine", Engine)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    sets = official.candidates("test")[:3]
    want = authors_prompts(official)
    targets = [official.items[cs.target].id for cs in sets]
    info = type("I", (), {"device": torch.device("cpu"), "is_main": False})
    for prompts in ("authors", "ours"):
        cfg = ev.EvalConfig(prompts=prompts, task=TaskConfig(max_prompt_tokens=10**6), batch_size=2, dtype="float32",
                            sampling=ev.SamplingConfig(enabled=False), exact=ev.ExactConfig(enabled=False))
        seen.clear()
        targets[:] = [official.items[cs.target].id for cs in sets]
        recs = ev.evaluate_model(cfg, "m", ev.ModelSpec(path=str(tmp_path)), official, sets, info)
        verbatim = [m == want[cs.user].messages for m, cs in zip(seen, sets)]
        assert all(verbatim) if prompts == "authors" else not any(verbatim)
        if prompts == "authors":
            assert [r["greedy"]["hit"] for r in recs] == [True] * 3
