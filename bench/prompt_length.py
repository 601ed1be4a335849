"""Prompt length: our rendered test prompts (a config's `task:` block) vs the authors' verbatim prompts, on a
dataset dir built from source "official" (characters of the user turn; Gemma tokens of the whole chat prompt).

    python -m twice.data prepare configs/data/official.yaml out_dir=data/official-grocery
    python bench/prompt_length.py data/official-grocery configs/amazon-gemma3-1b/eval.yaml [--tokenizer DIR]

`task.*=value` overrides after the config compare settings (e.g. task.candidate_desc_chars=0 task.details_chars=0,
what the paper configs rendered before issue 11 item 14). No token budget is applied (the lengths are what the
budget would have to hold).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from twice.config import from_dict  # noqa: E402
from twice.data import load_dataset  # noqa: E402
from twice.tasks import TaskConfig, authors_prompts, recommend_example  # noqa: E402
from twice.tokenizer import Tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("data_dir")
    ap.add_argument("config", help="a YAML with a task: block (sft.yaml / eval.yaml / grpo.yaml)")
    ap.add_argument("overrides", nargs="*", help="task.key=value")
    ap.add_argument("--tokenizer", default="~/.cache/twice/gemma-3-270m")
    a = ap.parse_args()
    task = yaml.safe_load(Path(a.config).read_text())["task"]
    for o in a.overrides:
        k, v = o.split("=", 1)
        task[k.removeprefix("task.")] = yaml.safe_load(v)
    cfg = from_dict(TaskConfig, task)
    cfg.max_prompt_tokens = 10 ** 9
    ds = load_dataset(a.data_dir)
    tok = Tokenizer.from_pretrained(os.path.expanduser(a.tokenizer))
    theirs = authors_prompts(ds)
    rows = {"ours": [], "authors": []}
    for cs in ds.candidates("test"):
        ex = recommend_example(ds, ds.user(cs.user), "test", list(cs.candidates), cfg, reasoning=True,
                               with_response=False)
        for name, e in (("ours", ex), ("authors", theirs[cs.user])):
            rows[name].append((len(e.messages[-1]["content"]), len(tok.apply_chat_template(e.messages,
                                                                                          add_generation_prompt=True))))
    print(f"{len(rows['ours'])} test users of {a.data_dir}; task: {task}")
    for name, r in rows.items():
        chars, toks = [c for c, _ in r], [t for _, t in r]
        print(f"{name:8s} chars: user 1 {chars[0]:6d}  mean {statistics.mean(chars):8.0f} | "
              f"tokens: mean {statistics.mean(toks):6.0f}  max {max(toks):6d}")


if __name__ == "__main__":
    main()
