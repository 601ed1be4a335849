"""Stage 1 nouns: the teacher request for (S_u, i+), the teacher's answer parsed, curation, and line-atomic JSONL.

    python build_rationales.py configs/quickstart/rationales.yaml      # the loop that uses these (see that file)

The teacher sees the user's history S_u AND the true next item i+ (paper Stage 1, Appendix F in spirit), writes
`<rationale>...</rationale><verdict>RELEVANT|IRRELEVANT</verdict>` (twice.prompts.teacher_messages; few-shot
exemplars are earlier chat turns), and so tags its own instances; curation keeps an instance only when all of these hold, else drops it with ONE reason (the first
that applies, in this order):

    unparseable   no `<rationale>...</rationale>` pair, or no `<verdict>` with RELEVANT / IRRELEVANT after it
                  (case-insensitive; the first verdict tag wins)
    irrelevant    the teacher's verdict is IRRELEVANT (the self-annotated curation of the paper)
    empty         the rationale is empty after stripping whitespace
    degenerate    the rationale is grounded in neither side of the link. Rule (simple, deterministic):
                  content words = lower-cased alphanumeric runs of >= 3 characters that are not in STOPWORDS;
                  the rationale is degenerate when it has fewer than `min_words` words (whitespace split), OR
                  when it shares no content word with the history item titles AND none with the target's
                  title / description / detail values, OR when one sentence (>= 4 words, case/space-folded)
                  occurs 3+ times (a looping small model). E.g. "The customer will like this item." is degenerate;
                  "They loved the cookies, and baklava is a sweet treat" is kept (cookies: a history title word).

Teachers (make_teacher): "api", "local", and "evidence" (twice/evidence.py: no model, the rationale is written from
the data; its records say "teacher": "evidence"). With `tries` > 1 an LLM teacher is wrapped in RetryingTeacher,
which re-asks (new seed) an answer curation would drop as unparseable / empty / degenerate; never an IRRELEVANT one.

Records (build_rationales.py's docstring lists the files): one JSON object per line, `{"user", "history", "target", "rationale",
"verdict", "teacher", "prompt_hash"}` (+ "tokens": [prompt, completion]) in rationales.jsonl; dropped instances
go to dropped.jsonl with the same keys + "reason" and the raw teacher "text". `append_jsonl` writes a record as
ONE os.write of a full line then fsync, and `repair_jsonl` cuts a torn last line left by a killed run, so a
resumed run never reads half a record and never duplicates one (it skips users already in either file).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from twice import prompts
from twice.config import ConfigError

DROP_REASONS = ("unparseable", "irrelevant", "empty", "degenerate")

STOPWORDS = frozenset("""
the and for with this that these those from into onto over under than then they them their there here have has had
was were are is be been being will would can could should may might must not but nor yet also just very more most
much many some any each every all both few other such own same only its it's his her hers our ours your yours you
who whom whose which what when where why how item items customer customers user users product products next bought
buy buys buying purchase purchased purchases purchasing history like likes liked love loves loved enjoy enjoys
enjoyed prefer prefers preference preferences because since while about after before again likely well good great
one two new use used uses using make makes made pack count ounce ounces size fits fit way shows show shown seems
""".split())


@dataclass
class RationaleConfig:
    exemplars: str = "configs/teacher_exemplars.jsonl"   # hand-checked few-shot exemplars (JSONL: history, target, rationale, verdict)
    n_shots: int = 4              # exemplars put in each prompt (the first n of the file; 0 = zero-shot)
    max_history: int = 10         # most recent history items shown to the teacher
    desc_chars: int = 120         # description chars per history item
    review_chars: int = 160       # review chars per history item
    target_desc_chars: int = 200  # description chars of the target item
    min_words: int = 8            # rationales shorter than this (whitespace words) are degenerate


# ---------------------------------------------------------------------------------------------------------------
# the request

def load_exemplars(path: str | Path, n: int | None = None) -> list[dict]:
    """Exemplar file -> list of {history, target, rationale, verdict}; a bad line is an error naming file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher exemplars file not found: {path}")
    out = []
    for ln, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{ln}: not JSON ({e})") from None
        for key in ("history", "target", "rationale", "verdict"):
            if not isinstance(ex.get(key), str) or not ex[key].strip():
                raise ValueError(f"{path}:{ln}: field '{key}' must be a non-empty string")
        if ex["verdict"] not in (prompts.VERDICT_RELEVANT, prompts.VERDICT_IRRELEVANT):
            raise ValueError(f"{path}:{ln}: verdict must be {prompts.VERDICT_RELEVANT} or "
                             f"{prompts.VERDICT_IRRELEVANT}, got {ex['verdict']!r}")
        out.append(ex)
    return out if n is None else out[:n]


