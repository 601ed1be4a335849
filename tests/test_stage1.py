"""Stage 1 (build_rationales.py + twice/rationale.py) end to end against OUR server on loopback (real HTTP):
a tiny random Gemma-3, a scripted teacher (every curation branch), retries on 500, a hanging server (timeout),
an unreachable endpoint, a refused key, a local teacher == the same model served, and resume after kill -9.

    python -m pytest tests/test_stage1.py -q
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

import build_rationales as br
from twice import prompts
from twice.config import save_config
from twice.data import load_dataset
from twice.gemma3 import PRESETS, Gemma3
from twice.llm_api import LLMError
from twice.rationale import (RationaleConfig, TeacherConfig, append_jsonl, build_request, curate, grounding_words,
                             load_exemplars, parse_teacher, read_jsonl, repair_jsonl)
from twice.serve import EngineBackend, GenOutput, ServeConfig, make_server
from twice.tokenizer import Tokenizer

torch.set_num_threads(1)  # tiny shapes; the machine is shared

ROOT = Path(__file__).resolve().parents[1]
ADJ = "crimson azure velvet woolen tiny lunar amber misty".split()
NOUN = "lamp mug scarf sock pillow kettle".split()
N_ITEMS, N_USERS = 24, 30


def write_dataset(out: Path) -> Path:
    """Items I1..I24 with distinct two-word titles; 30 users with 5..8 items (train target = items[-3])."""
    import random
    rng = random.Random(0)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "items.jsonl", "w") as f:
        for i in range(1, N_ITEMS + 1):
            f.write(json.dumps({"idx": i, "id": f"I{i}", "title": f"{ADJ[i % 8]} {NOUN[i % 6]} {i}",
                                "description": f"a {ADJ[(i + 3) % 8]} one", "details": {"Brand": f"brand{i}"}}) + "\n")
    with open(out / "users.jsonl", "w") as f:
        for u in range(1, N_USERS + 1):
            n = rng.randint(5, 8)
            items = rng.sample(range(1, N_ITEMS + 1), n)
            f.write(json.dumps({"idx": u, "id": f"U{u}", "items": items, "ratings": [rng.randint(1, 5)] * n,
                                "reviews": ["nice"] * n, "timestamps": list(range(n))}) + "\n")
    (out / "meta.json").write_text(json.dumps({"source": "test", "version": 1}))
    return out


# ---------------------------------------------------------------------------------------------------------------
# a scripted teacher (deterministic, reads the prompt it is sent): the target's number picks the curation branch

def expected_reason(target: int) -> str | None:
    return {0: "irrelevant", 1: "unparseable", 2: "degenerate", 3: "empty", 4: None}[target % 5]


def scripted_reply(r) -> str:
    text = r.messages[-1]["content"]
    if text == "Reply with OK.":  # the preflight
        return "OK"
    now = text[text.index("[Purchase History]"):]  # the customer of this request (the last user turn)
    hist, nxt = now.split("[Next Item]", 1)
    target_title = re.search(r"title:(.*)", nxt).group(1)
    k = int(re.search(r"item_id:I(\d+)", nxt).group(1))
    last_hist = re.findall(r"title:(.*)", hist)[-1]
    return {0: f"<rationale>The {last_hist} has nothing to do with {target_title}.</rationale>"
               f"<verdict>IRRELEVANT</verdict>",
            1: "I cannot help with that.",
            2: "<rationale>The customer will surely appreciate this purchase overall, no doubt at all."
               "</rationale><verdict>RELEVANT</verdict>",
            3: "<rationale>   </rationale><verdict>RELEVANT</verdict>",
            4: f"Sure. <rationale>They rated the {last_hist} highly, so the {target_title} in the same style "
               f"suits them well.</rationale>\n<verdict>RELEVANT</verdict>"}[k % 5]


class ScriptedBackend:
    name = "scripted"

    def __init__(self, delay: float = 0.0):
        self.delay, self.stops = delay, set()

    def encode_chat(self, messages):
        return list(range(sum(len(m["content"].split()) for m in messages)))

    def generate(self, reqs, on_output=None):
        time.sleep(self.delay)
        self.stops |= {r.stop for r in reqs if r.messages[-1]["content"] != "Reply with OK."}
        return [GenOutput(scripted_reply(r), len(r.prompt_ids), 20, "stop") for r in reqs]


# ---------------------------------------------------------------------------------------------------------------
# fixtures and helpers

@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("stage1")
    data = write_dataset(d / "data")
    ds = load_dataset(data)
    corpus = [build_request(ds, u.idx, RationaleConfig(n_shots=0, max_history=3), [])["messages"][1]["content"]
              for u in ds.users] + [prompts.TEACHER_SYSTEM, "<rationale>x</rationale><verdict>RELEVANT</verdict>"]
    tok = Tokenizer.train_tiny(d / "tok", corpus, vocab_size=512)
    torch.manual_seed(0)
    model = Gemma3.from_config(PRESETS["tiny"]).eval()
    model.save_pretrained(d / "model", tokenizer_path=d / "tok" / "tokenizer.model")
    return {"dir": d, "data": data, "ds": ds, "model": model, "tok": tok}


def serve(backend, **kw):
    srv = make_server(backend, cfg=kw.pop("cfg", ServeConfig()), **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def config(world, run_dir, base_url, **teacher) -> br.BuildConfig:
    t = dict(backend="api", base_url=base_url + "/v1", model="test", temperature=0.7, max_tokens=8, concurrency=2,
             timeout_s=10.0, max_retries=2, backoff_s=0.01, dtype="float32")  # local: as the fp32 served model
    t.update(teacher)
    return br.BuildConfig(data_dir=str(world["data"]), run_dir=str(run_dir), n_users=0, seed=0, chunk=4,
                          teacher=TeacherConfig(**t),
                          rationale=RationaleConfig(exemplars=str(ROOT / "configs/teacher_exemplars.jsonl"),
                                                    n_shots=0, max_history=3, min_words=8))


def records(run_dir) -> tuple[list[dict], list[dict]]:
    return read_jsonl(Path(run_dir) / "rationales.jsonl"), read_jsonl(Path(run_dir) / "dropped.jsonl")


class Proxy(ThreadingHTTPServer):
    """A misbehaving front for our server: the first `fail_first` POSTs get `fail_code`; requests for which
    `hang_if(body)` is true hang (never answered in time); everything else is forwarded to `upstream`."""
    daemon_threads = True
    block_on_close = False

    def __init__(self, upstream: str, fail_first: int = 0, fail_code: int = 500, hang_if=None):
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream, self.fail_first, self.fail_code, self.hang_if = upstream, fail_first, fail_code, hang_if
        self.count, self.failed, self.hung, self.lock = 0, 0, 0, threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server_address[1]}"


class ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def _reply(self, code, data: bytes):
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        raw = self.rfile.read(int(self.headers["Content-Length"]))
        srv = self.server
        with srv.lock:
            srv.count += 1
            fail = srv.count <= srv.fail_first
            srv.failed += fail
        if fail:
            return self._reply(srv.fail_code, b'{"error": {"message": "scripted failure"}}')
        if srv.hang_if is not None and srv.hang_if(json.loads(raw)):
            with srv.lock:
                srv.hung += 1
            time.sleep(3)  # far past the client's timeout
            self.close_connection = True
            return
        req = urllib.request.Request(srv.upstream + self.path, data=raw, method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            self._reply(r.status, r.read())


# ---------------------------------------------------------------------------------------------------------------
# curation on crafted teacher outputs

def test_curation_each_reason():
    hist, tgt = {"velvet", "lamp", "crimson"}, {"amber", "kettle", "brand7"}
    good = "They loved the velvet lamp they rated Excellent, and this amber kettle matches that cozy style."
    cases = [
        (f"<rationale>{good}</rationale><verdict>RELEVANT</verdict>", None),
        (f"<RATIONALE>{good}</RATIONALE>\n<Verdict> relevant </Verdict>", None),  # case-insensitive tags/verdict
        (f"<rationale>{good}</rationale><verdict>IRRELEVANT</verdict>", "irrelevant"),
        (f"{good}", "unparseable"),                                                # no tags
        (f"<rationale>{good}", "unparseable"),                                      # unclosed
        (f"<rationale>{good}</rationale>", "unparseable"),                          # no verdict
        (f"<rationale>{good}</rationale><verdict>MAYBE</verdict>", "unparseable"),  # bad verdict
        (f"<verdict>RELEVANT</verdict><rationale>{good}</rationale>", "unparseable"),  # verdict must follow
        ("<rationale> \n </rationale><verdict>RELEVANT</verdict>", "empty"),
        ("<rationale>The customer will like this item a lot, surely, overall.</rationale>"
         "<verdict>RELEVANT</verdict>", "degenerate"),                               # grounded in nothing
        ("<rationale>Velvet lamp fan.</rationale><verdict>RELEVANT</verdict>", "degenerate"),  # < min_words
        ("<rationale>" + "The velvet lamp is what they like. " * 3 + "</rationale><verdict>RELEVANT</verdict>",
         "degenerate"),                                                              # a sentence looping 3 times
        ("<rationale>" + "The velvet lamp is what they like. " * 2 + "</rationale><verdict>RELEVANT</verdict>",
         None),
        ("<rationale>Someone who owns a crimson thing will want one more of those for sure.</rationale>"
         "<verdict>RELEVANT</verdict>", None),                                      # a history title word suffices
        ("<rationale>It is from brand7, which makes the nicest gadgets around for sure.</rationale>"
         "<verdict>RELEVANT</verdict>", None),                                      # ... or a target attribute
    ]
    for text, want in cases:
        reason, rationale, verdict = curate(text, hist, tgt, min_words=8)
        assert reason == want, (text, reason)
    assert parse_teacher(f"x <rationale> {good} </rationale> y <verdict>RELEVANT</verdict>") == (good, "RELEVANT")


def test_grounding_words_and_exemplars(world):
    ds = world["ds"]
    h, t = grounding_words(ds, [1, 2], 7)
    assert {"azure", "mug", "velvet", "scarf"} <= h        # titles "azure mug 1", "velvet scarf 2"
    assert {"misty", "mug", "velvet", "brand7"} <= t and "one" not in t  # title, description, details; no stopwords
    ex = load_exemplars(ROOT / "configs/teacher_exemplars.jsonl")
    assert len(ex) >= 3 and {e["verdict"] for e in ex} == {"RELEVANT", "IRRELEVANT"}
    req = build_request(ds, 3, RationaleConfig(n_shots=2, max_history=2), ex[:2])
    assert [m["role"] for m in req["messages"]] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert req["messages"][2]["content"] == f"<rationale>{ex[0]['rationale']}</rationale><verdict>RELEVANT</verdict>"
    assert ds.items[ds.target(3, "train")].title in req["messages"][-1]["content"]
    assert ds.items[ds.history(3, "train")[-1]].title in req["messages"][-1]["content"]
    assert world["tok"].apply_chat_template(req["messages"])  # a valid Gemma-3 conversation
    for e in ex:  # the hand-written exemplars pass our own curation as labelled
        hw = set().union(*(grounding_words_text(x) for x in re.findall(r"title:(.*)", e["history"])))
        reason, _, _ = curate(f"<rationale>{e['rationale']}</rationale><verdict>{e['verdict']}</verdict>",
                              hw, grounding_words_text(e["target"]))
        assert reason == (None if e["verdict"] == "RELEVANT" else "irrelevant")


def grounding_words_text(text):
    from twice.rationale import content_words
    return content_words(text)


def test_repair_torn_last_line(tmp_path):
    p = tmp_path / "r.jsonl"
    fd = os.open(p, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    append_jsonl(fd, {"user": 1})
    append_jsonl(fd, {"user": 2})
    os.write(fd, b'{"user": 3, "rat')  # a write torn by a kill
    os.close(fd)
    assert repair_jsonl(p) == len(b'{"user": 3, "rat')
    assert read_jsonl(p) == [{"user": 1}, {"user": 2}]
    assert repair_jsonl(p) == 0
    p.write_bytes(b'{"user": 1}\n{"user": 2, "x\n{"user": 3}\n')  # corruption a kill cannot make: an error
    with pytest.raises(ValueError, match="r.jsonl:2"):
        repair_jsonl(p)


# ---------------------------------------------------------------------------------------------------------------
# end to end over HTTP

def test_end_to_end_scripted_teacher(world, tmp_path):
    """Every user asked once; each curation branch lands where the script says; records follow build_rationales.py's docstring."""
    srv = serve(ScriptedBackend())
    try:
        stats = br.main(config(world, tmp_path / "run", srv.url))
    finally:
        srv.close()
    assert srv.backend.stops == {("</verdict>",)}  # every instance request stops decoding at the closed verdict
    ds = world["ds"]
    kept, dropped = records(tmp_path / "run")
    want = {u.idx: expected_reason(ds.target(u.idx, "train")) for u in ds.users}
    assert sorted(r["user"] for r in kept + dropped) == sorted(want)  # each user exactly once
    assert {r["user"] for r in kept} == {u for u, w in want.items() if w is None}
    for r in dropped:
        assert r["reason"] == want[r["user"]]
    for r in kept:
        assert set(r) == {"user", "history", "target", "rationale", "verdict", "teacher", "prompt_hash", "tokens"}
        assert r["history"] == ds.history(r["user"], "train") and r["target"] == ds.target(r["user"], "train")
        assert r["verdict"] == "RELEVANT" and r["teacher"] == "api:test" and len(r["prompt_hash"]) == 16
        assert ds.items[r["target"]].title in r["rationale"]
    counts = {k: sum(w == k for w in want.values()) for k in ("irrelevant", "unparseable", "degenerate", "empty")}
    assert stats["kept"] == len(kept) and stats["dropped"] == counts and stats["failed_requests"] == 0
    assert stats["pending"] == 0 and stats["done"] == N_USERS
    assert stats["tokens"]["completion"] == 20 * N_USERS
    assert json.loads((tmp_path / "run/stats.json").read_text()) == stats
    # a rerun of a finished run asks nothing and changes nothing
    srv = serve(ScriptedBackend())
    try:
        again = br.main(config(world, tmp_path / "run", srv.url))
    finally:
        srv.close()
    assert again["asked_this_run"] == 0 and records(tmp_path / "run") == (kept, dropped)


