"""Evaluate recommenders on the dataset's fixed test candidate sets: Gemma-3 checkpoints (base / SFT / GRPO) and SASRec.

    python eval.py configs/quickstart/eval.yaml
    python eval.py configs/quickstart/eval.yaml max_users=50 sampling.enabled=false models.base.path=DIR
    torchrun --nproc_per_node 8 eval.py configs/amazon-gemma3-1b/eval.yaml       # users strided over ranks

Every model sees the same users, the same candidate lists (candidates_<split>.jsonl) and the same prompt text
(twice.tasks.recommend_example, exactly what SFT and GRPO trained on). Protocols, per LLM model:

  sampling     the paper's: n samples (5) at temperature 1.5, top-k 120, top-p 0.95, each stopped at </item>.
               The item IDs are read in SAMPLE ORDER, duplicates removed keeping the first, IDs outside the
               candidate set dropped -> a ranked list of <= n items; the target's rank is its position in it
               (absent = never a hit). HR@1, HR@5, NDCG@5. (The authors' script passes the IDs through a Python
               set, which scrambles the order, so their HR@5/NDCG@5 depend on string hashing; we keep the order.)
  exact        deterministic: prompt (+ the greedy rationale through </think> when the model reasons) prefilled
               ONCE, then every candidate's `<item>ID</item>` continuation scored by its exact summed
               log-likelihood (Engine.score); rank all candidates, ties pessimistic (twice.metrics).
               HR@1/5/10, NDCG@5/10, MRR.
  greedy       one greedy completion: the item it names, hit, validity (no tag / ID not among the candidates =
               hallucination), format (Eq. 3 well-formed), rationale length.
  constrained  (optional) greedy decoding of the item span restricted to a trie of the candidates' token
               sequences, after the same greedy rationale. Read off the exact protocol's per-token log-probs:
               log p(token | prefix) is shared by every candidate with that prefix, so walking the trie by the
               best child is exactly constrained greedy decoding.
SASRec is ranked on the same candidate lists (its scores give its ranked list, so it fills both columns).
Every rate has a 95% interval (Wilson for hit rates/validity, percentile bootstrap for NDCG/MRR).

Judge (paper RQ2, optional): an OpenAI-compatible endpoint (twice.llm_api.ChatClient) scores the greedy rationale
of N sampled users per model on the paper's 0-3 rubric (prompts.judge_prompt); distribution, mean and every
judgment (judge_<model>.jsonl) are saved.

Writes run_dir/: config.yaml (resolved), results.json, results.md (markdown table), predictions_<model>.jsonl (one
line per user, with the rationale), judge_<model>.jsonl. Multi-process: users are strided over ranks, per-user
results are summed into full-length tensors with all_reduce, rank 0 writes the files.
"""
from __future__ import annotations

import json
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from twice import prompts
from twice.config import ConfigError, parse_args, save_config
from twice.data import load_dataset
from twice.dist import all_reduce_sum, barrier, init_distributed, print0
from twice.engine import Engine
from twice.fileio import write_atomic
from twice.llm_api import ChatClient, LLMConfig, LLMError
from twice.metrics import bootstrap_interval, wilson_interval
from twice.rewards import normalize_item, parse_completion
from twice.tasks import TaskConfig, prompt_ids, recommend_example


# ---------------------------------------------------------------------------------------------------------------
# config

@dataclass
class ModelSpec:
    path: str = ""                    # HF folder (python -m twice.convert ..., an SFT/GRPO run's final/)
    reasoning: bool = True            # T3 prompt (<think> then <item>); False: T2 prompt (<item> only)
    label: str = ""                   # row name in the table (default: the key in `models`)


@dataclass
class SamplingConfig:
    enabled: bool = True
    num_samples: int = 5              # the paper: 5
    temperature: float = 1.5          # the paper: 1.5
    top_k: int = 120                  # the paper: 120
    top_p: float = 0.95               # the paper: 0.95
    max_new_tokens: int = 300         # the paper: 300
    ks: list[int] = field(default_factory=lambda: [1, 5])   # HR@k and NDCG@k (k <= num_samples is meaningful)
    seed: int = 0                     # row seeds = seed + user_idx * num_samples + sample (batch-independent)


