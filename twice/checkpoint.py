"""Training-state checkpoints (atomic, keep last N, exact resume) and the final HF-format export.

    # in a training script, after building model (+LoRA, +FSDP2) and optimizer, before the loop:
    state = load_latest(run_dir / "ckpt", model, opt, extra_generators={"rollout": rollout_gen})
    start = state["step"] if state else 0;  data_pos = state["data"] if state else {...}
    ...
    save_checkpoint(run_dir / "ckpt", step, model, opt, data=data_pos, config=cfg,
                    extra_generators={"rollout": rollout_gen}, keep_last=3)
    ...
    export_hf(model, run_dir / "hf")          # LoRA merged in, original key names, save_pretrained folder

On disk (one directory per saved step; a directory exists only once it is complete):

    ckpt/step_000200/model.safetensors   full (unsharded) weights, original key names; with trainable_only=True just
                                         the parameters that train (LoRA adapters): the frozen base is re-read from
                                         the pretrained folder by the script
    ckpt/step_000200/optim.pt            full AdamW state keyed by parameter name (torch.save; loaded weights_only=True)
    ckpt/step_000200/rng_rank{r}.pt      this rank's RNG streams: python random, numpy, torch CPU, CUDA (if any), and
                                         the caller's named torch.Generators (e.g. the rollout sampler's)
    ckpt/step_000200/meta.json           step (optimizer steps completed), world_size, data position (the caller's
                                         JSON dict), resolved config, file format version, and the size + sha256 of
                                         every other file in the directory; written last
    ckpt/latest                          text "step_000200": updated (atomically) after the rename

Why full tensors gathered on rank 0 rather than DCP's sharded format: the weights stay a plain safetensors file
(inspectable, loadable by anything, the same file at any world size) and the optimizer state is keyed by parameter
name, so a run can resume on a different number of ranks (all but the per-rank RNG streams, which are then
re-seeded by the caller: resume is bit-exact only at the same world size). It works the same on gloo/CPU and
nccl/GPU. The cost is one host-memory copy of the model + optimizer on rank 0 at save time (fine up to a few B
params; for 27B full fine-tuning switch to torch.distributed.checkpoint's sharded save). Multi-node runs need
`ckpt_dir` on a filesystem every rank sees (each rank writes its own RNG file).

Atomicity: everything is written into `.tmp_step_XXXXXX/`, each file fsynced, then the directory is renamed to
`step_XXXXXX` (os.replace is atomic), then `latest` is replaced. A kill at any point leaves either the previous
complete checkpoint or the new one, never a half-written one that looks complete; stale `.tmp_*` are removed on
the next save. On load the newest complete `step_*` wins (the pointer is for people and tools; it can only lag).

Verification: what atomicity cannot catch (a disk that fills, a copy cut short, bit rot) is caught on load: every
file is checked against the size and sha256 that meta.json recorded. `load_latest` logs which file of which
checkpoint is bad and falls back to the newest intact one; when none is intact, or `load_checkpoint` is given a bad
one, a CheckpointError (a ConfigError: scripts print it as one line) names the file. Hashing reads each file once
(about 1 s per GB).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed
import torch.nn as nn
from safetensors.torch import load_file, save_file

from twice import dist
from twice.config import InputError
from twice.fileio import chmod_like_umask, write_atomic
from twice.lora import (cast_if_exact, concat_deltas, delta_dense, frozen_deltas, is_lora_key, lora_delta,
                        lora_modules)

FORMAT_VERSION = 1
STEP_RE = re.compile(r"^step_(\d{6,})$")


class CheckpointError(InputError):
    """A checkpoint that cannot be used (missing, truncated or altered file); the message names the file."""


# ----------------------------------------------------------------------------------------------------------------
# small file helpers

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(ckpt_dir) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt_dir.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_dir) -> Path | None:
    dirs = [p for p in step_dirs(ckpt_dir) if (p / "meta.json").is_file()]
    return dirs[-1] if dirs else None


def file_digest(path: Path) -> dict:
    """{"bytes", "sha256"} of one file, read in 16 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return {"bytes": path.stat().st_size, "sha256": h.hexdigest()}


