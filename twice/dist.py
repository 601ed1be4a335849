"""Distributed runtime: torchrun init/cleanup, rank helpers, and FSDP2 wrapping (the only place that wraps).

    python train_sft.py cfg.yaml                                  # one process: world size 1, same code path
    torchrun --nproc_per_node 8 train_grpo.py cfg.yaml           # 8 ranks: nccl on GPU, gloo on CPU

The model files contain no distributed code. A training script does, in this order:

    info = init_distributed()                    # reads the torchrun env (RANK, LOCAL_RANK, WORLD_SIZE)
    seed_everything(cfg.seed)                    # SAME seed on every rank: FSDP2 never syncs initial weights
    model = Gemma3.from_pretrained(...); apply_lora(model)   # LoRA before wrapping
    model = wrap_fsdp(model)                     # fully_shard per block, then the root
    seed_everything(cfg.seed + info.rank)        # per-rank streams (dropout, data order) from here on
    ...
    cleanup()

Gradient semantics under FSDP2: the reduce-scatter AVERAGES gradients over ranks (reduce_dtype fp32). A loss that
is a mean over each rank's equal-sized share therefore gives the gradient of the global mean; a loss normalised by
a global token count (sum over ranks and micro-batches) must be multiplied by world_size to undo that average.
Without a process group (plain `python script.py` on CPU) nothing is wrapped and all collectives are no-ops.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    rank: int             # global rank, 0..world_size-1
    local_rank: int       # rank on this machine (= the CUDA device index)
    world_size: int       # number of processes
    device: torch.device  # cuda:<local_rank> on GPU machines, else cpu
    is_main: bool         # rank == 0: the one process that logs and writes files


def init_distributed(timeout_min: float = 30.0) -> DistInfo:
    """Read the torchrun environment and start the process group (nccl on CUDA, gloo on CPU).

    Without torchrun's env this is one process: on CPU no process group is made (collectives below are no-ops and
    wrap_fsdp returns the model as is); on a GPU a one-rank nccl group is made from an in-memory store so that
    FSDP2's MixedPrecisionPolicy (bf16 compute, fp32 master weights) applies exactly as with N ranks."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda and local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"init_distributed: local rank {local_rank} but this node has {torch.cuda.device_count()}"
                               " GPU(s): use --nproc_per_node <= the GPU count, or CUDA_VISIBLE_DEVICES= for gloo on CPU")
        if cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            kw = {"device_id": device} if cuda else {}
            dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_min), **kw)
        return DistInfo(rank, local_rank, world_size, device, rank == 0)
    if cuda:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1, device_id=device)
        return DistInfo(0, 0, 1, device, True)
    return DistInfo(0, 0, 1, torch.device("cpu"), True)


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", 0))


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (every rank would otherwise print the same line N times)."""
    if get_rank() == 0:
        print(*args, **kwargs)


def barrier() -> None:
    if is_distributed() and dist.get_world_size() > 1:
        dist.barrier()


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    """In place over ranks, wherever `t` lives: nccl reduces only CUDA tensors and gloo only CPU ones, so a tensor on
    the other device goes through a copy on the backend's device. Identity at world size 1."""
    if not (is_distributed() and dist.get_world_size() > 1):
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if t.device == dev:
        dist.all_reduce(t, op=op)
    else:
        buf = t.to(dev)
        dist.all_reduce(buf, op=op)
        t.copy_(buf)
    return t


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns `t` (any device)."""
    return _all_reduce(t, dist.ReduceOp.SUM)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """In-place max over ranks; returns `t` (any device)."""
    return _all_reduce(t, dist.ReduceOp.MAX)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """In-place mean over ranks (sum / world_size); returns `t`."""
    return _all_reduce(t, dist.ReduceOp.SUM).div_(get_world_size())


def seed_everything(seed: int) -> None:
    """Seed python `random`, numpy's global stream and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------------------------------------------
# FSDP2

def _fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_fsdp(model: nn.Module) -> bool:
    return len(_fsdp_modules(model)) > 0


