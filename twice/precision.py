"""The precision policy, in one place: which dtype each stage computes in, and how trainable weights stay fp32.

    from twice import precision
    compute = precision.resolve_dtype(cfg.model.dtype, device)        # "auto" | "bfloat16" | "float32" -> dtype
    model = Gemma3.from_pretrained(path, dtype=precision.param_dtype(compute, dist.is_distributed()))
    apply_lora(model, ...)                                             # adapters are created fp32 (twice/lora.py)
    model = dist.wrap_fsdp(model, mixed_precision=precision.fsdp_mixed(compute))
    opt = build_adamw(model, ...)       # MasterAdamW when a trainable parameter is bf16 (full FT in one process)
    rec["compute_dtype"] = precision.dtype_name(compute)               # every metrics line / results.json says it

The rule (`dtype: auto`, the default of every stage):
  - bf16 compute where it is fast: a CUDA GPU with bf16 support, or a CPU whose flags (/proc/cpuinfo) show
    `amx_bf16` or `avx512_bf16` (oneDNN then runs bf16 matmuls 3-7x faster than fp32: AMX on Xeon Sapphire
    Rapids+, AVX512-BF16 on Zen 4+/Cooper Lake); fp32 elsewhere. The choice is logged once per process.
  - `auto` never rounds stored weights: a checkpoint that stores float32 tensors (our exports keep a fine-tune's
    changed weights in float32, twice/checkpoint.py) is computed in fp32, logged with the reason. Except where the
    folder also carries the LoRA delta it merged (lora_delta.safetensors, twice/hf.py) and the caller loads it as
    adapters (eval.py, twice.serve: `delta_adapters=True`): then every float32 tensor is a delta module's merged
    weight, the load recovers the exact bf16 base and keeps the delta as frozen fp32 adapters, so bf16 it is.
    Training under LoRA (train_sft.py, train_grpo.py, via training_load) does the same: bf16 base + frozen fp32
    delta, the new trainable LoRA stacked on it (twice/lora.py stack_on_delta); `dtype: float32` (or a delta on a
    module the LoRA does not target, or a full fine-tune) loads it merged and computes in fp32.
  - `dtype: float32` forces fp32 everywhere (parameters, activations, KV cache); `dtype: bfloat16` forces bf16.
What stays fp32 whatever the compute dtype (so numerics only change where bf16 is harmless):
  - trainable parameters and their AdamW state: LoRA A/B are created fp32 and cast to the activations' dtype inside
    the forward (autograd returns fp32 grads); a full fine-tune in one process keeps bf16 working weights and an fp32
    master copy in the optimizer (MasterAdamW below); under FSDP2 the fp32 shards are the masters and its
    MixedPrecisionPolicy casts to bf16 per forward (reduce in fp32);
  - RMSNorm, softmax, log-probs/entropy (the fused kernel accumulates fp32) and every loss (twice/grpo.py promotes);
    those are in twice/gemma3.py, kernels/ and twice/grpo.py, checked by tests/test_precision.py.
"""
from __future__ import annotations

from itertools import chain

import torch

NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CHOICES = ("auto", "bfloat16", "float32")   # what the training configs accept (float16 only for inference on GPU)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")

_logged: set = set()


