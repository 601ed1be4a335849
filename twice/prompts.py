"""Every prompt `twice` sends to a language model, in one place: the three instruction tasks (paper Stage 2),
the teacher prompt that writes rationales (Stage 1, Appendix F in spirit) and the rationale-quality judge (RQ2).

Prompts are plain strings; `twice.tasks` turns them into chat messages and token ids. Item text comes from data,
so every field is passed through `clean()` first: a review that says "<end_of_turn>" or "<item>" can never forge a
chat turn or an answer tag (the <think>/<item> output format, README "Stage 3").

The layout follows the authors' released prompts (../shared/data/twice_official_sample): a [Purchase History] block
of items (title / item_id / description / details / review / rating word), a [Candidate List] block, then the
instruction. Our answer tags are the paper's `<think>` and `<item>` (configurable in `Tags`).
"""
from __future__ import annotations

from dataclasses import dataclass

from twice.tokenizer import neutralize

RATING_WORDS = {1: "Terrible", 2: "Bad", 3: "Okay", 4: "Good", 5: "Excellent"}

SYSTEM_RECOMMENDER = ("You are a recommendation expert who suggests the optimal next item based on the customer's "
                      "purchase history.")
SYSTEM_ITEM_EXPERT = "You are an expert with in-depth knowledge of the items of this catalogue."


@dataclass(frozen=True)
class Tags:
    think: str = "think"
    item: str = "item"

    def wrap_item(self, item_id: str) -> str:
        return f"<{self.item}>{item_id}</{self.item}>"

    def wrap_think(self, text: str) -> str:
        return f"<{self.think}>{text}</{self.think}>"


# Data text must never carry a chat control token or an answer tag: ours (<think>, <item>) and the authors' release's
# (<item_nm>, <item_id>, <item_info>). The defusing itself lives in twice.tokenizer.neutralize (one mechanism).
DATA_TAGS = ("think", "item", "item_nm", "item_id", "item_info")


def clean(text: str | None, max_chars: int | None = None) -> str:
    """Data text -> prompt-safe text: control strings and tags defused ("<item>" -> "‹item>"), whitespace folded,
    length capped. Capping happens after defusing so a cut never leaves half a tag."""
    if not text:
        return ""
    text = " ".join(neutralize(str(text), DATA_TAGS).split())
    if max_chars is not None and len(text) > max_chars:
        text = text[:max_chars].rstrip() + "..."
    return text


def render_details(details: dict | None, max_chars: int) -> str:
    if not details or max_chars <= 0:
        return ""
    return clean(", ".join(f'"{k}": "{v}"' for k, v in details.items()), max_chars)


def render_item(title: str, item_id: str, description: str = "", details: dict | None = None,
                review: str | None = None, rating: int | None = None, *,
                desc_chars: int = 200, review_chars: int = 200, details_chars: int = 0) -> str:
    """One item as the authors' prompts show it. Review/rating lines only for history items."""
    lines = [f"title:{clean(title, 300)}", f"- item_id:{clean(item_id, 64)}"]
    if desc_chars > 0:
        lines.append(f"- description:{clean(description, desc_chars)}")
    if details_chars > 0:
        lines.append(f"- details:{render_details(details, details_chars)}")
    if review is not None and review_chars > 0:
        lines.append(f"- review:{clean(review, review_chars)}")
    if rating is not None:
        lines.append(f"- rating:{RATING_WORDS.get(int(rating), 'Okay')}")
    return "\n".join(lines)


def recommendation_prompt(history_block: str, candidates_block: str, reasoning: bool, tags: Tags = Tags(),
                          domain: str = "") -> str:
    """Task 2 (reasoning=False) and Task 3 (reasoning=True): history + candidates -> answer in tags."""
    where = f" in the {domain} domain" if domain else ""
    if reasoning:
        instruction = (
            f"Based on the [Purchase History], reason about the customer's preferences (their ratings and reviews, "
            f"positive and negative) and identify the single most suitable next item{where} from the "
            f"[Candidate List]. First write your reasoning inside <{tags.think}> </{tags.think}>, then the "
            f"recommended item ID inside <{tags.item}> </{tags.item}>.\n"
            f"Answer format: <{tags.think}>your reasoning</{tags.think}><{tags.item}>item ID</{tags.item}>")
    else:
        instruction = (
            f"Based on the [Purchase History], identify the single most suitable next item{where} from the "
            f"[Candidate List]. Answer with the recommended item ID inside <{tags.item}> </{tags.item}> and "
            f"nothing else.\nAnswer format: <{tags.item}>item ID</{tags.item}>")
    return (f"[Purchase History]\n{history_block}\n\n[Candidate List]\n{candidates_block}\n\n"
            f"***Instruction***\n{instruction}")


def item_description_prompt(title: str, domain: str = "") -> str:
    """Task 1: title -> the item's description and details (item knowledge)."""
    where = f" in the {domain} domain" if domain else ""
    return (f"[Item Title]\n{clean(title, 300)}\n\n***Instruction***\nFor the given [Item Title]{where}, write "
            f"the item's ID, description and details.")


def item_description_answer(item_id: str, description: str, details: dict | None, desc_chars: int = 400,
                            details_chars: int = 200) -> str:
    text = f"item_id:{clean(item_id, 64)}\n- description:{clean(description, desc_chars)}"
    if details_chars > 0 and details:
        text += f"\n- details:{render_details(details, details_chars)}"
    return text