def wrap_fsdp(model: nn.Module, mixed_precision: bool | None = None, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: `fully_shard` each transformer block (`model.layers[i]`), then the root.

    The root unit holds what is left: embed_tokens and the final norm. They must stay together in the root because
    the LM head is tied to embed_tokens and used inside the root forward (logits / fused log-probs), so the embedding
    is unsharded exactly while the root forward runs. LoRA must be applied BEFORE this (frozen base weights and
    trainable adapters in one unit is fine in FSDP2: only params with requires_grad get gradients).

    mixed_precision (default: on when the parameters are on CUDA): params all-gathered in bf16 for compute, gradients
    reduced in fp32, the sharded fp32 params are the optimizer's master weights (so build/load the model in fp32).
    On CPU: fp32 throughout.
    reshard_after_forward=True frees each block's gathered params after its forward (re-gathered in backward): the
    ZeRO-3 memory profile. False keeps them until backward (ZeRO-2: less communication, more memory).
    Without a process group (one CPU process) the model is returned unchanged."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    on_cuda = next(model.parameters()).device.type == "cuda"
    if mixed_precision is None:
        mixed_precision = on_cuda
    if not is_distributed():
        if mixed_precision:
            raise RuntimeError("wrap_fsdp(mixed_precision=True) needs a process group: call init_distributed() first")
        return model
    if not hasattr(model, "layers") or not isinstance(model.layers, nn.ModuleList):
        raise TypeError(f"wrap_fsdp expects a model with a `.layers` nn.ModuleList, got {type(model).__name__}")
    if mixed_precision and any(p.dtype != torch.float32 for p in model.parameters()):
        print0("WARNING: wrap_fsdp(mixed_precision=True) on non-fp32 parameters: the optimizer's master weights "
               "will not be fp32 (load the model with dtype=torch.float32; FSDP2 casts to bf16 for compute)")
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
          else MixedPrecisionPolicy())
    for block in model.layers:
        fully_shard(block, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        block._twice_reshard_after_forward = reshard_after_forward  # what `unsharded` restores on exit
    # root: FSDP2's default (None) keeps its params after forward, since backward needs them at once
    fully_shard(model, mp_policy=mp)
    return model


def set_grad_sync(model: nn.Module, enabled: bool) -> None:
    """Gradient accumulation under FSDP2: with enabled=False the backward keeps unsharded gradients and skips the
    reduce-scatter (less communication, more memory); the last micro-batch must run with enabled=True. The default
    (always sync) is the memory-lean choice and needs no call at all. No-op without FSDP."""
    for m in _fsdp_modules(model)[:1]:  # the root; recurse=True reaches every unit
        m.set_requires_gradient_sync(enabled, recurse=True)


@contextlib.contextmanager
def unsharded(model: nn.Module):
    """Gather every FSDP2 unit's full parameters ONCE for a whole generation rollout, instead of an all-gather per
    block per decode step; reshard on exit. Entering is a collective (every rank must enter); inside, no collectives
    run, so ranks may run different numbers of forwards (different stop times). No-op without FSDP. For no-grad use
    (generation, reference log-probs) only.

        with torch.no_grad(), unsharded(model):
            result = engine.generate(...)
    """
    mods = _fsdp_modules(model)
    if not mods:
        yield model
        return
    blocks = mods[1:]  # model.modules() visits the root first; the root keeps its params after forward anyway
    try:
        for b in blocks:  # otherwise each block's post-forward hook would free what we just gathered
            b.set_reshard_after_forward(False, recurse=False)
        for m in mods:
            m.unshard()
        yield model
    finally:
        for b in blocks:
            b.set_reshard_after_forward(getattr(b, "_twice_reshard_after_forward", True), recurse=False)
        for m in mods:
            m.reshard()


def full_state_dict(model: nn.Module, trainable_only: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) state dict as CPU tensors, for export or a checkpoint.

    Under FSDP2 this is a collective (every rank must call it); rank 0 receives the full tensors, the other ranks get
    {} so only one host holds a CPU copy. Without FSDP it is the module's own state dict, detached, on CPU.
    trainable_only keeps just the parameters with requires_grad (the LoRA adapters) and drops frozen ones."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    if is_fsdp(model):
        opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
        return get_model_state_dict(model, options=opts)
    keep = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if keep is None or k in keep}


def load_full_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Inverse of full_state_dict. Under FSDP2 rank 0 passes the full tensors and the other ranks pass {} (they are
    broadcast from rank 0 and each rank keeps its shard). strict=True: missing or unexpected keys are errors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    if is_fsdp(model):
        opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        set_model_state_dict(model, state_dict, options=opts)
        return
    # strict=False is only for partial (trainable-only) loads: keys may be missing, but a stray key is still an error
    unexpected = model.load_state_dict(state_dict, strict=strict).unexpected_keys
    if unexpected:
        raise KeyError(f"state dict has keys the model lacks: {sorted(unexpected)[:8]}")