def cpu_bf16_flags(cpuinfo: str = "/proc/cpuinfo") -> list[str]:
    """The bf16 matmul flags this CPU reports (Linux /proc/cpuinfo); [] where the file is absent (macOS, Windows)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [f for f in BF16_CPU_FLAGS if f in flags]
    except OSError:
        pass
    return []


def auto_dtype(device) -> tuple[torch.dtype, str]:
    """-> (dtype, why) for `dtype: auto` on `device`."""
    device = torch.device(device)
    if device.type == "cuda":
        ok = torch.cuda.is_bf16_supported()
        return (torch.bfloat16 if ok else torch.float32), f"CUDA {'with' if ok else 'without'} bf16 support"
    if device.type == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return torch.bfloat16, f"CPU has {'/'.join(flags)}"
        return torch.float32, "CPU has neither amx_bf16 nor avx512_bf16 (bf16 would be emulated: slower)"
    return torch.float32, f"no bf16 policy for device type {device.type!r}"


def resolve_dtype(name: str, device="cpu", where: str = "dtype", choices=CHOICES, checkpoint=None,
                  delta_adapters: bool = False) -> torch.dtype:
    """Config value -> torch dtype. "auto" follows the rule in the module docstring; the choice is logged once.
    checkpoint: the HF folder about to be loaded. `auto` never rounds stored weights: a folder that stores float32
    tensors (a merged fine-tune: its update is often below bf16's resolution, 2^-8 relative) computes in float32,
    unless delta_adapters (the caller loads with Gemma3.from_pretrained(delta="auto")) and every float32 tensor is
    the merged weight of a module whose delta the folder carries (lora_delta.json): bf16 base + fp32 delta."""
    if name not in choices:
        from twice.config import ConfigError
        raise ConfigError(f"{where}: expected one of {list(choices)}, got {name!r}")
    if name == "auto":
        dt, why = auto_dtype(device)
        if dt != torch.float32 and checkpoint:
            from twice.hf import delta_meta, stored_float32
            meta = delta_meta(checkpoint) if delta_adapters else None
            n = stored_float32(checkpoint, skip_modules=meta["modules"] if meta else ())
            if n:
                dt, why = torch.float32, (f"{checkpoint} stores {n} float32 tensors (a fine-tune's weights): "
                                          f"bf16 would round them")
            elif meta:
                why += (f"; {checkpoint}: bf16 base + its fp32 LoRA delta ({len(meta['modules'])} modules, "
                        f"lora_delta.safetensors) applied unmerged")
    else:
        dt, why = NAMES[name], "forced by the config"
    key = (name, str(torch.device(device)), str(checkpoint or ""), delta_adapters)
    if key not in _logged:
        _logged.add(key)
        # stdout, like the stages' other progress lines (stderr is kept for errors: a bad config is ONE line there)
        print(f"precision: {where}={name} on {torch.device(device)} -> compute in {dtype_name(dt)} ({why})",
              flush=True)
    return dt


def training_load(name: str, device, checkpoint, lora_targets=(), where: str = "model.dtype"
                  ) -> tuple[torch.dtype, str]:
    """-> (compute dtype, delta mode for Gemma3.from_pretrained) of a TRAINING stage starting from `checkpoint`.
    A folder with a lora_delta (SFT's final/) under a LoRA whose targets cover the delta's modules: `auto` computes
    in bf16 where bf16 is fast, loading "adapters" (the exact bf16 base + the frozen fp32 delta; apply_lora stacks
    the new LoRA on it, twice/lora.py stack_on_delta). Otherwise, or under `dtype: float32`, "merged" (fp32 under
    `auto`: the stored fp32 weights are not rounded). Logs which one, once."""
    from twice.hf import delta_meta
    meta = delta_meta(checkpoint) if checkpoint and lora_targets else None
    stack = bool(meta) and all(m.rpartition(".")[2] in tuple(lora_targets) for m in meta["modules"])
    compute = resolve_dtype(name, device, where, checkpoint=checkpoint, delta_adapters=stack)
    mode = "adapters" if stack and compute != torch.float32 else "merged"
    key = ("load", str(checkpoint), mode)
    if meta and key not in _logged:
        _logged.add(key)
        how = ("bf16 base + frozen fp32 lora_delta, the new LoRA stacked on it" if mode == "adapters" else
               "merged weights (base + lora_delta), the new LoRA on top")
        print(f"precision: {checkpoint}: {how} ({dtype_name(compute)} compute)", flush=True)
    return compute, mode


def weights_note(compute: torch.dtype, checkpoint) -> str:
    """What a results.json records beside compute_dtype for a folder loaded with delta="auto": "bf16 base + fp32
    lora_delta (rank R)" where the delta is applied unmerged, "merged" otherwise."""
    from twice.hf import delta_meta
    meta = delta_meta(checkpoint) if checkpoint and compute in (torch.bfloat16, torch.float16) else None
    if not meta:
        return "merged"
    ranks = sorted(set(meta["modules"].values()))
    return f"{dtype_name(compute)} base + float32 lora_delta (rank {'/'.join(map(str, ranks))}) unmerged"


def dtype_name(dt: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (what metrics.jsonl / results.json record as compute_dtype)."""
    return str(dt).removeprefix("torch.")


def param_dtype(compute: torch.dtype, fsdp: bool) -> torch.dtype:
    """dtype to load a TRAINING model's parameters in. Under FSDP2 (a process group: torchrun, or any GPU run) fp32,
    because its MixedPrecisionPolicy casts to the compute dtype per forward and the fp32 shards are the optimizer's
    master weights. In one CPU process the compute dtype itself: the frozen weights are stored bf16 (half the
    memory, no per-step cast); the trainable ones keep fp32 masters (LoRA A/B are fp32; MasterAdamW otherwise)."""
    return torch.float32 if fsdp else compute


def fsdp_mixed(compute: torch.dtype) -> bool:
    """wrap_fsdp's mixed_precision flag: bf16 compute under FSDP2 (ignored without a process group)."""
    from twice import dist
    return compute == torch.bfloat16 and dist.is_distributed()


class MasterAdamW(torch.optim.AdamW):
    """torch AdamW that keeps an fp32 master copy (state["master"]) of every low-precision parameter.

    The model's parameter stays bf16 (what the forward computes with); at step() the parameter's storage is swapped
    for its fp32 master, the grad is upcast, torch's AdamW updates master + exp_avg + exp_avg_sq in fp32, and the
    bf16 parameter receives the rounded master. Without it an update smaller than bf16's resolution (2^-8 relative:
    lr 1e-5 on a weight of 1) would be lost every step. fp32 parameters take the plain AdamW path unchanged.
    The state dict carries the masters (so a resume is exact); load_state_dict keeps them fp32 (torch would cast
    every floating state tensor to the parameter's dtype)."""

    @torch.no_grad()
    def step(self, closure=None):
        swapped = []  # (param, its low-precision storage, its low-precision grad, fresh master or None)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None or p.dtype == torch.float32 or not p.is_floating_point():
                    continue
                st = self.state[p]
                master = st.get("master")
                fresh = master is None
                if fresh:  # not stored yet: an empty state lets AdamW initialise exp_avg/exp_avg_sq from the fp32 data
                    master = p.detach().to(torch.float32, copy=True)
                swapped.append((p, p.data, p.grad, master if fresh else None))
                p.data, p.grad = master, p.grad.to(torch.float32)
        try:
            loss = super().step(closure)
        finally:
            for p, low, grad, fresh in swapped:
                master = p.data
                low.copy_(master)  # round to nearest into the working copy
                p.data, p.grad = low, grad
                if fresh is not None:
                    self.state[p]["master"] = master
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        saved = state_dict["state"]
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            if pid in saved and p.dtype != torch.float32:
                for k, v in saved[pid].items():  # put back the fp32 values torch rounded to the param's dtype
                    if k != "step" and torch.is_tensor(v) and v.is_floating_point():
                        self.state[p][k] = v.to(device=p.device, dtype=torch.float32, copy=True)
