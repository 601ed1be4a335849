"""The study (issue 13): paired tests and the RQ3 table (twice/study.py) on hand-made predictions, and
`python -m twice.pipeline --preset study --tiny` end to end (evidence rationales, GRPO C / D / E, the RQ3 table).

    python -m pytest tests/test_study.py -q
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from twice.study import paired, rq3_table, sign_test_p

ROOT = Path(__file__).resolve().parents[1]
ML100K = Path.home() / ".cache" / "twice" / "ml-100k" / "ml-100k.inter"


def test_sign_test_matches_the_binomial_by_hand():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(5, 0) == pytest.approx(2 / 32)                 # 2 * 0.5**5
    assert sign_test_p(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert sign_test_p(2, 8) == sign_test_p(8, 2) and sign_test_p(3, 3) == 1.0


def test_paired_difference_and_interval():
    a, b = [1, 1, 1, 0, 1, 0], [0, 1, 0, 0, 0, 0]
    r = paired(a, b)
    d = [1, 0, 1, 0, 1, 0]
    sd = math.sqrt(sum((x - 0.5) ** 2 for x in d) / 5)
    assert r["mean"] == pytest.approx(0.5) and r["n"] == 6
    assert (r["lo"], r["hi"]) == pytest.approx((0.5 - 1.96 * sd / math.sqrt(6), 0.5 + 1.96 * sd / math.sqrt(6)))
    assert r["p"] == pytest.approx(sign_test_p(3, 0))
    with pytest.raises(ValueError):
        paired([1], [1, 0])


def test_rq3_table_from_hand_made_predictions(tmp_path):
    ev = tmp_path / "eval"
    ev.mkdir()
    users = [1, 2, 3, 4]
    ranks = {"sft": [3, 1, 8, 2], "grpo_E": [1, 1, 2, 6], "grpo_D": [2, 2, 2, 2]}
    for name, rs in ranks.items():
        (ev / f"predictions_{name}.jsonl").write_text("".join(
            json.dumps({"user": u, "exact": {"rank": r}, "sampling": {"rank": r}}) + "\n" for u, r in zip(users, rs)))
    val = lambda x: {"value": x}  # noqa: E731
    res = {"split": "test", "n_candidates": 10, "models": {
        n: {p: {"hr@1": val(0.1), "hr@5": val(0.5), "ndcg@5": val(0.3)} for p in ("sampling", "exact")}
        for n in ranks}}
    (ev / "results.json").write_text(json.dumps(res))
    t = rq3_table(tmp_path)
    # E vs SFT, HR@5: E hits users 1,2,3 (ranks 1,1,2), SFT hits 1,2,4 (3,1,2): d = [0,0,1,-1] -> mean 0, p = 1
    row = next(x for x in t.splitlines() if x.startswith("| (E)") and "| (B) +SFT | exact |" in x)
    assert "+0.000 [" in row and "| 1 |" in row
    # D vs SFT NDCG@5: D = 1/log2(3) for all; SFT = [1/log2 4, 1, 0, 1/log2 3]
    row = next(x for x in t.splitlines() if x.startswith("| (D)") and "| (B) +SFT | sampling |" in x)
    d = [1 / math.log2(3) - 0.5, 1 / math.log2(3) - 1, 1 / math.log2(3), 0.0]
    assert f"{sum(d) / 4:+.3f}" in row.split("|")[6]
    assert "SASRec" not in t.split("Paired")[1]       # no OUT/sasrec/best: no SASRec comparison rows
    assert "4 users x 10 candidates" in t
    # E vs D (the paper's "E > D"), HR@5: E hits users 1, 2, 3; D all four -> d = [0, 0, 0, -1], sign test p = 1
    row = next(x for x in t.splitlines() if x.startswith("| (E)") and "| (D) +SFT+GRPO match+format | exact |" in x)
    assert "| -0.250 [" in row and "| 1 |" in row
    assert "| (A) base |" not in t                    # base not evaluated: no row, no pair

    # a model evaluated in another run_dir (the study's base, exact protocol only): joined by `extra`
    other = tmp_path / "eval_base"
    other.mkdir()
    (other / "predictions_base.jsonl").write_text("".join(
        json.dumps({"user": u, "exact": {"rank": r}}) + "\n" for u, r in zip(users, [9, 9, 1, 9])))
    (other / "results.json").write_text(json.dumps({"split": "test", "n_candidates": 10, "models": {"base": {
        "exact": {"hr@1": val(0.25), "hr@5": val(0.25), "ndcg@5": val(0.25)}, "greedy": {"valid": val(0.0)}}}}))
    t = rq3_table(tmp_path, extra=[other])
    assert "| (A) base | - | - | - | 0.250 | 0.250 | 0.250 | 0.000 | - |" in t
    row = next(x for x in t.splitlines() if x.startswith("| (B) +SFT | (A) base | exact |"))
    assert "+0.500 [" in row                           # HR@5: SFT hits 1, 2, 4; base hits 3 -> (1+1-1+1)/4
    assert not any(x.startswith("| (B) +SFT | (A) base | sampling |") for x in t.splitlines())  # base: no sampling
    (other / "predictions_base.jsonl").write_text(json.dumps({"user": 1, "exact": {"rank": 1}}) + "\n")
    with pytest.raises(ValueError, match="other users"):
        rq3_table(tmp_path, extra=[other])


def test_study_preset_commands(tmp_path):
    """--preset study --dry-run: configs/study/, GRPO C from the base model with E's rewards, C in the eval."""
    from twice.pipeline import STUDY_STAGES, stage_command
    out, model = tmp_path / "o", tmp_path / "m"
    cfgs = ROOT / "configs" / "study"
    c = stage_command("grpo_C", out, model, tiny=False, configs=cfgs, preset="study")
    assert str(cfgs / "grpo.yaml") in c and f"model.path={model}" in c and "rewards.weights={cg: 1.0, format: 1.0}" in c
    assert not any(a.startswith("steps=") for a in c)        # the study's sizes come from its YAMLs, not QUICK
    e = stage_command("eval", out, model, tiny=False, configs=cfgs, preset="study")
    assert f"models.grpo_C.path={out / 'grpo_C' / 'final'}" in e
    assert "models.grpo_C.path" not in " ".join(stage_command("eval", out, model, tiny=False))   # quickstart as before
    e2 = stage_command("eval", out, model, tiny=False, configs=cfgs, preset="study", eval_procs=2)
    assert e2[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] and e2[5:] == e[1:]
    assert STUDY_STAGES.index("grpo_C") == STUDY_STAGES.index("sft") + 1
    r = subprocess.run([sys.executable, "-m", "twice.pipeline", "--preset", "study", "--dry-run", "--out",
                        str(tmp_path / "d")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[7/10] grpo_C" in r.stdout and str(ROOT / "configs" / "study" / "eval.yaml") in r.stdout


@pytest.mark.slow   # ~1 CPU-minute (8 min wall on the shared 2-core box): the same path as the tiny quickstart + C
@pytest.mark.skipif(not ML100K.exists(), reason="ml-100k cache absent")
def test_study_preset_tiny_end_to_end(tmp_path):
    out = tmp_path / "study"
    r = subprocess.run([sys.executable, "-m", "twice.pipeline", "--preset", "study", "--tiny", "--out", str(out),
                        "--threads", "1"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    state = json.loads((out / "pipeline.json").read_text())
    assert list(state["stages"]) == ["data", "model", "sasrec", "sasrec_reward", "rationales", "sft", "grpo_C",
                                     "grpo_D", "grpo_E", "eval"]
    kept = [json.loads(x) for x in (out / "rationales" / "rationales.jsonl").read_text().splitlines()]
    assert kept and {k["teacher"] for k in kept} == {"evidence"}
    assert "model.path=" + str(out / "model") in " ".join(state["stages"]["grpo_C"]["cmd"])   # C starts from base
    table = (out / "results.md").read_text()
    assert "(C) GRPO from base" in table and "Paired differences" in table and "| SASRec | exact |" in table
    assert table.splitlines()[0] in r.stdout
