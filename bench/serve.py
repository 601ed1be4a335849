"""Serving benchmark: p50/p95 latency and throughput of POST /v1/recommend over real HTTP (loopback), at 1 and 8
concurrent clients, with the worker's batching on, and at 8 clients with batching OFF (max_batch=1) as the peer
measured in the same run (the ratio is what batching buys).

    python bench/serve.py [--model ~/.cache/twice/gemma-3-270m] [--requests 8] [--max-tokens 48] [--threads 2]

Model: the converted Gemma-3-270m (python -m twice.convert gemma-3-270m); when that folder is absent, a RANDOM
270m-shaped Gemma-3 with a tiny tokenizer (vocab shrunk to the tokenizer's; printed). Requests: 5 history items
(title, genre description, review, rating) + 10 candidates from data/ml-100k when --data points at a dataset dir,
else fixed synthetic text; greedy decoding, `--max-tokens` new tokens at most (rationale + item).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from twice.gemma3 import PRESETS, Gemma3  # noqa: E402
from twice.serve import EngineBackend, ServeConfig, load_backend, make_server  # noqa: E402
from twice.tokenizer import Tokenizer  # noqa: E402

GENRES = ["Drama", "Comedy", "Action, Thriller", "Romance", "Sci-Fi, Adventure", "Animation, Children's"]


def requests_from(data_dir: str | None, n: int) -> list[dict]:
    out = []
    if data_dir:
        from twice.data import load_dataset
        ds = load_dataset(data_dir)
        for cs in ds.candidates("test")[:n]:
            u = ds.user(cs.user)
            pos = list(range(len(u.items) - 1))[-5:]  # the last 5 history positions (test target = items[-1])
            out.append({"history": [{"id": ds.items[u.items[p]].id, "title": ds.items[u.items[p]].title,
                                     "description": ds.items[u.items[p]].description,
                                     "review": u.reviews[p] or "", "rating": u.ratings[p]} for p in pos],
                        "candidates": [{"id": ds.items[c].id, "title": ds.items[c].title} for c in cs.candidates[:10]]})
        return out
    for r in range(n):
        out.append({"history": [{"id": f"M{r}{j}", "title": f"Some Movie Title Number {r * 5 + j} (199{j})",
                                 "description": GENRES[(r + j) % 6], "review": "Loved the story and the actors.",
                                 "rating": 3 + (r + j) % 3} for j in range(5)],
                    "candidates": [{"id": f"C{c}", "title": f"Candidate Film {c} (1997)"} for c in range(10)]})
    return out


def run_level(url: str, reqs: list[dict], clients: int, max_tokens: int) -> dict:
    lat, toks, errors = [], [], []
    lock = threading.Lock()
    todo = list(enumerate(reqs))

    def client():
        while True:
            with lock:
                if not todo:
                    return
                i, r = todo.pop(0)
            body = json.dumps({**r, "max_tokens": max_tokens, "temperature": 0.0, "seed": i}).encode()
            t0 = time.perf_counter()
            try:
                req = urllib.request.Request(url + "/v1/recommend", data=body, method="POST",
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=600) as resp:
                    out = json.loads(resp.read())
                dt = time.perf_counter() - t0
                with lock:
                    lat.append(dt)
                    toks.append(out["usage"]["completion_tokens"])
            except Exception as e:  # noqa: BLE001 -- counted and printed
                with lock:
                    errors.append(repr(e))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    q = lambda p: lat[min(len(lat) - 1, int(round(p * (len(lat) - 1))))] if lat else float("nan")
    return {"clients": clients, "requests": len(lat), "errors": len(errors), "p50_ms": 1000 * q(0.5),
            "p95_ms": 1000 * q(0.95), "mean_ms": 1000 * statistics.mean(lat) if lat else float("nan"),
            "req_per_s": len(lat) / wall, "gen_tok_per_s": sum(toks) / wall, "wall_s": wall,
            "mean_completion_tokens": statistics.mean(toks) if toks else 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="~/.cache/twice/gemma-3-270m")
    ap.add_argument("--data", default="", help="dataset dir for realistic requests (else synthetic)")
    ap.add_argument("--requests", type=int, default=8, help="requests per client level (x2 at 8 clients)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-wait-ms", type=float, default=10.0)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    mdir = Path(os.path.expanduser(a.model))
    if (mdir / "config.json").exists():
        backend, what = load_backend(str(mdir)), f"Gemma-3-270m weights from {mdir}"
    else:
        import tempfile
        tok = Tokenizer.train_tiny(tempfile.mkdtemp(), [" ".join(GENRES) + " Some Movie Title Candidate Film"] * 4)
        cfg = PRESETS["gemma-3-270m"]
        cfg = type(cfg)(**{**cfg.__dict__, "vocab_size": tok.vocab_size})
        torch.manual_seed(0)
        backend = EngineBackend(Gemma3.from_config(cfg).eval(), tok, name="random-270m")
        what = f"RANDOM 270m-shaped Gemma-3 ({mdir} not found; vocab {tok.vocab_size})"
    reqs = requests_from(a.data or None, 2 * a.requests)
    print(f"model: {what}; torch threads {a.threads}; {platform()}", flush=True)
    results = []
    for clients, n, batching in ((1, a.requests, True), (8, 2 * a.requests, True), (8, 2 * a.requests, False)):
        cfg = ServeConfig(max_batch=8 if batching else 1, batch_wait_ms=a.batch_wait_ms)
        srv = make_server(backend, cfg=cfg)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        try:
            run_level(srv.url, reqs[:1], 1, a.max_tokens)  # warm-up
            r = run_level(srv.url, reqs[:n], clients, a.max_tokens)
            r["batching"] = batching
            r["mean_batch"] = round((srv.batcher.requests - 1) / max(1, srv.batcher.batches - 1), 2)
        finally:
            srv.close()
        results.append(r)
        print(f"clients {clients} batching {'on ' if batching else 'off'}: {r['requests']} req ({r['errors']} errors) "
              f"p50 {r['p50_ms']:.0f} ms  p95 {r['p95_ms']:.0f} ms  {r['req_per_s']:.3f} req/s  "
              f"{r['gen_tok_per_s']:.1f} gen tok/s  mean batch {r['mean_batch']}  "
              f"(mean {r['mean_completion_tokens']:.1f} new tokens)", flush=True)
    on, off = results[1], results[2]
    print(f"8 clients: batching gives {on['req_per_s'] / off['req_per_s']:.2f}x the throughput of max_batch=1, "
          f"p50 {on['p50_ms'] / off['p50_ms']:.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps({"model": what, "threads": a.threads, "max_tokens": a.max_tokens,
                                           "results": results}, indent=2))


def platform() -> str:
    import platform as p
    return f"{p.processor() or p.machine()}, {os.cpu_count()} CPUs visible, torch {torch.__version__}"


if __name__ == "__main__":
    main()
