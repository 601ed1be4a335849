"""twice.serve: real HTTP round trips on loopback (tiny random Gemma-3 + tiny tokenizer), request validation,
concurrent requests batched by the worker, /v1/recommend.

    python -m pytest tests/test_serve.py -q
"""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from twice.engine import Engine
from twice.gemma3 import PRESETS, Gemma3
from twice.serve import EngineBackend, GenOutput, ServeConfig, make_server
from twice.tokenizer import Tokenizer

torch.set_num_threads(1)  # tiny shapes; the machine is shared

CORPUS = ["red blue soft warm small cozy light dark thing item customer review rating excellent good",
          "<think>likes it</think><item>I1</item>", "Purchase History Candidate List Instruction title item_id"] * 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tok = Tokenizer.train_tiny(d / "tok", CORPUS, vocab_size=512)
    torch.manual_seed(0)
    model = Gemma3.from_config(PRESETS["tiny"]).eval()
    return model, tok


def start(backend, **kw):
    cfg = kw.pop("cfg", None) or ServeConfig()
    srv = make_server(backend, cfg=cfg, **kw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def post(url: str, body, timeout: float = 30.0, raw: bytes | None = None, headers: dict | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class EchoBackend:
    """A fake model: answers each request with its own last user message (so mixed-up batches would show), after a
    delay per generate call (so concurrent requests pile up in the queue and get batched)."""
    name = "echo"

    def __init__(self, delay: float = 0.0, reply=None):
        self.delay, self.calls, self.reply = delay, [], reply

    def encode_chat(self, messages):
        return list(range(sum(len(m["content"].split()) for m in messages) + 3))

    def generate(self, reqs, on_output=None):
        self.calls.append(len(reqs))
        time.sleep(self.delay)
        out = []
        for r in reqs:
            text = self.reply(r) if self.reply else "echo: " + r.messages[-1]["content"]
            out.append(GenOutput(text[:1000], len(r.prompt_ids), 3, "stop"))
        return out


def test_chat_round_trip_matches_engine(tiny):
    """A real HTTP round trip; the text equals what Engine.generate gives for the same prompt and seed."""
    model, tok = tiny
    srv = start(EngineBackend(model, tok, name="tiny"))
    try:
        msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "red thing"}]
        code, body = post(srv.url + "/v1/chat/completions",
                          {"messages": msgs, "max_tokens": 7, "temperature": 0.8, "top_p": 0.9, "seed": 123})
        assert code == 200, body
        assert body["object"] == "chat.completion" and body["model"] == "tiny"
        ids = tok.apply_chat_template(msgs)
        ref = Engine(model, tok).generate([ids], 1, 7, temperature=0.8, top_p=0.9, seeds=[123])
        toks = [t for t in ref.tokens[0] if t not in tok.stop_ids]
        assert body["choices"][0]["message"] == {"role": "assistant", "content": tok.decode(toks)}
        assert body["usage"]["prompt_tokens"] == len(ids)
        assert body["usage"]["completion_tokens"] == len(toks)
        assert body["choices"][0]["finish_reason"] == ("stop" if ref.stop_reasons[0] != "length" else "length")
        # same seed, same answer; health counts the two requests
        assert post(srv.url + "/v1/chat/completions", {"messages": msgs, "max_tokens": 7, "temperature": 0.8,
                                                       "top_p": 0.9, "seed": 123})[1]["choices"] == body["choices"]
        with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
            health = json.loads(r.read())
        assert health["status"] == "ok" and health["requests"] == 2
    finally:
        srv.close()


def test_stop_string_is_cut():
    """OpenAI semantics: text ends before the EARLIEST stop string of the request, which is not returned."""
    from twice.serve import cut_at_stop
    assert cut_at_stop("abc</item>def", ("</item>",)) == ("abc", True)
    assert cut_at_stop("abc", ("x", "</item>")) == ("abc", False)
    assert cut_at_stop("a STOP b stop", ("stop", "STOP")) == ("a ", True)


