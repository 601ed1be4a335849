"""eval.py: protocol metrics on hand-made predictions, exact ranking vs full forwards, the judge on loopback.

    python -m pytest tests/test_eval.py -q
"""
from __future__ import annotations

import http.server
import json
import math
import random
import sys
import threading
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import eval as ev  # noqa: E402
from twice.gemma3 import PRESETS, Gemma3  # noqa: E402
from twice.sasrec import SASRec, SASRecConfig  # noqa: E402
from twice.tokenizer import Tokenizer  # noqa: E402

torch.set_num_threads(1)

N_ITEMS, N_USERS, SEQ, N_CANDS = 12, 6, 5, 4
WORDS = "red blue soft warm small cozy light dark".split()


# ----------------------------------------------------------------------------------------------- pure metrics

def test_sample_order_ranking_keeps_order_dedups_and_drops_invalid():
    cands = ["A", "B", "C", "D"]
    # sample order: C, (none), X (not a candidate), C again, " A " (whitespace), B
    items = ["C", None, "X", "C", " A ", "B"]
    assert ev.sample_order_ranking(items, cands) == ["C", "A", "B"]
    assert ev.list_rank(["C", "A", "B"], "A", 4) == 2
    assert ev.list_rank(["C", "A", "B"], "D", 4) == 5          # absent: C + 1, outside every cut-off
    assert ev.sample_order_ranking([None, "Z"], cands) == []


def test_ranked_metrics_hand_computed():
    # four users: target first, second, absent (rank C+1 = 31), fifth
    ranks = [1, 2, 31, 5]
    m = ev.ranked_metrics(ranks, [1, 5], mrr=True)
    assert m["hr@1"]["value"] == pytest.approx(1 / 4)
    assert m["hr@5"]["value"] == pytest.approx(3 / 4)
    ndcg5 = (1.0 + 1 / math.log2(3) + 0.0 + 1 / math.log2(6)) / 4
    assert m["ndcg@5"]["value"] == pytest.approx(ndcg5)
    assert m["ndcg@1"]["value"] == pytest.approx(1 / 4)
    assert m["mrr"]["value"] == pytest.approx((1 + 1 / 2 + 1 / 31 + 1 / 5) / 4)
    lo, hi = m["hr@5"]["ci95"]
    assert lo < 0.75 < hi and 0 <= lo and hi <= 1
    # the same from sampled predictions: the paper's protocol end to end on hand-made samples
    cands = ["A", "B", "C", "D", "E", "F"]
    samples = {"A": ["A", "B", "A", None, "C"],          # target first -> rank 1
               "B": ["Q", "C", "C", "B", "B"],           # Q invalid, C dup -> [C, B]: rank 2
               "F": ["A", "B", "C", "D", "E"],           # never sampled -> absent
               "E": ["A", "B", "C", "D", "E"]}           # rank 5
    got = [ev.list_rank(ev.sample_order_ranking(s, cands), t, 30) for t, s in samples.items()]
    assert got == ranks


def test_authors_id_set_keeps_hallucinated_id_shaped_answers():
    """Issue 11 item 8: evaluation_vllm.py keeps every ASIN-shaped answer (candidate or not), deduplicated by a set;
    our protocol keeps only candidates, in sample order. Per user the set protocol reports its expectation."""
    from twice.metrics import set_expectation
    cands = ["B000000001", "B000000002", "B000000003"]
    items = ["B000000002", "B0HALLUC1N", None, "not an id", "B000000002", " B000000003 ", "b000000009"]
    d = ev.authors_id_set(items, "[A-Z0-9]{10}")
    assert d == ["B000000002", "B000000003", "B0HALLUC1N"]              # hallucinated ASIN kept, junk dropped
    assert ev.sample_order_ranking(items, cands) == ["B000000002", "B000000003"]
    # target B000000003: ours rank 2 (HR@1 0); theirs: in a set of 3 -> HR@1 1/3, NDCG@5 mean of 1/log2(r+1), r<=3
    assert ev.list_rank(["B000000002", "B000000003"], "B000000003", 30) == 2
    hr1, _ = set_expectation("B000000003" in d, len(d), 1)
    _, nd5 = set_expectation("B000000003" in d, len(d), 5)
    assert hr1 == pytest.approx(1 / 3) and nd5 == pytest.approx((1 + 1 / math.log2(3) + 0.5) / 3)
    assert ev.authors_id_set(["12", "7", None], "[0-9]+") == ["12", "7"]


