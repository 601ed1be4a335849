"""Rows that keep text after the `</item>` stop string (issue 10 item 1), scripted streams of tests/test_engine.py.

    python bench/stop_rate.py

Scripted one-hot "model": o fillers, `</item>` in 1-3 tokens, 1-3 tokens of extra text, then <end_of_turn>; every
check_every in 1..16, sampled at T = 1. Prints per cadence how many of the rows keep text after the stop string.
"""
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(root), str(root / "tests")]
from test_engine import ScriptedModel, ScriptTokenizer, stop_scripts  # noqa: E402

from twice.engine import Engine  # noqa: E402

succ, pieces, scripts, V = stop_scripts()
eng = Engine(ScriptedModel(succ, V), ScriptTokenizer(pieces))
prompts = [[2, s] for s, _ in scripts]
bad = tot = 0
for ce in range(1, 17):
    res = eng.generate(prompts, max_new_tokens=30, temperature=1.0, stop_strings=["</item>"], seeds=0, check_every=ce)
    b = sum(not t.endswith("</item>") for t in res.texts)
    bad, tot = bad + b, tot + len(res.texts)
    print(f"check_every {ce:2d}: {b:3d}/{len(res.texts)} rows keep text after </item>")
print(f"total {bad}/{tot} = {bad / tot:.3f}")