@dataclass
class ExactConfig:
    enabled: bool = True
    ks: list[int] = field(default_factory=lambda: [1, 5, 10])
    constrained: bool = False         # also report constrained greedy decoding of the item span
    score_batch_size: int = 64        # continuations per teacher-forced forward


@dataclass
class GreedyConfig:
    enabled: bool = True              # (the exact protocol needs the greedy rationale: it runs when either is on)
    max_new_tokens: int = 300         # rationale + answer budget


@dataclass
class JudgeConfig:
    enabled: bool = False
    llm: LLMConfig = field(default_factory=lambda: LLMConfig(temperature=0.0, max_tokens=128))
    n_users: int = 300                # the paper: 300 per domain (fewer if fewer users were evaluated)
    seed: int = 0                     # which users are judged
    models: list[str] = field(default_factory=list)   # keys of `models` to judge ([] = every LLM model)
    history_items: int = 10           # most recent history items shown to the judge


@dataclass
class EvalConfig:
    run_dir: str = "runs/eval"
    data_dir: str = "data/ml-100k"
    split: str = "test"               # "test" (the paper) or "valid"
    max_users: int = 0                # evaluate the first N users of the candidate file (0 = all)
    models: dict[str, ModelSpec] = field(default_factory=dict)   # name -> model; order = table order
    sasrec_dir: str = ""              # SASRec.load folder ("" = no SASRec row)
    task: TaskConfig = field(default_factory=TaskConfig)   # prompt builder: the same as SFT/GRPO
    dtype: str = "auto"               # compute dtype (twice/precision.py): auto = bf16 on GPUs and AMX/AVX512-BF16
                                      #   CPUs, else fp32; float32 | bfloat16 | float16 force one
    batch_size: int = 8               # prompts per generate() call
    threads: int = 0                  # torch CPU threads (0 = torch default)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    exact: ExactConfig = field(default_factory=ExactConfig)
    greedy: GreedyConfig = field(default_factory=GreedyConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


# ---------------------------------------------------------------------------------------------------------------
# pure pieces (tested on hand-made predictions in tests/test_eval.py)

def sample_order_ranking(sampled_items: list[str | None], candidate_ids: list[str]) -> list[str]:
    """The paper's list from n samples: IDs in sample order, duplicates dropped keeping the first, IDs outside the
    candidate set (and samples without an <item>) dropped. IDs are whitespace-normalised before comparing."""
    cands = {normalize_item(c) for c in candidate_ids}
    out: list[str] = []
    for it in sampled_items:
        if it is None:
            continue
        it = normalize_item(it)
        if it in cands and it not in out:
            out.append(it)
    return out


def list_rank(ranked: list[str], target_id: str, n_candidates: int) -> int:
    """1-based position of the target in a ranked list; absent -> n_candidates + 1 (outside every cut-off <= C)."""
    t = normalize_item(target_id)
    return ranked.index(t) + 1 if t in ranked else n_candidates + 1


def pessimistic_rank(scores: list[float], target_index: int) -> int:
    """1 + #{other candidates scoring >= the target} (ties count against the target, as twice.metrics)."""
    if any(math.isnan(s) for s in scores):
        raise ValueError("candidate scores contain NaN")
    t = scores[target_index]
    return sum(1 for j, s in enumerate(scores) if j != target_index and s >= t) + 1


def trie_greedy(sequences: list[list[int]], token_logprobs: list[list[float]]) -> int:
    """Constrained greedy decoding over a trie of token sequences, from per-token log-probs of each sequence
    (token_logprobs[i][t] = log p(seq_i[t] | prompt, seq_i[:t])). At each depth keep the surviving sequences
    whose next token is the most probable allowed one (ties: smallest token id); a sequence that ends is chosen
    when its end is reached (the answer closed). Returns the index of the decoded sequence."""
    alive = list(range(len(sequences)))
    depth = 0
    while True:
        ended = [i for i in alive if len(sequences[i]) == depth]
        if ended:  # every candidate continuation ends with </item>: a prefix of another one cannot occur in
            return ended[0]  # practice; if it does, the closed answer wins
        best = max(alive, key=lambda i: (token_logprobs[i][depth], -sequences[i][depth]))
        tok = sequences[best][depth]
        alive = [i for i in alive if sequences[i][depth] == tok]
        depth += 1


def rate(successes: int, n: int) -> dict:
    return {"value": successes / n if n else 0.0, "ci95": list(wilson_interval(successes, n)) if n else [0.0, 0.0],
            "n": n}


def ranked_metrics(ranks: list[int], ks: list[int], mrr: bool = False) -> dict:
    """HR@k (Wilson CI) and NDCG@k (bootstrap CI) over per-user ranks (absent items have rank C+1); MRR optional."""
    n = len(ranks)
    out: dict = {"n": n}
    for k in ks:
        out[f"hr@{k}"] = rate(sum(r <= k for r in ranks), n)
        gains = [1.0 / math.log2(r + 1) if r <= k else 0.0 for r in ranks]
        out[f"ndcg@{k}"] = {"value": sum(gains) / n, "ci95": list(bootstrap_interval(gains)), "n": n}
    if mrr:
        rr = [1.0 / r for r in ranks]
        out["mrr"] = {"value": sum(rr) / n, "ci95": list(bootstrap_interval(rr)), "n": n}
    return out


def judge_score(text: str) -> int | None:
    """The judge's `<score>N</score>` (N in 0..3), or None when absent/out of range."""
    m = re.search(r"<score>\s*([0-9]+)\s*</score>", text or "")
    if not m or not 0 <= int(m.group(1)) <= 3:
        return None
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------------------------
# one model

def rationale_prefix(tok, gen_tokens: list[int], text: str, think_tag: str, item_tag: str) -> tuple[list[int], str]:
    """Token ids to put after the prompt before scoring `<item>ID</item>`, and their text: what the model wrote
    before its answer. The greedy completion's own tokens through the one that completes `</think>` when they end
    exactly there, else the text through `</think>` re-encoded. Without `</think>`: the text before `<item>` (all of
    it when there is no `<item>`), closed with `</think>` only if the model opened `<think>` (a model that answers
    without reasoning, e.g. one trained on T2 only, is scored right where it wrote `<item>`)."""
    close, item_open = f"</{think_tag}>", f"<{item_tag}>"
    cut = text.find(close)
    if cut >= 0:
        upto = text[:cut + len(close)]
        for n in range(1, len(gen_tokens) + 1):  # the generated tokens, if one ends exactly at </think>
            d = tok.decode(gen_tokens[:n])
            if len(d) >= len(upto):
                if d == upto:
                    return gen_tokens[:n], upto
                break
        return tok.encode(upto), upto
    j = text.find(item_open)
    upto = text[:j] if j >= 0 else text
    if f"<{think_tag}>" in upto:
        upto = upto.rstrip() + close
    return (tok.encode(upto) if upto else []), upto


def _parse_dtype(name: str, device) -> torch.dtype:
    from twice.precision import resolve_dtype
    return resolve_dtype(name, device, "dtype", choices=("auto", "float32", "bfloat16", "float16"))


def evaluate_model(cfg: EvalConfig, name: str, spec: ModelSpec, ds, users: list, info) -> list[dict]:
    """Run every enabled protocol for one LLM on this rank's users -> one record per user (JSON-ready)."""
    from twice.gemma3 import Gemma3
    from twice.tokenizer import Tokenizer

    path = Path(spec.path).expanduser()
    if not (path / "tokenizer.model").exists():
        raise FileNotFoundError(f"models.{name}.path={spec.path}: no tokenizer.model there (an HF folder from "
                                f"`python -m twice.convert` or a run's final/ is expected)")
    tok = Tokenizer.from_pretrained(path, tags=(cfg.task.think_tag, cfg.task.item_tag))
    model = Gemma3.from_pretrained(path, dtype=_parse_dtype(cfg.dtype, info.device), device=info.device).eval()
    engine = Engine(model, tok)
    tags = cfg.task.tags
    item_close = f"</{tags.item}>"
    S = cfg.sampling
    records = []
    bar = tqdm(total=len(users), desc=f"eval {name}", disable=not info.is_main, dynamic_ncols=True)
    for b0 in range(0, len(users), cfg.batch_size):
        batch = users[b0:b0 + cfg.batch_size]
        exs, pids = [], []
        for cs in batch:
            ex = recommend_example(ds, ds.user(cs.user), cfg.split, list(cs.candidates), cfg.task, tokenizer=tok,
                                   reasoning=spec.reasoning, with_response=False)
            exs.append(ex)
            pids.append(prompt_ids(tok, ex))
        recs = [{"user": cs.user, "target": ex.target_id, "candidates": ex.candidate_ids,
                 "prompt_tokens": len(p), "truncated": ex.truncated} for cs, ex, p in zip(batch, exs, pids)]

        if cfg.greedy.enabled or cfg.exact.enabled:
            g = engine.greedy(pids, max_new_tokens=cfg.greedy.max_new_tokens, stop_strings=[item_close])
            for r, text, toks, reason in zip(recs, g.texts, g.tokens, g.stop_reasons):
                p = parse_completion(text, tags.think, tags.item)
                item = normalize_item(p.item) if p.item is not None else None
                r["greedy"] = {"text": text, "rationale": p.think, "item": item, "stop": reason,
                               "valid": item is not None and item in set(r["candidates"]),
                               "hit": item is not None and item == normalize_item(r["target"]),
                               "well_formed": p.well_formed if spec.reasoning else
                               (p.n_item_open == 1 and p.n_item_close == 1 and bool(item)),
                               "_tokens": toks}

        if cfg.exact.enabled:
            for r, pid in zip(recs, pids):
                prefix, rationale = [], None
                if spec.reasoning:
                    prefix, rationale = rationale_prefix(tok, r["greedy"]["_tokens"], r["greedy"]["text"],
                                                         tags.think, tags.item)
                conts = [tok.encode(tags.wrap_item(c)) for c in r["candidates"]]
                per_tok = engine.score(pid + prefix, conts, per_token=True, batch_size=cfg.exact.score_batch_size)
                scores = [float(sum(x)) for x in per_tok]
                ti = r["candidates"].index(r["target"])
                r["exact"] = {"rank": pessimistic_rank(scores, ti), "scores": scores, "rationale_scored": rationale}
                if cfg.exact.constrained:
                    c = r["candidates"][trie_greedy(conts, per_tok)]
                    r["constrained"] = {"item": c, "hit": c == r["target"]}

        if S.enabled:
            K = S.num_samples
            seeds = [S.seed + cs.user * K + k for cs in batch for k in range(K)]
            out = engine.generate(pids, num_samples=K, max_new_tokens=S.max_new_tokens, temperature=S.temperature,
                                  top_k=S.top_k, top_p=S.top_p, stop_strings=[item_close], seeds=seeds)
            for i, r in enumerate(recs):
                texts = out.texts[i * K:(i + 1) * K]
                parsed = [parse_completion(t, tags.think, tags.item) for t in texts]
                items = [normalize_item(p.item) if p.item is not None else None for p in parsed]
                ranked = sample_order_ranking(items, r["candidates"])
                cset = set(r["candidates"])
                r["sampling"] = {"items": items, "ranked": ranked,
                                 "rank": list_rank(ranked, r["target"], len(r["candidates"])),
                                 "no_tag": sum(it is None for it in items),
                                 "hallucinated": sum(it is not None and it not in cset for it in items),
                                 "well_formed": sum(p.well_formed for p in parsed), "texts": texts}
        for r in recs:
            r.get("greedy", {}).pop("_tokens", None)
        records.extend(recs)
        bar.update(len(batch))
    bar.close()
    del model, engine
    return records


# ---------------------------------------------------------------------------------------------------------------
# aggregation (full-length tensors summed over ranks: each rank fills its own users' slots)

def gather_values(values_by_pos: dict[int, list[float]], n: int, width: int) -> torch.Tensor:
    t = torch.zeros(n, width, dtype=torch.float64)
    for pos, vals in values_by_pos.items():
        t[pos] = torch.tensor(vals, dtype=torch.float64)
    return all_reduce_sum(t)


def summarize_model(rows: torch.Tensor, cfg: EvalConfig) -> dict:
    """rows [U, 12] per user (see PER_USER) -> the results.json block of one model."""
    out: dict = {}
    U = rows.shape[0]
    col = {k: rows[:, i] for i, k in enumerate(PER_USER)}
    if cfg.greedy.enabled or cfg.exact.enabled:
        hits, valid, wf = (int(col[k].sum()) for k in ("g_hit", "g_valid", "g_wf"))
        no_tag = int(col["g_notag"].sum())
        rat = col["g_ratlen"][col["g_has_rat"] > 0]
        out["greedy"] = {"hr@1": rate(hits, U), "valid": rate(valid, U), "invalid": rate(U - valid, U),
                         "no_tag": rate(no_tag, U), "hallucination": rate(U - valid - no_tag, U),
                         "format": rate(wf, U),
                         "rationale_words": float(rat.mean()) if rat.numel() else 0.0,
                         "rationale_words_ci95": list(bootstrap_interval(rat.tolist())) if rat.numel() else None,
                         "with_rationale": rate(int((col["g_has_rat"] > 0).sum()), U)}
    if cfg.exact.enabled:
        out["exact"] = ranked_metrics([int(x) for x in col["e_rank"]], cfg.exact.ks, mrr=True)
        if cfg.exact.constrained:
            out["constrained"] = {"hr@1": rate(int(col["c_hit"].sum()), U)}
    if cfg.sampling.enabled:
        K = cfg.sampling.num_samples
        n_s = U * K
        out["sampling"] = ranked_metrics([int(x) for x in col["s_rank"]], cfg.sampling.ks)
        no_tag, hall, wf = (int(col[k].sum()) for k in ("s_notag", "s_hall", "s_wf"))
        out["sampling"].update({"no_tag": rate(no_tag, n_s), "hallucination": rate(hall, n_s),
                                "invalid": rate(no_tag + hall, n_s), "format": rate(wf, n_s)})
    return out


PER_USER = ("g_hit", "g_valid", "g_wf", "g_notag", "g_ratlen", "g_has_rat", "e_rank", "c_hit",
            "s_rank", "s_notag", "s_hall", "s_wf")


def per_user_values(r: dict) -> list[float]:
    g, e, s, c = r.get("greedy", {}), r.get("exact", {}), r.get("sampling", {}), r.get("constrained", {})
    rat = g.get("rationale")
    return [float(g.get("hit", 0)), float(g.get("valid", 0)), float(g.get("well_formed", 0)),
            float(bool(g) and g.get("item") is None), float(len(rat.split()) if rat else 0), float(bool(rat)),
            float(e.get("rank", 0)), float(c.get("hit", 0)),
            float(s.get("rank", 0)), float(s.get("no_tag", 0)), float(s.get("hallucinated", 0)),
            float(s.get("well_formed", 0))]


# ---------------------------------------------------------------------------------------------------------------
# judge (RQ2)

def _history_text(ds, user, split: str, n: int) -> str:
    hist = ds.history(user.idx, split)
    start = len(hist) - min(n, len(hist))
    parts = []
    for pos in range(start, len(hist)):
        it = ds.items[user.items[pos]]
        parts.append(prompts.render_item(it.title, it.id, it.description, it.details,
                                         review=user.reviews[pos] if user.reviews else None,
                                         rating=user.ratings[pos] if user.ratings else None))
    return "\n\n".join(parts)


def run_judge(cfg: EvalConfig, name: str, records: list[dict], ds, out_dir: Path) -> dict:
    """Judge the greedy rationales of a seeded sample of users; write judge_<name>.jsonl; -> summary."""
    J = cfg.judge
    rng = random.Random(J.seed)
    sample = sorted(rng.sample(range(len(records)), min(J.n_users, len(records))))
    convs, meta = [], []
    for i in sample:
        r = records[i]
        g = r["greedy"]
        idx = ds.item_by_id.get(g["item"]) if g["item"] is not None else None
        exists = idx is not None
        rec_block = (prompts.render_item(ds.items[idx].title, ds.items[idx].id, ds.items[idx].description)
                     if exists else f"item_id:{prompts.clean(g['item'] or '(none)', 64)}")
        text = prompts.judge_prompt(_history_text(ds, ds.user(r["user"]), cfg.split, J.history_items), rec_block,
                                    g["rationale"] or g["text"], exists)
        convs.append([{"role": "system", "content": prompts.JUDGE_SYSTEM}, {"role": "user", "content": text}])
        meta.append((r["user"], g["item"], exists))
    client = ChatClient(J.llm)
    results = client.chat_many(convs)
    dist_ = {str(k): 0 for k in range(4)}
    scores, failed = [], 0
    with open(out_dir / f"judge_{name}.jsonl.tmp", "w") as f:
        for (user, item, exists), res in zip(meta, results):
            if isinstance(res, LLMError):
                failed += 1
                row = {"user": user, "item": item, "item_exists": exists, "score": None, "error": str(res)}
            else:
                s = judge_score(res.text)
                failed += s is None
                if s is not None:
                    scores.append(s)
                    dist_[str(s)] += 1
                row = {"user": user, "item": item, "item_exists": exists, "score": s, "judgment": res.text}
            f.write(json.dumps(row) + "\n")
    os.replace(out_dir / f"judge_{name}.jsonl.tmp", out_dir / f"judge_{name}.jsonl")
    n = len(scores)
    return {"n": len(sample), "scored": n, "failed": failed, "mean": sum(scores) / n if n else None,
            "distribution": dist_, "share": {k: (v / n if n else 0.0) for k, v in dist_.items()},
            "mean_ci95": list(bootstrap_interval(scores)) if n else None}


# ---------------------------------------------------------------------------------------------------------------
# the table

def _fmt(m: dict | None) -> str:
    if not m:
        return "-"
    return f"{m['value']:.4f}"


def results_table(results: dict, cfg: EvalConfig) -> str:
    """Markdown: one row per model; HR@1, HR@5, NDCG@5 under sampling and exact; greedy HR@1 and validity."""
    sk = [k for k in (1, 5) if k in cfg.sampling.ks]
    ek = [k for k in (1, 5) if k in cfg.exact.ks]
    head = (["model"] + [f"sampling HR@{k}" for k in sk] + (["sampling NDCG@5"] if 5 in sk else [])
            + [f"exact HR@{k}" for k in ek] + (["exact NDCG@5"] if 5 in ek else [])
            + ["greedy HR@1", "greedy valid", "format"] + (["constrained HR@1"] if cfg.exact.constrained else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["models"].items():
        s, e, g = m.get("sampling", {}), m.get("exact", {}), m.get("greedy", {})
        row = ([m.get("label", name)] + [_fmt(s.get(f"hr@{k}")) for k in sk]
               + ([_fmt(s.get("ndcg@5"))] if 5 in sk else []) + [_fmt(e.get(f"hr@{k}")) for k in ek]
               + ([_fmt(e.get("ndcg@5"))] if 5 in ek else [])
               + [_fmt(g.get("hr@1")), _fmt(g.get("valid")), _fmt(g.get("format"))]
               + ([_fmt(m.get("constrained", {}).get("hr@1"))] if cfg.exact.constrained else []))
        lines.append("| " + " | ".join(row) + " |")
    n = results["n_users"]
    lines.append("")
    lines.append(f"{n} {results['split']} users, {results['n_candidates']} candidates each. sampling = the paper's "
                 f"protocol ({cfg.sampling.num_samples} samples, T={cfg.sampling.temperature}, top-k "
                 f"{cfg.sampling.top_k}, top-p {cfg.sampling.top_p}, IDs in sample order); exact = candidates ranked "
                 f"by log-likelihood; SASRec's ranking fills both; constrained = greedy item span restricted to the "
                 f"candidates' "
                 f"token trie (reported separately). 95% intervals are in results.json.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------

def main(argv: list[str]) -> dict | None:
    cfg = parse_args(EvalConfig, argv)
    if cfg.split not in ("valid", "test"):
        raise ConfigError(f"split must be 'valid' or 'test', got {cfg.split!r}")
    if not cfg.models and not cfg.sasrec_dir:
        raise ConfigError("nothing to evaluate: set `models` and/or `sasrec_dir`")
    if cfg.judge.enabled and not (cfg.greedy.enabled or cfg.exact.enabled):
        raise ConfigError("judge.enabled needs greedy (or exact) decoding: the judge reads the greedy rationale")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed()
    out_dir = Path(cfg.run_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    cfg.data_dir, cfg.sasrec_dir = (str(Path(p).expanduser()) if p else p for p in (cfg.data_dir, cfg.sasrec_dir))
    ds = load_dataset(cfg.data_dir)
    all_sets = ds.candidates(cfg.split)
    if not all_sets:
        raise FileNotFoundError(f"{cfg.data_dir}: no candidates_{cfg.split}.jsonl")
    if cfg.max_users:
        all_sets = all_sets[:cfg.max_users]
    for cs in all_sets:
        if cs.target not in cs.candidates:
            raise ValueError(f"{cfg.data_dir}/candidates_{cfg.split}.jsonl: user {cs.user}: target {cs.target} is "
                             f"not among its candidates")
    U = len(all_sets)
    mine = list(range(info.rank, U, info.world_size))  # users strided over ranks
    t0 = time.time()
    results: dict = {"split": cfg.split, "n_users": U, "n_candidates": len(all_sets[0].candidates),
                     "data_dir": cfg.data_dir, "models": {},
                     "compute_dtype": str(_parse_dtype(cfg.dtype, info.device)).removeprefix("torch.")}

    if cfg.sasrec_dir:
        from twice.sasrec import SASRec, rank_candidates
        sas = SASRec.load(cfg.sasrec_dir)
        hist = [ds.history(all_sets[i].user, cfg.split) for i in mine]
        ranks = rank_candidates(sas, hist, [list(all_sets[i].candidates) for i in mine],
                                [all_sets[i].target for i in mine]).tolist() if mine else []
        full = gather_values({p: [float(r)] for p, r in zip(mine, ranks)}, U, 1)[:, 0].long().tolist()
        block = ranked_metrics(full, sorted(set(cfg.exact.ks) | set(cfg.sampling.ks)), mrr=True)
        results["models"]["sasrec"] = {"label": "SASRec", "exact": block, "sampling": block}
        print0(f"SASRec: exact HR@1 {block['hr@1']['value']:.4f}" if "hr@1" in block else "SASRec done")

    for name, spec in cfg.models.items():
        if not spec.path:
            raise ConfigError(f"models.{name}.path is empty")
        records = evaluate_model(cfg, name, spec, ds, [all_sets[i] for i in mine], info)
        rows = gather_values({p: per_user_values(r) for p, r in zip(mine, records)}, U, len(PER_USER))
        block = summarize_model(rows, cfg)
        block["label"] = spec.label or name
        # predictions: each rank writes its part, rank 0 merges them in user order
        part = out_dir / f".predictions_{name}.rank{info.rank}.jsonl"
        with open(part, "w") as f:
            for p, r in zip(mine, records):
                f.write(json.dumps({"pos": p, **r}) + "\n")
        barrier()
        if info.is_main:
            merged = []
            for rk in range(info.world_size):
                pf = out_dir / f".predictions_{name}.rank{rk}.jsonl"
                merged += [json.loads(line) for line in pf.read_text().splitlines()]
                pf.unlink()
            merged.sort(key=lambda r: r.pop("pos"))
            write_atomic(out_dir / f"predictions_{name}.jsonl", "".join(json.dumps(r) + "\n" for r in merged))
            if cfg.judge.enabled and (not cfg.judge.models or name in cfg.judge.models):
                block["judge"] = run_judge(cfg, name, merged, ds, out_dir)
        results["models"][name] = block
        g = block.get("greedy", {})
        print0(f"{name}: " + ", ".join(f"{proto} HR@1 {block[proto]['hr@1']['value']:.4f}"
                                       for proto in ("sampling", "exact", "greedy") if proto in block)
               + (f", greedy valid {g['valid']['value']:.3f}" if g else ""))
        barrier()

    results["wall_s"] = round(time.time() - t0, 1)
    if info.is_main:
        write_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
        table = results_table(results, cfg)
        write_atomic(out_dir / "results.md", table)
        print(table)
    return results


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"eval.py: config error: {e}")