def checkpoint_problem(path) -> str | None:
    """Why checkpoint directory `path` cannot be loaded ("<file>: <what>"), or None when every file matches the size
    and sha256 in its meta.json. Checkpoints written before sizes were recorded are checked for presence only."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        return "meta.json: missing (an incomplete save)"
    except (OSError, ValueError) as e:
        return f"meta.json: unreadable ({type(e).__name__}: {e})"
    if meta.get("format_version") != FORMAT_VERSION:
        return f"meta.json: format_version {meta.get('format_version')} != {FORMAT_VERSION}"
    files = meta.get("files")
    if files is None:  # older checkpoints: no record to check against
        return None if (path / "model.safetensors").is_file() else "model.safetensors: missing"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name}: missing"
        size = f.stat().st_size
        if size != want["bytes"]:
            return f"{name}: {size} bytes, meta.json recorded {want['bytes']} (truncated or overwritten)"
        if file_digest(f)["sha256"] != want["sha256"]:
            return f"{name}: sha256 differs from meta.json's (the file was altered or corrupted)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# RNG streams

def rng_state(extra_generators: dict[str, torch.Generator] | None = None) -> dict:
    """Every RNG stream of this process, as types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state()  # ('MT19937', uint32[624], pos, has_gauss, cached_gaussian)
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in (extra_generators or {}).items()},
    }
    return state


def set_rng_state(state: dict, extra_generators: dict[str, torch.Generator] | None = None, where: str = "") -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    saved, wanted = set(state["generators"]), set(extra_generators or {})
    if saved != wanted:
        raise KeyError(f"{where}: checkpoint has generators {sorted(saved)}, the caller passed {sorted(wanted)}")
    for k, g in (extra_generators or {}).items():
        g.set_state(state["generators"][k])


def _to_tuple(x):  # random.setstate wants nested tuples; lists may come back from older pickles
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ----------------------------------------------------------------------------------------------------------------
# save / load

def _config_dict(config):
    """The resolved config as JSON data (Paths and other odd leaves become strings)."""
    if config is None:
        return None
    d = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    return json.loads(json.dumps(d, default=str))


