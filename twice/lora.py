"""LoRA (Hu et al. 2021): low-rank adapters on the attention and MLP projections; inject, switch off, merge, save.

    model = Gemma3.from_pretrained(path)
    apply_lora(model, r=8, alpha=16)          # the authors' setting: q/k/v/o/gate/up/down, base weights frozen
    model = wrap_fsdp(model)                  # LoRA BEFORE FSDP2; frozen + trainable params share a unit just fine
    ...
    with lora_disabled(model): ref_logp = ...   # GRPO reference policy = the adapter switched off
    ...
    sd = merge_lora_state_dict(full_state_dict(model), scale)   # export: original key names, plain Linear weights

y = x W^T + b + ((alpha / r) * dropout(x) A^T) B^T, with A [r, in] ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform with
a=sqrt(5), as nn.Linear and peft) and B [out, r] = 0, so the adapted model equals the base model at step 0.

On a fine-tuned folder loaded as bf16 base + frozen delta (Gemma3.from_pretrained(delta="adapters")), apply_lora
stacks the new adapter on the frozen one (stack_on_delta): y = x W^T + b + x dA^T dB^T + scale * x A^T B^T; only
A/B train, lora_disabled leaves the delta on, and export_hf writes base + [delta; new] (twice/checkpoint.py).

Key names: LoRALinear registers the base `weight`/`bias` under their ORIGINAL names (q_proj.weight) and adds
`lora_A`/`lora_B` beside them (q_proj.lora_A), so pretrained checkpoints load into a LoRA model unchanged and a
merged state dict is just the base key table.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def add_low_rank_(y, t, B):
    """y [..., out] += t [..., r] @ B^T [r, out] in one GEMM, in place -> y. Why in place: torch.addmm(y, ..) returns a
    new [..., out] tensor with y copied into it first (a 54 MB copy per MLP projection of a 25-prompt eval prefill) and
    y + t B^T allocates one more; the GEMM accumulating into y is bit-identical to addmm (eval predictions identical).
    Autograd allows it: F.linear saves its input and weight, never its output, and differentiates the addmm_ w.r.t.
    t and B."""
    return y.view(-1, y.shape[-1]).addmm_(t.reshape(-1, t.shape[-1]), B.t()).view(y.shape)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable rank-r update. Built from an existing Linear, sharing its parameters."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, generator=None):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        self.weight = base.weight  # [out, in], same Parameter object: no copy, same key name
        self.bias = base.bias      # [out] or None
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        dev = base.weight.device
        # A from a dedicated generator (CPU, then moved) so every rank builds the SAME adapter before FSDP2 shards it.
        # Adapters are fp32 whatever the base dtype (twice/precision.py): they are the trainable master weights
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.empty(r, self.in_features, dtype=torch.float32).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(device=dev))                                                  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=torch.float32))  # [out, r]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_enabled = True  # flipped by lora_disabled()
        # a frozen lora_delta under this trainable LoRA (stack_on_delta): fp32 buffers, non-persistent, so they are
        # no parameter (the optimizer and FSDP2's sharding never see them) and no state-dict key (checkpoints stay
        # LoRA-only; the folder's lora_delta.safetensors is their source)
        self.register_buffer("delta_A", None, persistent=False)   # [r_d, in]
        self.register_buffer("delta_B", None, persistent=False)   # [out, r_d], scale folded in

    def forward(self, x):  # x [..., in] -> [..., out]
        y = F.linear(x, self.weight, self.bias)
        if self.delta_A is not None:  # the frozen delta IS the model (SFT's fine-tune): lora_disabled keeps it
            y = self._add_frozen(x, y, self.delta_A, self.delta_B, "_delta_low")
        if not self.lora_enabled:
            return y
        if getattr(self, "frozen_delta", False):  # attach_delta: the adapter itself is the frozen delta (scale 1)
            return self._add_frozen(x, y, self.lora_A, self.lora_B, "_low")
        A, B = self.lora_A, self.lora_B
        if A.dtype != x.dtype:  # fp32 adapters on a bf16 base: compute in bf16, autograd hands back fp32 grads
            A, B = A.to(x.dtype), B.to(x.dtype)
        t = F.linear(self.dropout(x), A)  # [..., r]
        if self.scale != 1:  # scale the r-wide intermediate, not the [..., out] product (fwd and bwd: 2 full passes)
            t = t * self.scale
        return add_low_rank_(y, t, B)  # autograd differentiates it w.r.t. t and B

    def _add_frozen(self, x, y, A, B, cache: str):
        """y [..., out] + x A^T B^T for a frozen pair, in x's dtype: cast once and cached under `cache`, not per call
        (decode: 126 modules per step), then one addmm_ into y itself (add_low_rank_)."""
        if A.dtype != x.dtype:
            low = self.__dict__.get(cache)
            if low is None or low[0].dtype != x.dtype or low[0].device != A.device:
                with torch.inference_mode(False):  # first call may be a rollout: a normal tensor, usable in backward
                    low = self.__dict__[cache] = (A.detach().to(x.dtype), B.detach().to(x.dtype))
            A, B = low
        return add_low_rank_(y, F.linear(x, A), B)

    def extra_repr(self) -> str:
        d = "" if self.delta_A is None else f", frozen delta r={self.delta_A.shape[0]}"
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}{d}"


def stack_on_delta(frozen: LoRALinear, r: int, alpha: float, dropout: float = 0.0, generator=None) -> LoRALinear:
    """A trainable LoRALinear over a frozen-delta one (attach_delta, a bf16 + delta load): same base weight/bias,
    the frozen (A, B) moved to non-persistent fp32 buffers delta_A/delta_B, fresh trainable lora_A/lora_B. Forward:
    base(x) + x dA^T dB^T + scale * B(A x). Key names are a plain LoRA's (q_proj.weight, .lora_A, .lora_B)."""
    lo = LoRALinear(frozen, r, alpha, dropout, generator=generator)
    lo.delta_A = frozen.lora_A.detach().float()
    lo.delta_B = frozen.lora_B.detach().float()
    return lo


