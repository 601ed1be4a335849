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
               set, which scrambles their order: with <= 5 distinct IDs HR@5 does not depend on it, but HR@1 and
               NDCG@5 do, through string hashing. We keep the sample order; `authors` below is their reading.)
  authors      a labelled DEVIATION, for comparison with the paper: the same samples read as evaluation_vllm.py
               does: every answer with the ID shape (sampling.authors_id_pattern; an ASIN by default) kept,
               hallucinated ones included, deduplicated through a set D; the set's arbitrary order is replaced by
               its expectation: HR@1 = 1[t in D]/|D|, HR@k = 1[t in D] min(k,|D|)/|D|,
               NDCG@k = 1[t in D] mean_{r <= |D|} 1[r <= k]/log2(r+1) (twice.metrics.set_expectation).
  exact        deterministic: each candidate's response `rationale<item>ID</item>` (the greedy rationale through
               </think> when the model reasons, else nothing) is encoded exactly as SFT encodes a response (one
               encode of the whole text: tokens merge across `</think><item>`); the prompt + the ids all candidates
               share are prefilled ONCE and each candidate's remaining ids scored by their exact summed
               log-likelihood (Engine.score); rank all candidates, ties pessimistic (twice.metrics).
               HR@1/5/10, NDCG@5/10, MRR.
  greedy       one greedy completion: the item it names, hit, validity (no tag / ID not among the candidates =
               hallucination), format (Eq. 3 well-formed), rationale length.
  constrained  (optional) greedy decoding of the item span restricted to a trie of the candidates' token
               sequences, after the same greedy rationale. Read off the exact protocol's per-token log-probs:
               log p(token | prefix) is shared by every candidate with that prefix, so walking the trie by the
               best child is exactly constrained greedy decoding.
SASRec is ranked on the same candidate lists: its own ranking (row "SASRec (ranking)"); its top-k fills the
sampling columns, marked, because it is not the sampling protocol. A random row gives each protocol's chance level
in closed form (twice.metrics: random ranker, uniform n-sample sampler in sample order and as a set).
Every rate has a 95% interval (Wilson for hit rates/validity, percentile bootstrap for NDCG/MRR). Paired tests: each
LLM row vs each of `compare_to` (base, sft, sasrec) on the same users: the mean per-user difference of HR@1/HR@5/
NDCG@5 with a paired bootstrap interval, and McNemar's exact test for the hit rates. Diagnostic: exact.length_spearman
= mean within-list Spearman(#scored tokens, log-likelihood) (< 0: IDs with fewer tokens are favoured).
Optional `orderings=N`: N extra seeded shufflings of every candidate list, the spread of each headline metric.

Judge (paper RQ2, optional): an OpenAI-compatible endpoint (twice.llm_api.ChatClient) scores the greedy rationale
of N sampled users per model on the paper's two-step 0-3 rubric: correctness in code (an item outside the item
vocabulary scores 0 and is never sent), then the judge grades the rationale 1-3 (prompts.judge_prompt); distribution,
mean and every judgment (judge_<model>.jsonl) are saved.

Writes run_dir/: config.yaml (resolved), results.json, results.md (markdown table), predictions_<model>.jsonl (one
line per user, with the rationale), judge_<model>.jsonl. Every input (data, SASRec, each model folder and tokenizer)
is checked before any work; results.json is rewritten after every model ("complete": false until the end; results.md
is written when the run completes), so a crash keeps the finished rows, and a rerun of the same config skips models
already finished (resume=false redoes them). Multi-process: users are strided over ranks, per-user results are
summed into full-length tensors with all_reduce, rank 0 writes the files.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from twice import prompts
from twice.config import ConfigError, parse_args, save_config, to_dict
from twice.data import load_dataset
from twice.dist import all_reduce_sum, barrier, init_distributed, print0
from twice.engine import Engine
from twice.fileio import write_atomic
from twice.llm_api import ChatClient, LLMConfig, LLMError
from twice.metrics import (bootstrap_interval, mcnemar_exact, paired_bootstrap, random_ranker, set_expectation,
                           spearman, uniform_sampler, uniform_sampler_set, wilson_interval)
from twice.precision import weights_note
from twice.rewards import normalize_item, parse_completion
from twice.tasks import AUTHORS_TAGS, TaskConfig, authors_prompts, encode_response, prompt_ids, recommend_example


# ---------------------------------------------------------------------------------------------------------------
# config

