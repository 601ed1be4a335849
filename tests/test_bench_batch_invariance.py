"""bench/batch_invariance.py --compare: weight identity and per-user prediction differences between two runs.

    pytest tests/test_bench_batch_invariance.py -q      (seconds)
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import batch_invariance  # noqa: E402


def fake_run(root: Path, weight: float, rows: list[tuple]) -> Path:
    """A pipeline --out folder with sft/final weights and eval predictions: rows = (samples, greedy, rank) per user."""
    (root / "sft" / "final").mkdir(parents=True)
    save_file({"w": torch.full((2, 2), weight)}, root / "sft" / "final" / "model.safetensors")
    (root / "eval").mkdir()
    recs = [{"user": u, "sampling": {"texts": s}, "greedy": {"text": g}, "exact": {"rank": r}}
            for u, (s, g, r) in enumerate(rows)]
    (root / "eval" / "predictions_sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return root


def test_compare_counts_each_kind_of_difference(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 1.0, [(["x", "y"], "g", 1), (["x"], "g", 2), (["z"], "h", 3)])
    b = fake_run(tmp_path / "b", 1.0, [(["x", "y"], "g", 1), (["x2"], "g", 5), (["z"], "h2", 3)])
    c = fake_run(tmp_path / "c", 2.0, [(["x", "y"], "g", 1), (["x"], "g", 2), (["z"], "h", 3)])
    batch_invariance.compare(a, b)
    out = capsys.readouterr().out
    assert "sft/final weights" in out and "(identical)" in out
    assert "sft: of 3 users, differ in samples 1, greedy text 1, exact rank 1" in out
    batch_invariance.compare(a, c)
    out = capsys.readouterr().out
    assert "(DIFFERENT)" in out and "samples 0, greedy text 0, exact rank 0" in out
    # a run whose eval skipped a model's sampling (models.NAME.sampling: false): the other kinds are still counted
    d = fake_run(tmp_path / "d", 1.0, [(["x", "y"], "g", 1), (["x"], "g", 4), (["z"], "h", 3)])
    f = d / "eval" / "predictions_sft.jsonl"
    f.write_text("".join(json.dumps({k: v for k, v in json.loads(x).items() if k != "sampling"}) + "\n"
                         for x in f.read_text().splitlines()))
    batch_invariance.compare(a, d)
    assert "differ in samples - (not in both), greedy text 0, exact rank 1" in capsys.readouterr().out


def test_matmul_rows_prints_each_shape(capsys):
    batch_invariance.matmul_rows()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("max |diff|" in ln for ln in lines)