def save_checkpoint(ckpt_dir, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | None, *,
                    data: dict | None = None, config=None, extra_generators: dict[str, torch.Generator] | None = None,
                    keep_last: int = 3, trainable_only: bool = False) -> Path:
    """Save the whole training state after `step` optimizer steps. Collective: every rank must call it (FSDP2
    gathers). Returns the checkpoint directory. `data` must be JSON-serialisable (checked before anything is
    written). keep_last <= 0 keeps every checkpoint."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    ckpt_dir = Path(ckpt_dir)
    rank, is_main = dist.get_rank(), dist.get_rank() == 0
    name = f"step_{step:06d}"
    final, tmp = ckpt_dir / name, ckpt_dir / f".tmp_{name}"
    meta = {"format_version": FORMAT_VERSION, "step": int(step), "world_size": dist.get_world_size(),
            "trainable_only": bool(trainable_only), "data": data or {}, "config": _config_dict(config),
            "generators": sorted(extra_generators or {}), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__}
    json.dumps(meta)  # fails here, before any write, if data/config is not JSON-able

    if is_main:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    dist.barrier()

    # collectives first (every rank), files after
    model_sd = dist.full_state_dict(model, trainable_only=trainable_only)  # rank 0: full CPU tensors; others {}
    optim_sd = None
    if optimizer is not None:
        optim_sd = get_optimizer_state_dict(model, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        # safetensors refuses shared/non-contiguous storage: give it plain contiguous copies
        tensors = {k: v.contiguous().clone() for k, v in model_sd.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"step": str(step)})
        if optim_sd is not None:
            torch.save(optim_sd, tmp / "optim.pt")
    torch.save(rng_state(extra_generators), tmp / f"rng_rank{rank}.pt")
    mine = [f"rng_rank{rank}.pt"] + (["model.safetensors"] + (["optim.pt"] if optim_sd is not None else [])
                                     if is_main else [])
    for f in mine:  # each rank makes its own files durable before the rename makes them visible
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    dist.barrier()

    if is_main:
        # sizes and hashes of every file (all ranks' RNG files are in place after the barrier) -> verified on load
        meta["files"] = {f.name: file_digest(f) for f in sorted(tmp.iterdir())}
        write_atomic(tmp / "meta.json", json.dumps(meta, indent=1))  # last file: its presence marks it complete
        chmod_like_umask(tmp)  # safetensors writes 0600: readable like any other output
        _fsync_dir(tmp)
        if final.exists():  # re-saving a step (e.g. after a resume): move the old one aside first
            old = ckpt_dir / f".old_{name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        write_atomic(ckpt_dir / "latest", name + "\n")
        _fsync_dir(ckpt_dir)
        for stale in ckpt_dir.glob(".tmp_step_*"):  # crashed saves from before
            shutil.rmtree(stale, ignore_errors=True)
        if keep_last > 0:
            for old in step_dirs(ckpt_dir)[:-keep_last]:
                shutil.rmtree(old)
    dist.barrier()
    return final


def load_checkpoint(path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    extra_generators: dict[str, torch.Generator] | None = None, verify: bool = True) -> dict:
    """Restore model, optimizer and this rank's RNG streams from one checkpoint directory. Collective. Returns the
    meta dict: {"step", "data", "config", "world_size", "path", ...}. Files are verified against meta.json first
    (CheckpointError naming the bad file); keys are checked strictly."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    path = Path(path)
    if verify:
        why = checkpoint_problem(path) if dist.get_rank() == 0 else None
        if dist.get_world_size() > 1:  # one verdict for every rank (rank 0 read the files)
            box = [why]
            torch.distributed.broadcast_object_list(box, src=0)
            why = box[0]
        if why:
            raise CheckpointError(f"checkpoint {path / why}")
    meta = json.loads((path / "meta.json").read_text())
    rank, is_main, fsdp = dist.get_rank(), dist.get_rank() == 0, dist.is_fsdp(model)
    trainable_only = meta["trainable_only"]

    # ---- model: rank 0 reads; under FSDP2 the tensors are broadcast and each rank keeps its shard
    sd, err = {}, None
    if is_main or not fsdp:
        sd = load_file(str(path / "model.safetensors"))
        own = set(model.state_dict().keys())
        if trainable_only:
            own = {n for n, p in model.named_parameters() if p.requires_grad}
        missing, unexpected = sorted(own - set(sd)), sorted(set(sd) - own)
        if missing or unexpected:
            err = (f"{path / 'model.safetensors'}: keys do not match the model (trainable_only={trainable_only}): "
                   f"missing {missing[:6]}, unexpected {unexpected[:6]}")
    if fsdp:  # every rank raises the same error instead of the others waiting in the broadcast until timeout
        box = [err]
        torch.distributed.broadcast_object_list(box, src=0)
        err = box[0]
    if err:
        raise KeyError(err)
    dist.load_full_state_dict(model, sd, strict=not trainable_only)

    # ---- optimizer: keyed by parameter name, so it does not depend on the sharding
    if optimizer is not None:
        if not (path / "optim.pt").is_file():
            raise FileNotFoundError(f"{path}: no optim.pt (saved without an optimizer)")
        if fsdp:
            osd = torch.load(path / "optim.pt", weights_only=True) if is_main else {}
            set_optimizer_state_dict(model, optimizer, osd,
                                     options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        else:
            osd = torch.load(path / "optim.pt", weights_only=True)
            set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions())

    # ---- RNG: only meaningful at the same world size (rank r's streams)
    if meta["world_size"] == dist.get_world_size():
        rng = torch.load(path / f"rng_rank{rank}.pt", weights_only=True)
        set_rng_state(rng, extra_generators, where=str(path / f"rng_rank{rank}.pt"))
    else:
        dist.print0(f"WARNING: {path} was saved with world_size={meta['world_size']}, resuming with "
                    f"{dist.get_world_size()}: RNG streams not restored (resume is not bit-exact)")
    dist.barrier()
    meta["path"] = str(path)
    return meta