def test_end_to_end_tiny_model_served_equals_local(world, tmp_path):
    """Our server serving the tiny random Gemma-3 as the teacher (real HTTP), and the same checkpoint as a local
    teacher through the engine: every instance is accounted for, and the two give the same records."""
    backend = EngineBackend(world["model"], world["tok"], name="tiny")
    srv = serve(backend, cfg=ServeConfig(max_batch=1))  # batch 1 on both sides: bit-identical computations
    n = 8
    try:
        cfg = config(world, tmp_path / "served", srv.url, temperature=0.0, concurrency=1)
        cfg.n_users = n
        served = br.main(cfg)
    finally:
        srv.close()
    cfg = config(world, tmp_path / "local", "http://unused", backend="local", temperature=0.0,
                 model_path=str(world["dir"] / "model"), batch_size=1)
    cfg.n_users = n
    local = br.main(cfg)
    for s in (served, local):
        assert s["users"] == n and s["done"] == n and s["kept"] + sum(s["dropped"].values()) == n
        assert s["failed_requests"] == 0 and s["tokens"]["completion"] > 0
    strip = lambda rs: sorted((json.dumps({k: v for k, v in r.items() if k != "teacher"}, sort_keys=True)
                               for r in rs))
    for a, b in zip(records(tmp_path / "served"), records(tmp_path / "local")):
        assert strip(a) == strip(b)