def test_pessimistic_rank_and_trie_greedy():
    assert ev.pessimistic_rank([0.5, 0.1, 0.5, 0.9], 0) == 3      # one above, one tie counted above
    assert ev.pessimistic_rank([1.0, 1.0, 1.0], 1) == 3            # all tied: worst rank
    with pytest.raises(ValueError):
        ev.pessimistic_rank([float("nan"), 1.0], 0)
    # trie: seqs share a first token; per-token lps are conditional, so the greedy walk may pick a sequence
    # whose SUM is not the largest (greedy is not exact ranking)
    seqs = [[5, 1, 9], [5, 2, 9], [6, 3, 9]]
    lps = [[-0.5, -3.0, 0.0], [-0.5, -0.1, 0.0], [-0.9, -0.01, 0.0]]
    assert ev.trie_greedy(seqs, lps) == 1          # 5 beats 6, then 2 beats 1
    lps2 = [[-0.5, -3.0, 0.0], [-0.5, -2.9, 0.0], [-0.6, 0.0, 0.0]]
    assert ev.trie_greedy(seqs, lps2) == 1         # greedy picks 5 (sum of [6,3,9] = -0.6 would be higher)


def test_rationale_text_rules():
    assert ev.rationale_text("<think>likes warm things</think><item>I3</item>", "think", "item") == \
        "<think>likes warm things</think>"
    # an open rationale cut by the token budget is closed; an answer without reasoning is scored where it starts
    assert ev.rationale_text("<think>likes warm", "think", "item") == "<think>likes warm</think>"
    assert ev.rationale_text("<item>I3</item>", "think", "item") == ""
    assert ev.rationale_text("blah <item>I3", "think", "item") == "blah "


REAL = Path("~/.cache/twice/gemma-3-270m").expanduser()


@pytest.mark.parametrize("which", ["tiny", "gemma"])
def test_exact_scores_the_sft_response_ids(world, which):
    """Issue 11 item 5: the ids exact ranking feeds + scores for candidate c are exactly the ids SFT trains on for
    the response naming c (tasks.encode_example), with and without a rationale, for every candidate. Gemma's
    tokenizer merges across `</think><item>` ('think', '><', 'item'), so encoding `<item>ID</item>` on its own (the
    old scheme) scores tokens SFT never saw."""
    import dataclasses
    from twice.data import load_dataset
    from twice.tasks import TaskConfig, encode_example, recommend_example
    if which == "gemma" and not (REAL / "tokenizer.model").exists():
        pytest.skip(f"{REAL} is absent (python -m twice.convert gemma-3-270m)")
    tok = world["tok"] if which == "tiny" else Tokenizer.from_pretrained(REAL)
    ds = load_dataset(world["data"])
    task = TaskConfig(max_history=3, desc_chars=0, review_chars=0, max_prompt_tokens=4096)
    tags = task.tags
    old_scheme_differs = False
    for cs in ds.candidates("test")[:3]:
        for rationale in (None, "likes warm things, rated the red one Good", "cozy >< small"):
            ex = recommend_example(ds, ds.user(cs.user), "test", list(cs.candidates), task, tokenizer=tok,
                                   reasoning=rationale is not None, rationale=rationale)
            ids, mask = encode_example(tok, ex)
            n_prompt = mask.index(1)
            # what the model would have written before its answer (the rationale as SFT rendered it)
            before = ex.response[:ex.response.index(tags.wrap_item(ex.target_id))]
            shared, conts = ev.candidate_continuations(tok, ev.rationale_text(ex.response, "think", "item"),
                                                       ex.candidate_ids, tags)
            assert ev.rationale_text(ex.response, "think", "item") == before
            for c, cont in zip(ex.candidate_ids, conts):
                ex_c = dataclasses.replace(ex, response=before + tags.wrap_item(c))
                ids_c, mask_c = encode_example(tok, ex_c)
                sft_response = ids_c[n_prompt:-1]                    # without the closing <end_of_turn>
                assert mask_c.index(1) == n_prompt and ids_c[:n_prompt] == ids[:n_prompt]
                assert shared + cont == sft_response, (c, rationale)
                assert len(cont) >= 1
                old = tok.encode(before) + tok.encode(tags.wrap_item(c))
                old_scheme_differs |= old != sft_response
            assert len(set(map(tuple, conts))) == len(conts)
    if which == "gemma":
        assert old_scheme_differs     # the bug this guards against is real for Gemma's tokenizer


def test_judge_score_parse():
    assert ev.judge_score("<score>3</score> convincing") == 3
    assert ev.judge_score("<score> 1 </score>") == 1
    assert ev.judge_score("<score>0</score>") is None        # 0 = Incorrect is decided in code, not by the judge
    assert ev.judge_score("<score>7</score>") is None
    assert ev.judge_score("no score") is None


def test_judge_rubric_is_the_papers():
    """Issue 11 item 10: the rubric's words are the paper's (RQ2: "0: Incorrect, 1: Correct and Insufficient
    Rationale, 2: Correct and Acceptable Rationale, 3: Correct and Satisfying Rationale"), and the judge is asked
    for 1-3 only: correctness (the item exists in the vocabulary) is not its call."""
    from twice import prompts
    assert prompts.JUDGE_RUBRIC == {0: "Incorrect", 1: "Correct and Insufficient Rationale",
                                    2: "Correct and Acceptable Rationale", 3: "Correct and Satisfying Rationale"}
    text = prompts.judge_prompt("title:a\n- item_id:1", "title:b\n- item_id:2", "because")
    for k in (1, 2, 3):
        assert f"\n{k}: {prompts.JUDGE_RUBRIC[k]}\n" in text
    assert "0:" not in text and "N = 1, 2 or 3" in text