def test_bad_requests_get_400(tiny):
    model, tok = tiny
    cfg = ServeConfig(max_body_bytes=4096, max_tokens_limit=16, max_context=64)
    srv = start(EngineBackend(model, tok), cfg=cfg)
    url = srv.url + "/v1/chat/completions"
    ok_msgs = [{"role": "user", "content": "hi"}]
    try:
        cases = [
            (None, b"{not json", "not valid JSON"),
            ([], None, "JSON object"),
            ({"model": "x"}, None, "missing field 'messages'"),
            ({"messages": []}, None, "non-empty list"),
            ({"messages": "hi"}, None, "non-empty list"),
            ({"messages": [{"role": "robot", "content": "hi"}]}, None, "role"),
            ({"messages": [{"role": "user", "content": 5}]}, None, "must be a string"),
            ({"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}, None, "alternate"),
            ({"messages": ok_msgs, "temperature": "hot"}, None, "'temperature' must be a number"),
            ({"messages": ok_msgs, "temperature": 9}, None, "'temperature' must be in"),
            ({"messages": ok_msgs, "top_p": 0}, None, "'top_p' must be in"),
            ({"messages": ok_msgs, "max_tokens": 1.5}, None, "'max_tokens' must be an integer"),
            ({"messages": ok_msgs, "max_tokens": True}, None, "'max_tokens' must be an integer"),
            ({"messages": ok_msgs, "max_tokens": 17}, None, "'max_tokens' must be in [1, 16]"),
            ({"messages": ok_msgs, "stop": [1]}, None, "'stop'"),
            ({"messages": ok_msgs, "stream": True}, None, "stream"),
            ({"messages": [{"role": "user", "content": "red blue " * 40}], "max_tokens": 16}, None, "too many tokens"),
            (None, json.dumps({"messages": ok_msgs, "pad": "x" * 5000}).encode(), "limit is 4096"),
        ]
        for body, raw, needle in cases:
            code, out = post(url, body, raw=raw)
            assert code == 400, (body, raw, out)
            assert needle in out["error"]["message"], (needle, out)
        assert post(srv.url + "/v1/nothing", {"messages": ok_msgs})[0] == 404
        rec = srv.url + "/v1/recommend"
        for body, needle in [({"candidates": [{"id": "a", "title": "t"}]}, "missing field 'history'"),
                             ({"history": [{"title": "t"}]}, "missing field 'candidates'"),
                             ({"history": [{"title": "t", "rating": 7}], "candidates": [{"id": "a", "title": "t"}]},
                              "'rating' must be an integer 1..5"),
                             ({"history": [{"title": "t"}], "candidates": [{"title": "t"}]}, "missing field 'id'"),
                             ({"history": [{"title": "t"}], "candidates": [{"id": "a", "title": "t"}] * 2},
                              "duplicate candidate id")]:
            code, out = post(rec, body)
            assert code == 400 and needle in out["error"]["message"], (body, out)
        # the server still answers a good request after all that
        code, out = post(url, {"messages": ok_msgs, "max_tokens": 4, "seed": 1})
        assert code == 200 and isinstance(out["choices"][0]["message"]["content"], str)
    finally:
        srv.close()


def test_api_key_refused():
    srv = start(EchoBackend(), api_key="s3cret")
    try:
        body = {"messages": [{"role": "user", "content": "hi"}]}
        assert post(srv.url + "/v1/chat/completions", body)[0] == 401
        assert post(srv.url + "/v1/chat/completions", body, headers={"Authorization": "Bearer nope"})[0] == 401
        code, out = post(srv.url + "/v1/chat/completions", body, headers={"Authorization": "Bearer s3cret"})
        assert code == 200 and out["choices"][0]["message"]["content"] == "echo: hi"
    finally:
        srv.close()


def test_concurrent_requests_are_batched():
    """8 client threads at once: every one gets ITS answer, and the worker ran them in fewer, larger batches."""
    backend = EchoBackend(delay=0.3)
    srv = start(backend, cfg=ServeConfig(max_batch=8, batch_wait_ms=50))
    results = {}

    def client(i):
        results[i] = post(srv.url + "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": f"request {i}"}], "max_tokens": 4})

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == list(range(8))
        for i, (code, body) in results.items():
            assert code == 200 and body["choices"][0]["message"]["content"] == f"echo: request {i}"
        assert sum(backend.calls) == 8
        assert max(backend.calls) > 1 and len(backend.calls) < 8, backend.calls
        with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
            h = json.loads(r.read())
        assert h["requests"] == 8 and h["batches"] == len(backend.calls) and h["max_batch"] == max(backend.calls)
    finally:
        srv.close()