def test_retries_500_then_succeeds(world, tmp_path):
    srv = serve(ScriptedBackend())
    proxy = Proxy(srv.url, fail_first=2, fail_code=500)
    try:
        stats = br.main(config(world, tmp_path / "run", proxy.url, max_retries=3))
    finally:
        proxy.shutdown()
        srv.close()
    assert proxy.failed == 2 and stats["failed_requests"] == 0 and stats["done"] == N_USERS


def test_hanging_server(world, tmp_path):
    """A server that never answers: the preflight times out -> a clear error. One that hangs only for one
    instance: that request is a counted failure, not recorded, and the next run asks it again."""
    srv = serve(ScriptedBackend())
    proxy = Proxy(srv.url, hang_if=lambda body: True)
    try:
        with pytest.raises(LLMError, match="preflight.*timed out"):
            br.main(config(world, tmp_path / "dead", proxy.url, timeout_s=0.3, max_retries=1))
        proxy.shutdown()
        victim = world["ds"].users[4].idx
        proxy = Proxy(srv.url, hang_if=lambda body: body.get("seed") == br.instance_seed(0, victim))
        stats = br.main(config(world, tmp_path / "run", proxy.url, timeout_s=0.3, max_retries=1))
        assert proxy.hung == 2  # first try + one retry
        assert stats["failed_requests"] == 1 and stats["pending"] == 1 and stats["done"] == N_USERS - 1
        assert victim not in {r["user"] for rs in records(tmp_path / "run") for r in rs}
        again = br.main(config(world, tmp_path / "run", srv.url))  # healthy endpoint: only the victim is asked
        assert again["asked_this_run"] == 1 and again["pending"] == 0 and again["done"] == N_USERS
    finally:
        proxy.shutdown()
        srv.close()


