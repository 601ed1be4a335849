"""Rewards of TWiCE-Rec stage 3 (paper Eq. 2-5): pure functions of a completion's text, stdlib only.

    python -m pytest tests/test_rewards.py          # golden values for every branch / format case

A completion looks like `<think>rationale</think><item>ID</item>` (tag names configurable). The rewards:

    rho_match  1 if the ID inside <item> equals the true next item (whitespace-normalised, exact, case-sensitive)
    rho_cf     sigmoid(SASRec logit of the named item); 0 when there is no <item> or the ID is not in the catalogue
    rho_cg     Eq. 2:  1 + lam*rho_cf   if match and rho_cf >= tau
                       1                if match and rho_cf <  tau
                       rho_cf           if not match and rho_cf >= tau
                       0                otherwise                      (lam=3, tau=0.3 as in the authors' code)
    rho_struct Eq. 3:  1 if the completion is WELL FORMED (below), else 0
    rho_tag    Eq. 4:  0.25 for each of <think>, </think>, <item>, </item> that occurs EXACTLY ONCE
    rho_fmt    Eq. 5:  rho_struct + rho_tag, in [0, 2]

Decisions the paper leaves open (documented here, tested in tests/test_rewards.py):
  * WELL FORMED (Eq. 3) means: each of the four tags occurs exactly once; `<think>` < `</think>` < `<item>` <
    `</item>` by position (think first: the paper's rationale-first decoding; no nesting); the rationale and the
    ID are non-empty after stripping whitespace. Text outside the tags is allowed (Eq. 3 asks "there exists").
  * "present" in Eq. 4 means present exactly once. The paper introduces rho_tag "to handle repeated tags", and the
    authors' `tag_count_reward` scores `text.count(tag) == 1`; counting mere presence would not see repeats.
  * The item for rho_match / rho_cf is the text between the FIRST `<item>` and the first `</item>` after it, even
    when the completion is not well formed (the authors' `re.search(r"<item_id>(.*?)</item_id>")`); the format
    rewards punish the bad format separately.
  * ITEM OUTSIDE THE CANDIDATES: when the prompt had a candidate list, an ID that is not among the candidates
    never matches (rho_match = 0). Its rho_cf depends on `cf_outside_candidates`: "score" (default, the authors':
    SASRec scores the whole catalogue, their code looks the title up in the full vocabulary), so a plausible
    non-candidate can still earn rho_cf >= tau without ever being right under the candidate-list metric; "zero":
    rho_cf = 0 for it. A target that is not among its own candidates is a data error.
  * WHICH HISTORY SASRec READS for rho_cf is the caller's (train_grpo.py, `cf_history`): "prompt" (default, the
    authors': the items the prompt shows) or "full" (the split's whole history, SASRec's last maxlen items).

The authors' effective format terms (their TRL reward functions, configs/ablations/authors.yaml; our tag names):
    tag_presence   1 if BOTH pairs `<think>...</think>` and `<item>...</item>` occur, in either order, else 0
    tag            0.25 per expected tag that occurs exactly once (= Eq. 4 as we read it; their tag count)
    only_tags      1 if no tag other than the four expected ones occurs (`<b>`, `</answer>`, ... -> 0), else 0

Registry: every reward has the signature `fn(ctx: RewardContext) -> float`; `compute_rewards(ctxs, weights)`
sums the weighted components (YAML `rewards: {cg: 1.0, format: 1.0}`) and returns every component for logging,
weighted or not.
"""
from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Literal, NamedTuple, Optional


@dataclass
class RewardConfig:
    weights: dict[str, float] = field(default_factory=lambda: {"cg": 1.0, "format": 1.0})  # reward name -> weight; the paper: rho = rho_cg + rho_fmt
    lam: float = 3.0  # Eq. 2 amplification lambda (authors' code default 3; RQ4 sweeps it)
    tau: float = 0.3  # Eq. 2 CF-confidence threshold (authors' code default 0.3)
    think_tag: str = "think"  # rationale tag name: <think>...</think>
    item_tag: str = "item"  # item tag name: <item>...</item>
    cf_history: Literal["prompt", "full"] = "prompt"  # history SASRec reads for rho_cf: "prompt" = the items the prompt shows (the
    #                             authors') | "full" = the split's whole history (last maxlen items)
    cf_outside_candidates: Literal["score", "zero"] = "score"  # rho_cf of an answer outside the prompt's candidates: "score" = SASRec's
    #                                       sigmoid as for any item (the authors') | "zero" = 0


