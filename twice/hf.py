"""Hugging Face checkpoint folders in and out for twice.gemma3.Gemma3 (imports torch + safetensors, not the model).

    python -c "from twice.gemma3 import Gemma3; m = Gemma3.from_pretrained('ckpt/gemma-3-1b-it'); \
               m.save_pretrained('/tmp/copy')"

Reads what people download (Hub checkpoints of every Gemma-3 size):
  - config.json in the transformers v4 form (rope_theta, rope_local_base_freq, rope_scaling, sliding_window_pattern)
    and the v5 form (rope_parameters per layer type, layer_types); absent keys take Gemma3TextConfig's defaults;
  - multimodal 4B+ checkpoints (model_type "gemma3", sparse text_config; weights under `language_model.model.` or
    `model.language_model.`; the vision tower and projector are skipped);
  - one model.safetensors or shards listed in model.safetensors.index.json.
Weights go through one explicit key table and are loaded strictly: a missing, unexpected or mis-shaped tensor is an
error that names it. The model is built on the meta device and each tensor is read once (safe_open) and assigned,
so a load never holds two copies of the weights.
Writes a folder that transformers 4.5x/5.x `Gemma3ForCausalLM.from_pretrained` (and vLLM) load: config.json with
both the v4 and v5 keys, generation_config.json, model.safetensors (sharded with an index above max_shard_bytes),
tokenizer.model. Everything is written to a temp dir first, then renamed into place.
A fine-tune's folder (twice.checkpoint.export_hf, LoRA merged) also carries the low-rank delta that was merged:
lora_delta.safetensors ({module}.lora_A [r, in], {module}.lora_B [out, r], fp32, the LoRA scale folded into B) and
lora_delta.json (format, base_dtype, rank per module). transformers ignores both files. `from_pretrained` in bf16
recovers the bf16 base from them and keeps the delta as frozen fp32 adapters (see load_delta_state).
Imports are one-way: twice/gemma3.py calls into this module from `Gemma3.from_pretrained` / `save_pretrained`; this
module never imports the model. The model class is handed in (`cls`, with `cls.config_class` for its config).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from twice.lora import attach_delta, delta_dense

# HF's layer_types strings (Gemma3Config.layer_types uses the same two, so they pass through unchanged)
SLIDING, FULL = "sliding_attention", "full_attention"

# ----------------------------------------------------------------------------------------------------------------
# Config

# Gemma3TextConfig defaults (transformers 4.57 and 5.x agree): what a sparse (multimodal) text_config leaves out.
HF_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256,
                   sliding_window=4096, sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=1e4,
                   rope_scaling=None, max_position_embeddings=131072, rms_norm_eps=1e-6, pad_token_id=0,
                   bos_token_id=2, eos_token_id=1, final_logit_softcapping=None)
# Fields copied as-is from the (defaults-filled) HF dict into Gemma3Config.
_PLAIN = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window", "max_position_embeddings",
          "rms_norm_eps", "pad_token_id", "bos_token_id", "eos_token_id", "final_logit_softcapping"]


def _rope_factor(params: dict | None, where: str) -> float:
    """Linear scaling factor of one RoPE spec (v4 rope_scaling or a v5 rope_parameters entry); 1.0 if none."""
    if not params:
        return 1.0
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return 1.0
    if kind == "linear":
        return float(params["factor"])
    raise ValueError(f"{where}: rope_type {kind!r} is not supported (Gemma-3 uses 'default' or 'linear')")


def config_from_hf(raw: dict, config_cls, where: str = "config.json"):
    """HF config dict (text-only or multimodal, v4 or v5 keys) -> config_cls (Gemma3Config); absent keys get HF
    defaults. config_cls is passed in so this module does not import the model."""
    text = raw
    if raw.get("model_type") == "gemma3" or "text_config" in raw:  # multimodal wrapper: settings under text_config
        text = dict(raw.get("text_config") or {})
        where = f"{where}: text_config"
        for k in ("eos_token_id", "bos_token_id", "pad_token_id"):  # ids are sometimes only at the top level
            if k not in text and k in raw:
                text[k] = raw[k]
    nullable = ("rope_scaling", "final_logit_softcapping")  # null is a real value for these, a gap for the rest
    c = {**HF_DEFAULTS, **{k: v for k, v in text.items() if v is not None or k in nullable}}
    # refuse the variants this decoder does not implement, instead of silently computing something else
    if (c.get("hidden_activation") or "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ValueError(f"{where}: hidden_activation {c['hidden_activation']!r} is not supported")
    for flag in ("attention_bias", "use_bidirectional_attention"):
        if c.get(flag):
            raise ValueError(f"{where}: {flag}=true is not supported")
    if raw.get("tie_word_embeddings", text.get("tie_word_embeddings", True)) is False:
        raise ValueError(f"{where}: tie_word_embeddings=false is not supported (Gemma-3 ties the LM head)")

    # layer kinds: v5 (and 4.53+) list them; the Hub's older configs give the pattern (every p-th layer is global)
    n = c["num_hidden_layers"]
    layer_types = c.get("layer_types")
    if not layer_types:
        p = c.get("sliding_window_pattern") or c.get("_sliding_window_pattern") or 6
        layer_types = [SLIDING if (i + 1) % p != 0 else FULL for i in range(n)]

    # RoPE: v5 rope_parameters {full_attention: {...}, sliding_attention: {...}} wins when present (transformers
    # 4.57 ignores it, so a v5 checkpoint read by 4.57 loses its scaling: never fall back to the v4 keys then)
    rp = text.get("rope_parameters")
    if rp:
        if FULL in rp or SLIDING in rp:
            full, local = rp.get(FULL, {}), rp.get(SLIDING, {})
        else:  # a flat spec describes the global layers
            full, local = rp, {}
        rope_theta = float(full.get("rope_theta", c["rope_theta"]))
        rope_local = float(local.get("rope_theta", c["rope_local_base_freq"]))
        factor = _rope_factor(full, f"{where}: rope_parameters.{FULL}")
        if _rope_factor(local, f"{where}: rope_parameters.{SLIDING}") != 1.0:
            raise ValueError(f"{where}: scaled RoPE on sliding layers is not supported")
    else:
        rope_theta, rope_local = float(c["rope_theta"]), float(c["rope_local_base_freq"])
        factor = _rope_factor(c.get("rope_scaling"), f"{where}: rope_scaling")

    try:
        return config_cls(**{k: c[k] for k in _PLAIN}, layer_types=list(layer_types), rope_theta=rope_theta,
                            rope_local_base_freq=rope_local, rope_scaling_factor=factor)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{where}: {e}") from e


def config_to_hf(cfg, dtype: torch.dtype) -> dict:
    """Gemma3Config -> a text-only config.json that transformers 4.5x (v4 keys) and 5.x (layer_types) both read.

    rope_parameters (v5 form) is deliberately NOT written: 4.57 ignores it, and 5.x converts the legacy
    rope_theta / rope_local_base_freq / rope_scaling keys itself (tested by tests/test_hf.py)."""
    out = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text"}
    out.update({k: getattr(cfg, k) for k in _PLAIN})
    out.update(layer_types=list(cfg.layer_types), rope_theta=cfg.rope_theta,
               rope_local_base_freq=cfg.rope_local_base_freq,
               rope_scaling=None if cfg.rope_scaling_factor == 1.0 else
               {"rope_type": "linear", "factor": cfg.rope_scaling_factor},
               hidden_activation="gelu_pytorch_tanh", attention_bias=False, attention_dropout=0.0,
               attn_logit_softcapping=None, tie_word_embeddings=True, use_cache=True,
               torch_dtype=str(dtype).removeprefix("torch."))
    p = cfg.sliding_window_pattern  # only for readers older than layer_types (4.50-4.52), and only if it is exact
    if cfg.layer_types == [SLIDING if (i + 1) % p != 0 else FULL for i in range(cfg.num_hidden_layers)]:
        out["sliding_window_pattern"] = p
    return out


# ----------------------------------------------------------------------------------------------------------------
# The key table: our parameter name -> checkpoint name after the prefix ({} = layer index)

KEY_TABLE = {
    "embed_tokens.weight": "embed_tokens.weight",
    "norm.weight": "norm.weight",
    "layers.{}.input_layernorm.weight": "layers.{}.input_layernorm.weight",
    "layers.{}.self_attn.q_proj.weight": "layers.{}.self_attn.q_proj.weight",
    "layers.{}.self_attn.k_proj.weight": "layers.{}.self_attn.k_proj.weight",
    "layers.{}.self_attn.v_proj.weight": "layers.{}.self_attn.v_proj.weight",
    "layers.{}.self_attn.o_proj.weight": "layers.{}.self_attn.o_proj.weight",
    "layers.{}.self_attn.q_norm.weight": "layers.{}.self_attn.q_norm.weight",
    "layers.{}.self_attn.k_norm.weight": "layers.{}.self_attn.k_norm.weight",
    "layers.{}.post_attention_layernorm.weight": "layers.{}.post_attention_layernorm.weight",
    "layers.{}.pre_feedforward_layernorm.weight": "layers.{}.pre_feedforward_layernorm.weight",
    "layers.{}.mlp.gate_proj.weight": "layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.up_proj.weight": "layers.{}.mlp.up_proj.weight",
    "layers.{}.mlp.down_proj.weight": "layers.{}.mlp.down_proj.weight",
    "layers.{}.post_feedforward_layernorm.weight": "layers.{}.post_feedforward_layernorm.weight",
}
# Where the text decoder lives: text-only Gemma3ForCausalLM; multimodal as saved (4.57 and 5.x); v5 in-memory naming.
PREFIXES = ("model.", "language_model.model.", "model.language_model.")
# Tensors of a multimodal checkpoint that a text decoder skips (matched as name prefixes).
SKIPPED = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
# A tied head some exporters write out anyway; accepted only if it equals the embeddings.
LM_HEADS = ("lm_head.weight", "language_model.lm_head.weight")


def key_table(cfg, prefix: str = "model.") -> dict[str, str]:
    """Expanded table {our name: checkpoint name} for every tensor of a model with this config."""
    out = {}
    for ours, theirs in KEY_TABLE.items():
        layers = range(cfg.num_hidden_layers) if "{}" in ours else [None]
        for i in layers:
            out[ours.format(i)] = prefix + theirs.format(i)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Load

def _weight_files(path: Path) -> dict[str, Path]:
    """{tensor name: file} for a single model.safetensors or a sharded index."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: path / f for name, f in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.exists():
                raise FileNotFoundError(f"{index} lists {f.name}, which is missing")
        return files
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def stored_float32(path, skip_modules=()) -> int:
    """Number of float32-stored tensors in an HF folder's weights (headers only: no tensor is read). Our exports store
    a tensor in the source model's dtype only where that is exact, so a fine-tune's changed weights are the float32
    ones (twice.checkpoint.export_hf); twice.precision's `auto` will not round them to bf16. skip_modules: module
    prefixes ("layers.0.self_attn.q_proj") whose weight is not counted (those a lora_delta restores exactly)."""
    path = Path(path).expanduser()
    skip = {p + m + ".weight" for p in PREFIXES for m in skip_modules}
    n = 0
    for file in sorted(set(_weight_files(path).values())):
        with safe_open(file, framework="pt") as f:
            n += sum(f.get_slice(k).get_dtype() == "F32" and k not in skip for k in f.keys())
    return n