def history_block(ds, user_idx: int, history: list[int], cfg: RationaleConfig) -> str:
    """The user's last cfg.max_history history items with review + rating (positions are the first len(history))."""
    user = ds.user(user_idx)
    n = len(history)
    parts = []
    for pos in range(max(0, n - cfg.max_history), n):
        item = ds.items[history[pos]]
        rating = user.ratings[pos] if user.ratings else None
        review = (user.reviews[pos] if user.reviews else "") or None  # no empty "- review:" line (MovieLens)
        parts.append(prompts.render_item(item.title, item.id, item.description, review=review, rating=rating,
                                         desc_chars=cfg.desc_chars, review_chars=cfg.review_chars))
    return "\n\n".join(parts)


def target_block(ds, target: int, cfg: RationaleConfig) -> str:
    item = ds.items[target]
    return prompts.render_item(item.title, item.id, item.description, desc_chars=cfg.target_desc_chars)


def build_request(ds, user_idx: int, cfg: RationaleConfig, exemplars: list[dict],
                  split: str = "train") -> dict:
    """-> {"user", "history", "target", "messages", "prompt_hash"} for one training instance (S_u, i+)."""
    history, target = ds.history(user_idx, split), ds.target(user_idx, split)
    messages = prompts.teacher_messages(history_block(ds, user_idx, history, cfg), target_block(ds, target, cfg),
                                        exemplars)
    return {"user": user_idx, "history": list(history), "target": target, "messages": messages,
            "prompt_hash": prompt_hash(messages)}


def prompt_hash(messages: list[dict]) -> str:
    """Short, stable hash of the exact messages sent (records which prompt version produced a rationale)."""
    blob = json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# parsing and curation

_RATIONALE = re.compile(r"<rationale>(.*?)</rationale>", re.IGNORECASE | re.DOTALL)
_VERDICT = re.compile(r"<verdict>\s*(RELEVANT|IRRELEVANT)\b", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]{3,}")


def parse_teacher(text: str) -> tuple[str | None, str | None]:
    """-> (rationale or None, "RELEVANT" / "IRRELEVANT" or None). The verdict is searched after the rationale."""
    m = _RATIONALE.search(text or "")
    if m is None:
        return None, None
    v = _VERDICT.search(text, m.end())
    return m.group(1).strip(), (v.group(1).upper() if v else None)


def content_words(text: str) -> set[str]:
    return {w for w in _WORD.findall((text or "").lower()) if w not in STOPWORDS}


def grounding_words(ds, history: list[int], target: int) -> tuple[set[str], set[str]]:
    """(content words of the history titles, content words of the target's title/description/detail values)."""
    hist = set().union(*(content_words(ds.items[i].title) for i in history)) if history else set()
    t = ds.items[target]
    details = " ".join(str(v) for v in (t.details or {}).values())
    return hist, content_words(f"{t.title} {t.description} {details}")


def curate(text: str, history_words: set[str], target_words: set[str], min_words: int = 8
           ) -> tuple[str | None, str, str | None]:
    """Teacher output -> (reason or None when kept, rationale, verdict). See the module docstring for the rule."""
    rationale, verdict = parse_teacher(text)
    if rationale is None or verdict is None:
        return "unparseable", rationale or "", verdict
    if verdict == prompts.VERDICT_IRRELEVANT:
        return "irrelevant", rationale, verdict
    if not rationale:
        return "empty", rationale, verdict
    words = content_words(rationale)
    if len(rationale.split()) < min_words or not (words & history_words or words & target_words) \
            or _loops(rationale):
        return "degenerate", rationale, verdict
    return None, rationale, verdict


def _loops(text: str, times: int = 3) -> bool:
    """True when one sentence of >= 4 words occurs `times` or more times."""
    sents = [" ".join(x.lower().split()) for x in re.split(r"[.!?;\n]+", text)]
    counts: dict[str, int] = {}
    for x in sents:
        if len(x.split()) >= 4:
            counts[x] = counts.get(x, 0) + 1
    return any(c >= times for c in counts.values())


# ---------------------------------------------------------------------------------------------------------------
# line-atomic JSONL

def append_jsonl(fd: int, record: dict) -> None:
    """One os.write of the whole line + fsync: a kill leaves either the full line or (rarely) a torn tail that
    `repair_jsonl` removes; never a line split across two writes interleaved with another record."""
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    n = os.write(fd, data)
    if n != len(data):  # regular files write fully or raise; a short write would break line atomicity
        raise OSError(f"short write ({n} of {len(data)} bytes)")
    os.fsync(fd)


