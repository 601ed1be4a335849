"""A tiny GRPO world for tests/test_train_grpo.py and bench/grpo.py: dataset dir, SentencePiece tokenizer, random
Gemma-3 (HF folder), frozen SASRec, and a few SFT steps that teach the model the answer format half of the time.

    python tests/grpo_fixture.py OUT_DIR          # builds OUT_DIR/{data,model,warm,sasrec}

The warm model writes `<think>...</think><item>ID</item>` (well formed) or `<think>...<item>ID</item>` (no closing
think tag) about equally often, so GRPO with the format reward has something to learn within a few steps, and
groups have reward spread (non-zero advantages) for the gradient-invariance tests.
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
from twice.sasrec import SASRec, SASRecConfig  # noqa: E402
from twice.tasks import TaskConfig, prompt_ids, recommend_example, sample_candidates  # noqa: E402
from twice.tokenizer import Tokenizer  # noqa: E402

N_ITEMS, N_USERS, SEQ = 10, 8, 6
TASK = dict(max_prompt_tokens=2048, max_history=2, desc_chars=0, review_chars=0, n_negatives=2)
WORDS = "red blue soft warm small cozy light dark".split()


def write_dataset(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    with open(out / "items.jsonl", "w") as f:
        for i in range(1, N_ITEMS + 1):
            f.write(json.dumps({"idx": i, "id": f"I{i}", "title": f"{WORDS[i % 8]} {WORDS[(3 * i) % 8]} thing",
                                "description": "", "details": {}}) + "\n")
    with open(out / "users.jsonl", "w") as f:
        for u in range(1, N_USERS + 1):
            items = rng.sample(range(1, N_ITEMS + 1), SEQ)
            f.write(json.dumps({"idx": u, "id": f"U{u}", "items": items, "ratings": [5] * SEQ,
                                "reviews": [""] * SEQ, "timestamps": list(range(SEQ))}) + "\n")
    (out / "meta.json").write_text(json.dumps({"source": "test", "version": 1}))
    return out


def answers(item_id: str) -> tuple[str, str]:
    return f"<think>likes it</think><item>{item_id}</item>", f"<think>likes it<item>{item_id}</item>"


def build(out: Path, warm_steps: int = 30) -> dict:
    """-> paths {data, model (random), warm (format-mixed), sasrec}. Deterministic."""
    out = Path(out)
    torch.set_num_threads(1)  # tiny shapes: a second thread only adds contention on a shared 2-core box
    data = write_dataset(out / "data")
    ds = load_dataset(data)
    task = TaskConfig(**TASK)
    exs = []
    for u in ds.users:
        tgt = ds.target(u.idx, "train")
        cands = sample_candidates(ds, u, tgt, task.n_negatives, random.Random(u.idx))
        exs.append(recommend_example(ds, u, "train", cands, task, reasoning=True, with_response=False))
    corpus = [m["content"] for e in exs for m in e.messages] + [a for e in exs for a in answers(e.target_id)] * 20
    tok = Tokenizer.train_tiny(out / "tok", corpus, vocab_size=1024)
    torch.manual_seed(0)
    cfg = dataclasses.replace(PRESETS["tiny"], vocab_size=tok.vocab_size)  # never samples an id the tokenizer lacks
    model = Gemma3.from_config(cfg)
    model.save_pretrained(out / "model", tokenizer_path=out / "tok" / "tokenizer.model")

    # warm start: teacher-forced SFT on both answer forms (the item named is the target)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3)
    seqs = []
    for e in exs:
        p = prompt_ids(tok, e)
        for a in answers(e.target_id):
            c = tok.encode(a)
            seqs.append((p, c))
    L = max(len(p) + len(c) for p, c in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    tg = torch.full((len(seqs), L), -100, dtype=torch.long)
    for r, (p, c) in enumerate(seqs):
        ids[r, :len(p) + len(c)] = torch.tensor(p + c)
        tg[r, len(p) - 1:len(p) + len(c) - 1] = torch.tensor(c)
    model.train()
    loss = torch.zeros(())
    for _ in range(warm_steps):
        loss = -model(ids, targets=tg).sum() / (tg != -100).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(out / "warm", tokenizer_path=out / "tok" / "tokenizer.model")

    torch.manual_seed(0)
    sas = SASRec(SASRecConfig(n_items=N_ITEMS, hidden=16, blocks=1, heads=1, inner=16, maxlen=8, dropout=0.0))
    sas.init_weights()
    sas.save(out / "sasrec")
    return {"data": str(data), "model": str(out / "model"), "warm": str(out / "warm"), "sasrec": str(out / "sasrec"),
            "final_sft_loss": float(loss.detach())}


def overrides(paths: dict, run_dir, model: str = "warm", **kw) -> list[str]:
    """Command-line overrides of a tiny GRPO run on the fixture (any extra key=value in kw)."""
    base = {"run_dir": str(run_dir), "model.path": paths[model], "data_dir": paths["data"],
            "sasrec_dir": paths["sasrec"], "rollout.group_size": 4, "rollout.prompts_per_step": 2,
            "rollout.max_new_tokens": 14, "optim.micro_batch_size": 4, "optim.lr": 1e-3, "lora.enabled": False,
            "steps": 1, "checkpoint_every": 0, "threads": 1, "rewards.weights": "{format: 1.0}",
            "model.dtype": "float32"}  # exact 1-proc == FSDP2 / resume comparisons; bf16: tests/test_precision.py
    base.update({f"task.{k}": v for k, v in TASK.items()})
    base.update(kw)
    return [f"{k}={v}" for k, v in base.items()]


if __name__ == "__main__":
    print(json.dumps(build(Path(sys.argv[1])), indent=1))
