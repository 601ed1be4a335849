"""Stage 1: a teacher LLM writes a rationale for every training instance (S_u, i+) and tags it relevant or not;
curation keeps the relevant, well-formed, grounded ones.

    python build_rationales.py configs/quickstart/rationales.yaml [teacher.temperature=0.3 n_users=50 ...]

Teacher: an OpenAI-compatible endpoint (`teacher.backend: api`; vLLM, llama.cpp, a hosted API, or our own
`python -m twice.serve --model DIR`), a local checkpoint through our engine (`teacher.backend: local`), or no model
at all: `teacher.backend: evidence` writes each rationale from the data (MovieLens genres, ratings, co-watching;
twice/evidence.py; records say "teacher": "evidence"). `teacher.tries: N` re-asks an LLM teacher's unparseable /
empty / degenerate answers; `teacher.prefill: "<rationale>"` starts a local teacher's answer inside the tag.
Instances: the train split of `data_dir` (history = items[:-3], target i+ = items[-3]), users with a non-empty
history, optionally a seeded sample of `n_users`.

Outputs in run_dir:
    rationales.jsonl   kept: {"user", "history", "target", "rationale", "verdict", "teacher", "prompt_hash", "tokens"}
    dropped.jsonl      the same + "reason" (unparseable | irrelevant | empty | degenerate, see twice/rationale.py)
                       + "text" (the raw teacher output)
    stats.json         users, done, kept, dropped by reason, failed requests, pending, tokens (rewritten each step)
    metrics.jsonl, build_rationales.log, config.yaml
Resumable: a user is done once its record is in rationales.jsonl or dropped.jsonl; a rerun skips done users, so a
killed run continues where it stopped and never duplicates a record. Appends are one write() of a full line +
fsync; a torn last line is cut on start. A request that fails (retries exhausted) is counted and NOT recorded, so
the next run asks again. Before the loop, one preflight request turns a wrong URL / refused key into a clear error.
"""
from __future__ import annotations

import json
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from twice.config import ConfigError, check_inputs, parse_args, save_config
from twice.data import load_dataset
from twice.fileio import write_json_atomic
from twice.llm_api import LLMError
from twice.rationale import (DROP_REASONS, RationaleConfig, TeacherConfig, append_jsonl, build_request, curate,
                             grounding_words, load_exemplars, make_teacher, read_jsonl,
                             repair_jsonl)


@dataclass
class BuildConfig:
    data_dir: str = "data/ml-100k"        # dataset dir (python -m twice.data prepare ...)
    run_dir: str = "runs/rationales"      # outputs (see the module docstring); reused on resume
    n_users: int = 0                      # 0 = every user with a train instance; else a seeded sample of this many
    seed: int = 0                         # user sample and per-instance sampling seeds
    chunk: int = 16                       # instances sent per loop step (records are appended after each step)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rationale: RationaleConfig = field(default_factory=RationaleConfig)


def select_users(ds, n_users: int, seed: int) -> list[int]:
    """Users whose train split has a non-empty history (>= 4 items), all or a seeded sample, in idx order."""
    users = [u.idx for u in ds.users if len(u.items) >= 4]
    if 0 < n_users < len(users):
        users = sorted(random.Random(seed).sample(users, n_users))
    return users


def instance_seed(seed: int, user: int) -> int:
    """Sampling seed of one instance: the same on every (re)run, independent of batching."""
    return (seed * 1_000_003 + user) % (2 ** 62)