DELTA_FILE, DELTA_META = "lora_delta.safetensors", "lora_delta.json"
DELTA_FORMAT = 1


def delta_meta(path) -> dict | None:
    """lora_delta.json of an HF folder ({"format", "base_dtype", "modules": {prefix: rank}}), None when absent."""
    f = Path(path).expanduser() / DELTA_META
    if not f.is_file():
        return None
    try:
        meta = json.loads(f.read_text())
    except ValueError as e:
        raise ValueError(f"{f}: not JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != DELTA_FORMAT or not isinstance(meta.get("modules"), dict):
        raise ValueError(f"{f}: expected {{\"format\": {DELTA_FORMAT}, \"base_dtype\", \"modules\": {{module: rank}}}}")
    return meta


def read_delta(path) -> tuple[dict, dict] | None:
    """-> ({prefix: (A [r, in], B [out, r])} fp32 CPU, meta) from lora_delta.safetensors/.json; None when absent.
    Strict: every module the JSON lists has both tensors with its rank, and the file has nothing else."""
    path = Path(path).expanduser()
    meta = delta_meta(path)
    if meta is None:
        return None
    file = path / DELTA_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path / DELTA_META} lists a delta but {file} is missing")
    tensors = load_file(str(file))
    want = {f"{m}.lora_{x}" for m in meta["modules"] for x in "AB"}
    if set(tensors) != want:
        raise KeyError(f"{file}: tensors do not match {DELTA_META}: missing {sorted(want - set(tensors))[:4]}, "
                       f"unexpected {sorted(set(tensors) - want)[:4]}")
    delta = {}
    for m, r in meta["modules"].items():
        A, B = tensors[f"{m}.lora_A"], tensors[f"{m}.lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise ValueError(f"{file}: {m}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} are not [r, in] / "
                             f"[out, r] with r={r} from {DELTA_META}")
        delta[m] = (A.float(), B.float())
    return delta, meta