def test_concurrent_engine_requests_all_answered(tiny):
    """The same through the real engine: 8 concurrent seeded requests, mixed lengths, one Engine batch or a few."""
    model, tok = tiny
    backend = EngineBackend(model, tok)
    srv = start(backend, cfg=ServeConfig(max_batch=8, batch_wait_ms=200))
    results = {}

    def client(i):
        results[i] = post(srv.url + "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "red " * (i + 1)}], "max_tokens": 3 + i,
                           "temperature": 1.0, "seed": i})

    try:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(results) == list(range(8))
        for i, (code, body) in results.items():
            assert code == 200, body
            assert body["usage"]["completion_tokens"] <= 3 + i  # each request's own max_tokens is honoured
        assert srv.batcher.max_batch_seen > 1
    finally:
        srv.close()


def test_recommend_endpoint(tiny):
    """/v1/recommend builds the Task-3 prompt, stops at </item>, parses the item and the rationale."""
    seen = {}

    def reply(r):
        seen["prompt"] = r.messages[-1]["content"]
        seen["stop"] = r.stop
        return "<think>likes red things</think><item> C2 "  # the server stops before "</item>" (OpenAI semantics)

    srv = start(EchoBackend(reply=reply))
    body = {"history": [{"title": "red thing", "id": "H1", "review": "great", "rating": 5},
                        {"title": "blue thing", "description": "soft"}],
            "candidates": [{"id": "C1", "title": "dark thing"}, {"id": "C2", "title": "red cozy thing"}]}
    try:
        code, out = post(srv.url + "/v1/recommend", body)
        assert code == 200, out
        assert out["item_id"] == "C2" and out["valid"] is True and out["rationale"] == "likes red things"
        assert out["latency_ms"] > 0 and seen["stop"] == ("</item>",)
        assert "[Purchase History]" in seen["prompt"] and "item_id:C2" in seen["prompt"]
        assert "- rating:Excellent" in seen["prompt"] and "<think>" in seen["prompt"]
    finally:
        srv.close()
    # the real tiny model end to end: a well-formed response whatever the random model writes
    model, tok = tiny
    srv = start(EngineBackend(model, tok))
    try:
        code, out = post(srv.url + "/v1/recommend", {**body, "max_tokens": 6})
        assert code == 200, out
        assert set(out) >= {"item_id", "valid", "rationale", "text", "latency_ms", "usage"}
        assert out["valid"] == (out["item_id"] in ("C1", "C2"))
        assert out["usage"]["completion_tokens"] <= 6
    finally:
        srv.close()


def test_sasrec_data_dir_comes_from_the_sasrec_run(tmp_path, capsys):
    """`--sasrec RUN/best` without --data: the dataset is train.data_dir of train_sasrec.py's RUN/config.yaml."""
    from twice.serve import sasrec_data_dir
    (tmp_path / "sasrec" / "best").mkdir(parents=True)
    (tmp_path / "sasrec" / "config.yaml").write_text("sasrec: {hidden: 8}\ntrain: {data_dir: runs/quickstart/data}\n")
    assert sasrec_data_dir(str(tmp_path / "sasrec" / "best")) == "runs/quickstart/data"
    assert "--data runs/quickstart/data" in capsys.readouterr().out
    (tmp_path / "lone").mkdir()
    with pytest.raises(SystemExit, match="pass --data DATA_DIR"):
        sasrec_data_dir(str(tmp_path / "lone"))
