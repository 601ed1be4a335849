"""Optimizer nouns: AdamW with decay/no-decay groups, the LR schedule as a plain function, gradient clipping.

    opt = build_adamw(model.named_parameters(), lr=cfg.lr, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    for step in range(start, total):
        ...backward over the micro-batches...
        gnorm = clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        set_lr(opt, lr_at(step, total, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio))
        opt.step(); opt.zero_grad(set_to_none=True)

Weight decay policy (decided here, once): parameters with ndim >= 2 decay (projection matrices, LoRA A/B, and the
embedding, which is also the tied LM head: nanoGPT and HF Trainer decay it too); parameters with ndim < 2 (RMSNorm
scales, biases) never decay, since pulling a Gemma (1 + w) norm scale or a bias towards 0 is not a regularizer of
model capacity. Frozen parameters (requires_grad False, e.g. the base weights under LoRA) are not given to AdamW at
all, so they carry no optimizer state. Under FSDP2 the parameters are fp32 DTensor shards: AdamW updates the
local shard elementwise, so its state is sharded too (ZeRO-3).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from twice.precision import MasterAdamW


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """[{params with ndim>=2, weight_decay}, {params with ndim<2, 0.0}], trainable params only."""
    decay, no_decay = [], []
    for name, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append((name, p))
    groups = [{"params": [p for _, p in g], "weight_decay": wd}
              for g, wd in ((decay, weight_decay), (no_decay, 0.0)) if g]
    if not groups:
        raise ValueError("build_adamw: no trainable parameters (all have requires_grad=False)")
    return groups


def build_adamw(named_params, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8):
    """torch AdamW (decoupled decay) over `named_params` = model.named_parameters() (or a module); MasterAdamW
    (twice/precision.py: fp32 master copies and fp32 moments) when some trainable parameter is not fp32.
    The initial lr is stored as each group's `initial_lr`; set_lr() overwrites `lr` every step."""
    if isinstance(named_params, nn.Module):
        named_params = named_params.named_parameters()
    groups = param_groups(named_params, weight_decay)
    # bf16 trainable parameters (a full fine-tune computing in bf16 in one process) get fp32 masters + fp32 state
    low = any(p.dtype != torch.float32 for g in groups for p in g["params"])
    cls = MasterAdamW if low else torch.optim.AdamW
    opt = cls(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
    for g in opt.param_groups:
        g["initial_lr"] = lr
    return opt


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr_ratio: float = 0.0) -> float:
    """LR for optimizer step `step` (0-based): linear warmup lr*(step+1)/warmup over the first `warmup_steps` steps,
    then cosine from lr down to lr*min_lr_ratio at step total_steps-1, and min thereafter."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    min_lr = lr * min_lr_ratio
    decay_steps = total_steps - 1 - warmup_steps
    # one step after warmup (decay_steps 0): that step runs at the configured lr, there is nothing to decay towards
    progress = 0.0 if decay_steps <= 0 else min(1.0, (step - warmup_steps) / decay_steps)  # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr


def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale gradients in place so their global L2 norm is at most max_norm; returns the pre-clip norm as a plain
    fp32 scalar tensor (the same value on every rank). max_norm <= 0 or inf: only measure.

    Under FSDP2 the grads are DTensor shards: torch.nn.utils.clip_grad_norm_ computes the per-shard norms and the
    DTensor reduction all-reduces them, so the norm is the norm of the FULL gradient (tests/test_dist.py checks it
    against one process); `.full_tensor()` then gives the replicated value."""
    grads_params = [p for p in params if p.grad is not None]
    if not grads_params:
        return torch.zeros(())
    limit = max_norm if max_norm and max_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(grads_params, limit, foreach=True)
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.detach().float()
