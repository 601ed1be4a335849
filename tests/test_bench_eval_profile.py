"""bench/eval_profile.py: the op categories it reports are read correctly off the profiler's shapes.

    pytest tests/test_bench_eval_profile.py -q      (seconds)
"""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import eval_profile  # noqa: E402
from twice.engine import Engine  # noqa: E402
from twice.gemma3 import PRESETS, Gemma3  # noqa: E402

V = 262144


@pytest.mark.parametrize("name, shapes, want", [
    ("aten::mm", [[48, 640], [640, V]], "head"),                     # the vocabulary matmul
    ("aten::mm", [[48, 640], [640, 2048]], "body"),                  # an MLP projection
    ("aten::addmm", [[48, 2048], [48, 8], [8, 2048], [], []], "body"),  # LoRA
    ("aten::bmm", [[48, 4, 256], [48, 256, 512]], "attention"),     # q k^T over the cached keys
    ("aten::bmm", [[48, 4, 512], [48, 512, 256]], "attention"),     # p v
    ("aten::bmm", [[48, 256, 640], [48, 640, 1]], "refine"),        # the exact fp32 re-scoring of the top 256
    ("aten::topk", [[48, V], [], [], [], []], "top-k"),
    ("aten::copy_", [[48, 256, 640], [48, 256, 640], []], "copies"),
    ("aten::gelu", [[48, 1, 2048], []], "other"),
])
def test_category(name, shapes, want):
    assert eval_profile.category(name, shapes, V) == want


def test_profiled_generate_reports_every_op_once(one_thread, capsys):
    """A real (tiny) generate under the wrapper: same tokens as unwrapped, the head (V = the tiny vocabulary), body
    and attention matmuls found, the split and torch's op table printed."""
    torch.manual_seed(0)
    model = Gemma3.from_config(PRESETS["tiny"]).eval()
    eng = Engine(model)
    kw = dict(num_samples=3, max_new_tokens=6, stop_ids=[], seeds=1, temperature=1.0)
    want = eng.generate([[2, 5, 7, 9], [2, 11]], **kw)
    run = eval_profile.profiled(Engine.generate)
    got = run(eng, [[2, 5, 7, 9], [2, 11]], **kw)
    assert got.tokens == want.tokens
    assert {"head", "body", "attention"} <= set(run.last) and all(t >= 0 for t in run.last.values())
    out = capsys.readouterr().out
    assert out.startswith("generate: ") and "head" in out and "aten::" in out
