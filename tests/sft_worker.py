"""A tiny SFT world for tests/test_train_sft.py: dataset dir (items with descriptions, users with ratings and
reviews, valid candidate sets, official-style examples_task3), stage-1 rationales.jsonl, a SentencePiece tokenizer
trained on the rendered prompts, and a random tiny Gemma-3 saved as an HF folder.

    python tests/sft_worker.py OUT_DIR         # builds OUT_DIR/{data,tok,model,rationales.jsonl}
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twice.data import load_dataset  # noqa: E402
from twice.gemma3 import PRESETS, Gemma3  # noqa: E402
from twice.tasks import TaskConfig, describe_example, recommend_example, sample_candidates  # noqa: E402
from twice.tokenizer import Tokenizer  # noqa: E402

N_ITEMS, N_USERS, SEQ = 12, 6, 6
TASK = dict(max_prompt_tokens=1024, max_history=3, desc_chars=24, review_chars=16, n_negatives=3)
WORDS = "red blue soft warm small cozy light dark".split()
# 3 layers (sliding, sliding, full): both attention kinds at half the cost of the 6-layer tiny preset
MODEL_CFG = dataclasses.replace(PRESETS["tiny"], num_hidden_layers=3, layer_types=None)


def write_dataset(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(out / "items.jsonl", "w") as f:
        for i in range(1, N_ITEMS + 1):
            f.write(json.dumps({"idx": i, "id": f"I{i}", "title": f"{WORDS[i % 8]} {WORDS[(3 * i) % 8]} thing",
                                "description": f"a {WORDS[(5 * i) % 8]} thing for {WORDS[(7 * i) % 8]} days",
                                "details": {"color": WORDS[i % 8]}}) + "\n")
    seqs = []
    with open(out / "users.jsonl", "w") as f:
        for u in range(1, N_USERS + 1):
            items = rng.sample(range(1, N_ITEMS + 1), SEQ)
            seqs.append(items)
            f.write(json.dumps({"idx": u, "id": f"U{u}", "items": items,
                                "ratings": [rng.randint(1, 5) for _ in items],
                                "reviews": [f"so {WORDS[k % 8]}" for k in items],
                                "timestamps": list(range(SEQ))}) + "\n")
    with open(out / "candidates_valid.jsonl", "w") as f:
        for u, items in enumerate(seqs, 1):
            negs = rng.sample([i for i in range(1, N_ITEMS + 1) if i not in items], 3)
            cands = negs + [items[-2]]
            rng.shuffle(cands)
            f.write(json.dumps({"user": u, "target": items[-2], "candidates": cands}) + "\n")
    (out / "meta.json").write_text(json.dumps({"source": "test", "version": 1}))
    return out


def rationale(ds, hist: list[int], target: int) -> str:
    return f"likes {ds.items[hist[-1]].title}, so {ds.items[target].title}"


def build(out: Path) -> dict:
    out = Path(out)
    data = write_dataset(out / "data")
    ds = load_dataset(data)
    task = TaskConfig(**TASK)
    with open(out / "rationales.jsonl", "w") as f:
        for u in ds.users:
            h, t = ds.history(u.idx, "train"), ds.target(u.idx, "train")
            f.write(json.dumps({"user": u.idx, "history": h, "target": t, "rationale": rationale(ds, h, t),
                                "verdict": "RELEVANT", "teacher": "test", "prompt_hash": "x"}) + "\n")
        f.write("{not json\n")  # one bad line: counted and logged, never fatal
    texts = []
    for u in ds.users:
        for split in ("train", "valid"):
            h, t = ds.history(u.idx, split), ds.target(u.idx, split)
            cands = sample_candidates(ds, u, t, task.n_negatives, random.Random(u.idx))
            for reasoning in (False, True):
                ex = recommend_example(ds, u, split, cands, task, reasoning=reasoning, rationale=rationale(ds, h, t))
                texts += [m["content"] for m in ex.messages] + [ex.response] * 5
    for i in range(1, N_ITEMS + 1):
        ex = describe_example(ds, i, task)
        texts += [m["content"] for m in ex.messages] + [ex.response]
    tok = Tokenizer.train_tiny(out / "tok", texts, vocab_size=512)
    assert tok.vocab_size <= MODEL_CFG.vocab_size
    torch.manual_seed(0)
    model = Gemma3.from_config(MODEL_CFG)
    model.save_pretrained(out / "model", tokenizer_path=out / "tok" / "tokenizer.model")
    return {"data": str(data), "model": str(out / "model"), "rationales": str(out / "rationales.jsonl"),
            "tok": str(out / "tok")}


def overrides(paths: dict, run_dir, **kw) -> list[str]:
    """Command-line overrides of a tiny SFT run on this world (extra key=value in kw)."""
    base = {"run_dir": str(run_dir), "model.path": paths["model"], "data_dir": paths["data"],
            "mix.t3_source": paths["rationales"], "optim.lr": 3e-3, "optim.batch_size": 6,
            "optim.micro_batch_tokens": 2048, "optim.warmup_steps": 1, "optim.max_grad_norm": 1.0,
            "max_seq_len": 1024, "model.gradient_checkpointing": True, "steps": 4, "checkpoint_every": 2,
            "eval.every": 2, "eval.loss_users": 4, "eval.hr_users": 2, "eval.max_new_tokens": 8,
            "model.dtype": "float32"}  # exact 1-proc == FSDP2 / resume comparisons; bf16: tests/test_precision.py
    base.update({f"task.{k}": v for k, v in TASK.items()})
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


if __name__ == "__main__":
    print(json.dumps(build(Path(sys.argv[1])), indent=1))