# ----------------------------------------------------------------------------------------------- a tiny world

def _write_world(root: Path) -> dict:
    data = root / "data"
    data.mkdir(parents=True)
    rng = random.Random(0)
    with open(data / "items.jsonl", "w") as f:
        for i in range(1, N_ITEMS + 1):
            f.write(json.dumps({"idx": i, "id": f"I{i}", "title": f"{WORDS[i % 8]} {WORDS[(3 * i) % 8]}",
                                "description": "", "details": {}}) + "\n")
    users = []
    with open(data / "users.jsonl", "w") as f:
        for u in range(1, N_USERS + 1):
            items = rng.sample(range(1, N_ITEMS + 1), SEQ)
            users.append(items)
            f.write(json.dumps({"idx": u, "id": f"U{u}", "items": items, "ratings": [4] * SEQ,
                                "reviews": ["ok"] * SEQ, "timestamps": list(range(SEQ))}) + "\n")
    for split, back in (("valid", 2), ("test", 1)):
        with open(data / f"candidates_{split}.jsonl", "w") as f:
            for u, items in enumerate(users, 1):
                negs = rng.sample([i for i in range(1, N_ITEMS + 1) if i not in items], N_CANDS - 1)
                c = negs + [items[-back]]
                rng.shuffle(c)
                f.write(json.dumps({"user": u, "target": items[-back], "candidates": c}) + "\n")
    (data / "meta.json").write_text(json.dumps({"source": "test", "version": 1}))
    corpus = [f"title:{WORDS[i % 8]} {WORDS[(3 * i) % 8]}\n- item_id:I{i}" for i in range(1, N_ITEMS + 1)]
    corpus += ["<think>likes warm things</think><item>I3</item>"] * 20 + ["[Purchase History] [Candidate List]"]
    tok = Tokenizer.train_tiny(root / "tok", corpus, vocab_size=512)
    torch.manual_seed(0)
    model = Gemma3.from_config(PRESETS["tiny"])
    model.save_pretrained(root / "model", tokenizer_path=root / "tok" / "tokenizer.model")
    sas = SASRec(SASRecConfig(n_items=N_ITEMS, hidden=16, blocks=1, heads=1, inner=16, maxlen=8, dropout=0.0))
    sas.init_weights()
    sas.save(root / "sasrec")
    return {"data": str(data), "model": str(root / "model"), "sasrec": str(root / "sasrec"), "tok": tok}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return _write_world(tmp_path_factory.mktemp("evalworld"))


TASK = ["task.max_history=3", "task.desc_chars=0", "task.review_chars=0"]


def _run(world, out, *extra):
    argv = ["run_dir=" + str(out), "data_dir=" + world["data"], "sasrec_dir=" + world["sasrec"],
            "models.base.path=" + world["model"], "models.plain.path=" + world["model"],
            "models.plain.reasoning=false", "greedy.max_new_tokens=6", "sampling.max_new_tokens=5",
            "sampling.num_samples=3", "sampling.ks=[1,3]", "exact.constrained=true", "batch_size=4",
            "dtype=float32", *TASK, *extra]  # fp32: scores are compared with fp32 full forwards
    res = ev.main(argv)
    assert set(res["compute_dtype"].values()) == {"float32"}  # results.json: the dtype that computed each row
    return res


