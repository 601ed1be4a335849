"""The evidence teacher: stage-1 rationales written from the data itself (MovieLens-style genres, co-watching, ratings).

    python build_rationales.py configs/study/rationales.yaml          # teacher.backend: evidence
    python build_rationales.py configs/quickstart/rationales.yaml teacher.backend=evidence n_users=0

Why: the paper's teacher is a large LLM; offline on a CPU the only local model is Gemma-3-270m, a base model that
keeps about 1 rationale in 8 (issue 13). This teacher needs no model: for an instance (S_u, i+) it reads

    genres       the comma-separated genre list MovieLens keeps in each item's description
    ratings      the user's rating of each shown history item (4-5 = liked, 1-2 = disliked)
    co-watching  how many OTHER users watched both a shown history item and i+, counted on the SASRec training part
                 of every sequence (items[:-2]: no valid/test target is ever read)

and writes the rationale in the same `<rationale>...</rationale><verdict>...</verdict>` answer the LLM teachers
write, so the same `twice.rationale.curate` parses and curates it and every record says `"teacher": "evidence"`
(`"evidence-brief"` with `teacher.evidence_style: brief`, the one-sentence form the CPU main job uses).
Only the `window` most recent history items (the teacher's and the student's view: `rationale.max_history`, keep it
equal to the SFT `task.max_history`) are named or counted, so the student is never taught to cite an item its
prompt does not show.

Verdict rule (deterministic; the "self-annotated curation" of this teacher):
    RELEVANT    i+ shares a genre with a shown item the user LIKED (rating >= 4) AND at least MIN_COWATCH other users
                watched i+ together with some shown item
    IRRELEVANT  otherwise (the rationale still names what evidence there is; curation drops it)
It is not an LLM and writes templated prose; records, stats and the README say so.
"""
from __future__ import annotations

import random
from collections import Counter

from twice.prompts import RATING_WORDS, VERDICT_IRRELEVANT, VERDICT_RELEVANT, teacher_answer

LIKED, DISLIKED = 4, 2    # rating >= LIKED is a liked item, <= DISLIKED a disliked one
MIN_COWATCH = 5           # co-watchers needed (with the liked-genre link) for a RELEVANT verdict
SOURCES = ("movielens-100k", "recbole")   # datasets whose item description is a genre list


def genres(item) -> list[str]:
    """MovieLens keeps the genres as the description: "Animation, Children's, Comedy"; "unknown" is no genre."""
    return [g.strip() for g in (item.description or "").split(",") if g.strip() and g.strip().lower() != "unknown"]


class CoWatch:
    """users_of[i] = the users whose SASRec training part (items[:-2]) holds item i."""

    def __init__(self, ds):
        self.users_of: dict[int, set[int]] = {}
        for u in ds.users:
            for i in u.items[:-2]:
                self.users_of.setdefault(i, set()).add(u.idx)

    def count(self, a: int, b: int, exclude_user: int) -> int:
        """Other users (not exclude_user) who watched both a and b."""
        both = self.users_of.get(a, set()) & self.users_of.get(b, set())
        return len(both) - (exclude_user in both)


def _join(xs: list[str]) -> str:
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


STYLES = ("full", "brief")