# ---------------------------------------------------------------------------------------------------------------
# Stage 1: the teacher. It sees the history AND the true next item, explains the causal link, and tags whether
# the link is real (self-annotated curation: instances it tags irrelevant are dropped).

TEACHER_SYSTEM = ("You are an expert analyst of customer behaviour. You explain, from a customer's purchase history, "
                  "why they bought the next item, and you honestly judge whether the history really explains it.")

VERDICT_RELEVANT, VERDICT_IRRELEVANT = "RELEVANT", "IRRELEVANT"


TEACHER_INSTRUCTION = (
    "Explain why the customer bought the [Next Item], using only the [Purchase History]: link the preferences "
    "the history shows (items, ratings, reviews) to concrete attributes of the next item. Write the rationale "
    "as the recommender would, before knowing the answer: infer the preference first, then say why the item "
    "fits. Mention at least one history item and one attribute of the next item.\n"
    f"Then judge the link: <verdict>{VERDICT_RELEVANT}</verdict> if the history clearly explains the purchase, "
    f"<verdict>{VERDICT_IRRELEVANT}</verdict> if there is no clear connection.\n"
    "Answer exactly as: <rationale>...</rationale><verdict>RELEVANT or IRRELEVANT</verdict>")


def teacher_case(history_block: str, target_block: str) -> str:
    return f"[Purchase History]\n{history_block}\n[Next Item]\n{target_block}"


def teacher_answer(rationale: str, verdict: str) -> str:
    return f"<rationale>{rationale}</rationale><verdict>{verdict}</verdict>"


def teacher_messages(history_block: str, target_block: str, exemplars: list[dict]) -> list[dict]:
    """The Stage-1 request as chat messages, few-shot as real turns: the instruction and exemplar 1 in the first
    user turn, its answer as an assistant turn, then exemplar 2 / answer ..., and this customer last. Small
    instruct models follow the answer format far better this way than with exemplars pasted into one long user
    message (measured on Gemma-3-270m: 1 of 6 single-message prompts vs 2 of 2 multi-turn prompts started with
    <rationale>). Each exemplar is {"history": str, "target": str, "rationale": str, "verdict": str}."""
    msgs = [{"role": "system", "content": TEACHER_SYSTEM}]
    for i, ex in enumerate(exemplars):
        head = TEACHER_INSTRUCTION + "\n\n" if i == 0 else ""
        msgs += [{"role": "user", "content": head + teacher_case(ex["history"], ex["target"])},
                 {"role": "assistant", "content": teacher_answer(ex["rationale"], ex["verdict"])}]
    head = "" if exemplars else TEACHER_INSTRUCTION + "\n\n"
    msgs.append({"role": "user", "content": head + teacher_case(history_block, target_block)})
    return msgs


def teacher_prompt(history_block: str, target_block: str, exemplars: list[dict]) -> str:
    """The same request as ONE user message (for endpoints or tools that take a single prompt)."""
    shots = "\n\n".join(f"### Example {i + 1}\n{teacher_case(ex['history'], ex['target'])}\n"
                         f"{teacher_answer(ex['rationale'], ex['verdict'])}" for i, ex in enumerate(exemplars))
    return (f"{TEACHER_INSTRUCTION}\n\n{shots}\n\n### Now this customer\n"
            f"{teacher_case(history_block, target_block)}\n")


# ---------------------------------------------------------------------------------------------------------------
# RQ2: the rationale-quality judge. The paper (Sec. "Rationale quality", RQ2): "The evaluation criteria are formulated
# with a two-step approach: initially assessing correctness of the recommendation, followed by the assessment of
# rationale quality. Correctness is defined by the inclusion of the recommended item in the item vocabulary set [...]
# a four-level scoring system, i.e., 0: Incorrect, 1: Correct and Insufficient Rationale, 2: Correct and Acceptable
# Rationale, 3: Correct and Satisfying Rationale." Step 1 (correctness) is a lookup, done in code (eval.run_judge:
# an item outside the vocabulary scores 0 and is never sent); the judge does step 2 only and grades 1-3. The paper's
# own judge prompt (its Appendix F) is not in the text we have, so only the rubric's words are the paper's.

JUDGE_RUBRIC = {0: "Incorrect", 1: "Correct and Insufficient Rationale", 2: "Correct and Acceptable Rationale",
                3: "Correct and Satisfying Rationale"}

JUDGE_SYSTEM = "You are a strict evaluator of product-recommendation explanations."


def judge_prompt(history_block: str, recommended_block: str, rationale: str) -> str:
    """Step 2 of the paper's rubric for a recommendation already found correct (the item exists): grade 1-3."""
    levels = "\n".join(f"{k}: {JUDGE_RUBRIC[k]}" for k in (1, 2, 3))
    return (
        "The recommended item below exists in the item vocabulary, so the recommendation is Correct. Assess the "
        "quality of its rationale: how well it explains, from the customer's purchase history, why this item fits. "
        f"Score it on this scale:\n{levels}\n\n"
        f"[Purchase History]\n{history_block}\n\n[Recommended Item]\n{recommended_block}\n\n"
        f"[Rationale]\n{clean(rationale, 4000)}\n\nAnswer with <score>N</score> (N = 1, 2 or 3) and one sentence of "
        f"justification.")