def frozen_deltas(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{module prefix: (delta_A, delta_B)} fp32 CPU of every stacked LoRALinear: the delta NOT inside the weights."""
    return {n: (m.delta_A.detach().float().cpu(), m.delta_B.detach().float().cpu()) for n, m in model.named_modules()
            if isinstance(m, LoRALinear) and m.delta_A is not None}


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16, targets=TARGETS, dropout: float = 0.0,
               seed: int = 0) -> nn.Module:
    """Replace every nn.Linear whose attribute name is in `targets` by a LoRALinear, in place; freeze EVERY other
    parameter (embeddings, norms too), so only lora_A / lora_B train. Returns the model. Call after the base
    weights are loaded (a meta-device model would lose A's init) and before wrap_fsdp."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    stray = [n for n, m in model.named_modules()
             if getattr(m, "frozen_delta", False) and n.rpartition(".")[2] not in targets]
    if stray:
        raise ValueError(f"apply_lora: {stray[0]} carries a frozen lora_delta but is not in targets {tuple(targets)} "
                         f"({len(stray)} such modules); load the folder with delta='merged' to train on it")
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and getattr(child, "frozen_delta", False):
                # a bf16 + delta load (Gemma3.from_pretrained(delta="adapters")): the new LoRA stacks on the frozen
                # delta, same A init (same generator order) as on a plain Linear
                setattr(parent, name, stack_on_delta(child, r, alpha, dropout, generator=gen))
                n += 1
            elif name in targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear(child, r, alpha, dropout, generator=gen))
                n += 1
    if n == 0:
        raise ValueError(f"apply_lora: no nn.Linear named any of {tuple(targets)} in {type(model).__name__}")
    return model


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextlib.contextmanager
def lora_disabled(model: nn.Module):
    """Run the base model: every adapter is bypassed inside the block (the GRPO reference policy, no second copy).
    A frozen lora_delta (attach_delta, or under a stacked LoRA) stays on: it is the model. Works under FSDP2 (it flips a plain attribute; parameters are untouched)."""
    mods = [m for m in lora_modules(model) if not getattr(m, "frozen_delta", False)]  # a loaded delta is the model
    prev = [m.lora_enabled for m in mods]
    try:
        for m in mods:
            m.lora_enabled = False
        yield model
    finally:
        for m, p in zip(mods, prev):
            m.lora_enabled = p


def is_lora_key(key: str) -> bool:
    return key.endswith(".lora_A") or key.endswith(".lora_B")


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors {'layers.0.self_attn.q_proj.lora_A': [r, in], ...}, full and on CPU.
    Under FSDP2 each DTensor is gathered (`full_tensor()`, a collective: every rank must call this)."""
    out = {}
    for k, v in model.state_dict().items():
        if is_lora_key(k):
            v = v.full_tensor() if hasattr(v, "full_tensor") else v
            out[k] = v.detach().cpu().clone()
    return out


def load_lora_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Load adapters saved by lora_state_dict, strictly: the key set must equal the model's adapter keys and the
    shapes must match. Under FSDP2 every rank passes the same full tensors and keeps its own shard."""
    own = {k: p for k, p in model.named_parameters() if is_lora_key(k)}  # the live parameters, written in place
    missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise KeyError(f"LoRA state dict mismatch: missing {missing[:6]}, unexpected {unexpected[:6]}")
    with torch.no_grad():
        for k, dst in own.items():
            src = state_dict[k]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"LoRA tensor {k}: shape {tuple(src.shape)} != model's {tuple(dst.shape)}")
            if hasattr(dst, "device_mesh"):  # DTensor: copy our shard of the full tensor
                from torch.distributed.tensor import distribute_tensor
                dst.copy_(distribute_tensor(src.to(dst.device, dst.dtype), dst.device_mesh, dst.placements))
            else:
                dst.copy_(src)