def main(cfg: BuildConfig) -> dict:
    check_inputs(("data_dir", cfg.data_dir, "dataset"),  # before the teacher loads: one line naming the field
                 ("rationale.exemplars", cfg.rationale.exemplars if cfg.rationale.n_shots else "", "file"),
                 ("teacher.model_path", cfg.teacher.model_path if cfg.teacher.backend == "local" else "", "model"))
    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run / "config.yaml")
    kept_path, dropped_path = run / "rationales.jsonl", run / "dropped.jsonl"
    logf = open(run / "build_rationales.log", "a")

    def log(msg: str):
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}"
        logf.write(line + "\n")
        logf.flush()
        tqdm.write(line, file=sys.stderr)

    ds = load_dataset(cfg.data_dir)
    exemplars = load_exemplars(cfg.rationale.exemplars, cfg.rationale.n_shots) if cfg.rationale.n_shots else []
    users = select_users(ds, cfg.n_users, cfg.seed)
    for p in (kept_path, dropped_path):  # a killed run may have left half a line
        cut = repair_jsonl(p)
        if cut:
            log(f"{p.name}: removed a torn last line ({cut} bytes) left by an interrupted run")
    old_kept, old_dropped = read_jsonl(kept_path), read_jsonl(dropped_path)
    done = {r["user"] for r in old_kept + old_dropped}
    # running totals, seeded from the files (exact across resumes) and bumped as records are appended
    tot = {"kept": len(old_kept), "dropped": Counter({r: 0 for r in DROP_REASONS}),
           "tokens": [sum(r.get("tokens", [0, 0])[k] for r in old_kept + old_dropped) for k in (0, 1)]}
    tot["dropped"].update(r["reason"] for r in old_dropped)
    del old_kept, old_dropped
    todo = [u for u in users if u not in done]
    log(f"{len(users)} instances, {len(users) - len(todo)} already done, {len(todo)} to ask "
        f"({cfg.teacher.backend} teacher, {len(exemplars)} shots)")

    teacher = make_teacher(cfg.teacher, ds, cfg.rationale.max_history, cfg.rationale.min_words)
    if todo:
        teacher.preflight()  # LLMError: unreachable / key refused / dead server -> a clear error before the loop

    asked, failed = 0, 0
    fd_kept = os.open(kept_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    fd_dropped = os.open(dropped_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    bar = tqdm(total=len(users), initial=len(users) - len(todo), desc="rationales", unit="inst", dynamic_ncols=True)
    try:
        for step, start in enumerate(range(0, len(todo), cfg.chunk)):
            t0 = time.perf_counter()
            reqs = [build_request(ds, u, cfg.rationale, exemplars) for u in todo[start:start + cfg.chunk]]
            # the bar advances per instance as the teacher answers (per request for an API teacher, per finished
            # engine row for a local one), not once per chunk
            results = teacher.complete([r["messages"] for r in reqs], [instance_seed(cfg.seed, r["user"]) for r in reqs],
                                       requests=reqs,
                                       on_result=lambda i, res: isinstance(res, LLMError) or bar.update(1))
            asked += len(reqs)
            step_kept = 0
            for req, res in zip(reqs, results):
                if isinstance(res, LLMError):
                    failed += 1
                    log(f"user {req['user']}: request failed, will be retried by the next run: {res}")
                    continue
                reason, rationale, verdict = curate(res.text, *grounding_words(ds, req["history"], req["target"]),
                                                    cfg.rationale.min_words)
                rec = {"user": req["user"], "history": req["history"], "target": req["target"],
                       "rationale": rationale, "verdict": verdict, "teacher": teacher.name,
                       "prompt_hash": req["prompt_hash"], "tokens": [res.prompt_tokens, res.completion_tokens]}
                if reason is None:
                    append_jsonl(fd_kept, rec)
                    step_kept += 1
                    tot["kept"] += 1
                else:
                    append_jsonl(fd_dropped, {**rec, "reason": reason, "text": res.text})
                    tot["dropped"][reason] += 1
                done.add(req["user"])
                tot["tokens"][0] += res.prompt_tokens
                tot["tokens"][1] += res.completion_tokens
            stats = write_stats(run, users, done, tot, asked, failed)
            with open(run / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "asked": len(reqs), "kept": step_kept,
                                    "seconds": round(time.perf_counter() - t0, 3), "kept_total": stats["kept"],
                                    "done": stats["done"], "failed_requests": failed,
                                    "compute_dtype": getattr(teacher, "compute_dtype", None)}) + "\n")
            bar.set_postfix(kept=stats["kept"], dropped=sum(stats["dropped"].values()), failed=failed)
    finally:
        bar.close()
        os.close(fd_kept)
        os.close(fd_dropped)
    stats = write_stats(run, users, done, tot, asked, failed)
    if getattr(teacher, "retried", 0):
        log(f"{teacher.retried} re-asks of unparseable / empty / degenerate answers this run (teacher.tries)")
    log(f"done: {stats['kept']} kept, dropped {stats['dropped']}, {failed} failed requests this run, "
        f"{stats['pending']} pending" + (" (rerun to retry them)" if stats["pending"] else ""))
    logf.close()
    return stats


def write_stats(run: Path, users: list[int], done: set[int], tot: dict, asked: int, failed: int) -> dict:
    """stats.json (atomic): totals over all runs (kept, dropped by reason, tokens) + this run's request counts."""
    stats = {"users": len(users), "done": len(done), "kept": tot["kept"], "dropped": dict(tot["dropped"]),
             "asked_this_run": asked, "failed_requests": failed, "pending": len(set(users) - done),
             "tokens": {"prompt": tot["tokens"][0], "completion": tot["tokens"][1]}}
    write_json_atomic(run / "stats.json", stats)
    return stats


if __name__ == "__main__":
    try:
        main(parse_args(BuildConfig, sys.argv[1:]))
    except ConfigError as e:  # a misspelled key, a missing input: one line, before any model is loaded
        raise SystemExit(f"build_rationales.py: error: {e}") from None
    except LLMError as e:
        raise SystemExit(f"build_rationales.py: teacher error: {e}") from None
