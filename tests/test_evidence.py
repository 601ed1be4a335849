"""Stage 1 without a model: the evidence teacher (twice/evidence.py), the re-asking wrapper and the local teacher's
answer prefill (twice/rationale.py), and build_rationales.py end to end with `teacher.backend: evidence`.

    python -m pytest tests/test_evidence.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import build_rationales as br
from twice.config import load_config
from twice.data import load_dataset
from twice.evidence import MIN_COWATCH, CoWatch, EvidenceTeacher, genres, write_rationale
from twice.llm_api import Completion, LLMError
from twice.rationale import (RationaleConfig, RetryingTeacher, TeacherConfig, curate, grounding_words,
                             make_teacher, parse_teacher, read_jsonl)
from twice.serve import GenOutput

GENRES = ["Comedy", "Drama", "Horror", "Western, Drama", "Sci-Fi, Horror", "unknown", "Comedy, Romance", "War"]
ROOT = Path(__file__).resolve().parents[1]
ML100K = Path.home() / ".cache" / "twice" / "ml-100k" / "ml-100k.inter"


def write_movielens(out: Path, source: str = "movielens-100k") -> Path:
    """8 films M1..M8 (genres above). User 1 (the one under test): M1 (5) M2 (4) M3 (1) M7 | M4 valid-ish tail.
    Users 2..8 all watch M2 and M7 early in their sequences (co-watchers of the pair (M2, M7) = 7 others)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "items.jsonl", "w") as f:
        for i, g in enumerate(GENRES, 1):
            f.write(json.dumps({"idx": i, "id": str(i), "title": f"Film {i} (199{i})", "description": g,
                                "details": {}}) + "\n")
    users = [([1, 2, 3, 7, 5, 6], [5, 4, 1, 4, 3, 3])]     # train target = items[-3] = 7 (Comedy, Romance)
    users += [([2, 7, 1, 8, 4, 5], [3] * 6) for _ in range(7)]   # 7 others: M2 & M7 both in items[:-2]
    users += [([3, 8, 4, 6, 5], [2] * 5)]                       # user 9: M3 & M8, nothing with M7
    with open(out / "users.jsonl", "w") as f:
        for u, (items, ratings) in enumerate(users, 1):
            f.write(json.dumps({"idx": u, "id": f"U{u}", "items": items, "ratings": ratings, "reviews": [""] * len(items),
                                "timestamps": list(range(len(items)))}) + "\n")
    (out / "meta.json").write_text(json.dumps({"source": source, "version": 1}))
    return out


def test_genres_and_cowatch_counts(tmp_path):
    ds = load_dataset(write_movielens(tmp_path / "d"))
    assert genres(ds.items[4]) == ["Western", "Drama"] and genres(ds.items[6]) == []   # "unknown" is no genre
    cw = CoWatch(ds)
    # users 2..8 hold M2 and M7 in items[:-2]; user 1 holds them too but is excluded
    assert cw.count(2, 7, exclude_user=1) == 7
    assert cw.count(1, 7, exclude_user=1) == 7      # users 2..8 also hold M1 in items[:-2]
    assert cw.count(3, 7, exclude_user=1) == 0      # user 9's M3 never meets M7
    # items[-2:] (valid/test targets) are never counted: user 9's M5 is its test target, M6 its valid target
    assert 9 not in cw.users_of.get(5, set()) and 9 not in cw.users_of.get(6, set())


def test_write_rationale_names_the_evidence_and_is_relevant(tmp_path):
    ds = load_dataset(write_movielens(tmp_path / "d"))
    hist, tgt = ds.history(1, "train"), ds.target(1, "train")
    assert (hist, tgt) == ([1, 2, 3], 7)
    text, verdict = write_rationale(ds, CoWatch(ds), 1, hist, tgt, window=10, seed=0)
    assert verdict == "RELEVANT"
    # liked M1 (Comedy, rated 5) shares Comedy with M7; disliked M3 (Horror) is named as such; co-watching 7 with M1/M2
    assert "Film 1 (1991)" in text and "Excellent" in text and "Comedy" in text
    assert "Film 3 (1993)" in text and "Horror" in text and "Terrible" in text
    assert "7 other viewers" in text
    assert "Film 7 (1997) (Comedy, Romance)" in text
    # same seed -> same text; the answer passes the same curation as an LLM teacher's
    assert write_rationale(ds, CoWatch(ds), 1, hist, tgt, 10, 0) == (text, verdict)
    from twice.prompts import teacher_answer
    assert curate(teacher_answer(text, verdict), *grounding_words(ds, hist, tgt)) == (None, text, verdict)