def write_delta(folder: Path, delta: dict, base_dtype: torch.dtype) -> None:
    """lora_delta.safetensors + lora_delta.json into `folder` (save_pretrained's temp dir)."""
    tensors = {}
    for m, (A, B) in delta.items():
        tensors[f"{m}.lora_A"] = A.float().cpu().contiguous()
        tensors[f"{m}.lora_B"] = B.float().cpu().contiguous()
    save_file(tensors, str(folder / DELTA_FILE), metadata={"format": "pt"})
    meta = {"format": DELTA_FORMAT, "base_dtype": str(base_dtype).removeprefix("torch."),
            "note": "model.safetensors = base + lora_B @ lora_A per module (scale folded into lora_B, fp32)",
            "modules": {m: int(A.shape[0]) for m, (A, _) in delta.items()}}
    (folder / DELTA_META).write_text(json.dumps(meta, indent=2) + "\n")


def from_pretrained(cls, path, dtype=torch.float32, device="cpu", delta: str = "auto"):
    """HF folder -> a `cls` (Gemma3) in `dtype` on `device`, eval mode. Strict: every tensor accounted for, by name.

    A folder with a lora_delta (a merged fine-tune, see the module docstring), by `delta`:
      "adapters": each delta module's weight is loaded as the recovered base, (merged - B @ A) in `dtype`, and the
                  delta stays a frozen fp32 adapter applied unmerged (twice.lora.attach_delta): bf16 compute without
                  rounding the fine-tune away. model.lora_delta_adapters = True.
      "merged":   the stored (merged) weights as they are; model.lora_delta = {prefix: (A, B)} rides along so an
                  export of a model trained on top records the total delta (twice.checkpoint.export_hf).
      "auto":     "adapters" when `dtype` is bf16/fp16, else "merged" (fp32 holds the merged weights exactly).
    Training on it: "adapters" (any dtype: the base is rounded to lora_delta.json's base_dtype first, so an fp32
    load holds the exact bf16 base) lets apply_lora stack a trainable LoRA on the frozen delta (bf16 compute);
    "merged" is the fp32 path."""
    if delta not in ("auto", "adapters", "merged"):
        raise ValueError(f"from_pretrained: delta={delta!r}, expected auto | adapters | merged")
    path = Path(path).expanduser()
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{path}: no config.json")
    config = config_from_hf(json.loads(cfg_file.read_text()), cls.config_class, str(cfg_file))
    files = _weight_files(path)

    prefix = next((p for p in PREFIXES if p + "embed_tokens.weight" in files), None)
    if prefix is None:
        raise KeyError(f"{path}: no embedding tensor under any known prefix {PREFIXES} "
                       f"(first names: {sorted(files)[:5]})")
    table = key_table(config, prefix)  # ours -> theirs
    wanted = set(table.values())
    missing = sorted(wanted - files.keys())
    unexpected = sorted(n for n in files if n not in wanted and n not in LM_HEADS and not n.startswith(SKIPPED))
    if missing or unexpected:
        raise KeyError(f"{path}: checkpoint does not match the Gemma-3 key table for {config.num_hidden_layers} "
                       f"layers; missing: {missing[:20]}{' ...' if len(missing) > 20 else ''}; "
                       f"unexpected: {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")

    found = read_delta(path)
    if delta == "auto":
        delta = "adapters" if dtype in (torch.bfloat16, torch.float16) else "merged"
    adapters = found[0] if found and delta == "adapters" else {}
    base_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(
        found[1].get("base_dtype") if found else None, dtype)
    for m, (A, B) in (found[0] if found else {}).items():
        if m + ".weight" not in table:
            raise KeyError(f"{path / DELTA_META}: module {m!r} has no weight in the Gemma-3 key table")

    with torch.device("meta"):
        model = cls(config)
    expected_shapes = {n: p.shape for n, p in model.named_parameters()}
    for m, (A, B) in (found[0] if found else {}).items():
        if (B.shape[0], A.shape[1]) != tuple(expected_shapes[m + ".weight"]):
            raise ValueError(f"{path / DELTA_FILE}: {m}: B @ A is {(B.shape[0], A.shape[1])}, the weight is "
                             f"{tuple(expected_shapes[m + '.weight'])}")
    by_file: dict[Path, list[str]] = {}
    for ours, theirs in table.items():
        by_file.setdefault(files[theirs], []).append(ours)
    state, rounded = {}, [0, 0]  # fp32-stored values that change when loaded as bf16, of all fp32-stored values
    for file, names in by_file.items():
        with safe_open(file, framework="pt") as f:  # one tensor in memory at a time, converted, then kept
            for ours in names:
                t = f.get_tensor(table[ours])
                if t.shape != expected_shapes[ours]:
                    raise ValueError(f"{file.name}: {table[ours]} has shape {tuple(t.shape)}, expected "
                                     f"{tuple(expected_shapes[ours])} from config.json")
                if ours[: -len(".weight")] in adapters:
                    # The merged weight is M = fl(W0 + D) with D = delta_dense(A, B), the same CPU product as here,
                    # and W0 the bf16 base. M - D is W0 up to fp32 rounding (|err| <= a few 2^-24 |M|), far below
                    # half of W0's bf16 spacing (2^-9 |W0|) unless |W0| < ~2^-15 |D| (W0 nearly 0: then fp32 M no
                    # longer holds W0's bits at all), so the cast to bf16 lands exactly on W0 (tests/
                    # test_lora_delta.py checks it on the real 270m). Rounded entries are counted below.
                    # through the base's own dtype first: an fp32 load (FSDP2's masters) gets the same exact base
                    state[ours] = (t.float() - delta_dense(*adapters[ours[: -len(".weight")]])).to(
                        base_dtype).to(device, dtype)
                    continue   # not a rounding of stored values: the stored value is base + delta, both kept
                state[ours] = t.to(device=device, dtype=dtype)
                if t.dtype == torch.float32 and dtype in (torch.bfloat16, torch.float16):
                    low, flat = state[ours].reshape(-1), t.reshape(-1)
                    for i in range(0, flat.numel(), 1 << 22):  # in chunks: no second full-size fp32 copy at load
                        rounded[0] += int((low[i:i + (1 << 22)].to("cpu", torch.float32)
                                           != flat[i:i + (1 << 22)]).sum())
                    rounded[1] += t.numel()
    if rounded[0]:  # e.g. a merged fine-tune exported in fp32: updates below bf16's resolution are rounded away
        print(f"WARNING: {path}: {rounded[0] / rounded[1]:.0%} of its float32 weights change when loaded as "
              f"{str(dtype).removeprefix('torch.')} (small fine-tuning updates may be rounded away; dtype: float32 "
              f"keeps them)", file=sys.stderr, flush=True)
    for head in (h for h in LM_HEADS if h in files):  # tied: must be the embedding, or logits would silently differ
        with safe_open(files[head], framework="pt") as f:
            t = f.get_tensor(head).to(device=device, dtype=dtype)
        if t.shape != state["embed_tokens.weight"].shape or not torch.equal(t, state["embed_tokens.weight"]):
            raise ValueError(f"{path}: {head} differs from the embeddings, but Gemma-3's LM head is tied")
        del t
    model.load_state_dict(state, strict=True, assign=True)
    for m, (A, B) in adapters.items():  # frozen fp32 adapters over the recovered base, applied unmerged
        parent, _, name = m.rpartition(".")
        holder = model.get_submodule(parent)
        setattr(holder, name, attach_delta(getattr(holder, name), A, B))
    model.lora_delta_adapters = bool(adapters)
    if found:
        model.lora_delta_base_dtype = found[1].get("base_dtype")
    if found and not adapters:
        model.lora_delta = found[0]
    model.source_dir = str(path)  # save_pretrained copies tokenizer.model from here by default
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# Save