class Parsed(NamedTuple):
    think: Optional[str]  # text between the first <think> and the next </think>, raw; None if no such pair
    item: Optional[str]  # text between the first <item> and the next </item>, raw; None if no such pair
    n_think_open: int
    n_think_close: int
    n_item_open: int
    n_item_close: int
    well_formed: bool  # Eq. 3, see the module docstring


def _between(text: str, open_tag: str, close_tag: str) -> tuple[Optional[str], int, int]:
    """Content of the first open_tag ... next close_tag pair, and the two positions (-1 when absent)."""
    i = text.find(open_tag)
    if i < 0:
        return None, -1, -1
    j = text.find(close_tag, i + len(open_tag))
    if j < 0:
        return None, i, -1
    return text[i + len(open_tag):j], i, j


def parse_completion(text: str, think_tag: str = "think", item_tag: str = "item") -> Parsed:
    to, tc, io, ic = f"<{think_tag}>", f"</{think_tag}>", f"<{item_tag}>", f"</{item_tag}>"
    counts = [text.count(t) for t in (to, tc, io, ic)]
    think, t0, t1 = _between(text, to, tc)
    item, i0, i1 = _between(text, io, ic)
    well_formed = (
        counts == [1, 1, 1, 1]
        and 0 <= t0 < t1 < i0 < i1  # think opens, closes, then item opens, closes: no nesting, no reversal
        and bool(think and think.strip())
        and bool(item and item.strip())
    )
    return Parsed(think, item, *counts, well_formed)


def normalize_item(s: str) -> str:
    """Whitespace normalisation for IDs: strip, and collapse inner runs of whitespace to one space."""
    return " ".join(s.split())


def item_match(parsed_item: Optional[str], target_id: str) -> float:
    """rho_match: 1.0 iff the named ID equals the target after whitespace normalisation (exact, case-sensitive)."""
    if parsed_item is None:
        return 0.0
    item = normalize_item(parsed_item)
    return 1.0 if item and item == normalize_item(target_id) else 0.0


def cf_reward(parsed_item: Optional[str], logit: Optional[float]) -> float:
    """rho_cf = sigmoid(SASRec logit of the named item). The caller looks the item up and passes its logit, or
    None when the ID is not in the catalogue; no <item> (parsed_item None) gives 0 too."""
    if parsed_item is None or logit is None:
        return 0.0
    z = float(logit)
    if math.isnan(z):
        raise ValueError(f"cf_reward: SASRec logit for item {parsed_item!r} is NaN")
    # numerically stable sigmoid: never exp of a large positive number
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def collaborative_guided_reward(match: bool, cf: float, lam: float = 3.0, tau: float = 0.3) -> float:
    """Eq. 2, exactly. `cf` is rho_cf in [0, 1] (a sigmoid, not a logit: out of range is an error)."""
    if not 0.0 <= cf <= 1.0:
        raise ValueError(f"collaborative_guided_reward: rho_cf must be in [0, 1] (a sigmoid), got {cf!r}")
    if match:
        return 1.0 + lam * cf if cf >= tau else 1.0
    return cf if cf >= tau else 0.0


def struct_reward(text: str, think_tag: str = "think", item_tag: str = "item") -> float:
    """Eq. 3: 1.0 iff the completion is well formed (module docstring)."""
    return 1.0 if parse_completion(text, think_tag, item_tag).well_formed else 0.0


def tag_reward(text: str, think_tag: str = "think", item_tag: str = "item") -> float:
    """Eq. 4: 0.25 for each of the four tags that occurs exactly once (a repeated tag earns nothing)."""
    tags = (f"<{think_tag}>", f"</{think_tag}>", f"<{item_tag}>", f"</{item_tag}>")
    return 0.25 * sum(text.count(t) == 1 for t in tags)


def format_reward(text: str, think_tag: str = "think", item_tag: str = "item") -> float:
    """Eq. 5: rho_struct + rho_tag, in [0, 2]."""
    return struct_reward(text, think_tag, item_tag) + tag_reward(text, think_tag, item_tag)


def tag_presence_reward(text: str, think_tag: str = "think", item_tag: str = "item") -> float:
    """1.0 iff an open...close pair of each expected tag occurs (order between the pairs free, repeats allowed)."""
    ok = all(_between(text, f"<{t}>", f"</{t}>")[0] is not None for t in (think_tag, item_tag))
    return 1.0 if ok else 0.0