def cast_if_exact(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype` when that changes no value, else t unchanged (fp32). A merged adapter's update is often below
    bf16's resolution (2^-8 relative: measured, 77% of a 3-step SFT's changed entries rounded back to the base value),
    so a fine-tune is stored fp32 where it differs and in the base dtype where it does not."""
    low = t.to(dtype)
    return low if torch.equal(low.to(t.dtype), t) else t


def merge_lora_state_dict(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """Pure function on a FULL state dict (e.g. dist.full_state_dict(model) on rank 0): W' = W + (scale * B) @ A
    (computed in fp32 by delta_dense, the same product a lora_delta load subtracts; cast back to W's dtype only where
    exact, see cast_if_exact), adapter keys dropped. The result has exactly the base model's key names."""
    out = {k: v for k, v in state_dict.items() if not is_lora_key(k)}
    for prefix, (A, B) in lora_delta(state_dict, scale).items():
        W = out[prefix + ".weight"]
        out[prefix + ".weight"] = cast_if_exact(W.float() + delta_dense(A, B), W.dtype)
    return out


# ----------------------------------------------------------------------------------------------------------------
# The low-rank delta an export merged (lora_delta.safetensors beside the merged weights; twice/hf.py reads/writes it)
#   {module prefix "layers.0.self_attn.q_proj": (A [r, in] fp32, B [out, r] fp32 with the scale folded in)}
# so delta_dense(A, B) = B @ A is exactly what was added to that module's base weight.

def lora_delta(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The adapters of a full state dict as a delta: {prefix: (A, scale * B)}, fp32 on CPU."""
    out = {}
    for k in state_dict:
        if k.endswith(".lora_A"):
            prefix = k[: -len(".lora_A")]
            A, B = state_dict[k].float().cpu(), state_dict[prefix + ".lora_B"].float().cpu()  # [r, in], [out, r]
            out[prefix] = (A, B * scale)
    return out


def delta_dense(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """[out, in] fp32 = B @ A on the CPU. One function for the merge and for the base recovery at load, so both
    compute the same product (same device, same kernel)."""
    return B.float().cpu() @ A.float().cpu()


def concat_deltas(first: dict, second: dict) -> dict:
    """The delta of two successive merges (SFT's, then GRPO's LoRA on top): per module A = [A1; A2] [r1+r2, in],
    B = [B1, B2] [out, r1+r2], so B @ A = B1 @ A1 + B2 @ A2. A module in only one of them keeps its own pair."""
    out = dict(first)
    for prefix, (A2, B2) in second.items():
        if prefix in out:
            A1, B1 = out[prefix]
            out[prefix] = (torch.cat([A1, A2], 0), torch.cat([B1, B2], 1))
        else:
            out[prefix] = (A2, B2)
    return out


def attach_delta(module: nn.Module, A: torch.Tensor, B: torch.Tensor) -> "LoRALinear":
    """A frozen LoRALinear over `module` (a plain nn.Linear holding the base weight) that adds x A^T B^T: rank
    A.shape[0], scale 1 (B carries it), no dropout, nothing trains. apply_lora replaces it by a trainable LoRA
    stacked on it (stack_on_delta)."""
    r = A.shape[0]
    lo = LoRALinear(module, r, alpha=r, generator=torch.Generator())  # own generator: the global RNG is untouched
    dev = module.weight.device
    lo.lora_A = nn.Parameter(A.float().to(dev), requires_grad=False)
    lo.lora_B = nn.Parameter(B.float().to(dev), requires_grad=False)
    lo.frozen_delta = True
    return lo


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """In place on an UNWRAPPED model: fold each adapter into its weight and put the plain nn.Linear back, so the
    state dict has the original key names (ready for save_pretrained). Returns the model. Under FSDP2 gather first:
    `merge_lora_state_dict(full_state_dict(model), scale)` on rank 0."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                if hasattr(child.weight, "device_mesh"):
                    raise RuntimeError("merge_lora on an FSDP2-sharded model: use merge_lora_state_dict("
                                       "dist.full_state_dict(model), scale) instead")
                W = child.weight
                # in the live model's dtype (its forward needs one dtype); an export uses merge_lora_state_dict,
                # which keeps an update bf16 cannot represent in fp32
                upd = child.scale * (child.lora_B.float() @ child.lora_A.float())
                if child.delta_A is not None:  # a stacked LoRA: the frozen delta goes in too
                    upd = upd + child.delta_B.float() @ child.delta_A.float()
                W.copy_((W.float() + upd).to(W.dtype))
                lin = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                device="meta")
                lin.weight, lin.bias = W, child.bias
                setattr(parent, name, lin)
    return model