def load_latest(ckpt_dir, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                extra_generators: dict[str, torch.Generator] | None = None) -> dict | None:
    """Resume from the newest intact checkpoint in ckpt_dir; None when there is none (a fresh run). A checkpoint whose
    files do not match its meta.json is reported (which file, why) and skipped for the one before it; CheckpointError
    when checkpoints exist but none is intact."""
    found = [p for p in step_dirs(ckpt_dir) if (p / "meta.json").is_file()]
    if not found:
        return None
    path, bad = None, []
    if dist.get_rank() == 0:
        for p in reversed(found):
            why = checkpoint_problem(p)
            if why is None:
                path = p
                break
            bad.append(f"{p / why}")
            print(f"WARNING: checkpoint {p / why}: skipped, trying the previous checkpoint", file=sys.stderr,
                  flush=True)
    if dist.get_world_size() > 1:  # rank 0 read the files; every rank loads the same one
        box = [path, bad]
        torch.distributed.broadcast_object_list(box, src=0)
        path, bad = box
    if path is None:
        raise CheckpointError(f"{ckpt_dir}: no intact checkpoint ({len(found)} found; newest: {bad[0]}); delete "
                              f"the directory to start over")
    pointer = Path(ckpt_dir) / "latest"
    if bad:
        dist.print0(f"resuming from {path.name}, the newest intact checkpoint ({len(bad)} newer one(s) skipped)",
                    file=sys.stderr, flush=True)
    elif pointer.is_file() and pointer.read_text().strip() != path.name:
        dist.print0(f"note: {pointer} says {pointer.read_text().strip()!r}, newest complete is {path.name}: "
                    f"using {path.name}")
    return load_checkpoint(path, model, optimizer, extra_generators, verify=False)


def rewrite_metrics(path: Path, upto_step: int) -> None:
    """On resume drop the JSONL lines logged after the checkpoint's step (a killed run may have logged further;
    those steps are redone). Rank 0 only."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln).get("step", 0) <= upto_step:
                keep.append(ln)
        except ValueError:  # a line torn by the kill: dropped (its step is redone anyway)
            print(f"note: {path}: dropping a torn line {ln[:60]!r}", file=sys.stderr)
    write_atomic(path, "".join(ln + "\n" for ln in keep))


# ----------------------------------------------------------------------------------------------------------------
# HF export

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def source_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype recorded in config.json of the folder `model` was loaded from (None when unknown)."""
    src = getattr(model, "source_dir", None)
    try:
        return DTYPES.get(json.loads((Path(src) / "config.json").read_text()).get("torch_dtype")) if src else None
    except (OSError, ValueError):
        return None