_ANY_TAG = re.compile(r"</?([A-Za-z_][\w.-]*)\s*/?>")


def only_tags_reward(text: str, think_tag: str = "think", item_tag: str = "item") -> float:
    """1.0 iff every tag-shaped token (`<name>`, `</name>`, `<name/>`) is one of the expected four."""
    for m in _ANY_TAG.finditer(text):
        if m.group(1) not in (think_tag, item_tag) or m.group(0).endswith("/>") or " " in m.group(0):
            return 0.0
    return 1.0


# ---------------------------------------------------------------- registry: fn(ctx) -> float, switchable from YAML


@dataclass
class RewardContext:
    completion: str  # the generated text (completion only, no prompt)
    target: str  # the true next item's ID
    candidates: Optional[frozenset[str]] = None  # IDs offered in the prompt (normalised here); None = no candidate list
    cf_logit: Optional[float] = None  # SASRec logit of the NAMED item; None if no item / not in the catalogue
    lam: float = 3.0
    tau: float = 0.3
    think_tag: str = "think"
    item_tag: str = "item"
    cf_outside_candidates: str = "score"  # "zero": rho_cf = 0 for an ID outside `candidates` (RewardConfig)
    parsed: Parsed = field(init=False, repr=False)

    def __post_init__(self):
        self.parsed = parse_completion(self.completion, self.think_tag, self.item_tag)
        if self.candidates is not None:
            self.candidates = frozenset(normalize_item(c) for c in self.candidates)
            if normalize_item(self.target) not in self.candidates:
                raise ValueError(f"RewardContext: target {self.target!r} is not among its own {len(self.candidates)} candidates")


def outside_candidates(ctx: RewardContext) -> bool:
    """The completion names an ID (non-empty) that is not among the prompt's candidates (False without a list)."""
    item = ctx.parsed.item
    return (item is not None and bool(item.strip()) and ctx.candidates is not None
            and normalize_item(item) not in ctx.candidates)


def _match(ctx: RewardContext) -> float:
    if outside_candidates(ctx):
        return 0.0  # outside the candidate set: never a match (module docstring)
    return item_match(ctx.parsed.item, ctx.target)


def _cf(ctx: RewardContext) -> float:
    if ctx.cf_outside_candidates == "zero" and outside_candidates(ctx):
        return 0.0
    return cf_reward(ctx.parsed.item, ctx.cf_logit)


def _cg(ctx: RewardContext) -> float:
    return collaborative_guided_reward(_match(ctx) == 1.0, _cf(ctx), ctx.lam, ctx.tau)


REWARDS: dict[str, Callable[[RewardContext], float]] = {
    "match": _match,
    "cf": _cf,
    "cg": _cg,
    "format": lambda ctx: format_reward(ctx.completion, ctx.think_tag, ctx.item_tag),
    "struct": lambda ctx: struct_reward(ctx.completion, ctx.think_tag, ctx.item_tag),
    "tag": lambda ctx: tag_reward(ctx.completion, ctx.think_tag, ctx.item_tag),
    "tag_presence": lambda ctx: tag_presence_reward(ctx.completion, ctx.think_tag, ctx.item_tag),
    "only_tags": lambda ctx: only_tags_reward(ctx.completion, ctx.think_tag, ctx.item_tag),
}


def check_weights(weights: dict[str, float]) -> None:
    """Unknown names fail with the closest valid one; at least one weight must be nonzero."""
    for name, w in weights.items():
        if name not in REWARDS:
            close = difflib.get_close_matches(name, list(REWARDS), n=1, cutoff=0.0)
            raise ValueError(f"unknown reward '{name}' (did you mean '{close[0]}'?); valid: {sorted(REWARDS)}")
        if not math.isfinite(w):
            raise ValueError(f"reward weight for '{name}' must be finite, got {w!r}")
    if not any(w != 0 for w in weights.values()):
        raise ValueError(f"no reward has a nonzero weight: {weights}")


def compute_rewards(ctxs: list[RewardContext], weights: dict[str, float]) -> tuple[list[float], dict[str, list[float]]]:
    """-> (total[i] = sum_name weights[name] * REWARDS[name](ctxs[i]), {name: [value per ctx]} for EVERY reward)."""
    check_weights(weights)
    parts = {name: [fn(c) for c in ctxs] for name, fn in REWARDS.items()}  # all of them: logged even at weight 0
    total = [sum(w * parts[name][i] for name, w in weights.items()) for i in range(len(ctxs))]
    return total, parts