def repair_jsonl(path: str | Path) -> int:
    """Cut a torn (newline-less or non-JSON) last line left by a killed run. -> bytes removed (0 if intact).
    Any other corrupt line is an error naming the line: that is not something a kill can produce."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1  # everything after the last newline is a torn tail
    lines = data[:keep].split(b"\n")[:-1]
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:  # a full line that is not JSON can only be the torn tail of a crashed write
            keep -= len(lines[-1]) + 1
            lines = lines[:-1]
    for ln, line in enumerate(lines, 1):
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{ln}: corrupt JSON line ({e}); fix or delete the file") from None
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return len(data) - keep


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# teachers: an OpenAI-compatible endpoint or a local checkpoint through our engine, one interface
#   .name (recorded in every record), .preflight() (raise a clear LLMError early), and
#   .complete(conversations, seeds) -> list[Completion | LLMError] (a failure is returned in its slot, counted)

@dataclass
class TeacherConfig:
    backend: str = "api"          # "api" (OpenAI-compatible endpoint) | "local" (a checkpoint through twice.engine)
                                  #   | "evidence" (no model: rationales written from genres, ratings, co-watching;
                                  #   MovieLens only; twice/evidence.py)
    base_url: str = "http://127.0.0.1:8000/v1"   # api: ".../v1" (vLLM, llama.cpp server, hosted, python -m twice.serve)
    model: str = "local"          # api: model name sent in each request
    api_key_env: str = ""         # api: NAME of the env var holding the key ("" = none); the key is never logged
    temperature: float = 0.7      # sampling temperature (both backends)
    max_tokens: int = 300         # completion tokens per instance (both backends)
    concurrency: int = 4          # api: requests in flight
    timeout_s: float = 120.0      # api: per-request timeout
    max_retries: int = 4          # api: retries on 429 / 5xx / timeouts (exponential backoff with jitter)
    backoff_s: float = 1.0        # api: first retry waits ~backoff_s, doubling
    model_path: str = ""          # local: HF-format folder (python -m twice.convert ..., an SFT final/, ...)
    dtype: str = "auto"           # local: auto (bf16 on AMX/AVX512-BF16 CPUs, twice/precision.py) | float32 | bfloat16
    batch_size: int = 8           # local: prompts per Engine.generate call
    prefill: str = ""             # local: text the answer starts with, e.g. "<rationale>" (the model continues
                                  #   inside the tag instead of choosing a format; the prefix is part of the text parsed)
    evidence_style: str = "full"  # evidence: "full" (4-5 sentences, ~128 tokens) | "brief" (one sentence, ~65 tokens:
                                  #   the same evidence and verdict; what a 2-core CPU budget can decode per sample)
    tries: int = 1                # api/local: asks per instance; an unparseable / empty / degenerate answer is re-asked
                                  #   with a new seed up to tries-1 times (an IRRELEVANT verdict is never re-asked)


STOP = ("</verdict>",)  # the answer is complete once the verdict is closed: stop decoding there (not returned)


class ApiTeacher:
    def __init__(self, cfg: TeacherConfig):
        from twice.llm_api import ChatClient, LLMConfig
        self.client = ChatClient(LLMConfig(base_url=cfg.base_url, model=cfg.model, api_key_env=cfg.api_key_env,
                                           temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                                           timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
                                           backoff_s=cfg.backoff_s, concurrency=cfg.concurrency))
        self.name = f"api:{cfg.model}"

    def preflight(self):
        self.client.preflight()

    def complete(self, conversations: list[list[dict]], seeds: list[int], requests=None, on_result=None) -> list:
        """on_result(i, result) as each request finishes (progress per instance)."""
        return self.client.chat_many(conversations, per_request=[{"seed": s} for s in seeds], stop=list(STOP),
                                     on_result=on_result)


class LocalTeacher:
    """A local checkpoint run through EngineBackend (the same code path as twice.serve, without HTTP)."""

    def __init__(self, cfg: TeacherConfig, backend=None):
        from twice.serve import load_backend
        if backend is None:
            if not cfg.model_path:
                raise ConfigError("teacher.backend=local needs teacher.model_path (an HF-format folder)")
            backend = load_backend(cfg.model_path, cfg.dtype)
        self.backend, self.cfg = backend, cfg
        engine_dtype = getattr(getattr(backend, "engine", None), "dtype", None)  # recorded in metrics.jsonl
        self.compute_dtype = str(engine_dtype).removeprefix("torch.") if engine_dtype is not None else None
        self.name = f"local:{os.path.basename(os.path.normpath(cfg.model_path)) or backend.name}"

    def preflight(self):
        pass  # loading the checkpoint already failed loudly if it is missing or broken

    def complete(self, conversations: list[list[dict]], seeds: list[int], requests=None, on_result=None) -> list:
        """on_result(i, result) for each instance as soon as its row of the engine batch finishes."""
        from twice.llm_api import Completion, LLMError
        from twice.serve import GenRequest
        pre = self.cfg.prefill
        pre_ids = self.backend.tokenizer.encode(pre) if pre else []
        out: list = [None] * len(conversations)

        def answered(j: int, o) -> None:
            out[j] = Completion(pre + o.text, o.prompt_tokens, o.completion_tokens)
            if on_result is not None:
                on_result(j, out[j])
        for i in range(0, len(conversations), max(1, self.cfg.batch_size)):
            reqs = [GenRequest(m, self.backend.encode_chat(m) + pre_ids, self.cfg.max_tokens, self.cfg.temperature,
                               1.0, STOP, s)
                    for m, s in zip(conversations[i:i + self.cfg.batch_size], seeds[i:i + self.cfg.batch_size])]
            try:
                outs = self.backend.generate(reqs, on_output=lambda k, o, i=i: answered(i + k, o))
                for k, o in enumerate(outs):   # a backend without per-row progress reports at the end
                    if out[i + k] is None:
                        answered(i + k, o)
            except (RuntimeError, ValueError) as e:  # e.g. out of memory for one batch: counted, run goes on
                for j in range(i, i + len(reqs)):   # rows answered before the failure keep their answers
                    if out[j] is None:
                        out[j] = LLMError(f"local generation failed: {type(e).__name__}: {e}")
                        if on_result is not None:
                            on_result(j, out[j])
        return out


RETRY_REASONS = ("unparseable", "empty", "degenerate")   # format failures worth another sample; never "irrelevant"


class RetryingTeacher:
    """Wraps a teacher: an answer that curation would drop for a FORMAT reason (RETRY_REASONS) is asked again with
    a new seed, up to `tries` asks in all; the first answer that passes (or the last one) fills the slot, with the
    tokens of every try summed. `retried` counts the extra asks. Curation itself is unchanged (twice.curate)."""

    def __init__(self, teacher, tries: int, ds, min_words: int = 8):
        self.inner, self.tries, self.ds, self.min_words = teacher, tries, ds, min_words
        self.name, self.retried = teacher.name, 0

    def preflight(self):
        self.inner.preflight()

    def complete(self, conversations, seeds, requests=None, on_result=None):
        """on_result(i, result) once per instance, when its answer is final (kept, or its last try)."""
        from twice.llm_api import Completion, LLMError
        if requests is None:
            raise ValueError("RetryingTeacher.complete needs requests= (history/target for curation)")
        out = self.inner.complete(conversations, seeds, requests=requests)
        pending = set(range(len(out)))
        for k in range(1, self.tries + 1):
            redo = [] if k == self.tries else [
                i for i in sorted(pending) if not isinstance(out[i], LLMError)
                and curate(out[i].text, *grounding_words(self.ds, requests[i]["history"], requests[i]["target"]),
                           self.min_words)[0] in RETRY_REASONS]
            for i in sorted(pending - set(redo)):   # final now: report it
                if on_result is not None:
                    on_result(i, out[i])
            pending = set(redo)
            if not redo:
                break
            self.retried += len(redo)
            again = self.inner.complete([conversations[i] for i in redo], [retry_seed(seeds[i], k) for i in redo],
                                        requests=[requests[i] for i in redo])
            for i, res in zip(redo, again):
                if not isinstance(res, LLMError):  # a failed retry keeps the earlier answer
                    out[i] = Completion(res.text, out[i].prompt_tokens + res.prompt_tokens,
                                        out[i].completion_tokens + res.completion_tokens)
        return out


def retry_seed(seed: int, k: int) -> int:
    """Seed of the k-th re-ask (k >= 1) of an instance: distinct from every instance's first seed in practice."""
    return (seed + k * 0x9E3779B97F4A7C15) % (2 ** 62)


def make_teacher(cfg: TeacherConfig, ds=None, window: int = 10, min_words: int = 8):
    """ds (the dataset) and window (rationale.max_history) are needed by backend=evidence and by tries > 1."""
    if cfg.tries < 1:
        raise ConfigError(f"teacher.tries must be >= 1, got {cfg.tries}")
    if cfg.backend == "evidence":
        from twice.evidence import EvidenceTeacher
        if ds is None:
            raise ValueError("teacher.backend=evidence needs the dataset (make_teacher(cfg, ds=...))")
        return EvidenceTeacher(ds, window, cfg.evidence_style)  # deterministic: more tries would give the same answer
    if cfg.backend == "api":
        teacher = ApiTeacher(cfg)
    elif cfg.backend == "local":
        teacher = LocalTeacher(cfg)
    else:
        raise ConfigError(f"teacher.backend must be 'api', 'local' or 'evidence', got {cfg.backend!r}")
    if cfg.tries > 1:
        if ds is None:
            raise ValueError("teacher.tries > 1 needs the dataset (make_teacher(cfg, ds=...)) to curate retries")
        teacher = RetryingTeacher(teacher, cfg.tries, ds, min_words)
    return teacher