def test_eval_end_to_end_files_and_consistency(world, tmp_path):
    res = _run(world, tmp_path / "run")
    out = tmp_path / "run"
    for f in ("results.json", "results.md", "predictions_base.jsonl", "predictions_plain.jsonl", "config.yaml"):
        assert (out / f).exists(), f
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(res))
    preds = [json.loads(x) for x in (out / "predictions_base.jsonl").read_text().splitlines()]
    assert [p["user"] for p in preds] == list(range(1, N_USERS + 1))
    for p in preds:
        ranked = ev.sample_order_ranking(p["sampling"]["items"], p["candidates"])
        assert ranked == p["sampling"]["ranked"]
        ti = p["candidates"].index(p["target"])
        assert p["exact"]["rank"] == ev.pessimistic_rank(p["exact"]["scores"], ti)
        assert p["greedy"]["hit"] == (p["greedy"]["item"] == p["target"])
        assert p["constrained"]["item"] in p["candidates"]
    m = res["models"]["base"]
    assert m["exact"]["hr@1"]["value"] == pytest.approx(sum(p["exact"]["rank"] == 1 for p in preds) / N_USERS)
    assert m["sampling"]["hr@1"]["value"] == pytest.approx(sum(p["sampling"]["rank"] == 1 for p in preds) / N_USERS)
    assert m["greedy"]["valid"]["value"] + m["greedy"]["invalid"]["value"] == pytest.approx(1.0)
    assert m["greedy"]["no_tag"]["value"] + m["greedy"]["hallucination"]["value"] == \
        pytest.approx(m["greedy"]["invalid"]["value"])

    def walk(x):
        if isinstance(x, dict):
            for k, v in x.items():
                if k in ("length_spearman", "orderings"):
                    continue
                if k in ("value",):
                    assert 0.0 <= v <= 1.0
                if k == "ci95" and v is not None and k != "mean_ci95":
                    assert 0.0 <= v[0] <= v[1] <= 1.0
                walk(v)
    walk({k: v for k, v in res["models"].items()})
    table = (out / "results.md").read_text()
    assert "| SASRec (ranking) |" in table
    assert "| base |" in table and "| plain |" in table and "| random (expectation) |" in table
    assert "\u2020 SASRec" in table and "DEVIATION" in table
    assert "not the sampling protocol" in res["models"]["sasrec"]["note"]
    for ln in table.splitlines():
        if ln.startswith("| SASRec"):
            assert ln.split("|")[2].strip().endswith("\u2020")       # its sampling cell is marked
    # the random row: exact expectations for C=4 candidates, 3 samples (twice.metrics closed forms)
    rnd = res["baselines"]["random"]
    assert rnd["exact"]["hr@1"]["value"] == pytest.approx(1 / 4)
    assert rnd["sampling"]["hr@3"]["value"] == pytest.approx(1 - (3 / 4) ** 3)
    assert rnd["greedy"]["hr@1"]["value"] == pytest.approx(1 / 4)
    # the authors' reading of the same samples: set expectation per user, recomputed from the predictions
    from twice.metrics import set_expectation
    want = [set_expectation(p["target"] in p["sampling"]["authors"]["ids"], len(p["sampling"]["authors"]["ids"]), 1)[0]
            for p in preds]
    assert m["authors"]["hr@1"]["value"] == pytest.approx(sum(want) / N_USERS)
    # paired tests, recomputed by hand from the two models' predictions
    plain = [json.loads(x) for x in (out / "predictions_plain.jsonl").read_text().splitlines()]
    a = [float(p["exact"]["rank"] == 1) for p in plain]
    b = [float(p["exact"]["rank"] == 1) for p in preds]
    c = res["paired"]["plain vs base"]["exact"]["hr@1"]
    assert c["diff"] == pytest.approx((sum(a) - sum(b)) / N_USERS) and c["n"] == N_USERS
    assert c["mcnemar"]["a_only"] == sum(x and not y for x, y in zip(a, b))
    assert c["mcnemar"]["b_only"] == sum(y and not x for x, y in zip(a, b))
    assert set(res["paired"]) == {"base vs sasrec", "plain vs base", "plain vs sasrec"}
    assert "Paired differences" in table and "| plain vs base | exact |" in table
    # the length diagnostic: mean within-list Spearman(#scored tokens, score) over users with unequal lengths
    from twice.metrics import spearman
    rhos = [spearman(p["exact"]["scored_tokens"], p["exact"]["scores"]) for p in preds]
    rhos = [r for r in rhos if r is not None]
    ls = m["exact"]["length_spearman"]
    assert ls["n_users"] == len(rhos)
    assert (ls["mean"] is None) if not rhos else ls["mean"] == pytest.approx(sum(rhos) / len(rhos))
    # SASRec row = SASRec ranks on the same candidate lists
    from twice.data import load_dataset
    from twice.sasrec import rank_candidates
    ds = load_dataset(world["data"])
    cs = ds.candidates("test")
    ranks = rank_candidates(SASRec.load(world["sasrec"]), [ds.history(c.user, "test") for c in cs],
                            [c.candidates for c in cs], [c.target for c in cs]).tolist()
    assert res["models"]["sasrec"]["exact"]["hr@1"]["value"] == pytest.approx(sum(r == 1 for r in ranks) / N_USERS)


