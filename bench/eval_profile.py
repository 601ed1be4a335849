"""Where eval's decode time goes: eval.py run as written, with every Engine.generate call under torch.profiler.

    python bench/eval_profile.py configs/quickstart/eval.yaml run_dir=/tmp/evprof data_dir=runs/quickstart/data \
        max_users=8 batch_size=8 threads=1 sasrec_dir= \
        "models={sft: {path: runs/quickstart/sft/final, reasoning: true}}"

Every argument is eval.py's (the config and its overrides). Prints, per generate call (one per batch of users), the
self CPU time by category, read off the ops' input shapes: `head` = the [rows, D] x [D, V] vocabulary matmul,
`body` = every other matmul (projections, MLP, LoRA), `attention` = the batched matmuls over the cached keys and
values, `refine` = the exact fp32 re-scoring of the head's top candidates (Engine._head), `top-k` = the top-k over
the vocabulary, `copies` = copies, casts and gathers; then torch's own op table (top 25 by self CPU, with shapes).
"""
from __future__ import annotations

import sys
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import eval as evaluate  # noqa: E402
from twice import engine  # noqa: E402


def category(name: str, shapes: list, vocab: int) -> str:
    """One profiler row (op name, input shapes) -> its category (the docstring's); vocab: the head's V."""
    dims = [tuple(s) for s in shapes if isinstance(s, (list, tuple)) and s]
    if name in ("aten::mm", "aten::addmm"):  # the head: [rows, D] x [D, V] (the tied weight, transposed)
        return "head" if any(len(d) == 2 and d[-1] == vocab for d in dims) else "body"
    if name == "aten::bmm":  # refine: [B, R, D] @ [B, D, 1]; attention: [B, heads, hd] @ [B, hd, keys] and back
        return "refine" if dims and len(dims[-1]) == 3 and dims[-1][-1] == 1 else "attention"
    if name == "aten::topk":
        return "top-k"
    if name in ("aten::copy_", "aten::index", "aten::index_select", "aten::_to_copy", "aten::cat"):
        return "copies"
    return "other"


def report(prof, vocab: int) -> dict[str, float]:
    """Print the category split and torch's op table; return {category: self CPU seconds}."""
    rows = prof.key_averages(group_by_input_shape=True)
    total: dict[str, float] = {}
    for r in rows:
        if r.key.startswith("engine."):  # the engine's own spans: they nest the ops, counting them would double
            continue
        c = category(r.key, r.input_shapes, vocab)
        total[c] = total.get(c, 0.0) + r.self_cpu_time_total / 1e6
    all_s = sum(total.values())
    print(f"generate: {all_s:.1f} s self CPU: " + ", ".join(
        f"{c} {t:.1f} s ({t / all_s:.0%})" for c, t in sorted(total.items(), key=lambda kv: -kv[1])))
    print(rows.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=30,
                     max_shapes_column_width=90))
    return total


def profiled(generate):
    """Engine.generate -> the same call under torch.profiler, reported when it returns."""
    def run(self, *a, **kw):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            out = generate(self, *a, **kw)
        run.last = report(prof, self.config.vocab_size)
        return out
    return run


def main(argv: list[str]) -> None:
    engine.Engine.generate = profiled(engine.Engine.generate)
    evaluate.main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