def test_unreachable_endpoint(world, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with pytest.raises(LLMError, match="unreachable"):
        br.main(config(world, tmp_path / "run", f"http://127.0.0.1:{port}"))


def test_refused_key(world, tmp_path, monkeypatch):
    srv = serve(ScriptedBackend(), api_key="s3cret")
    try:
        monkeypatch.setenv("TWICE_TEST_KEY", "wrong")
        with pytest.raises(LLMError, match="refused"):
            br.main(config(world, tmp_path / "run", srv.url, api_key_env="TWICE_TEST_KEY"))
        monkeypatch.delenv("TWICE_TEST_KEY")
        with pytest.raises(LLMError, match="TWICE_TEST_KEY.*not set"):
            br.main(config(world, tmp_path / "run", srv.url, api_key_env="TWICE_TEST_KEY"))
        monkeypatch.setenv("TWICE_TEST_KEY", "s3cret")
        stats = br.main(config(world, tmp_path / "run", srv.url, api_key_env="TWICE_TEST_KEY"))
        assert stats["done"] == N_USERS
        assert "s3cret" not in "".join(p.read_text() for p in (tmp_path / "run").iterdir())  # never saved
    finally:
        srv.close()


def test_resume_after_kill(world, tmp_path):
    """build_rationales.py in a subprocess, killed (SIGKILL) midway, rerun: no duplicate, no loss, and the same
    final records as an uninterrupted run."""
    srv = serve(ScriptedBackend(delay=0.1))
    try:
        cfg = config(world, tmp_path / "killed", srv.url, concurrency=1)
        cfg.chunk = 1
        save_config(cfg, tmp_path / "cfg.yaml")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen([sys.executable, str(ROOT / "build_rationales.py"), str(tmp_path / "cfg.yaml")],
                                cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kp, dp = tmp_path / "killed/rationales.jsonl", tmp_path / "killed/dropped.jsonl"
        n = lambda: sum(p.read_bytes().count(b"\n") for p in (kp, dp) if p.exists())
        deadline = time.time() + 60
        while n() < 8 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        partial = n()
        assert 8 <= partial < N_USERS, partial  # really killed midway
        srv.backend.delay = 0.0
        stats = br.main(cfg)  # resume
        assert stats["asked_this_run"] == N_USERS - partial and stats["done"] == N_USERS
        clean = br.main(config(world, tmp_path / "clean", srv.url))  # uninterrupted reference
    finally:
        srv.close()
    as_set = lambda rs: [json.dumps(r, sort_keys=True) for r in rs]
    for a, b in zip(records(tmp_path / "killed"), records(tmp_path / "clean")):
        assert len(set(as_set(a))) == len(a)  # no duplicates
        assert sorted(as_set(a)) == sorted(as_set(b))  # nothing lost, nothing different
    assert clean["kept"] == stats["kept"] and clean["dropped"] == stats["dropped"]


def test_recommend_with_sasrec(world, tmp_path):
    """/v1/recommend --sasrec: SASRec's candidate scores for the request's history (ids mapped through the dataset),
    equal to SASRec.score on the same indices; unknown ids are listed, not fatal."""
    from twice.sasrec import SASRec, SASRecConfig
    from twice.serve import sasrec_scorer
    ds = world["ds"]
    torch.manual_seed(0)
    sas = SASRec(SASRecConfig(n_items=ds.n_items, hidden=16, blocks=1, heads=1, inner=32, maxlen=8)).eval()
    sas.save(tmp_path / "sasrec")

    class Fixed(ScriptedBackend):
        def generate(self, reqs, on_output=None):
            return [GenOutput("<think>ok</think><item>I3", len(r.prompt_ids), 5, "stop") for r in reqs]

    def post(url, body):
        req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())

    srv = serve(Fixed(), sasrec=sasrec_scorer(str(tmp_path / "sasrec"), str(world["data"])))
    body = {"history": [{"id": "I5", "title": "t5"}, {"id": "I9", "title": "t9"}, {"id": "X", "title": "nope"}],
            "candidates": [{"id": "I3", "title": "a"}, {"id": "I7", "title": "b"}, {"id": "Y", "title": "c"}]}
    try:
        code, out = post(srv.url + "/v1/recommend", body)
    finally:
        srv.close()
    assert code == 200 and out["item_id"] == "I3" and out["valid"]
    with torch.inference_mode():
        ref = torch.sigmoid(sas.score(torch.tensor([[5, 9]]), torch.tensor([[3, 7]])))[0].tolist()
    got = out["sasrec"]
    assert got["scores"].keys() == {"I3", "I7"} and got["unknown"] == ["X", "Y"]
    assert got["scores"]["I3"] == pytest.approx(ref[0], abs=1e-6)
    assert got["scores"]["I7"] == pytest.approx(ref[1], abs=1e-6)
    assert got["item_id"] == ("I3" if ref[0] > ref[1] else "I7")


def test_local_teacher_reports_each_instance_as_its_row_finishes():
    """The stage-1 bar advances per answered instance: on_result fires for an instance as soon as the backend
    reports its row (EngineBackend: at the engine's syncs), in finishing order, and otherwise right after the
    engine batch (teacher.batch_size prompts) that answered it; never once for the whole chunk."""
    from twice.rationale import LocalTeacher, TeacherConfig
    from twice.serve import GenOutput

    class Rowwise:   # answers the batch's rows in reverse order, each reported before the call returns
        name = "rowwise"

        def encode_chat(self, messages):
            return [2, 3]

        def generate(self, reqs, on_output=None):
            outs = [GenOutput(f"r{r.seed}", 2, 1, "stop") for r in reqs]
            for k in reversed(range(len(reqs))):
                on_output(k, outs[k])
            return outs

    seen = []
    t = LocalTeacher(TeacherConfig(backend="local", model_path="x", batch_size=3), backend=Rowwise())
    out = t.complete([[{"role": "user", "content": str(i)}] for i in range(4)], list(range(4)),
                     on_result=lambda i, res: seen.append((i, res.text)))
    assert [o.text for o in out] == [f"r{i}" for i in range(4)]
    assert seen == [(2, "r2"), (1, "r1"), (0, "r0"), (3, "r3")]   # each once, as reported


def test_local_teacher_without_row_progress_reports_per_batch():
    """A backend that reports nothing per row: on_result fires for every instance right after its engine batch."""
    from twice.rationale import LocalTeacher, TeacherConfig
    from twice.serve import GenOutput

    class Fake:
        name, calls = "fake", 0

        def encode_chat(self, messages):
            return [2, 3]

        def generate(self, reqs, on_output=None):
            Fake.calls += 1
            return [GenOutput(f"r{r.seed}", 2, 1, "stop") for r in reqs]

    seen = []
    t = LocalTeacher(TeacherConfig(backend="local", model_path="x", batch_size=2), backend=Fake())
    out = t.complete([[{"role": "user", "content": str(i)}] for i in range(5)], list(range(5)),
                     on_result=lambda i, res: seen.append((i, res.text, Fake.calls)))
    assert [o.text for o in out] == [f"r{i}" for i in range(5)]
    assert seen == [(0, "r0", 1), (1, "r1", 1), (2, "r2", 2), (3, "r3", 2), (4, "r4", 3)]