def _shards(table: dict[str, str], state: dict[str, torch.Tensor], max_shard_bytes: int) -> list[dict]:
    """Greedy split in key-table order; a tensor bigger than the limit gets a shard of its own."""
    shards, cur, size = [], {}, 0
    for ours, theirs in table.items():
        t = state[ours]
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[theirs] = t
        size += nbytes
    if cur:
        shards.append(cur)
    return shards


def save_pretrained(model, path, max_shard_bytes: int = 2_000_000_000, tokenizer_path=None,
                    state_dict: dict | None = None, lora_delta: dict | None = None,
                    base_dtype: torch.dtype | None = None):
    """Write an HF folder (config.json, generation_config.json, safetensors [+ index], tokenizer.model).

    tokenizer_path: a tokenizer.model file or a folder holding one; default: the folder the model was loaded from
    (if it has one). state_dict: full (unsharded) tensors to write instead of model.state_dict(), e.g. what a
    sharded trainer gathered on rank 0. lora_delta {prefix: (A, B)} + base_dtype: the delta merged into these
    weights (lora_delta.safetensors/.json; twice.checkpoint.export_hf). The folder is assembled in a temp dir and
    renamed into place."""
    path = Path(path)
    cfg = model.config
    state = model.state_dict() if state_dict is None else state_dict
    state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    table = key_table(cfg)
    if set(state) != set(table):
        raise KeyError(f"model state does not match the key table: extra {sorted(set(state) - set(table))}, "
                       f"missing {sorted(set(table) - set(state))}")
    dtype = state["embed_tokens.weight"].dtype

    if tokenizer_path is None and getattr(model, "source_dir", None):
        tokenizer_path = Path(model.source_dir) / "tokenizer.model"
        tokenizer_path = tokenizer_path if tokenizer_path.exists() else None
    if tokenizer_path is not None:
        tokenizer_path = Path(tokenizer_path)
        tokenizer_path = tokenizer_path / "tokenizer.model" if tokenizer_path.is_dir() else tokenizer_path
        if not tokenizer_path.exists():
            raise FileNotFoundError(f"tokenizer_path: {tokenizer_path} does not exist")

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config_to_hf(cfg, dtype), indent=2) + "\n")
        eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
        eos = eos + [106] * (106 not in eos)  # stop on <end_of_turn> too (chat models end turns with it)
        gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": eos, "pad_token_id": cfg.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        shards = _shards(table, state, max_shard_bytes)
        meta = {"format": "pt"}
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata=meta)
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / name), metadata=meta)
                weight_map.update({k: name for k in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        if lora_delta:
            write_delta(tmp, lora_delta, base_dtype or dtype)
        _move_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def _move_into_place(tmp: Path, path: Path):
    """A new folder is renamed in one step. An existing one (a run dir may hold other files) gets each file
    os.replace'd, and weight files of an earlier save that this save does not rewrite are removed, so stale
    shards can never be mixed with new ones."""
    if not path.exists():
        os.replace(tmp, path)
        return
    new = {p.name for p in tmp.iterdir()}
    stale = [path / f for f in ("model.safetensors.index.json", DELTA_FILE, DELTA_META)]  # a delta of an earlier
    for old in list(path.glob("model*.safetensors")) + [f for f in stale if f.exists()]:  # save must not outlive it
        if old.name not in new:
            old.unlink()
    for name in sorted(new, key=lambda n: n == "config.json"):  # config.json last: it marks the folder complete
        os.replace(tmp / name, path / name)


