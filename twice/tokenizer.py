"""Gemma-3 tokenizer: SentencePiece `tokenizer.model` + the Gemma-3 instruct chat template + data-text defusing.

    from twice.tokenizer import Tokenizer
    tok = Tokenizer.from_pretrained("~/.cache/twice/gemma-3-270m")     # a folder holding tokenizer.model
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # [2, 105, 2364, 107, ..., 105, 4368, 107]
    tok.decode(ids)                                                     # control tokens skipped

    python -m twice.tokenizer DIR "some text"      # prints ids and pieces (a debugging aid)

Two rules keep text that comes from data (reviews, titles) from steering the model:
1. Control tokens (<bos>, <start_of_turn>, <end_of_turn>, ...) are only ever inserted as ids by
   `apply_chat_template`; `encode` never turns text into them. SentencePiece already refuses to parse CONTROL pieces
   out of text, but Google's original tokenizer.model (and our tiny test model) declare <start_of_turn>/<end_of_turn>
   as USER_DEFINED pieces, which SentencePiece *does* match in raw text. `encode` therefore cuts such strings out of
   the text first and encodes them as plain characters ("<" + "end_of_turn>"), so id 106 can never come from text.
2. `neutralize(text)` additionally rewrites the '<' of control strings and of the recommendation tags
   (<think>, </think>, <item>, </item>) into a look-alike, so a review saying "<item>B000X</item>" can neither
   produce a tag the reward parser reads nor teach the model to copy one.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Iterable

import sentencepiece as spm

from twice.fileio import write_atomic

# Gemma-3 special pieces (google-deepmind/gemma `_Gemma3SpecialTokens`); the ids are read back from the model and
# checked, so a tokenizer with another layout fails loudly instead of mis-tokenising.
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
GEMMA_IDS = {PAD: 0, EOS: 1, BOS: 2, UNK: 3, START_OF_TURN: 105, END_OF_TURN: 106}
# Pieces that are never text, whatever type the .model file gives them (USER_DEFINED in Google's file, CONTROL in
# the GGUF): `encode` never emits them and `decode(skip_special=True)` drops them.
_SPECIAL_NAME = re.compile(r"<pad>|<eos>|<bos>|<unk>|<mask>|\[multimodal\]|<unused\d+>|<start_of_turn>|<end_of_turn>"
                           r"|<start_of_image>|<end_of_image>|<image_soft_token>")
# Tags the recommender's output format uses; `neutralize` defuses them in data text (configurable per instance).
DEFAULT_TAGS = ("think", "item")
LOOKALIKE_LT = "\u2039"  # '‹' SINGLE LEFT-POINTING ANGLE QUOTATION MARK stands in for '<' in defused text
ALTERNATION_ERROR = "Conversation roles must alternate user/assistant/user/assistant/..."

# SentencePiece piece types (sentencepiece_model.proto ModelProto.SentencePiece.Type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class Tokenizer:
    def __init__(self, model_file: str | os.PathLike, tags: Iterable[str] = DEFAULT_TAGS):
        self.model_file = str(model_file)
        if not os.path.isfile(self.model_file):
            raise FileNotFoundError(f"tokenizer model not found: {self.model_file}")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(self.model_file)
        except Exception as e:  # sentencepiece raises a bare OSError/RuntimeError without the path
            raise ValueError(f"{self.model_file}: not a SentencePiece model ({e})") from e
        self.vocab_size = self.sp.GetPieceSize()
        for piece, want in GEMMA_IDS.items():
            got = self.sp.PieceToId(piece)
            if got != want or self.sp.IdToPiece(got) != piece:
                raise ValueError(f"{self.model_file}: piece {piece!r} has id {got}, Gemma-3 layout needs {want}")
        self.pad_id, self.eos_id, self.bos_id, self.unk_id = 0, 1, 2, 3
        self.start_of_turn_id, self.end_of_turn_id = 105, 106
        self.stop_ids = [self.eos_id, self.end_of_turn_id]  # generation ends on <eos> or <end_of_turn>
        pieces = [self.sp.IdToPiece(i) for i in range(self.vocab_size)]
        # special ids: CONTROL/UNKNOWN pieces plus USER_DEFINED pieces that are Gemma control names
        self.special_ids = frozenset(i for i, p in enumerate(pieces)
                                     if self.sp.IsControl(i) or self.sp.IsUnknown(i) or _SPECIAL_NAME.fullmatch(p))
        # USER_DEFINED special pieces are the ones SentencePiece would parse out of raw text: cut them out first.
        # (They all match _SPECIAL_NAME, a short regex; a 6k-way alternation of literals would make encode slow.)
        self._guarded = frozenset(pieces[i] for i in self.special_ids if self._is_user_defined(i))
        self.tags = tuple(tags)
        self._neutralize_re = _neutralize_pattern(self.tags)

    def _is_user_defined(self, i: int) -> bool:
        # SentencePieceProcessor has IsControl/IsUnknown/IsByte/IsUnused but no IsUserDefined: a user-defined piece
        # is none of those and encodes back to itself as a single id.
        if self.sp.IsControl(i) or self.sp.IsUnknown(i) or self.sp.IsByte(i) or self.sp.IsUnused(i):
            return False
        p = self.sp.IdToPiece(i)
        return self.sp.EncodeAsIds(p.replace("\u2581", " ")) == [i]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **kw) -> "Tokenizer":
        """`path` is a folder holding tokenizer.model, or the .model file itself."""
        p = Path(path).expanduser()
        return cls(p / "tokenizer.model" if p.is_dir() else p, **kw)

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Write out_dir/tokenizer.model (atomic)."""
        out = Path(out_dir) / "tokenizer.model"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out, self.sp.serialized_model_proto())
        return out

    # ---- text <-> ids -----------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Plain text -> ids, no BOS. Never yields a special id: control strings in `text` stay characters."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        hits = [m for m in _SPECIAL_NAME.finditer(text) if m.group() in self._guarded] if self._guarded else []
        if not hits:
            return self.sp.EncodeAsIds(text)
        ids, pos = [], 0
        for m in hits:
            # text before the match, then the match split after its first character so that no user-defined
            # special piece can be matched (e.g. "<" + "end_of_turn>")
            ids += self.sp.EncodeAsIds(text[pos:m.start()])
            s = m.group()
            ids += self.sp.EncodeAsIds(s[0]) + self.sp.EncodeAsIds(s[1:])
            pos = m.end()
        ids += self.sp.EncodeAsIds(text[pos:])
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        """ids -> text. skip_special drops control ids; otherwise they are written as their piece ("<end_of_turn>")."""
        out, run = [], []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} outside the vocabulary [0, {self.vocab_size})")
            if i in self.special_ids:
                if run:
                    out.append(self.sp.DecodeIds(run))
                    run = []
                if not skip_special:
                    out.append(self.sp.IdToPiece(i))
            else:
                run.append(i)
        if run:
            out.append(self.sp.DecodeIds(run))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self.sp.IdToPiece(int(i))

    # ---- chat template ----------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """The Gemma-3 instruct template (gemma3_chat_template.jinja), producing ids directly, BOS included.

        Renders exactly the text the Jinja template renders (a leading system message is folded into the first
        turn as content + "\\n\\n", untrimmed; turn contents are trimmed; roles must alternate user/assistant;
        assistant is written "model"), but the control tokens are inserted as ids and every text stretch between
        two control tokens is encoded in one piece with `encode`, so message text can never become a control id.
        """
        if not messages:
            raise ValueError("apply_chat_template: messages is empty")
        prefix = ""
        loop = messages
        if messages[0].get("role") == "system":
            c = messages[0].get("content")
            prefix = (c if isinstance(c, str) else _first_text(c, 0)) + "\n\n"
            loop = messages[1:]
        ids = [self.bos_id]
        for k, m in enumerate(loop):
            role = m.get("role")
            if (role == "user") != (k % 2 == 0):
                raise ValueError(f"{ALTERNATION_ERROR} (message {k + (len(messages) - len(loop))} has role {role!r})")
            role = "model" if role == "assistant" else role
            body = _content_text(m.get("content"), k)
            ids.append(self.start_of_turn_id)
            ids += self.encode(f"{role}\n" + (prefix if k == 0 else "") + body)
            ids.append(self.end_of_turn_id)
            ids += self.encode("\n")
        if add_generation_prompt:
            ids.append(self.start_of_turn_id)
            ids += self.encode("model\n")
        return ids

    # ---- data text --------------------------------------------------------------------------------------------
    def neutralize(self, text: str) -> str:
        """Defuse control strings and recommendation tags in text that comes from data (reviews, titles, ...)."""
        return neutralize(text, self.tags, _pattern=self._neutralize_re)

    # ---- fixtures ---------------------------------------------------------------------------------------------
    @classmethod
    def train_tiny(cls, out_dir: str | os.PathLike, texts: Iterable[str], vocab_size: int = 512,
                   model_type: str = "bpe", extra_symbols: Iterable[str] = ()) -> "Tokenizer":
        """Train a small SentencePiece model with Gemma-3's special ids on `texts`; writes out_dir/tokenizer.model.

        Recipe (the special pieces of Google's Gemma-3 tokenizer.model): pad 0, eos 1, bos 2, unk 3, user-defined <mask>, [multimodal], <unused0..98>,
        <start_of_turn> 105, <end_of_turn> 106, "\\n" 107; identity normalisation, no dummy prefix, byte fallback,
        digits split (as Gemma). Deterministic for the same texts (one thread). The vocabulary is at most
        `vocab_size` (smaller when the texts are too few: read `.vocab_size`). Only the most frequent characters that
        fit beside the 363 reserved pieces are learnt; rarer ones are encoded with byte fallback. extra_symbols are
        added as user-defined pieces after "\n" (always one token each, e.g. every item ID of the ablation bench)."""
        texts = [t for t in texts if t]
        if not texts:
            raise ValueError("train_tiny: no non-empty texts")
        user = ["<mask>", "[multimodal]"] + [f"<unused{i}>" for i in range(99)] + [START_OF_TURN, END_OF_TURN, "\n"]
        user += [x for x in dict.fromkeys(extra_symbols) if x not in user]
        reserved = 4 + len(user) + 256  # specials + user-defined + byte pieces
        if vocab_size < reserved + 16:
            raise ValueError(f"train_tiny: vocab_size {vocab_size} leaves no room beside {reserved} reserved pieces")
        counts = Counter(c for t in texts for c in t)
        budget = vocab_size - reserved - 16
        if len(counts) > budget:  # SentencePiece refuses a vocabulary smaller than the character set: drop rare chars
            keep = {c for c, _ in counts.most_common(budget)}
            texts = [u for u in ("".join(c for c in t if c in keep) for t in texts) if u]
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            prefix = os.path.join(tmp, "tiny")
            with open(os.devnull, "w") as devnull:
                spm.SentencePieceTrainer.Train(
                    sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
                    pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece=PAD, eos_piece=EOS, bos_piece=BOS,
                    unk_piece=UNK, user_defined_symbols=user, normalization_rule_name="identity",
                    remove_extra_whitespaces=False, add_dummy_prefix=False, byte_fallback=True, split_digits=True,
                    character_coverage=1.0, hard_vocab_limit=False, num_threads=1, max_sentence_length=1 << 16,
                    allow_whitespace_only_pieces=True, minloglevel=2, logstream=devnull)
            os.replace(prefix + ".model", out / "tokenizer.model")
        return cls(out / "tokenizer.model")


def _first_text(content, k: int) -> str:
    try:
        return content[0]["text"]
    except (TypeError, IndexError, KeyError):
        raise ValueError(f"message {k}: content must be a string or a list of {{'type': 'text', 'text': ...}}")


def _content_text(content, k: int) -> str:
    if isinstance(content, str):
        return content.strip()  # Jinja's `trim` is Python's str.strip()
    if isinstance(content, (list, tuple)):
        parts = []
        for item in content:
            if not isinstance(item, dict):
                raise ValueError(f"message {k}: content items must be dicts, got {type(item).__name__}")
            if item.get("type") == "image":
                raise ValueError(f"message {k}: image content is not supported by this text-only tokenizer")
            if item.get("type") == "text":
                parts.append(str(item.get("text", "")).strip())
        return "".join(parts)
    raise ValueError(f"message {k}: Invalid content type {type(content).__name__}")


def _neutralize_pattern(tags: Iterable[str]) -> re.Pattern:
    names = [r"start_of_turn", r"end_of_turn", r"bos", r"eos", r"pad", r"unk", r"mask", r"unused\d+",
             r"start_of_image", r"end_of_image", r"image_soft_token"] + [re.escape(t) for t in tags]
    # '<' (or a full-width '＜') opening a control string or a tag, tolerant of case, inner spaces and '/'
    return re.compile(r"[<\uFF1C](?=\s*/?\s*(?:" + "|".join(names) + r")\s*[>\uFF1E])", re.IGNORECASE)


def neutralize(text: str, tags: Iterable[str] = DEFAULT_TAGS, _pattern: re.Pattern | None = None) -> str:
    """Replace the '<' of `<start_of_turn>`, `<end_of_turn>`, `<bos>`, `<eos>`, `<pad>`, ... and of `<tag>` /
    `</tag>` for each recommendation tag with a look-alike ('‹'), so the text reads the same to a human but can be
    neither a control token nor a tag. "[multimodal]" is dropped to "(multimodal)"."""
    pat = _pattern or _neutralize_pattern(tags)
    return pat.sub(LOOKALIKE_LT, text).replace("[multimodal]", "(multimodal)")



if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m twice.tokenizer DIR TEXT")
    tok = Tokenizer.from_pretrained(sys.argv[1])
    ids = tok.encode(sys.argv[2])
    print(ids)
    print([tok.id_to_piece(i) for i in ids])