def write_rationale(ds, cowatch: CoWatch, user_idx: int, history: list[int], target: int, window: int,
                    seed: int, style: str = "full") -> tuple[str, str]:
    """One instance -> (rationale, verdict). history: item idxs oldest first; only the last `window` are used.

    style "full": taste, dislikes, the genre link and the co-watching, 4-5 sentences (~128 tokens as SFT renders the
    response on ml-100k). "brief": the same evidence and the same verdict in one sentence (~65 tokens): the liked film
    that shares a genre with i+ and the co-watching count. Why brief exists: on a 2-core CPU every rationale token is
    decoded per sample in GRPO and eval, so the main job's budget buys about twice the users and steps with it."""
    if style not in STYLES:
        raise ValueError(f"teacher.evidence_style must be one of {STYLES}, got {style!r}")
    user = ds.user(user_idx)
    n = len(history)
    shown = list(range(max(0, n - window), n))                         # positions in the user's sequence
    rating = lambda p: (user.ratings[p] if user.ratings and user.ratings[p] is not None else 3)  # noqa: E731
    title = lambda i: ds.items[i].title                                  # noqa: E731
    tgt_genres = genres(ds.items[target])
    rng = random.Random(seed)

    # 1) the preference, inferred from the shown items: genres of the liked ones, weighted by how much
    liked = [p for p in reversed(shown) if rating(p) >= LIKED]           # most recent first
    disliked = [p for p in reversed(shown) if rating(p) <= DISLIKED]
    taste = Counter(g for p in liked for g in genres(ds.items[history[p]]))
    top = [g for g, _ in taste.most_common(3)]
    # 2) the link: liked items sharing a genre with i+, and the strongest co-watching
    linked = [p for p in liked if set(genres(ds.items[history[p]])) & set(tgt_genres)][:2]
    shared = sorted({g for p in linked for g in genres(ds.items[history[p]])} & set(tgt_genres),
                    key=lambda g: (-taste[g], g))
    co = sorted(((cowatch.count(history[p], target, user_idx), p) for p in shown), key=lambda x: (-x[0], -x[1]))
    best_co, best_p = co[0] if co else (0, None)

    verdict = VERDICT_RELEVANT if shared and best_co >= MIN_COWATCH else VERDICT_IRRELEVANT
    if style == "brief":
        return _brief(title, history, target, linked, shared, best_co, best_p, liked, rating), verdict

    parts = []
    if top:
        ex = _join([f"{title(history[p])} ({RATING_WORDS[rating(p)]})" for p in liked[:2]])
        parts.append(rng.choice([f"The user rates {_join(top)} films highly: {ex}.",
                                 f"Their recent favourites are {_join(top)} films such as {ex}."]))
    else:
        parts.append(f"None of the user's recent films earned a high rating; the most recent is "
                     f"{title(history[shown[-1]])} ({RATING_WORDS[rating(shown[-1])]}).")
    if disliked:
        bad = [g for g in genres(ds.items[history[disliked[0]]]) if g not in taste][:2]
        if bad:
            parts.append(f"They did not enjoy {title(history[disliked[0]])} "
                         f"({RATING_WORDS[rating(disliked[0])]}), so {_join(bad)} is less appealing.")
    tname = f"{title(target)} ({', '.join(tgt_genres) or 'no listed genre'})"
    if shared:
        parts.append(rng.choice([f"{tname} shares {_join(shared)} with "
                                 f"{_join([title(history[p]) for p in linked])}, which they liked.",
                                 f"{tname} offers the {_join(shared)} they liked in "
                                 f"{_join([title(history[p]) for p in linked])}."]))
    else:
        parts.append(f"{tname} shares no genre with the films they rated highly.")
    if best_co >= MIN_COWATCH:
        parts.append(rng.choice([f"It is also often watched together with {title(history[best_p])}: "
                                 f"{best_co} other viewers saw both.",
                                 f"{best_co} other viewers of {title(history[best_p])} also watched it."]))
    elif best_p is not None:
        parts.append(f"Few other viewers ({best_co}) watched it together with any of these films.")
    if verdict == VERDICT_RELEVANT:
        parts.append(rng.choice(["So it is a natural next pick for them.", "So it fits their taste well."]))
    return " ".join(parts), verdict


def _brief(title, history, target, linked, shared, best_co, best_p, liked, rating) -> str:
    """The one-sentence rationale: the strongest liked-genre link and the co-watching count, nothing else."""
    if shared:
        p = linked[0]
        link = f"They liked {title(history[p])} ({RATING_WORDS[rating(p)]}); {title(target)} is also {_join(shared)}"
    elif liked:
        link = f"{title(target)} shares no genre with {title(history[liked[0]])}, which they liked"
    else:
        link = f"None of their recent films earned a high rating, and {title(target)} has no liked genre to match"
    if best_p is None:
        return link + "."
    return f"{link}, and {best_co} other viewers of {title(history[best_p])} watched it too."


class EvidenceTeacher:
    """Same interface as twice.rationale's teachers (.name, .preflight(), .complete); needs the request dicts
    (user, history, target), which build_rationales passes as `requests=`. Token counts are 0 (no model)."""

    name = "evidence"

    def __init__(self, ds, window: int = 10, style: str = "full"):
        if style not in STYLES:
            raise ValueError(f"teacher.evidence_style must be one of {STYLES}, got {style!r}")
        source = ds.meta.get("source", "")
        if source not in SOURCES:
            raise ValueError(f"teacher.backend=evidence reads MovieLens genres (sources {SOURCES}); {ds.root} is "
                             f"{source!r}: use the authors' released rationales (mix.t3_source: official) or an "
                             f"LLM teacher (backend api/local) for it")
        self.ds, self.window, self.style, self.cowatch = ds, window, style, CoWatch(ds)
        self.name = "evidence" if style == "full" else f"evidence-{style}"   # recorded in every rationales.jsonl line

    def preflight(self):
        pass

    def complete(self, conversations: list[list[dict]], seeds: list[int], requests: list[dict] | None = None,
                 on_result=None) -> list:
        from twice.llm_api import Completion
        if requests is None or len(requests) != len(conversations):
            raise ValueError("EvidenceTeacher.complete needs requests= (one {user, history, target} per conversation)")
        out = []
        for req, seed in zip(requests, seeds):
            rationale, verdict = write_rationale(self.ds, self.cowatch, req["user"], req["history"], req["target"],
                                                 self.window, seed, self.style)
            out.append(Completion(teacher_answer(rationale, verdict), 0, 0))
            if on_result is not None:
                on_result(len(out) - 1, out[-1])
        return out