@dataclass
class ModelSpec:
    path: str = ""                    # HF folder (python -m twice.convert ..., an SFT/GRPO run's final/)
    reasoning: bool = True            # T3 prompt (<think> then <item>); False: T2 prompt (<item> only)
    label: str = ""                   # row name in the table (default: the key in `models`)
    sampling: bool = True             # False: this model skips the sampling protocol (greedy and exact still run), so
                                      #   its sampling cells read "-" and no sampling test involves it


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
    # the `authors` variant (evaluation_vllm.py) keeps every answer whose ID fully matches this regex, candidate or
    # not: an ASIN (10 upper-case letters/digits) for Amazon; set the dataset's ID shape otherwise ("[0-9]+" ml-100k)
    authors_id_pattern: str = "[A-Z0-9]{10}"


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
    # "ours": prompts rendered by twice.tasks (what SFT/GRPO trained on); "authors": the authors' released test prompts
    # verbatim (a dataset dir built from source "official", split test; answers parsed with <think>/<item_id>)
    prompts: str = "ours"
    dtype: str = "auto"               # compute dtype (twice/precision.py): auto = bf16 on GPUs and AMX/AVX512-BF16
                                      #   CPUs, else fp32; float32 | bfloat16 | float16 force one
    batch_size: int = 8               # prompts per generate() call
    threads: int = 0                  # torch CPU threads (0 = torch default)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    exact: ExactConfig = field(default_factory=ExactConfig)
    greedy: GreedyConfig = field(default_factory=GreedyConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    # paired tests: every LLM row vs each of these on the same users (keys of `models`, or "sasrec"; absent skipped)
    compare_to: list[str] = field(default_factory=lambda: ["base", "sft", "sasrec"])
    resume: bool = True               # skip models whose rows results.json already holds for this same config
    orderings: int = 0                # candidate-order robustness: N extra seeded shufflings per user (0 = off)
    orderings_seed: int = 0


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


def authors_id_set(sampled_items: list[str | None], pattern: str) -> list[str]:
    """The authors' list (evaluation_vllm.py): every sampled ID that has the ID shape (`pattern`, full match), kept
    whether or not it is a candidate (hallucinated IDs count), deduplicated through a set. Returned sorted (the set's
    own order is arbitrary: the metrics use only membership and size, see twice.metrics.set_expectation)."""
    rx = re.compile(pattern)
    return sorted({normalize_item(it) for it in sampled_items if it is not None and rx.fullmatch(normalize_item(it))})


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
    """The judge's `<score>N</score>`: N in 1..3 (the judge grades correct recommendations only; 0 = incorrect is
    decided in code), else None (counted as failed)."""
    m = re.search(r"<score>\s*([0-9]+)\s*</score>", text or "")
    if not m or not 1 <= int(m.group(1)) <= 3:
        return None
    return int(m.group(1))


# ---------------------------------------------------------------------------------------------------------------
# one model

def rationale_text(text: str, think_tag: str, item_tag: str) -> str:
    """What the model wrote before its answer, as text to put in front of `<item>ID</item>`: the greedy completion
    through `</think>`; without `</think>`, the text before `<item>` (all of it when there is no `<item>`), closed
    with `</think>` only if the model opened `<think>` (a model that answers without reasoning, e.g. one trained on
    T2 only, is scored right where it wrote `<item>`)."""
    close, item_open = f"</{think_tag}>", f"<{item_tag}>"
    cut = text.find(close)
    if cut >= 0:
        return text[:cut + len(close)]
    j = text.find(item_open)
    upto = text[:j] if j >= 0 else text
    if f"<{think_tag}>" in upto:
        upto = upto.rstrip() + close
    return upto


def candidate_continuations(tok, rationale: str, candidate_ids: list[str], tags) -> tuple[list[int], list[list[int]]]:
    """Each candidate's response `rationale + <item>ID</item>` encoded as SFT encodes it (tasks.encode_response: ONE
    encode of the whole text, so `</think><item>` is 'think','><','item' as in training, never a separately encoded
    `<item>` SFT never saw), split into the ids every candidate shares (their longest common prefix, fed after the
    prompt) and each candidate's remaining ids (scored). shared + conts[i] == the SFT response ids of candidate i."""
    full = [encode_response(tok, rationale + tags.wrap_item(c)) for c in candidate_ids]
    p, n = 0, min(len(f) for f in full) - 1       # keep >= 1 scored token per candidate
    while p < n and all(f[p] == full[0][p] for f in full):
        p += 1
    conts = [f[p:] for f in full]
    if len({tuple(c) for c in conts}) < len(conts):
        raise ValueError(f"two candidates encode to the same response tokens: {candidate_ids}")
    return full[0][:p], conts


def _parse_dtype(name: str, device, checkpoint=None) -> torch.dtype:
    from twice.precision import resolve_dtype
    return resolve_dtype(name, device, "dtype", choices=("auto", "float32", "bfloat16", "float16"),
                         checkpoint=checkpoint, delta_adapters=True)   # loaded with delta="auto": bf16 + delta


def evaluate_model(cfg: EvalConfig, name: str, spec: ModelSpec, ds, users: list, info,
                   times: dict | None = None) -> list[dict]:
    """Run every enabled protocol for one LLM on this rank's users -> one record per user (JSON-ready).

    Per batch of users: ONE prefill of their prompts serves everything: one decode runs each user's greedy row
    and its K sampled rows together (Engine.generate with per-slot temperatures and lengths: the same tokens as
    separate greedy and sampling calls, with fewer decode steps), then exact scoring continues each user's row of
    that prefill (Engine.score(prefix=...)) instead of prefilling the prompt again. times (if given) receives the
    wall seconds of each phase: prefill, decode (greedy + sampling rows), exact, total."""
    from twice.gemma3 import Gemma3
    from twice.tokenizer import Tokenizer

    path = Path(spec.path).expanduser()
    if not (path / "tokenizer.model").exists():
        raise FileNotFoundError(f"models.{name}.path={spec.path}: no tokenizer.model there (an HF folder from "
                                f"`python -m twice.convert` or a run's final/ is expected)")
    tok = Tokenizer.from_pretrained(path, tags=(cfg.task.think_tag, cfg.task.item_tag))
    model = Gemma3.from_pretrained(path, dtype=_parse_dtype(cfg.dtype, info.device, path), device=info.device).eval()
    engine = Engine(model, tok)
    released = authors_prompts(ds) if cfg.prompts == "authors" else None   # user -> the released prompt, verbatim
    tags = AUTHORS_TAGS if released else cfg.task.tags
    item_close = f"</{tags.item}>"
    S = cfg.sampling
    G = int(cfg.greedy.enabled or cfg.exact.enabled)   # the exact protocol scores after the greedy rationale
    K = S.num_samples if S.enabled and spec.sampling else 0
    clock = dict.fromkeys(("prefill", "decode", "exact"), 0.0)
    t_model = time.perf_counter()
    records = []
    bar = tqdm(total=len(users), desc=f"eval {name}", disable=not info.is_main, dynamic_ncols=True)
    for b0 in range(0, len(users), cfg.batch_size):
        batch = users[b0:b0 + cfg.batch_size]
        exs, pids = [], []
        for cs in batch:
            ex = released[cs.user] if released else recommend_example(
                ds, ds.user(cs.user), cfg.split, list(cs.candidates), cfg.task, tokenizer=tok,
                reasoning=spec.reasoning, with_response=False)
            exs.append(ex)
            pids.append(prompt_ids(tok, ex))
        recs = [{"user": cs.user, "target": ex.target_id, "candidates": ex.candidate_ids,
                 "prompt_tokens": len(p), "truncated": ex.truncated} for cs, ex, p in zip(batch, exs, pids)]

        if G + K:
            t = time.perf_counter()
            pre = engine.prefill(pids)     # (cache, last logits): copied by each use below, never modified
            clock["prefill"] += time.perf_counter() - t
            t = time.perf_counter()
            # row i*(G+K) + 0: greedy (if G); the next K: samples, seeded per user and sample (batch-independent)
            seeds = [x for cs in batch for x in [0] * G + [S.seed + cs.user * K + k for k in range(K)]]
            out = engine.generate(pids, num_samples=G + K, temperature=[0.0] * G + [S.temperature] * K,
                                  max_new_tokens=[cfg.greedy.max_new_tokens] * G + [S.max_new_tokens] * K,
                                  top_k=S.top_k if K else None, top_p=S.top_p if K else 1.0,
                                  stop_strings=[item_close], seeds=seeds, prefill=pre,
                                  full_logprobs=False)  # eval reads texts: the sampler skips the fp32 vocab passes
            clock["decode"] += time.perf_counter() - t
        if G:
            rows = range(0, len(batch) * (G + K), G + K)
            for r, text, reason in zip(recs, [out.texts[j] for j in rows], [out.stop_reasons[j] for j in rows]):
                p = parse_completion(text, tags.think, tags.item)
                item = normalize_item(p.item) if p.item is not None else None
                r["greedy"] = {"text": text, "rationale": p.think, "item": item, "stop": reason,
                               "valid": item is not None and item in set(r["candidates"]),
                               "hit": item is not None and item == normalize_item(r["target"]),
                               "well_formed": p.well_formed if spec.reasoning else
                               (p.n_item_open == 1 and p.n_item_close == 1 and bool(item))}

        if cfg.exact.enabled:
            t = time.perf_counter()
            for i, (r, pid) in enumerate(zip(recs, pids)):
                rationale = rationale_text(r["greedy"]["text"], tags.think, tags.item) if spec.reasoning else ""
                shared, conts = candidate_continuations(tok, rationale, r["candidates"], tags)
                per_tok = engine.score(pid + shared, conts, per_token=True, batch_size=cfg.exact.score_batch_size,
                                       prefix=(pre[0], i, pre[1]))   # the prompt comes from the batch prefill
                scores = [float(sum(x)) for x in per_tok]
                ti = r["candidates"].index(r["target"])
                r["exact"] = {"rank": pessimistic_rank(scores, ti), "scores": scores, "rationale_scored": rationale,
                              "shared_tokens": len(shared), "scored_tokens": [len(c) for c in conts]}
                if cfg.exact.constrained:
                    c = r["candidates"][trie_greedy(conts, per_tok)]
                    r["constrained"] = {"item": c, "hit": c == r["target"]}
            clock["exact"] += time.perf_counter() - t
        pre = None   # the batch's cache: free it before the next batch's prefill

        if K:
            for i, r in enumerate(recs):
                texts = out.texts[i * (G + K) + G:(i + 1) * (G + K)]
                parsed = [parse_completion(t, tags.think, tags.item) for t in texts]
                items = [normalize_item(p.item) if p.item is not None else None for p in parsed]
                ranked = sample_order_ranking(items, r["candidates"])
                cset = set(r["candidates"])
                id_set = authors_id_set(items, S.authors_id_pattern)
                r["sampling"] = {"items": items, "ranked": ranked,
                                 "authors": {"ids": id_set, "in": normalize_item(r["target"]) in id_set},
                                 "rank": list_rank(ranked, r["target"], len(r["candidates"])),
                                 "no_tag": sum(it is None for it in items),
                                 "hallucinated": sum(it is not None and it not in cset for it in items),
                                 "well_formed": sum(p.well_formed for p in parsed), "texts": texts}
        records.extend(recs)
        bar.update(len(batch))
    bar.close()
    del model, engine
    if times is not None:
        times.update({k: round(v, 3) for k, v in clock.items()}, total=round(time.perf_counter() - t_model, 3))
    return records


# ---------------------------------------------------------------------------------------------------------------
# aggregation (full-length tensors summed over ranks: each rank fills its own users' slots)

def gather_values(values_by_pos: dict[int, list[float]], n: int, width: int) -> torch.Tensor:
    t = torch.zeros(n, width, dtype=torch.float64)
    for pos, vals in values_by_pos.items():
        t[pos] = torch.tensor(vals, dtype=torch.float64)
    return all_reduce_sum(t)


def sampled(cfg: EvalConfig, name: str) -> bool:
    """Does this row carry the sampling protocol? Every LLM unless its spec says sampling: false; SASRec's ranking
    fills the sampling columns."""
    return cfg.sampling.enabled and (name not in cfg.models or cfg.models[name].sampling)


def summarize_model(rows: torch.Tensor, cfg: EvalConfig, with_sampling: bool = True) -> dict:
    """rows [U, len(PER_USER)] per user -> the results.json block of one model (with_sampling: it ran that protocol)."""
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
        rho = col["e_len_rho"][col["e_len_ok"] > 0]
        # diagnostic (issue 11 item 4): within-list Spearman(#scored tokens, summed log-lik); < 0 = short IDs favoured
        out["exact"]["length_spearman"] = {"mean": float(rho.mean()) if rho.numel() else None,
                                           "ci95": list(bootstrap_interval(rho.tolist())) if rho.numel() else None,
                                           "n_users": int(rho.numel())}
        if cfg.exact.constrained:
            out["constrained"] = {"hr@1": rate(int(col["c_hit"].sum()), U)}
    if cfg.sampling.enabled and with_sampling:
        K = cfg.sampling.num_samples
        n_s = U * K
        out["sampling"] = ranked_metrics([int(x) for x in col["s_rank"]], cfg.sampling.ks)
        no_tag, hall, wf = (int(col[k].sum()) for k in ("s_notag", "s_hall", "s_wf"))
        out["sampling"].update({"no_tag": rate(no_tag, n_s), "hallucination": rate(hall, n_s),
                                "invalid": rate(no_tag + hall, n_s), "format": rate(wf, n_s)})
        out["authors"] = {"note": AUTHORS_NOTE, "n": U}
        for k, vals in user_metrics(rows, "authors", cfg.sampling.ks).items():
            out["authors"][k] = {"value": sum(vals) / U, "ci95": list(bootstrap_interval(vals)), "n": U}
    return out


AUTHORS_NOTE = ("deviation, for comparison with the paper: evaluation_vllm.py's reading of the same samples (every "
                "ID-shaped answer kept, hallucinated ones included, deduplicated through a set; HR/NDCG are the "
                "expectation over the set's orderings)")
SASREC_NOTE = ("SASRec's own ranking of all candidates (deterministic, like `exact`); its numbers also fill the "
               "sampling columns, but they are not the sampling protocol")

PER_USER = ("g_hit", "g_valid", "g_wf", "g_notag", "g_ratlen", "g_has_rat", "e_rank", "c_hit",
            "s_rank", "s_notag", "s_hall", "s_wf", "a_in", "a_size", "e_len_rho", "e_len_ok")


def per_user_values(r: dict) -> list[float]:
    g, e, s, c = r.get("greedy", {}), r.get("exact", {}), r.get("sampling", {}), r.get("constrained", {})
    rat = g.get("rationale")
    a = s.get("authors", {})
    rho = spearman(e["scored_tokens"], e["scores"]) if e else None
    return [float(g.get("hit", 0)), float(g.get("valid", 0)), float(g.get("well_formed", 0)),
            float(bool(g) and g.get("item") is None), float(len(rat.split()) if rat else 0), float(bool(rat)),
            float(e.get("rank", 0)), float(c.get("hit", 0)),
            float(s.get("rank", 0)), float(s.get("no_tag", 0)), float(s.get("hallucinated", 0)),
            float(s.get("well_formed", 0)), float(a.get("in", 0)), float(len(a.get("ids", []))),
            float(rho if rho is not None else 0.0), float(rho is not None)]


def user_metrics(rows: torch.Tensor, proto: str, ks: list[int]) -> dict[str, list[float]]:
    """Per-user HR@k / NDCG@k values of one protocol ("exact", "sampling", "authors"; "ranking" = rows holds one
    column of ranks, SASRec) -> {"hr@k": [U], "ndcg@k": [U]}: the numbers paired tests compare user by user."""
    out: dict[str, list[float]] = {}
    if proto == "authors":
        a_in, a_size = rows[:, PER_USER.index("a_in")].tolist(), rows[:, PER_USER.index("a_size")].tolist()
        for k in ks:
            pairs = [set_expectation(bool(i), int(d), k) for i, d in zip(a_in, a_size)]
            out[f"hr@{k}"], out[f"ndcg@{k}"] = [p[0] for p in pairs], [p[1] for p in pairs]
        return out
    ranks = rows[:, 0] if proto == "ranking" else rows[:, PER_USER.index("e_rank" if proto == "exact" else "s_rank")]
    ranks = [int(x) for x in ranks]
    for k in ks:
        out[f"hr@{k}"] = [float(r <= k) for r in ranks]
        out[f"ndcg@{k}"] = [1.0 / math.log2(r + 1) if r <= k else 0.0 for r in ranks]
    return out


def random_baseline(n_candidates: list[int], cfg: EvalConfig) -> dict:
    """The random row, exact expectations per protocol (twice.metrics), averaged over users' candidate counts."""
    U = len(n_candidates)

    def avg(fn) -> dict:
        per = [fn(c) for c in n_candidates]
        return {k: {"value": sum(p[k] for p in per) / U} for k in per[0]}
    K, sk = cfg.sampling.num_samples, cfg.sampling.ks
    return {"label": "random (expectation)",
            "note": "a ranker/sampler that knows nothing: exact = uniformly random ranking, sampling/authors = "
                    f"{K} uniform draws from the candidates, greedy = one uniform draw (closed form, no simulation)",
            "exact": avg(lambda c: random_ranker(c, cfg.exact.ks)),
            "sampling": avg(lambda c: uniform_sampler(c, K, sk)),
            "authors": avg(lambda c: uniform_sampler_set(c, K, sk)),
            "greedy": {"hr@1": {"value": sum(1 / c for c in n_candidates) / U}}}


def paired_comparisons(per_model: dict[str, tuple[str, torch.Tensor]], cfg: EvalConfig) -> dict:
    """Every LLM row vs each `compare_to` row on the same users -> {"<a> vs <b>": {protocol: {metric: {diff, ci95,
    n[, mcnemar]}}}}. LLM vs LLM: the same protocol; LLM vs SASRec: each LLM protocol vs SASRec's ranking.
    per_model: name -> ("llm" | "ranking", per-user rows)."""
    out: dict = {}
    ks = sorted({1, 5} & set(cfg.sampling.ks) & set(cfg.exact.ks)) or [1]
    for a, (kind_a, rows_a) in per_model.items():
        if kind_a != "llm":
            continue
        for b in cfg.compare_to:
            if b == a or b not in per_model:
                continue
            kind_b, rows_b = per_model[b]
            block = {}
            for proto in ("sampling", "exact", "authors"):
                if (proto == "exact" and not cfg.exact.enabled) or \
                        (proto != "exact" and not (sampled(cfg, a) and sampled(cfg, b))):
                    continue
                ma = user_metrics(rows_a, proto, ks)
                mb = user_metrics(rows_b, "ranking" if kind_b == "ranking" else proto, ks)
                cmp = {}
                for m in ma:
                    cmp[m] = paired_bootstrap(ma[m], mb[m])
                    if m.startswith("hr@") and proto != "authors":   # binary per user: McNemar applies
                        cmp[m]["mcnemar"] = mcnemar_exact(ma[m], mb[m])
                block[proto] = cmp
            out[f"{a} vs {b}"] = block
    return out


def shuffled_sets(all_sets: list, seed: int, ordering: int) -> list:
    """Every user's candidate list in a seeded order (ordering 0 = the dataset's own order): per user, so the order a
    user sees does not depend on how many users are evaluated or how they are strided over ranks."""
    if ordering == 0:
        return list(all_sets)
    out = []
    for cs in all_sets:
        cands = list(cs.candidates)
        random.Random(f"{seed}:{ordering}:{cs.user}").shuffle(cands)
        out.append(dataclasses.replace(cs, candidates=cands))
    return out


def spread(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"values": values, "mean": mean, "sd": sd, "min": min(values), "max": max(values)}


def evaluate_orderings(cfg: EvalConfig, name: str, spec: ModelSpec, ds, all_sets: list, mine: list[int], info,
                       block: dict, out_dir: Path) -> dict:
    """Candidate-order robustness (issue 11 item 9): the same protocols on `cfg.orderings` extra seeded shufflings
    of every user's candidate list (prompt order changes, the set does not). Per headline metric: its value under
    each ordering (first = the dataset's order, i.e. the row itself) and their spread."""
    heads = [(p, k) for p in ("sampling", "authors", "exact") for k in ("hr@1", "hr@5", "ndcg@5")
             if k in block.get(p, {})]
    values = {f"{p} {k}": [block[p][k]["value"]] for p, k in heads}
    U = len(all_sets)
    for o in range(1, cfg.orderings + 1):
        sets = shuffled_sets(all_sets, cfg.orderings_seed, o)
        records = evaluate_model(cfg, f"{name} order {o}", spec, ds, [sets[i] for i in mine], info)
        merge_predictions(out_dir, f"predictions_{name}.order{o}", mine, records, info)
        rows = gather_values({p: per_user_values(r) for p, r in zip(mine, records)}, U, len(PER_USER))
        b = summarize_model(rows, cfg, sampled(cfg, name))
        for p, k in heads:
            values[f"{p} {k}"].append(b[p][k]["value"])
    return {"n": cfg.orderings + 1, "seed": cfg.orderings_seed, **{m: spread(v) for m, v in values.items()}}


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
    """The paper's two-step rubric on the greedy rationales of a seeded sample of users: step 1 in code (an item
    outside the item vocabulary, or no item, scores 0: Incorrect, never sent), step 2 by the judge (1-3) for the
    rest. Writes judge_<name>.jsonl; -> summary."""
    J = cfg.judge
    rng = random.Random(J.seed)
    sample = sorted(rng.sample(range(len(records)), min(J.n_users, len(records))))
    convs, meta = [], []
    for i in sample:
        r = records[i]
        g = r["greedy"]
        idx = ds.item_by_id.get(g["item"]) if g["item"] is not None else None
        if idx is None:
            meta.append((r["user"], g["item"], None))
            continue
        rec_block = prompts.render_item(ds.items[idx].title, ds.items[idx].id, ds.items[idx].description)
        text = prompts.judge_prompt(_history_text(ds, ds.user(r["user"]), cfg.split, J.history_items), rec_block,
                                    g["rationale"] or g["text"])
        meta.append((r["user"], g["item"], len(convs)))
        convs.append([{"role": "system", "content": prompts.JUDGE_SYSTEM}, {"role": "user", "content": text}])
    results = ChatClient(J.llm).chat_many(convs) if convs else []
    dist_ = {str(k): 0 for k in range(4)}
    scores, failed, rows = [], 0, []
    for user, item, j in meta:
        row = {"user": user, "item": item, "item_exists": j is not None}
        if j is None:
            s, row["scored_by"] = 0, "code: not in the item vocabulary"
        elif isinstance(results[j], LLMError):
            s, row["error"] = None, str(results[j])
        else:
            s, row["judgment"] = judge_score(results[j].text), results[j].text
        row["score"] = s
        failed += s is None
        if s is not None:
            scores.append(s)
            dist_[str(s)] += 1
        rows.append(row)
    write_atomic(out_dir / f"judge_{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    n = len(scores)
    return {"n": len(sample), "scored": n, "failed": failed, "sent_to_judge": len(convs),
            "mean": sum(scores) / n if n else None, "distribution": dist_,
            "share": {k: (v / n if n else 0.0) for k, v in dist_.items()},
            "mean_ci95": list(bootstrap_interval(scores)) if n else None,
            "rubric": {str(k): v for k, v in prompts.JUDGE_RUBRIC.items()}}


# ---------------------------------------------------------------------------------------------------------------
# the table

def _fmt(m: dict | None, mark: str = "") -> str:
    if not m:
        return "-"
    return f"{m['value']:.4f}{mark}"


def _fmt_diff(c: dict | None) -> str:
    if not c:
        return "-"
    lo, hi = c["ci95"]
    return f"{c['diff']:+.4f} [{lo:+.4f}, {hi:+.4f}]"


def results_table(results: dict, cfg: EvalConfig) -> str:
    """Markdown: one row per model (+ the random row); HR@1, HR@5, NDCG@5 under sampling, authors and exact; greedy
    HR@1 and validity; then the paired comparisons."""
    sk = [k for k in (1, 5) if k in cfg.sampling.ks] if cfg.sampling.enabled else []
    ek = [k for k in (1, 5) if k in cfg.exact.ks] if cfg.exact.enabled else []
    head = (["model"] + [f"sampling HR@{k}" for k in sk] + (["sampling NDCG@5"] if 5 in sk else [])
            + [f"authors HR@{k}" for k in sk] + (["authors NDCG@5"] if 5 in sk else [])
            + [f"exact HR@{k}" for k in ek] + (["exact NDCG@5"] if 5 in ek else [])
            + ["greedy HR@1", "greedy valid", "format"]
            + (["constrained HR@1"] if cfg.exact.enabled and cfg.exact.constrained else []))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = dict(results["models"])
    if "random" in results.get("baselines", {}):
        rows["random"] = results["baselines"]["random"]
    for name, m in rows.items():
        s, a, e, g = m.get("sampling", {}), m.get("authors", {}), m.get("exact", {}), m.get("greedy", {})
        mark = "\u2020" if name == "sasrec" else ""      # SASRec's ranking, not the sampling protocol
        row = ([m.get("label", name)] + [_fmt(s.get(f"hr@{k}"), mark) for k in sk]
               + ([_fmt(s.get("ndcg@5"), mark)] if 5 in sk else [])
               + [_fmt(a.get(f"hr@{k}")) for k in sk] + ([_fmt(a.get("ndcg@5"))] if 5 in sk else [])
               + [_fmt(e.get(f"hr@{k}")) for k in ek] + ([_fmt(e.get("ndcg@5"))] if 5 in ek else [])
               + [_fmt(g.get("hr@1")), _fmt(g.get("valid")), _fmt(g.get("format"))]
               + ([_fmt(m.get("constrained", {}).get("hr@1"))] if cfg.exact.enabled and cfg.exact.constrained else []))
        lines.append("| " + " | ".join(row) + " |")
    n = results["n_users"]
    lines.append("")
    lines.append(f"{n} {results['split']} users, {results['n_candidates']} candidates each. sampling = the paper's "
                 f"protocol ({cfg.sampling.num_samples} samples, T={cfg.sampling.temperature}, top-k "
                 f"{cfg.sampling.top_k}, top-p {cfg.sampling.top_p}, IDs in sample order, non-candidates dropped); "
                 f"authors = a DEVIATION kept for comparison with the paper: the same samples read as the authors' "
                 f"evaluation_vllm.py does (ID-shaped answers kept even when hallucinated, passed through a set; "
                 f"expectation over the set's orderings); exact = candidates ranked by the log-likelihood of the "
                 f"response SFT trains on; \u2020 SASRec: its own top-k ranking of the candidates fills the sampling "
                 f"columns (not sampled); random = exact expectation of a chance ranker / uniform sampler; "
                 f"constrained = greedy item span restricted to the candidates' token trie. 95% intervals are in "
                 f"results.json.")
    paired = results.get("paired", {})
    if paired:
        lines += ["", "Paired differences on the same users (row minus reference; 95% paired-bootstrap interval; "
                      "McNemar exact p for HR@1):", "",
                  "| comparison | protocol | diff HR@1 | McNemar p | diff HR@5 | diff NDCG@5 |",
                  "|---|---|---|---|---|---|"]
        for pair, block in paired.items():
            for proto, c in block.items():
                p1 = c.get("hr@1", {}).get("mcnemar")
                cells = [pair, proto, _fmt_diff(c.get("hr@1")), f"{p1['p']:.3g}" if p1 else "-",
                         _fmt_diff(c.get("hr@5")), _fmt_diff(c.get("ndcg@5"))]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# inputs: every one checked before any work

def check_inputs(cfg: EvalConfig) -> None:
    """Every path eval needs, checked before anything is loaded or evaluated: one line naming each bad input."""
    from safetensors import safe_open
    bad = []
    data = Path(cfg.data_dir).expanduser()
    if not data.is_dir():
        bad.append(f"data_dir={cfg.data_dir}: no such folder")
    elif not (data / f"candidates_{cfg.split}.jsonl").exists():
        bad.append(f"data_dir={cfg.data_dir}: no candidates_{cfg.split}.jsonl (python -m twice.data ...)")
    if cfg.sasrec_dir:
        sd = Path(cfg.sasrec_dir).expanduser()
        missing = [f for f in ("config.json", "model.safetensors") if not (sd / f).exists()]
        if missing:
            bad.append(f"sasrec_dir={cfg.sasrec_dir}: " + ("no such folder" if not sd.is_dir() else
                                                           f"no {' / '.join(missing)} (a train_sasrec.py best/)"))
    for name, spec in cfg.models.items():
        where = f"models.{name}.path={spec.path}"
        path = Path(spec.path).expanduser()
        if not spec.path:
            bad.append(f"models.{name}.path is empty")
        elif not path.is_dir():
            bad.append(f"{where}: no such folder")
        else:
            missing = [f for f in ("config.json", "tokenizer.model") if not (path / f).exists()]
            single, index = path / "model.safetensors", path / "model.safetensors.index.json"
            if not (single.exists() or index.exists()):
                missing.append("model.safetensors")
            if missing:
                bad.append(f"{where}: no {' / '.join(missing)} there (an HF folder from `python -m twice.convert` "
                           f"or a run's final/ is expected)")
                continue
            try:
                json.loads((path / "config.json").read_text())
                if single.exists():
                    with safe_open(str(single), framework="pt") as f:
                        f.keys()
                from twice.tokenizer import Tokenizer
                Tokenizer.from_pretrained(path)
            except Exception as e:  # noqa: BLE001 -- any unreadable file becomes one line naming it
                bad.append(f"{where}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if bad:
        raise ConfigError("; ".join(bad))


def model_fingerprint(cfg: EvalConfig, name: str, spec: ModelSpec) -> str:
    """What a model's rows depend on: resume reuses rows only when this is unchanged."""
    judged = cfg.judge.enabled and (not cfg.judge.models or name in cfg.judge.models)
    keys = {"spec": to_dict(spec), "path": str(Path(spec.path).expanduser().resolve()), "data": cfg.data_dir,
            "split": cfg.split, "max_users": cfg.max_users, "task": to_dict(cfg.task), "dtype": cfg.dtype,
            "prompts": cfg.prompts,
            "sampling": to_dict(cfg.sampling), "exact": to_dict(cfg.exact), "greedy": to_dict(cfg.greedy),
            "orderings": [cfg.orderings, cfg.orderings_seed], "judge": to_dict(cfg.judge) if judged else None}
    return hashlib.sha1(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def load_finished(out_dir: Path, cfg: EvalConfig, all_sets: list) -> dict[str, tuple[dict, torch.Tensor]]:
    """Models a previous run of this config finished: name -> (results block, per-user rows from its predictions)."""
    res_file = out_dir / "results.json"
    if not cfg.resume or not res_file.exists():
        return {}
    try:
        prev = json.loads(res_file.read_text())
    except json.JSONDecodeError:
        return {}
    done = {}
    users = [cs.user for cs in all_sets]
    for name, spec in cfg.models.items():
        block = prev.get("models", {}).get(name)
        pf = out_dir / f"predictions_{name}.jsonl"
        if not block or block.get("fingerprint") != model_fingerprint(cfg, name, spec) or not pf.exists():
            continue
        recs = [json.loads(line) for line in pf.read_text().splitlines() if line.strip()]
        if [r["user"] for r in recs] != users:
            continue
        done[name] = (block, torch.tensor([per_user_values(r) for r in recs], dtype=torch.float64))
    return done


# ---------------------------------------------------------------------------------------------------------------



def check_config(cfg: EvalConfig) -> None:
    """Every option and input path, before any model is loaded: one line naming the bad one (a typo costs seconds)."""
    if cfg.split not in ("valid", "test"):
        raise ConfigError(f"split must be 'valid' or 'test', got {cfg.split!r}")
    if cfg.prompts not in ("ours", "authors"):
        raise ConfigError(f"prompts must be 'ours' or 'authors', got {cfg.prompts!r}")
    if cfg.prompts == "authors" and cfg.split != "test":
        raise ConfigError("prompts=authors: the authors released test prompts only (set split=test)")
    if not cfg.models and not cfg.sasrec_dir:
        raise ConfigError("nothing to evaluate: set `models` and/or `sasrec_dir`")
    if cfg.judge.enabled and not (cfg.greedy.enabled or cfg.exact.enabled):
        raise ConfigError("judge.enabled needs greedy (or exact) decoding: the judge reads the greedy rationale")
    try:
        re.compile(cfg.sampling.authors_id_pattern)
    except re.error as e:
        raise ConfigError(f"sampling.authors_id_pattern={cfg.sampling.authors_id_pattern!r}: {e}") from None
    _parse_dtype(cfg.dtype, torch.device("cpu"))
    cfg.data_dir, cfg.sasrec_dir = (str(Path(p).expanduser()) if p else p for p in (cfg.data_dir, cfg.sasrec_dir))
    check_inputs(cfg)


def load_users(cfg: EvalConfig):
    """-> (dataset, the evaluated users' candidate sets: the split's first max_users, each holding its target)."""
    ds = load_dataset(cfg.data_dir)
    all_sets = ds.candidates(cfg.split)
    if not all_sets:
        raise ConfigError(f"data_dir={cfg.data_dir}: candidates_{cfg.split}.jsonl is empty")
    if cfg.max_users:
        all_sets = all_sets[:cfg.max_users]
    for cs in all_sets:
        if cs.target not in cs.candidates:
            raise ValueError(f"{cfg.data_dir}/candidates_{cfg.split}.jsonl: user {cs.user}: target {cs.target} is "
                             f"not among its candidates")
    return ds, all_sets


def new_results(cfg: EvalConfig, info, all_sets: list) -> dict:
    """results.json's skeleton: what was evaluated, the random baseline, and each model's compute dtype."""
    return {"split": cfg.split, "n_users": len(all_sets), "n_candidates": len(all_sets[0].candidates),
            "data_dir": cfg.data_dir, "complete": False, "models": {},
            "baselines": {"random": random_baseline([len(cs.candidates) for cs in all_sets], cfg)},
            "compute_dtype": {n: str(_parse_dtype(cfg.dtype, info.device, s.path)).removeprefix("torch.")
                              for n, s in cfg.models.items()},
            # how the weights met that dtype: "merged", or a bf16 base + the fine-tune's fp32 lora_delta
            "weights": {n: weights_note(_parse_dtype(cfg.dtype, info.device, s.path),
                                        Path(s.path).expanduser()) for n, s in cfg.models.items()}}


def evaluate_sasrec(cfg: EvalConfig, ds, all_sets: list, mine: list[int]) -> tuple[dict, tuple[str, torch.Tensor]]:
    """SASRec ranks the same candidates (both protocols read its ranking) -> (results block, per-user rows)."""
    from twice.sasrec import SASRec, check_dataset, rank_candidates
    sas = SASRec.load(cfg.sasrec_dir)
    check_dataset(sas, ds, cfg.sasrec_dir)  # one line: a SASRec of another catalogue would rank other items
    hist = [ds.history(all_sets[i].user, cfg.split) for i in mine]
    ranks = rank_candidates(sas, hist, [list(all_sets[i].candidates) for i in mine],
                            [all_sets[i].target for i in mine]).tolist() if mine else []
    full = gather_values({p: [float(r)] for p, r in zip(mine, ranks)}, len(all_sets), 1)
    block = ranked_metrics(full[:, 0].long().tolist(), sorted(set(cfg.exact.ks) | set(cfg.sampling.ks)), mrr=True)
    print0(f"SASRec: exact HR@1 {block['hr@1']['value']:.4f}" if "hr@1" in block else "SASRec done")
    return {"label": "SASRec (ranking)", "note": SASREC_NOTE, "exact": block, "sampling": block}, ("ranking", full)


def evaluate_llm(cfg: EvalConfig, name: str, spec: ModelSpec, ds, all_sets: list, mine: list[int], info,
                 out_dir: Path) -> tuple[dict, tuple[str, torch.Tensor]]:
    """One LLM on this rank's users, gathered over ranks -> (results block, per-user rows); writes its predictions."""
    times: dict = {}
    records = evaluate_model(cfg, name, spec, ds, [all_sets[i] for i in mine], info, times)
    rows = gather_values({p: per_user_values(r) for p, r in zip(mine, records)}, len(all_sets), len(PER_USER))
    block = summarize_model(rows, cfg, sampled(cfg, name))
    block["label"] = spec.label or name
    # where eval time goes (rank 0's wall seconds): prefill (once per batch of prompts, shared), decode (the
    # greedy and sampled rows together), exact (scoring from the shared prefill), total (+ model load, parsing)
    block["time_s"] = {**times, "users": len(mine), "batch_size": cfg.batch_size}
    block["fingerprint"] = model_fingerprint(cfg, name, spec)
    merged = merge_predictions(out_dir, f"predictions_{name}", mine, records, info)
    if info.is_main and cfg.judge.enabled and (not cfg.judge.models or name in cfg.judge.models):
        block["judge"] = run_judge(cfg, name, merged, ds, out_dir)
    if cfg.orderings:
        block["orderings"] = evaluate_orderings(cfg, name, spec, ds, all_sets, mine, info, block, out_dir)
    g = block.get("greedy", {})
    print0(f"{name}: " + ", ".join(f"{proto} HR@1 {block[proto]['hr@1']['value']:.4f}"
                                   for proto in ("sampling", "exact", "greedy") if proto in block)
           + (f", greedy valid {g['valid']['value']:.3f}" if g else ""))
    return block, ("llm", rows)


def main(argv: list[str]) -> dict | None:
    cfg = parse_args(EvalConfig, argv)
    check_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = init_distributed()
    out_dir = Path(cfg.run_dir)
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    ds, all_sets = load_users(cfg)
    mine = list(range(info.rank, len(all_sets), info.world_size))  # users strided over ranks
    t0 = time.time()
    results = new_results(cfg, info, all_sets)
    per_model: dict[str, tuple[str, torch.Tensor]] = {}   # per-user rows, for the paired tests
    finished = load_finished(out_dir, cfg, all_sets)
    if info.is_main:   # results.md exists only for a COMPLETE run (the pipeline's done-check reads it)
        (out_dir / "results.md").unlink(missing_ok=True)

    if cfg.sasrec_dir:
        results["models"]["sasrec"], per_model["sasrec"] = evaluate_sasrec(cfg, ds, all_sets, mine)
    for name, spec in cfg.models.items():
        if name in finished:
            block, rows = finished[name]
            results["models"][name], per_model[name] = block, ("llm", rows)
            print0(f"{name}: finished in {out_dir}/results.json for this config, skipped (resume=false redoes it)")
            continue
        results["models"][name], per_model[name] = evaluate_llm(cfg, name, spec, ds, all_sets, mine, info, out_dir)
        if info.is_main:     # a later failure keeps this model's rows (and resume skips it)
            results["paired"] = paired_comparisons(per_model, cfg)
            write_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
        barrier()

    results["paired"] = paired_comparisons(per_model, cfg)
    results["complete"] = True
    results["wall_s"] = round(time.time() - t0, 1)
    if info.is_main:
        write_atomic(out_dir / "results.json", json.dumps(results, indent=2) + "\n")
        table = results_table(results, cfg)
        write_atomic(out_dir / "results.md", table)
        print(table)
    return results


def merge_predictions(out_dir: Path, stem: str, mine: list[int], records: list[dict], info) -> list[dict] | None:
    """Each rank writes its users' records, rank 0 merges them in user order into stem.jsonl (-> merged on rank 0)."""
    part = out_dir / f".{stem}.rank{info.rank}.jsonl"
    with open(part, "w") as f:
        for p, r in zip(mine, records):
            f.write(json.dumps({"pos": p, **r}) + "\n")
    barrier()
    merged = None
    if info.is_main:
        merged = []
        for rk in range(info.world_size):
            pf = out_dir / f".{stem}.rank{rk}.jsonl"
            merged += [json.loads(line) for line in pf.read_text().splitlines()]
            pf.unlink()
        merged.sort(key=lambda r: r.pop("pos"))
        write_atomic(out_dir / f"{stem}.jsonl", "".join(json.dumps(r) + "\n" for r in merged))
    barrier()
    return merged


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except ConfigError as e:
        sys.exit(f"eval.py: error: {e}")