def export_hf(model: nn.Module, out_dir, dtype: torch.dtype | None = None, **save_kwargs) -> Path | None:
    """Write an HF-format folder (Gemma3.save_pretrained, which assembles it in a temp dir and renames it) with any
    LoRA adapters merged in and the original key names. dtype casts the floating weights; None = the model's own
    dtype: the `torch_dtype` of the folder it was loaded from (bf16 for Google's Gemma-3 releases and our converted
    270m) for every tensor that cast leaves exact, fp32 for the others (what training changed below bf16's
    resolution), else its parameters' dtype.
    With LoRA adapters (and dtype None or float32) the folder also gets the low-rank delta that was merged
    (lora_delta.safetensors/.json, twice/hf.py), so a bf16 load recovers the exact bf16 base and applies the delta
    unmerged instead of computing the whole model in fp32. When the model was loaded from a folder that already
    carried a delta (GRPO's LoRA trained on SFT's final/: hf.from_pretrained(delta="merged") leaves it in
    model.lora_delta), the delta written is both, concatenated (rank r1 + r2): always the total relative to the base.
    The same when the new LoRA was stacked on the frozen delta (a delta="adapters" load, lora.stack_on_delta): the
    weights are then the base itself and the frozen delta sits in the modules' buffers (lora.frozen_deltas).
    Collective under FSDP2 (the gather); rank 0 builds a plain CPU copy and writes. save_kwargs go to
    save_pretrained (e.g. tokenizer_path). Returns out_dir on rank 0, None elsewhere."""
    from twice.gemma3 import Gemma3

    scales = {m.scale for m in lora_modules(model)}
    if len(scales) > 1:
        raise ValueError(f"export_hf: adapters with different scales {sorted(scales)}")
    sd = dist.full_state_dict(model)  # rank 0: full CPU tensors
    if dist.get_rank() == 0:
        src = source_dtype(model)
        prev = getattr(model, "lora_delta", None) or {}   # already inside the loaded (merged) weights
        stacked = frozen_deltas(model)   # a LoRA stacked on a frozen delta: the weights hold the bare base
        new = lora_delta(sd, scales.pop()) if scales else {}
        if stacked:
            new = concat_deltas(stacked, new)
        total = concat_deltas(prev, new) if new and dtype in (None, torch.float32) else {}
        if total:   # base + delta, per module, with the SAME product a bf16 load subtracts (lora.delta_dense)
            base_dtype = DTYPES.get(getattr(model, "lora_delta_base_dtype", "")) or src or sd[
                "embed_tokens.weight"].dtype
            sd = {k: v for k, v in sd.items() if not is_lora_key(k)}
            for m, (A, B) in total.items():
                W = sd[m + ".weight"].float()
                if m in prev:   # the loaded weight is base + previous delta: take the base back out (exact, hf.py)
                    W = (W - delta_dense(*prev[m])).to(base_dtype).float()
                sd[m + ".weight"] = W + delta_dense(A, B)
            save_kwargs.update(lora_delta=total, base_dtype=base_dtype)
        elif new:
            sd = {k: v for k, v in sd.items() if not is_lora_key(k)}
            for m, (A, B) in new.items():
                sd[m + ".weight"] = sd[m + ".weight"].float() + delta_dense(A, B)
        if dtype is not None:   # asked for: every floating weight in it
            sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
        elif src is not None:   # the source's dtype wherever that rounds nothing: a fine-tune's
            sd = {k: cast_if_exact(v, src) if v.is_floating_point() else v for k, v in sd.items()}
            # changed weights stay fp32 (an update below bf16's resolution would be lost; the delta file lets a
            # bf16 load keep it), the untouched ones (embedding, norms under LoRA) return to bf16
        else:   # merged weights back in the parameters' dtype where that is exact (merge_lora_state_dict's rule)
            own = {k: v.dtype for k, v in model.state_dict().items()}
            sd = {k: cast_if_exact(v, own[k]) if v.is_floating_point() and k in own else v for k, v in sd.items()}
        with torch.device("meta"):
            plain = Gemma3(model.config)
        plain.load_state_dict(sd, strict=True, assign=True)
        if getattr(model, "source_dir", None):  # save_pretrained copies the tokenizer from there
            plain.source_dir = model.source_dir
        plain.save_pretrained(Path(out_dir), **save_kwargs)
        chmod_like_umask(out_dir)  # mkdtemp + safetensors made it 0700 / 0600
    dist.barrier()
    return Path(out_dir) if dist.get_rank() == 0 else None
