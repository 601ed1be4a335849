"""The three instruction tasks of the paper's Stage 2, as examples: chat messages + the target response.

    T1 "describe":  item title                          -> item id, description, details      (item knowledge)
    T2 "recommend": history + candidates                 -> <item>ID</item>                      (non-reasoning)
    T3 "reason":    history + candidates                 -> <think>rationale</think><item>ID</item>

The same builders make the GRPO prompts (T3 without a response) and the evaluation prompts, so training,
RL and evaluation read identical text. Every prompt fits a token budget: descriptions and reviews are shortened
first, then the oldest history items are dropped; the candidates and the instruction are never cut (the
model must see every item it may choose). `encode_example` returns token ids and a loss mask that covers exactly
the response tokens (+ the closing <end_of_turn>, so the model learns to stop).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

from twice import prompts
from twice.prompts import Tags


@dataclass
class TaskConfig:
    max_prompt_tokens: int = 2048     # hard budget for the rendered prompt (chat template included)
    max_history: int = 20             # most recent history items shown (older ones dropped first anyway)
    desc_chars: int = 200             # description chars per history item (shrunk first when over budget)
    review_chars: int = 200           # review chars per history item (shrunk first when over budget)
    details_chars: int = 0            # details chars per item, history and candidates alike (0 = omit)
    candidate_desc_chars: int = 0     # description chars per candidate (0 = title + id only; the authors' prompts
                                      #   show ~300 chars of description and of details for every candidate)
    domain: str = ""                  # e.g. "Grocery_and_Gourmet_Food"; shown in the instruction
    think_tag: str = "think"
    item_tag: str = "item"
    n_negatives: int = 29             # negatives for *training* examples (valid/test use the dataset's fixed sets)

    @property
    def tags(self) -> Tags:
        return Tags(self.think_tag, self.item_tag)


@dataclass
class Example:
    task: str                                   # "describe" | "recommend" | "reason"
    messages: list[dict]                        # chat messages (system folded in by the template)
    response: str | None = None                 # target completion; None for RL / eval prompts
    target_id: str | None = None                # ground-truth item id (original id string)
    candidate_ids: list[str] = field(default_factory=list)
    user: int | None = None                     # user idx in the dataset
    history: list[int] = field(default_factory=list)   # item idxs shown (after truncation)
    truncated: int = 0                          # how many budget-fitting steps were needed (logged)


# ---------------------------------------------------------------------------------------------------------------
# blocks of text

def _history_block(ds, user, history_positions: list[int], cfg: TaskConfig, desc_chars: int, review_chars: int) -> str:
    parts = []
    for pos in history_positions:
        item = ds.items[user.items[pos]]
        rating = user.ratings[pos] if user.ratings else None
        review = user.reviews[pos] if user.reviews else ""
        parts.append(prompts.render_item(item.title, item.id, item.description, item.details, review=review,
                                         rating=rating, desc_chars=desc_chars, review_chars=review_chars,
                                         details_chars=cfg.details_chars))
    return "\n\n".join(parts)


def _candidates_block(ds, candidates: list[int], cfg: TaskConfig) -> str:
    return "\n\n".join(prompts.render_item(ds.items[c].title, ds.items[c].id, ds.items[c].description,
                                           ds.items[c].details, desc_chars=cfg.candidate_desc_chars,
                                           details_chars=cfg.details_chars) for c in candidates)


def _messages(system: str, user_text: str) -> list[dict]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user_text}]


# ---------------------------------------------------------------------------------------------------------------
# candidates

def sample_candidates(ds, user, target: int, n_negatives: int, rng: random.Random) -> list[int]:
    """Target + n negatives the user never interacted with (nor in the part max_history cut off), drawn from
    `ds.negative_pool` (the one eligibility rule, twice.data.negative_mask: items that look like targets, so the
    ID format gives nothing away), shuffled (target position uniform). Training only: valid/test use the
    dataset's fixed candidate sets so every model is judged on the same lists."""
    seen = set(user.items) | set(getattr(user, "dropped", ()))
    pool = getattr(ds, "negative_pool", None) or range(1, ds.n_items + 1)
    if len(pool) - len(seen) < n_negatives:      # a lower bound on what is free: count exactly only when short
        n_negatives = min(n_negatives, len(set(pool) - seen))
    negatives: set[int] = set()
    while len(negatives) < n_negatives:
        c = pool[rng.randrange(len(pool))]
        if c not in seen:
            negatives.add(c)
    cands = sorted(negatives) + [target]
    rng.shuffle(cands)
    return cands


# ---------------------------------------------------------------------------------------------------------------
# the tasks