def test_a_model_without_sampling_keeps_greedy_and_exact_and_drops_only_its_sampling_tests(world, tmp_path):
    """models.NAME.sampling=false (the main job's base model, which never answers in format): its greedy and exact
    rows are the ones a full run gives (same tokens, same scores), it has no sampling/authors block, its sampling
    cells read "-", and only the sampling tests that involve it are dropped."""
    full = _run(world, tmp_path / "full")
    part = _run(world, tmp_path / "part", "models.base.sampling=false")
    b_full, b_part = full["models"]["base"], part["models"]["base"]
    assert "sampling" not in b_part and "authors" not in b_part
    assert b_part["exact"] == b_full["exact"] and b_part["greedy"] == b_full["greedy"]
    assert part["models"]["plain"]["sampling"] == full["models"]["plain"]["sampling"]
    preds = [json.loads(x) for x in (tmp_path / "part" / "predictions_base.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (tmp_path / "full" / "predictions_base.jsonl").read_text().splitlines()]
    assert all("sampling" not in p for p in preds)
    assert [p["greedy"]["text"] for p in preds] == [w["greedy"]["text"] for w in want]
    assert [p["exact"]["scores"] for p in preds] == [w["exact"]["scores"] for w in want]
    assert set(part["paired"]["plain vs base"]) == {"exact"}
    assert set(part["paired"]["base vs sasrec"]) == {"exact"}
    assert set(part["paired"]["plain vs sasrec"]) == set(full["paired"]["plain vs sasrec"]) == {"exact", "sampling",
                                                                                                "authors"}
    lines = (tmp_path / "part" / "results.md").read_text().splitlines()
    head = [c.strip() for c in lines[0].split("|")[1:-1]]
    base = dict(zip(head, (c.strip() for c in next(ln for ln in lines if ln.startswith("| base |")).split("|")[1:-1])))
    assert base["sampling HR@1"] == base["authors HR@1"] == "-" and base["exact HR@1"] != "-"


def test_exact_ranking_equals_full_forward_loglik(world, tmp_path):
    """The engine's one-prefill candidate scores == log-likelihoods from plain full forwards (no cache), so the
    exact protocol ranks candidates by sum log p(<item>ID</item> | prompt [+ rationale])."""
    _run(world, tmp_path / "run", "sampling.enabled=false")
    tok = world["tok"]
    model = Gemma3.from_pretrained(world["model"]).eval()
    from twice.data import load_dataset
    from twice.tasks import TaskConfig, prompt_ids, recommend_example
    ds = load_dataset(world["data"])
    task = TaskConfig(max_history=3, desc_chars=0, review_chars=0)
    for name, reasoning in (("base", True), ("plain", False)):
        preds = [json.loads(x) for x in (tmp_path / "run" / f"predictions_{name}.jsonl").read_text().splitlines()]
        for p in preds[:3]:
            c = [c for c in ds.candidates("test") if c.user == p["user"]][0]
            ex = recommend_example(ds, ds.user(p["user"]), "test", list(c.candidates), task, tokenizer=tok,
                                   reasoning=reasoning, with_response=False)
            prefix = prompt_ids(tok, ex)
            rationale = ev.rationale_text(p["greedy"]["text"], "think", "item") if reasoning else ""
            assert p["exact"]["rationale_scored"] == rationale
            full = [tok.encode(f"{rationale}<item>{cid}</item>") for cid in p["candidates"]]   # as SFT encodes
            n_shared = p["exact"]["shared_tokens"]
            assert all(f[:n_shared] == full[0][:n_shared] for f in full)
            assert p["exact"]["scored_tokens"] == [len(f) - n_shared for f in full]
            ref = []
            for f in full:
                ids = torch.tensor([prefix + f])
                with torch.no_grad():
                    lp = torch.log_softmax(model(ids).double(), -1)[0]       # [T, V] full forward, float64 softmax
                n = len(prefix) + n_shared                                   # score the tokens after the shared ones
                ref.append(sum(float(lp[n - 1 + t, f[n_shared + t]]) for t in range(len(f) - n_shared)))
            assert p["exact"]["scores"] == pytest.approx(ref, abs=2e-4)
            ref_rank = 1 + sum(1 for j, s in enumerate(ref) if j != p["candidates"].index(p["target"])
                               and s >= ref[p["candidates"].index(p["target"])])
            assert p["exact"]["rank"] == ref_rank


def test_one_prefill_one_decode_equals_separate_protocol_calls(world, tmp_path):
    """eval's batch path (one prefill per batch, greedy + sampled rows in one decode, exact scoring continuing the
    batch prefill) gives what separate calls give: Engine.greedy, Engine.generate with the per-user seeds, and
    Engine.score with its own prefill -- the same texts and the same scores. And the per-user results do not
    depend on how users are batched (batch_size 4 vs 5: other batch mates, other padding)."""
    res = _run(world, tmp_path / "run")
    _run(world, tmp_path / "b5", "batch_size=5")
    from twice.data import load_dataset
    from twice.engine import Engine
    from twice.tasks import TaskConfig, prompt_ids, recommend_example
    tok = world["tok"]
    ds = load_dataset(world["data"])
    task = TaskConfig(max_history=3, desc_chars=0, review_chars=0)
    engine = Engine(Gemma3.from_pretrained(world["model"]).eval(), tok)
    K, seed = 3, 0                                              # _run: sampling.num_samples=3, sampling.seed=0
    preds = [json.loads(x) for x in (tmp_path / "run" / "predictions_base.jsonl").read_text().splitlines()]
    other = [json.loads(x) for x in (tmp_path / "b5" / "predictions_base.jsonl").read_text().splitlines()]
    sets = {c.user: c for c in ds.candidates("test")}
    for b0 in range(0, len(preds), 4):                          # _run: batch_size=4
        batch = preds[b0:b0 + 4]
        pids = [prompt_ids(tok, recommend_example(ds, ds.user(p["user"]), "test", list(sets[p["user"]].candidates),
                                                  task, tokenizer=tok, reasoning=True, with_response=False))
                for p in batch]
        g = engine.greedy(pids, max_new_tokens=6, stop_strings=["</item>"])
        s = engine.generate(pids, num_samples=K, max_new_tokens=5, temperature=1.5, top_k=120, top_p=0.95,
                            stop_strings=["</item>"], seeds=[seed + p["user"] * K + k for p in batch for k in range(K)])
        for i, p in enumerate(batch):
            assert p["greedy"]["text"] == g.texts[i]
            assert p["sampling"]["texts"] == s.texts[i * K:(i + 1) * K]
            shared, conts = ev.candidate_continuations(tok, p["exact"]["rationale_scored"], p["candidates"],
                                                       ev.TaskConfig().tags)
            assert p["exact"]["scores"] == pytest.approx(engine.score(pids[i] + shared, conts), abs=1e-4)
    for p, q in zip(preds, other):
        assert p["greedy"]["text"] == q["greedy"]["text"] and p["sampling"]["texts"] == q["sampling"]["texts"]
        assert p["exact"]["scores"] == pytest.approx(q["exact"]["scores"], abs=1e-4)
    t = res["models"]["base"]["time_s"]                         # where the wall time went, per phase
    assert set(t) == {"prefill", "decode", "exact", "total", "users", "batch_size"} and t["users"] == N_USERS
    assert min(t["prefill"], t["decode"], t["exact"]) >= 0 and t["prefill"] + t["decode"] + t["exact"] <= t["total"]


# ----------------------------------------------------------------------------------------------- judge

class _FakeJudge(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        _FakeJudge.seen.append(text)
        score = 0 if "SAYZERO" in text else 2
        answer = "no idea" if "GARBLE" in text else f"<score>{score}</score> fine."
        out = {"choices": [{"message": {"role": "assistant", "content": answer}}],
               "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
        data = json.dumps(out).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *a):
        pass


def test_judge_against_fake_server(world, tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    try:
        _FakeJudge.seen.clear()
        url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        res = _run(world, tmp_path / "run", "sampling.enabled=false", "exact.enabled=false", "judge.enabled=true",
                   f"judge.llm.base_url={url}", "judge.n_users=4", "judge.models=[base]", "sasrec_dir=")
    finally:
        srv.shutdown()
    j = res["models"]["base"]["judge"]
    assert "judge" not in res["models"]["plain"]
    assert j["n"] == 4 and j["scored"] == 4 and j["failed"] == 0 and len(_FakeJudge.seen) == j["sent_to_judge"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "judge_base.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    lines = (tmp_path / "run" / "predictions_base.jsonl").read_text().splitlines()
    preds = {p["user"]: p for p in map(json.loads, lines)}
    from twice.data import load_dataset
    ds = load_dataset(world["data"])
    want = [0 if preds[r["user"]]["greedy"]["item"] not in ds.item_by_id else 2 for r in rows]
    assert [r["score"] for r in rows] == want
    assert j["distribution"] == {"0": want.count(0), "1": 0, "2": want.count(2), "3": 0}
    assert j["mean"] == pytest.approx(sum(want) / 4)
    assert j["sent_to_judge"] == want.count(2)


def test_run_judge_on_crafted_records(world, tmp_path):
    """Existing vs hallucinated items reach the judge as such; an unparseable judgment is counted as failed."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    from twice.data import load_dataset
    ds = load_dataset(world["data"])
    recs = [{"user": 1, "greedy": {"item": "I3", "rationale": "likes warm", "text": ""}},
            {"user": 2, "greedy": {"item": "NOPE", "rationale": "made up", "text": ""}},
            {"user": 3, "greedy": {"item": "I5", "rationale": "GARBLE", "text": ""}},
            {"user": 4, "greedy": {"item": None, "rationale": None, "text": "no answer"}},
            {"user": 5, "greedy": {"item": "I6", "rationale": "SAYZERO", "text": ""}}]
    try:
        _FakeJudge.seen.clear()
        cfg = ev.EvalConfig(data_dir=world["data"])
        cfg.judge.llm.base_url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        cfg.judge.n_users = 10
        s = ev.run_judge(cfg, "m", recs, ds, tmp_path)
    finally:
        srv.shutdown()
    # hallucinated / missing items: 0 in code, never sent; a judge answer outside 1-3 (or none) is a failure
    assert s["n"] == 5 and s["scored"] == 3 and s["failed"] == 2 and s["sent_to_judge"] == 3
    assert len(_FakeJudge.seen) == 3 and not any("made up" in t for t in _FakeJudge.seen)
    assert s["distribution"] == {"0": 2, "1": 0, "2": 1, "3": 0} and s["mean"] == pytest.approx(2 / 3)
    rows = [json.loads(x) for x in (tmp_path / "judge_m.jsonl").read_text().splitlines()]
    assert [(r["user"], r["item_exists"], r["score"]) for r in rows] == [
        (1, True, 2), (2, False, 0), (3, True, None), (4, False, 0), (5, True, None)]
    first = [t for t in _FakeJudge.seen if "likes warm" in t]
    assert len(first) == 1 and "title:" in first[0] and "exists in the item vocabulary" in first[0]


def _assert_close(a, b, where):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            if k == "time_s":  # wall seconds: differ from run to run
                continue
            _assert_close(a[k], b[k], (*where, k))
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_close(x, y, (*where, i))
    elif isinstance(a, float):
        assert a == pytest.approx(b, abs=1e-9), where
    else:
        assert a == b, where


def test_two_ranks_equal_one_process(world, tmp_path):
    """torchrun with 2 gloo ranks (users strided, per-user results all-reduced, predictions merged by rank 0)
    writes the same results and predictions as one process."""
    import os
    import subprocess
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    argv = ["data_dir=" + world["data"], "sasrec_dir=" + world["sasrec"],
            "models={base: {path: " + world["model"] + "}}", "greedy.max_new_tokens=4", "sampling.enabled=false",
            "exact.constrained=true", "batch_size=4", "dtype=float32", *TASK]  # bf16 sums depend on batch shapes
    one = ev.main(["run_dir=" + str(tmp_path / "one"), *argv])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "eval.py"), "run_dir=" + str(tmp_path / "two"), *argv]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    for k in ("n_users", "n_candidates"):
        assert two[k] == one[k]
    for m in ("sasrec", "base"):
        a, b = one["models"][m], two["models"][m]
        for proto in a:
            if proto in ("label", "time_s"):
                continue
            _assert_close(a[proto], b[proto], (m, proto))
    p1 = [json.loads(x) for x in (tmp_path / "one" / "predictions_base.jsonl").read_text().splitlines()]
    p2 = [json.loads(x) for x in (tmp_path / "two" / "predictions_base.jsonl").read_text().splitlines()]
    assert [r["user"] for r in p2] == [r["user"] for r in p1]
    for r1, r2 in zip(p1, p2):
        assert r1["greedy"]["text"] == r2["greedy"]["text"] and r1["exact"]["rank"] == r2["exact"]["rank"]
        assert r1["exact"]["scores"] == pytest.approx(r2["exact"]["scores"], abs=1e-4)
    assert not list((tmp_path / "two").glob(".predictions_*"))


# ----------------------------------------------------------------------------------------------- inputs, resume

def test_bad_model_path_fails_fast_before_any_work(world, tmp_path, monkeypatch):
    """Issue 15 item 2: a wrong path of the LAST model fails before SASRec or any model is evaluated, in one line
    naming the field."""
    import time
    called = []
    monkeypatch.setattr(ev, "evaluate_model", lambda *a, **k: called.append(a) or [])
    t0 = time.time()
    with pytest.raises(ev.ConfigError, match=r"models\.plain\.path=/no/such/model: no such folder"):
        _run(world, tmp_path / "run", "models.plain.path=/no/such/model")
    assert time.time() - t0 < 5 and not called
    assert not (tmp_path / "run" / "results.json").exists()
    for bad, pat in (("data_dir=/no/data", r"data_dir=/no/data: no such folder"),
                     ("sasrec_dir=" + str(tmp_path), r"sasrec_dir=.*: no config.json / model.safetensors"),
                     ("models.base.path=" + str(tmp_path), r"models\.base\.path=.*: no config.json / tokenizer.model")):
        with pytest.raises(ev.ConfigError, match=pat):
            _run(world, tmp_path / "run", bad)
    assert not called
    # the command line: one line on stderr, no traceback
    import subprocess
    p = subprocess.run([sys.executable, str(ROOT / "eval.py"), "run_dir=" + str(tmp_path / "cli"),
                        "data_dir=" + world["data"], "models.sft.path=/no/such/sft"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and p.stderr.strip().splitlines() == [
        "eval.py: error: models.sft.path=/no/such/sft: no such folder"]


def test_crash_after_first_model_keeps_its_rows_and_resume_skips_it(world, tmp_path, monkeypatch):
    """A failure in model 2 leaves model 1's rows in results.json + its predictions; the rerun skips model 1 and
    gives the same numbers as one uninterrupted run."""
    real = ev.evaluate_model
    calls = []

    def crash_on_plain(cfg, name, *a, **k):
        calls.append(name)
        if name == "plain":
            raise RuntimeError("boom")
        return real(cfg, name, *a, **k)
    monkeypatch.setattr(ev, "evaluate_model", crash_on_plain)
    with pytest.raises(RuntimeError, match="boom"):
        _run(world, tmp_path / "run", "sampling.enabled=false")
    partial = json.loads((tmp_path / "run" / "results.json").read_text())
    assert set(partial["models"]) == {"sasrec", "base"} and partial["complete"] is False
    assert (tmp_path / "run" / "predictions_base.jsonl").exists()
    assert not (tmp_path / "run" / "results.md").exists()          # written only by a complete run
    calls.clear()
    monkeypatch.setattr(ev, "evaluate_model", lambda cfg, name, *a, **k: calls.append(name) or real(cfg, name, *a, **k))
    res = _run(world, tmp_path / "run", "sampling.enabled=false")
    assert calls == ["plain"] and res["complete"] is True and (tmp_path / "run" / "results.md").exists()
    assert res["models"]["base"] == partial["models"]["base"]
    once = _run(world, tmp_path / "once", "sampling.enabled=false", "resume=false")
    _assert_close({k: v for k, v in res["models"].items()}, once["models"], ("models",))
    _assert_close(res["paired"], once["paired"], ("paired",))
    # a changed setting is a different row: not skipped
    calls.clear()
    _run(world, tmp_path / "run", "sampling.enabled=false", "greedy.max_new_tokens=5")
    assert calls == ["base", "plain"]


def test_id_shaped_samples_of_one_batch_do_not_leak_into_the_next(world, tmp_path, monkeypatch):
    """A user whose samples hold ID-shaped answers must not change how the NEXT batch's prompts are built (the
    per-user ID set once shadowed the released-prompts table: batch 2 then indexed that list by user and crashed as
    soon as a trained model answered with IDs)."""
    seen = []

    def fake_ids(items, pattern):
        seen.append(items)
        return ["I3"]                    # an ID-shaped answer for every user
    monkeypatch.setattr(ev, "authors_id_set", fake_ids)
    res = _run(world, tmp_path / "run", "batch_size=1", "models.plain.path=",
               "models={base: {path: " + world["model"] + "}}")
    preds = [json.loads(x) for x in (tmp_path / "run" / "predictions_base.jsonl").read_text().splitlines()]
    assert [p["user"] for p in preds] == list(range(1, N_USERS + 1)) and len(seen) == N_USERS
    assert all(p["sampling"]["authors"] == {"ids": ["I3"], "in": p["target"] == "I3"} for p in preds)
    assert res["complete"]


def test_candidate_orderings_report_spread(world, tmp_path):
    """Issue 11 item 9: N extra seeded orderings of every user's candidates; the first value is the row itself."""
    res = _run(world, tmp_path / "run", "sampling.enabled=false", "orderings=2", "models.plain.path=",
               "models={base: {path: " + world["model"] + "}}", "exact.constrained=false")
    o = res["models"]["base"]["orderings"]
    assert o["n"] == 3
    hr = o["exact hr@1"]
    assert hr["values"][0] == res["models"]["base"]["exact"]["hr@1"]["value"] and len(hr["values"]) == 3
    assert hr["min"] <= hr["mean"] <= hr["max"] and hr["sd"] >= 0
    p0 = [json.loads(x) for x in (tmp_path / "run" / "predictions_base.jsonl").read_text().splitlines()]
    for k in (1, 2):
        pk = [json.loads(x) for x in (tmp_path / "run" / f"predictions_base.order{k}.jsonl").read_text().splitlines()]
        assert [p["user"] for p in pk] == [p["user"] for p in p0]
        assert all(sorted(a["candidates"]) == sorted(b["candidates"]) for a, b in zip(p0, pk))
        assert any(a["candidates"] != b["candidates"] for a, b in zip(p0, pk))     # really reordered
        assert hr["values"][k] == pytest.approx(sum(p["exact"]["rank"] == 1 for p in pk) / N_USERS)


def test_set_note_matches_the_math():
    """Issue 11 item 11: through a set, <= 5 distinct IDs in arbitrary order: HR@5 cannot change with the order,
    HR@1 and NDCG@5 can. The notes in eval.py and the Amazon README must say so (they said the opposite)."""
    import itertools
    ids = ["T", "A", "B", "C"]
    hr1, hr5, nd5 = set(), set(), set()
    for order in itertools.permutations(ids):
        r = ev.list_rank(list(order), "T", 30)
        hr1.add(r <= 1)
        hr5.add(r <= 5)
        nd5.add(round(1 / math.log2(r + 1), 9))
    assert hr5 == {True} and len(hr1) == 2 and len(nd5) == 4
    readme = (ROOT / "configs" / "amazon-gemma3-1b" / "README.md").read_text()
    for text in (ev.__doc__, readme):
        flat = " ".join(text.split())
        assert "HR@5/NDCG@5 depend on string hashing" not in flat
        assert "HR@5 does not depend on" in flat and "HR@1 and NDCG@5 do" in flat
