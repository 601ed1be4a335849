"""`python -m twice.pipeline --tiny` end to end (what CI runs): every stage as a subprocess, the table, resumability.

    python -m pytest tests/test_pipeline.py -q

A small synthetic MovieLens-100k in the recbole layout (tests/fixtures/ml100k_like.py, put in $TWICE_CACHE: nothing
is downloaded; the real file is fetched only by `pytest -m slow`), a random tiny Gemma-3 and a SentencePiece model
trained on the dataset's text; tiny step counts. ~1 CPU-minute.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "tests"))
from fixtures.ml100k_like import write_ml100k_like  # noqa: E402
from twice.pipeline import (BUDGET_S, BUDGET_STUDY_S, BUDGET_TINY_S, ROWS, STAGES, STUDY_STAGES,  # noqa: E402
                            VARIANTS, eta_s, stage_command)
from twice.rewards import REWARDS  # noqa: E402

torch.set_num_threads(1)


def _run(out: Path) -> subprocess.CompletedProcess:
    cache = out.parent / "cache"
    if not (cache / "ml-100k").exists():
        write_ml100k_like(cache)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), TWICE_CACHE=str(cache))
    return subprocess.run([sys.executable, "-m", "twice.pipeline", "--tiny", "--out", str(out), "--threads", "1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_tiny_pipeline_end_to_end(tmp_path):
    out = tmp_path / "tq"
    p = _run(out)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    # every stage ran and recorded its exit code and timings
    state = json.loads((out / "pipeline.json").read_text())
    assert state["tiny"] is True and list(state["stages"]) == list(STAGES)
    assert all(s["rc"] == 0 and s["wall_s"] >= 0 for s in state["stages"].values())
    for f in ("data/candidates_test.jsonl", "model/config.json", "model/tokenizer.model", "sasrec/best/config.json",
              "sasrec-reward/best/config.json",
              "rationales/stats.json", "sft/final/config.json", "grpo_E/final/config.json", "eval/results.json",
              "eval/results.md", "results.md"):
        assert (out / f).exists(), f
    assert not (out / "grpo_D").exists()  # the RQ3 ablations are the study's (test_study.py), not the main job's
    for name in ("base", "sft", "grpo_E"):
        preds = (out / "eval" / f"predictions_{name}.jsonl").read_text().splitlines()
        assert len(preds) == 4 and all("rationale" in json.loads(x)["greedy"] for x in preds)

    # GRPO ran its steps, logged every reward component, and used the paper's reward weights (E)
    rows = [json.loads(x) for x in (out / "grpo_E" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        for comp in REWARDS:
            assert f"reward/{comp}" in r, comp
    cfg = yaml.safe_load((out / "grpo_E" / "config.yaml").read_text())
    assert cfg["rewards"]["weights"] == yaml.safe_load(VARIANTS["grpo_E"])

    # the final table: four model rows + the random row, eight cells each (value [95% interval] or "-"), in [0, 1],
    # each the value results.json holds; then the paired tests, each a line per protocol
    table = (out / "results.md").read_text()
    res = json.loads((out / "eval" / "results.json").read_text())
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert "paper sampling HR@1" in lines[0] and "exact NDCG@5" in lines[0] and "greedy format" in lines[0]
    labels = [ln.split("|")[1].strip() for ln in lines[1:6]]
    assert labels == [label for _, label in ROWS] + ["random (expectation)"]
    cols = [("sampling", "hr@1"), ("sampling", "hr@5"), ("sampling", "ndcg@5"), ("exact", "hr@1"), ("exact", "hr@5"),
            ("exact", "ndcg@5"), ("greedy", "valid"), ("greedy", "format")]
    for (key, _), ln in zip(list(ROWS) + [("random", "")], lines[1:6]):
        cells = [c.strip() for c in ln.split("|")[2:-1]]
        assert len(cells) == 8
        m = res["baselines"]["random"] if key == "random" else res["models"][key]
        for (proto, k), c in zip(cols, cells):
            if c == "-":   # greedy of the rankers; sampling of the base model (configs/quickstart/eval.yaml)
                assert (key in ("sasrec", "random") and proto == "greedy") or (key == "base" and proto == "sampling")
                assert key != "base" or proto not in m
                continue
            v = float(c.split()[0])
            assert 0.0 <= v <= 1.0 and abs(v - m[proto][k]["value"]) < 5e-4, (key, proto, k, c)
            if key != "random":
                lo, hi = (float(x) for x in c.split("[")[1].rstrip("]").split(","))
                assert lo <= v + 5e-3 and v <= hi + 5e-3
    paired = [ln for ln in lines if " vs " in ln.split("|")[1]]
    assert [ln.split("|")[1].strip() for ln in paired][:2] == ["+SFT vs base", "+SFT+GRPO (E) vs +SFT"]
    assert len(paired) == 5  # +SFT vs base (exact: base is not sampled), E vs +SFT, E vs SASRec (exact and sampling)
    assert "base: the sampling protocol was not run" in table
    assert table.splitlines()[0] in p.stdout   # printed too
    assert "stage(s) to run, about" in p.stdout and ", ETA " in p.stdout   # the overall ETA from the stage budgets

    # every number in results.json that is a rate lies in [0, 1], intervals included

    def walk(x):
        if isinstance(x, dict):
            if "value" in x and "ci95" in x:
                assert 0.0 <= x["value"] <= 1.0 and 0.0 <= x["ci95"][0] <= x["ci95"][1] <= 1.0
            for v in x.values():
                walk(v)
    walk(res["models"])
    assert set(res["models"]) == {"sasrec", "base", "sft", "grpo_E"}

    # resumable: a second run skips every stage and prints the same table
    p2 = _run(out)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert p2.stdout.count("complete, skipped") == len(STAGES)
    assert table.splitlines()[3] in p2.stdout


def test_stage_commands_chain_paths(tmp_path):
    """Each stage reads the previous stage's outputs (paths are config overrides, no discovery)."""
    out, model = tmp_path / "o", tmp_path / "m"
    sft = " ".join(stage_command("sft", out, model, tiny=False))
    assert f"model.path={model}" in sft and "mix.reason=0" in sft     # no rationales kept yet -> T1 + T2 only
    (out / "rationales").mkdir(parents=True)
    (out / "rationales" / "rationales.jsonl").write_text('{"user": 1}\n')
    sft = " ".join(stage_command("sft", out, model, tiny=False))
    assert f"mix.t3_source={out / 'rationales' / 'rationales.jsonl'}" in sft and "mix.reason=0" not in sft
    for v in VARIANTS:
        g = " ".join(stage_command(v, out, model, tiny=False))
        assert f"model.path={out / 'sft' / 'final'}" in g and f"sasrec_dir={out / 'sasrec-reward' / 'best'}" in g
    ev = " ".join(stage_command("eval", out, model, tiny=False))
    for v in ("sft", "grpo_E"):
        assert f"models.{v}.path={out / v / 'final'}" in ev
    assert "grpo_D" not in ev and "grpo_C" not in ev  # the study's variants (below) are not the main job's
    ev = " ".join(stage_command("eval", out, model, tiny=False, preset="study"))
    for v in ("sft", "grpo_C", "grpo_D", "grpo_E"):
        assert f"models.{v}.path={out / v / 'final'}" in ev
    # the same prompt layout for SFT, GRPO and eval: task.yaml (included by the three), and --tiny changes it the
    # same way for all three
    tasks = [[a for a in stage_command(s, out, model, tiny=tiny) if a.startswith("task.")]
             for tiny in (False, True) for s in ("sft", "grpo_E", "eval")]
    assert tasks[0] == tasks[1] == tasks[2] == [] and tasks[3] == tasks[4] == tasks[5] and tasks[3]
    # no CPU-time cap anywhere: the quickstart's length is in epochs/steps (same seed, same numbers on any machine)
    for s in STAGES:
        assert not any("cpu_s" in a or "max_train_s" in a for a in stage_command(s, out, model, tiny=False) or [])