def recommend_example(ds, user, split: str, candidates: list[int], cfg: TaskConfig, tokenizer=None,
                      reasoning: bool = False, rationale: str | None = None, with_response: bool = True) -> Example:
    """T2 (reasoning=False) or T3 (reasoning=True). With a tokenizer, the prompt is fitted to the token budget."""
    history = ds.history(user.idx, split)       # item idxs, oldest first (a prefix of user.items)
    target = ds.target(user.idx, split)
    n_hist = len(history)
    positions = list(range(max(0, n_hist - cfg.max_history), n_hist))
    desc_chars, review_chars, steps = cfg.desc_chars, cfg.review_chars, 0
    cand_block = _candidates_block(ds, candidates, cfg)
    while True:
        text = prompts.recommendation_prompt(_history_block(ds, user, positions, cfg, desc_chars, review_chars),
                                             cand_block, reasoning, cfg.tags, cfg.domain)
        messages = _messages(prompts.SYSTEM_RECOMMENDER, text)
        if tokenizer is None or len(tokenizer.apply_chat_template(messages)) <= cfg.max_prompt_tokens:
            break
        steps += 1
        if desc_chars > 0 or review_chars > 0:      # 1) shorten item texts
            desc_chars, review_chars = desc_chars // 2 if desc_chars > 16 else 0, review_chars // 2 if review_chars > 16 else 0
        elif len(positions) > 1:                     # 2) drop the oldest history items
            positions = positions[max(1, len(positions) // 4):]
        else:
            raise ValueError(f"user {user.id}: prompt does not fit max_prompt_tokens={cfg.max_prompt_tokens} even "
                             f"with one history item and no descriptions ({len(candidates)} candidates); "
                             f"raise the budget or show fewer candidates")
    response = None
    if with_response:
        item_id = ds.items[target].id
        answer = cfg.tags.wrap_item(item_id)
        if reasoning:
            if rationale is None:
                raise ValueError("the reasoning task needs a rationale for its response")
            answer = cfg.tags.wrap_think(prompts.clean(rationale)) + answer
        response = answer
    return Example(task="reason" if reasoning else "recommend", messages=messages, response=response,
                   target_id=ds.items[target].id, candidate_ids=[ds.items[c].id for c in candidates],
                   user=user.idx, history=[user.items[p] for p in positions], truncated=steps)


def describe_example(ds, item_idx: int, cfg: TaskConfig) -> Example:
    """T1: item title -> id, description, details."""
    item = ds.items[item_idx]
    messages = _messages(prompts.SYSTEM_ITEM_EXPERT, prompts.item_description_prompt(item.title, cfg.domain))
    return Example(task="describe", messages=messages, target_id=item.id,
                   response=prompts.item_description_answer(item.id, item.description, item.details,
                                                            details_chars=cfg.details_chars))


# ---------------------------------------------------------------------------------------------------------------
# tokens

def encode_example(tokenizer, ex: Example, max_len: int | None = None) -> tuple[list[int], list[int]]:
    """-> (input_ids, loss_mask). Loss covers exactly the response tokens and the closing <end_of_turn>."""
    prompt_ids = tokenizer.apply_chat_template(ex.messages, add_generation_prompt=True)
    response_ids = encode_response(tokenizer, ex.response) + [tokenizer.end_of_turn_id]
    ids = prompt_ids + response_ids
    mask = [0] * len(prompt_ids) + [1] * len(response_ids)
    if max_len is not None and len(ids) > max_len:
        raise ValueError(f"example for user {ex.user} ({ex.task}) is {len(ids)} tokens > max_len {max_len}")
    return ids, mask


def encode_response(tokenizer, response: str) -> list[int]:
    """A response's token ids as SFT trains on them: the WHOLE text in one encode, so tokens merge across the tags
    (`...</think><item>...` -> 'think', '><', 'item'). eval.py's exact ranking scores candidates through this."""
    return tokenizer.encode(response)


def prompt_ids(tokenizer, ex: Example) -> list[int]:
    return tokenizer.apply_chat_template(ex.messages, add_generation_prompt=True)



# ---------------------------------------------------------------------------------------------------------------
# the authors' prompts, verbatim (a dataset dir built from source "official")

# the authors' answer format: <think>..</think> <item_nm>title</item_nm> <item_id>ASIN</item_id>
AUTHORS_TAGS = Tags("think", "item_id")


def authors_prompts(ds) -> dict[int, Example]:
    """user idx -> the authors' released test prompt for that user, verbatim: their system prompt and user turn
    exactly as in amazon_<D>_llm_test*.json (no re-rendering, no token budget: ~7k Gemma tokens each). Parse
    completions with AUTHORS_TAGS. The candidates are checked against the dir's candidates_test.jsonl (the same
    lists in the same order) so a verbatim prompt is scored against the list it shows."""
    if ds.meta.get("source") != "official":
        raise ValueError(f"{ds.root}: the authors' prompts exist only in a dataset dir built from source 'official'")
    sets = {cs.user: cs for cs in ds.candidates("test")}
    out = {}
    for n, r in enumerate(ds.examples("test"), 1):
        u = r.get("user")
        if u not in sets or sets[u].candidates != r["candidates"] or sets[u].target != r["target"]:
            raise ValueError(f"{ds.root / 'examples_test.jsonl'}:{n}: user {u} does not match candidates_test.jsonl")
        out[u] = Example(task="reason", messages=_messages(r["system"], r["input"]), target_id=r["target_id"],
                         candidate_ids=[ds.items[c].id for c in r["candidates"]], user=u, history=list(r["history"]))
    return out
