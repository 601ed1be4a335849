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


def test_rationale_prefix_rules(world):
    tok = world["tok"]
    gen = tok.encode("<think>likes warm things</think><item>I3</item>")
    ids, text = ev.rationale_prefix(tok, gen, tok.decode(gen), "think", "item")
    assert text == "<think>likes warm things</think>" and tok.decode(ids) == text
    # an open rationale cut by the token budget is closed; an answer without reasoning is scored where it starts
    assert ev.rationale_prefix(tok, [], "<think>likes warm", "think", "item")[1] == "<think>likes warm</think>"
    assert ev.rationale_prefix(tok, [], "<item>I3</item>", "think", "item") == ([], "")
    assert ev.rationale_prefix(tok, [], "blah <item>I3", "think", "item")[1] == "blah "


def test_judge_score_parse():
    assert ev.judge_score("<score>3</score> convincing") == 3
    assert ev.judge_score("<score> 0 </score>") == 0
    assert ev.judge_score("<score>7</score>") is None
    assert ev.judge_score("no score") is None


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
    assert res["compute_dtype"] == "float32"  # results.json says which dtype computed the numbers
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
                if k in ("value",):
                    assert 0.0 <= v <= 1.0
                if k == "ci95" and v is not None and k != "mean_ci95":
                    assert 0.0 <= v[0] <= v[1] <= 1.0
                walk(v)
    walk({k: v for k, v in res["models"].items()})
    table = (out / "results.md").read_text()
    assert "| SASRec |" in table and "| base |" in table and "| plain |" in table
    # SASRec row = SASRec ranks on the same candidate lists
    from twice.data import load_dataset
    from twice.sasrec import rank_candidates
    ds = load_dataset(world["data"])
    cs = ds.candidates("test")
    ranks = rank_candidates(SASRec.load(world["sasrec"]), [ds.history(c.user, "test") for c in cs],
                            [c.candidates for c in cs], [c.target for c in cs]).tolist()
    assert res["models"]["sasrec"]["exact"]["hr@1"]["value"] == pytest.approx(sum(r == 1 for r in ranks) / N_USERS)


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
            if reasoning:
                # the scored prefix: the greedy tokens through </think>, or its text re-encoded
                g = tok.encode(p["greedy"]["text"])
                pre, _ = ev.rationale_prefix(tok, g, p["greedy"]["text"], "think", "item")
                assert tok.decode(pre) == p["exact"]["rationale_scored"]
                prefix = prefix + pre
            ref = []
            for cid in p["candidates"]:
                cont = tok.encode(f"<item>{cid}</item>")
                ids = torch.tensor([prefix + cont])
                with torch.no_grad():
                    lp = torch.log_softmax(model(ids).double(), -1)[0]       # [T, V] full forward, float64 softmax
                n = len(prefix)
                ref.append(sum(float(lp[n - 1 + t, cont[t]]) for t in range(len(cont))))
            assert p["exact"]["scores"] == pytest.approx(ref, abs=2e-4)
            ref_rank = 1 + sum(1 for j, s in enumerate(ref) if j != p["candidates"].index(p["target"])
                               and s >= ref[p["candidates"].index(p["target"])])
            assert p["exact"]["rank"] == ref_rank


# ----------------------------------------------------------------------------------------------- judge

class _FakeJudge(http.server.BaseHTTPRequestHandler):
    seen: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        text = body["messages"][-1]["content"]
        _FakeJudge.seen.append(text)
        score = 0 if "does NOT exist" in text else 2
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
    assert j["n"] == 4 and j["scored"] == 4 and j["failed"] == 0 and len(_FakeJudge.seen) == 4
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


def test_run_judge_on_crafted_records(world, tmp_path):
    """Existing vs hallucinated items reach the judge as such; an unparseable judgment is counted as failed."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    from twice.data import load_dataset
    ds = load_dataset(world["data"])
    recs = [{"user": 1, "greedy": {"item": "I3", "rationale": "likes warm", "text": ""}},
            {"user": 2, "greedy": {"item": "NOPE", "rationale": "made up", "text": ""}},
            {"user": 3, "greedy": {"item": "I5", "rationale": "GARBLE", "text": ""}}]
    try:
        _FakeJudge.seen.clear()
        cfg = ev.EvalConfig(data_dir=world["data"])
        cfg.judge.llm.base_url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
        cfg.judge.n_users = 10
        s = ev.run_judge(cfg, "m", recs, ds, tmp_path)
    finally:
        srv.shutdown()
    assert s["n"] == 3 and s["scored"] == 2 and s["failed"] == 1
    assert s["distribution"] == {"0": 1, "1": 0, "2": 1, "3": 0} and s["mean"] == pytest.approx(1.0)
    rows = [json.loads(x) for x in (tmp_path / "judge_m.jsonl").read_text().splitlines()]
    assert [(r["user"], r["item_exists"], r["score"]) for r in rows] == [(1, True, 2), (2, False, 0), (3, True, None)]
    first = [t for t in _FakeJudge.seen if "likes warm" in t]
    assert len(first) == 1 and "title:" in first[0] and "exists in the catalogue" in first[0]


def _assert_close(a, b, where):
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
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
            "exact.constrained=true", "batch_size=4", *TASK]
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
            if proto == "label":
                continue
            _assert_close(a[proto], b[proto], (m, proto))
    p1 = [json.loads(x) for x in (tmp_path / "one" / "predictions_base.jsonl").read_text().splitlines()]
    p2 = [json.loads(x) for x in (tmp_path / "two" / "predictions_base.jsonl").read_text().splitlines()]
    assert [r["user"] for r in p2] == [r["user"] for r in p1]
    for r1, r2 in zip(p1, p2):
        assert r1["greedy"]["text"] == r2["greedy"]["text"] and r1["exact"]["rank"] == r2["exact"]["rank"]
        assert r1["exact"]["scores"] == pytest.approx(r2["exact"]["scores"], abs=1e-4)
    assert not list((tmp_path / "two").glob(".predictions_*"))