def test_window_limits_what_is_named_and_weak_links_are_irrelevant(tmp_path):
    ds = load_dataset(write_movielens(tmp_path / "d"))
    hist, tgt = ds.history(1, "train"), ds.target(1, "train")
    # window 1: only M3 (rated 1, Horror) is shown: no liked item, no shared genre, no co-watching -> IRRELEVANT,
    # and neither M1 nor M2 (outside the student's view) is named
    text, verdict = write_rationale(ds, CoWatch(ds), 1, hist, tgt, window=1, seed=0)
    assert verdict == "IRRELEVANT"
    assert "Film 1 " not in text and "Film 2 " not in text and "Film 3 (1993)" in text
    assert MIN_COWATCH > 0
    reason, _, _ = curate(f"<rationale>{text}</rationale><verdict>{verdict}</verdict>",
                          *grounding_words(ds, hist[-1:], tgt))
    assert reason == "irrelevant"


def test_evidence_teacher_refuses_data_without_genres(tmp_path):
    ds = load_dataset(write_movielens(tmp_path / "d", source="amazon2023"))
    with pytest.raises(ValueError, match="official"):
        EvidenceTeacher(ds)
    ds = load_dataset(write_movielens(tmp_path / "m"))
    with pytest.raises(ValueError, match="requests="):
        EvidenceTeacher(ds).complete([[]], [0])
    with pytest.raises(ValueError, match="needs the dataset"):
        make_teacher(TeacherConfig(backend="evidence"))
    with pytest.raises(ValueError, match="'evidence'"):
        make_teacher(TeacherConfig(backend="evidance"))


def test_build_rationales_with_the_evidence_teacher(tmp_path):
    data = write_movielens(tmp_path / "d")
    cfg = load_config(br.BuildConfig, None, [f"data_dir={data}", f"run_dir={tmp_path / 'run'}", "teacher.backend=evidence",
                                            "rationale.n_shots=0", "rationale.max_history=5"])
    stats = br.main(cfg)
    kept, dropped = read_jsonl(tmp_path / "run" / "rationales.jsonl"), read_jsonl(tmp_path / "run" / "dropped.jsonl")
    assert stats["done"] == stats["users"] == 9 and stats["kept"] == len(kept) and len(kept) + len(dropped) == 9
    assert {r["teacher"] for r in kept + dropped} == {"evidence"}
    u1 = next(r for r in kept if r["user"] == 1)
    assert u1["target"] == 7 and u1["verdict"] == "RELEVANT" and "7 other viewers" in u1["rationale"]
    assert all(r["reason"] == "irrelevant" for r in dropped)   # templated text is never unparseable or degenerate
    # resumable like any teacher: a second run asks nothing
    again = br.main(cfg)
    assert again["asked_this_run"] == 0 and again["kept"] == stats["kept"]


@pytest.mark.skipif(not ML100K.exists(), reason="ml-100k cache absent (python -m twice.data prepare ...)")
def test_evidence_teacher_yield_on_movielens_100k(tmp_path):
    """Real data: the study needs >= 200 curated rationales, the main job >= 40 (issue 13). Window 5 is the
    quickstart's task.max_history."""
    from twice.data.__main__ import main as data_main
    data_main(["prepare", str(ROOT / "configs" / "quickstart" / "data.yaml"), f"out_dir={tmp_path / 'ml'}"])
    ds = load_dataset(tmp_path / "ml")
    teacher = EvidenceTeacher(ds, window=5)
    reqs = [{"user": u.idx, "history": ds.history(u.idx, "train"), "target": ds.target(u.idx, "train")}
            for u in ds.users]
    outs = teacher.complete([[]] * len(reqs), list(range(len(reqs))), requests=reqs)
    reasons = [curate(o.text, *grounding_words(ds, r["history"], r["target"]))[0] for o, r in zip(outs, reqs)]
    kept = reasons.count(None)
    assert kept >= 200 and set(reasons) <= {None, "irrelevant"}
    assert kept < len(reqs)   # the verdict rule does drop weak links


class ScriptedTeacher:
    """Answers by seed: the first ask of each instance is garbage for users in `bad`, a retry is a good answer."""
    name = "scripted"

    def __init__(self, bad, irrelevant=()):
        self.bad, self.irrelevant, self.calls = set(bad), set(irrelevant), []

    def preflight(self):
        pass

    def complete(self, conversations, seeds, requests=None):
        self.calls.append([r["user"] for r in requests])
        out = []
        for s, r in zip(seeds, requests):
            if r["user"] in self.irrelevant:
                out.append(Completion("<rationale>Film 1 has nothing to do with this at all, honestly none.</rationale>"
                                      "<verdict>IRRELEVANT</verdict>", 10, 5))
            elif r["user"] in self.bad and s < 1000:
                out.append(Completion("I think the user likes films", 10, 5))   # unparseable
            elif r["user"] == 99:
                out.append(LLMError("boom"))
            else:
                out.append(Completion("<rationale>They liked Film 1 so this Comedy film fits them very well."
                                      "</rationale><verdict>RELEVANT</verdict>", 10, 7))
        return out


