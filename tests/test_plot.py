"""twice.plot: PNGs from metrics.jsonl (skips cleanly when matplotlib, the optional `.[plot]` extra, is absent).

    python -m pytest tests/test_plot.py -q
"""
from __future__ import annotations

import json
import sys

import pytest

from twice import plot


def write_run(d, rows, torn=False):
    d.mkdir(parents=True)
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if torn:
        text += '{"step": 99, "rew'         # a run still writing its last line
    (d / "metrics.jsonl").write_text(text)
    return d


GRPO_ROWS = [{"step": s, "reward": 0.1 * s, "reward/match": 0.05 * s, "reward/cf": 0.3, "match_rate": 0.05 * s,
              "format_rate": 1.0, "truncated_frac": 0.0, "cf_mean": 0.3, "entropy": 1.0 / s, "clip_frac_low": 0.0,
              "clip_frac_high": 0.01, "kl": 0.001 * s, "loss": -0.1, "lr": 1e-3, "time/step": 2.0,
              "note": "text is ignored", "flag": True} for s in range(1, 6)]
SFT_ROWS = [{"step": s, "loss": 2.0 / s, "loss/recommend": 1.5 / s, "loss/reason": 3.0 / s, "lr": 1e-3}
            for s in range(1, 6)] + [{"step": 5, "eval/loss": 0.9, "eval/hr@1": 0.25}]


def test_panels_claim_keys_in_order_and_leftovers_go_to_other():
    p = plot.assign(["reward", "reward/cf", "cf_mean", "kl", "approx_kl_old", "loss/reason", "eval/hr@1", "foo"])
    assert p == {"reward": ["reward", "reward/cf"], "rho_cf": ["cf_mean"], "kl": ["kl", "approx_kl_old"],
                 "sft_loss": ["loss/reason"], "hit_rate": ["eval/hr@1"], "other": ["foo"]}


def test_series_reads_numbers_only_and_uses_step():
    s = plot.series([{"step": 3, "a": 1, "b": "x", "c": float("nan"), "d": True, "time/step": 4},
                     {"step": 7, "a": 2.5}, {"epoch": 9, "a": 3}])
    assert s == {"a": ([3.0, 7.0, 9.0], [1.0, 2.5, 3.0])}


def test_pngs_for_the_keys_that_exist(tmp_path, capsys):
    mpl = pytest.importorskip("matplotlib")
    grpo = write_run(tmp_path / "grpo_E", GRPO_ROWS, torn=True)
    sft = write_run(tmp_path / "sft", SFT_ROWS)
    assert plot.main([str(grpo), str(sft), "--out", str(tmp_path / "png")]) == 0
    names = sorted(p.name for p in (tmp_path / "png").iterdir())
    # every panel with a key, none for absent ones (no "rates" is missing: format_rate exists; no "lengths" key)
    assert names == ["clip.png", "entropy.png", "hit_rate.png", "kl.png", "loss.png", "optim.png", "rates.png",
                     "reward.png", "rho_cf.png", "sft_loss.png"]
    import matplotlib.image
    img = matplotlib.image.imread(tmp_path / "png" / "reward.png")
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 300     # a real picture, 3 subplots wide
    assert "skipped 1 unreadable line" in capsys.readouterr().err
    # one run: default output is RUN_DIR/plots
    assert plot.main([str(sft)]) == 0
    assert sorted(p.name for p in (sft / "plots").iterdir()) == ["hit_rate.png", "loss.png", "optim.png", "sft_loss.png"]
    assert mpl is not None


def test_one_colour_per_run_in_every_panel(tmp_path, monkeypatch):
    """A run keeps its colour across panels and figures, also where an earlier run has no line (SFT has no pg_loss:
    matplotlib's colour cycle would give GRPO the SFT colour there)."""
    pytest.importorskip("matplotlib")
    from matplotlib.axes import Axes
    drawn, legends = [], []
    plot_, legend_ = Axes.plot, Axes.legend
    monkeypatch.setattr(Axes, "plot", lambda ax, *a, **k: (drawn.append((id(ax), k["label"], k["color"])),
                                                            plot_(ax, *a, **k))[1])
    monkeypatch.setattr(Axes, "legend", lambda ax, *a, **k: (legends.append(list(a[1])), legend_(ax, *a, **k))[1])
    sft = write_run(tmp_path / "sft", SFT_ROWS)
    grpo = write_run(tmp_path / "grpo_E", GRPO_ROWS)
    assert plot.main([str(sft), str(grpo), "--out", str(tmp_path / "png")]) == 0
    colours = {}
    for _, label, c in drawn:
        colours.setdefault(label, set()).add(c)
    assert colours == {"sft": {"C0"}, "grpo_E": {"C1"}}
    assert any(label == "grpo_E" and not any(a == ax and l == "sft" for a, l, _ in drawn) for ax, label, _ in drawn)
    assert legends and all(lg == ["sft", "grpo_E"] for lg in legends)


def test_clear_errors(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    with pytest.raises(SystemExit, match="does not exist"):
        plot.main([str(tmp_path / "nope")])
    write_run(tmp_path / "empty", [{"step": 1, "note": "x"}])
    with pytest.raises(SystemExit, match="no numeric metrics"):
        plot.main([str(tmp_path / "empty")])
    monkeypatch.setitem(sys.modules, "matplotlib", None)        # as if the extra were not installed
    write_run(tmp_path / "r", SFT_ROWS)
    with pytest.raises(SystemExit, match=r"pip install -e \"\.\[plot\]\""):
        plot.main([str(tmp_path / "r")])