def test_eta_scales_the_budgets_by_the_observed_speed():
    assert eta_s(BUDGET_S, {}, ["sft", "eval"]) == BUDGET_S["sft"] + BUDGET_S["eval"]
    # the stages so far took twice their budget: the rest is expected to as well
    done = {"data": 2 * BUDGET_S["data"], "sasrec": 2 * BUDGET_S["sasrec"]}
    assert eta_s(BUDGET_S, done, ["eval"]) == 2 * BUDGET_S["eval"]
    assert eta_s(BUDGET_S, done, []) == 0
    # a cached model (2 s against a 100 s conversion budget) says nothing about compute speed: not counted
    assert eta_s(BUDGET_S, {"model": 2.0, "sasrec": 2 * BUDGET_S["sasrec"]}, ["eval"]) == 2 * BUDGET_S["eval"]


def test_every_stage_has_a_budget():
    assert set(BUDGET_S) == set(STAGES) and set(BUDGET_STUDY_S) == set(STUDY_STAGES)
    assert set(BUDGET_TINY_S) == set(STUDY_STAGES)   # --tiny serves both presets
    # the study's budgets are its own run's: SFT to a plateau and five models x 300 users cost more than the quickstart
    assert BUDGET_STUDY_S["sft"] > BUDGET_S["sft"] and BUDGET_STUDY_S["eval"] > BUDGET_S["eval"]