def test_retrying_teacher_reasks_only_format_failures(tmp_path):
    ds = load_dataset(write_movielens(tmp_path / "d"))
    reqs = [{"user": u, "history": ds.history(u, "train"), "target": ds.target(u, "train")} for u in (1, 2, 3)]
    inner = ScriptedTeacher(bad={1}, irrelevant={2})
    t = RetryingTeacher(inner, tries=3, ds=ds)
    out = t.complete([[]] * 3, [1, 2, 3], requests=reqs)
    assert inner.calls == [[1, 2, 3], [1]]          # only user 1 re-asked (user 2's IRRELEVANT is an honest verdict)
    assert t.retried == 1
    assert parse_teacher(out[0].text)[1] == "RELEVANT" and (out[0].prompt_tokens, out[0].completion_tokens) == (20, 12)
    assert parse_teacher(out[1].text)[1] == "IRRELEVANT"
    # tries=1: no wrapper at all; tries=3 with a local/api teacher: wrapped
    assert not isinstance(make_teacher(TeacherConfig(backend="api"), ds), RetryingTeacher)
    assert isinstance(make_teacher(TeacherConfig(backend="api", tries=3), ds), RetryingTeacher)
    with pytest.raises(ValueError, match="tries"):
        make_teacher(TeacherConfig(backend="api", tries=0), ds)


def test_retrying_teacher_gives_up_after_tries(tmp_path):
    ds = load_dataset(write_movielens(tmp_path / "d"))
    reqs = [{"user": 1, "history": ds.history(1, "train"), "target": ds.target(1, "train")}]

    class Always(ScriptedTeacher):
        def complete(self, conversations, seeds, requests=None):
            self.calls.append(list(seeds))
            return [Completion("no tags here", 1, 1)]
    inner = Always(bad=())
    out = RetryingTeacher(inner, tries=4, ds=ds).complete([[]], [5], requests=reqs)
    assert len(inner.calls) == 4 and len({s for c in inner.calls for s in c}) == 4   # 4 asks, 4 distinct seeds
    assert out[0].text == "no tags here" and out[0].completion_tokens == 4


def test_local_teacher_prefill_starts_the_answer_inside_the_tag():
    """teacher.prefill is appended to the prompt ids and to the returned text (curation parses the whole answer)."""
    from twice.rationale import LocalTeacher

    class Tok:
        def encode(self, s):
            return [1000 + ord(c) for c in s]

    class Backend:
        name, tokenizer, seen = "fake", Tok(), []

        def encode_chat(self, m):
            return [1, 2, 3]

        def generate(self, reqs, on_output=None):
            self.seen += [r.prompt_ids for r in reqs]
            return [GenOutput("They liked it.</rationale><verdict>RELEVANT", 3, 9, "stop") for _ in reqs]

    b = Backend()
    t = LocalTeacher(TeacherConfig(backend="local", prefill="<r>"), backend=b)
    out = t.complete([[{"role": "user", "content": "x"}]], [0])
    assert b.seen == [[1, 2, 3, 1000 + ord("<"), 1000 + ord("r"), 1000 + ord(">")]]
    assert out[0].text == "<r>They liked it.</rationale><verdict>RELEVANT"
    t0 = LocalTeacher(TeacherConfig(backend="local"), backend=b)
    t0.complete([[{"role": "user", "content": "x"}]], [0])
    assert b.seen[-1] == [1, 2, 3]


def test_rationale_config_defaults_unchanged():
    # the evidence teacher adds fields; an old YAML keeps its meaning
    c = TeacherConfig()
    assert (c.backend, c.tries, c.prefill) == ("api", 1, "") and RationaleConfig().max_history == 10


def test_brief_style_keeps_the_evidence_and_the_verdict_in_one_sentence(tmp_path):
    ds = load_dataset(write_movielens(tmp_path / "d"))
    hist, tgt = ds.history(1, "train"), ds.target(1, "train")
    full, v_full = write_rationale(ds, CoWatch(ds), 1, hist, tgt, window=10, seed=0)
    brief, v_brief = write_rationale(ds, CoWatch(ds), 1, hist, tgt, window=10, seed=0, style="brief")
    assert v_brief == v_full == "RELEVANT"
    # the liked film linked by genre (M1, rated 5, Comedy), the target, the shared genre and the co-watch count
    assert brief == ("They liked Film 1 (1991) (Excellent); Film 7 (1997) is also Comedy, and 7 other viewers of "
                     "Film 2 (1992) watched it too.")
    assert brief.count(".") == len(brief.split(". ")) and len(brief.split()) < len(full.split()) / 2
    from twice.prompts import teacher_answer
    assert curate(teacher_answer(brief, v_brief), *grounding_words(ds, hist, tgt)) == (None, brief, v_brief)
    # window 1: the verdict is the full style's (IRRELEVANT), and nothing outside the window is named
    text, verdict = write_rationale(ds, CoWatch(ds), 1, hist, tgt, window=1, seed=0, style="brief")
    assert verdict == "IRRELEVANT" and "Film 1 " not in text and "Film 2 " not in text
    teacher = make_teacher(TeacherConfig(backend="evidence", evidence_style="brief"), ds=ds)
    assert teacher.name == "evidence-brief"
    with pytest.raises(ValueError, match="evidence_style"):
        make_teacher(TeacherConfig(backend="evidence", evidence_style="short"), ds=ds)
