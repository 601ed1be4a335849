"""Training pieces shared by tests/test_dist.py and tests/test_checkpoint.py, and the worker they launch.

    torchrun --nproc_per_node 2 tests/dist_worker.py fsdp OUT_DIR          # FSDP2 on 2 gloo ranks
    python tests/dist_worker.py resume OUT_DIR CKPT_DIR N_STEPS            # a FRESH process resumes a checkpoint

The worker only computes and writes results (safetensors + JSON) into OUT_DIR; the pytest side compares them with
a single-process reference computed by the same functions, so every assertion is visible in pytest.
"""
from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twice import dist  # noqa: E402
from twice.checkpoint import export_hf, load_latest, save_checkpoint  # noqa: E402
from twice.gemma3 import PRESETS, Gemma3  # noqa: E402
from twice.lora import TARGETS, apply_lora, attach_delta, load_lora_state_dict, lora_state_dict  # noqa: E402
from twice.optim import build_adamw, clip_grad_norm_, lr_at, set_lr  # noqa: E402

T = 12            # tokens per row
GLOBAL_B = 4      # rows per optimizer step (split over ranks)
MAX_NORM = 0.05   # small enough that clipping is active on every step (the test checks it)
LR, WARMUP, MIN_LR_RATIO = 3e-3, 2, 0.1
N_FIXED, N_RESUME = 3, 4  # optimizer steps: 1 vs 2 ranks; straight vs resumed at N_RESUME // 2
# the tiny preset cut to 3 layers (sliding, sliding, full): both layer kinds, half the per-step cost
CFG = dataclasses.replace(PRESETS["tiny"], num_hidden_layers=3, layer_types=None)


def build_model(lora: bool, dropout: float = 0.0, init_seed: int = 0, train_norms: bool = False):
    """Tiny random Gemma3 (fp32, CPU). The init seed is the same on every rank, as it must be before FSDP2."""
    torch.manual_seed(init_seed)
    model = Gemma3.from_config(CFG)
    if lora:
        apply_lora(model, r=4, alpha=8, dropout=dropout, seed=init_seed)
        if train_norms:  # a mix of trainable base params (no-decay group) and adapters
            for n, p in model.named_parameters():
                if n.endswith("norm.weight"):
                    p.requires_grad_(True)
        # B = 0 would make the first steps trivial for the adapter gradients of A: start from a non-zero B
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.02)
    return model.train()


def build_stacked(init_seed: int = 0):
    """build_model(lora=True) stacked on a frozen rank-2 delta on every target (attach_delta, what a
    delta="adapters" load makes; twice/lora.py stack_on_delta): an FSDP2 unit then holds the frozen base, the delta
    buffers and the trainable adapters."""
    torch.manual_seed(init_seed)
    model = Gemma3.from_config(CFG)
    g = torch.Generator().manual_seed(7)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in TARGETS:
                A = torch.randn(2, child.in_features, generator=g) * 0.1
                setattr(parent, name, attach_delta(child, A, torch.randn(child.out_features, 2, generator=g) * 0.02))
    apply_lora(model, r=4, alpha=8, seed=init_seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))) * 0.02)
    return model.train()


def fixed_batches(n_steps: int, seed: int = 1234) -> torch.Tensor:
    """[n_steps, GLOBAL_B, T] token ids, identical in every process."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, CFG.vocab_size, (n_steps, GLOBAL_B, T), generator=g)


POOL = torch.randint(3, 512, (64, T + 6), generator=torch.Generator().manual_seed(99))


def sample_batch(B: int, gen: torch.Generator) -> torch.Tensor:
    """A random batch that consumes every RNG stream a real loop uses: numpy, python random, a named generator."""
    idx = np.random.randint(0, len(POOL), size=B)
    rows = [POOL[i] for i in idx]
    random.shuffle(rows)
    off = int(torch.randint(0, POOL.shape[1] - T + 1, (1,), generator=gen))
    return torch.stack(rows)[:, off:off + T]  # [B, T]


def lm_loss(model, ids):  # ids [B, T]: next-token cross-entropy, mean over the B*(T-1) targets
    logits = model(ids[:, :-1]).float()  # [B, T-1, V]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train_step(model, opt, step: int, total: int, ids, micro: int = 1) -> tuple[float, float]:
    """One optimizer step on this rank's rows `ids`, as `micro` accumulated micro-batches (the reduce-scatter is
    skipped on all but the last); returns (loss averaged over ranks, pre-clip grad norm)."""
    loss = 0.0
    for i, chunk in enumerate(ids.chunk(micro)):
        dist.set_grad_sync(model, i == micro - 1)
        part = lm_loss(model, chunk) / micro  # equal-sized chunks: the mean of means is the mean
        part.backward()
        loss = loss + part.detach()
    gnorm = clip_grad_norm_([p for p in model.parameters() if p.requires_grad], MAX_NORM)
    set_lr(opt, lr_at(step, total, WARMUP, LR, MIN_LR_RATIO))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(dist.all_reduce_mean(loss.clone())), float(gnorm)


def run_fixed(model, n_steps: int, rank: int = 0, world: int = 1, micro: int = 1):
    """n_steps on fixed_batches, rank r taking its contiguous share of each global batch."""
    opt = build_adamw(model.named_parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
    batches, per = fixed_batches(n_steps), GLOBAL_B // world
    losses, norms = [], []
    for s in range(n_steps):
        loss, gn = train_step(model, opt, s, n_steps, batches[s, rank * per:(rank + 1) * per], micro)
        losses.append(loss)
        norms.append(gn)
    return losses, norms


def run_random(model, opt, start: int, stop: int, total: int, gen: torch.Generator, data: dict):
    """Steps start..stop-1 on sample_batch (randomness from every stream + LoRA dropout); `data` counts rows seen."""
    for s in range(start, stop):
        ids = sample_batch(2, gen)
        data["rows_seen"] += ids.shape[0]
        train_step(model, opt, s, total, ids)


def seed_streams(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed + 7)


def new_optimizer(model):
    return build_adamw(model.named_parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)


# ----------------------------------------------------------------------------------------------------------------
# worker entry points

def fsdp_main(out: Path):
    info = dist.init_distributed(timeout_min=2.0)
    rank, world = info.rank, info.world_size
    res = {}

    # 1) full fine-tuning: gather == unwrapped state dict, then a few clipped AdamW steps with activation
    #    checkpointing and 2 accumulated micro-batches
    model = build_model(lora=False)
    plain_sd = {k: v.clone() for k, v in model.state_dict().items()}
    dist.wrap_fsdp(model)
    assert dist.is_fsdp(model)
    gathered = dist.full_state_dict(model)
    if rank == 0:
        save_file(plain_sd, str(out / "init_plain.safetensors"))
        save_file(gathered, str(out / "init_gathered.safetensors"))
    else:
        assert gathered == {}, "non-zero ranks must receive an empty dict"
    model.gradient_checkpointing = True  # per-block activation recompute under FSDP2 (the reference runs without)
    res["full"] = run_fixed(model, N_FIXED, rank, world, micro=2)  # + gradient accumulation without sync
    sd = dist.full_state_dict(model)
    if rank == 0:
        save_file(sd, str(out / "full_final.safetensors"))

    # 2) LoRA (adapters + norms trainable; frozen base in the same FSDP units)
    model = build_model(lora=True, train_norms=True)
    dist.wrap_fsdp(model)
    res["lora"] = run_fixed(model, N_FIXED, rank, world)
    sd = dist.full_state_dict(model)
    lsd = lora_state_dict(model)  # collective: every rank gathers each adapter
    again = build_model(lora=True, train_norms=True, init_seed=3)
    dist.wrap_fsdp(again)
    load_lora_state_dict(again, lsd)  # full tensors in, each rank keeps its shard
    reloaded = lora_state_dict(again)
    export_hf(model, out / "hf")  # collective gather, LoRA merged on rank 0
    if rank == 0:
        save_file(sd, str(out / "lora_final.safetensors"))
        save_file(lsd, str(out / "lora_adapters.safetensors"))
        save_file(reloaded, str(out / "lora_reloaded.safetensors"))

    # 2b) a LoRA stacked on a frozen lora_delta: the delta buffers replicate, the adapters shard; export gathers
    stacked = build_stacked()
    dist.wrap_fsdp(stacked)
    res["stacked"] = run_fixed(stacked, N_FIXED, rank, world)
    ssd = dist.full_state_dict(stacked)
    export_hf(stacked, out / "hf_stacked")
    if rank == 0:
        save_file(ssd, str(out / "stacked_final.safetensors"))
    del stacked

    # 3) unsharded(): one gather for many forwards; ranks run DIFFERENT numbers of forwards inside (a collective
    #    inside would hang and time out); params are plain tensors inside and DTensor shards again after
    ids = fixed_batches(1)[0, :2]
    with torch.no_grad():
        model.eval()
        ref = model(ids)
        with dist.unsharded(model):
            inside_plain = not hasattr(model.layers[0].self_attn.q_proj.weight, "device_mesh")
            for _ in range(1 + rank):
                got = model(ids)
            inside_plain &= not hasattr(model.layers[0].self_attn.q_proj.weight, "device_mesh")
        after_sharded = hasattr(model.layers[0].self_attn.q_proj.weight, "device_mesh")
        model.train()
    res["unsharded"] = {"max_diff": float((got - ref).abs().max()), "inside_plain": inside_plain,
                        "after_sharded": after_sharded}

    # 4) exact resume under FSDP2: LoRA with dropout, per-rank RNG streams, adapters-only checkpoint
    N = N_RESUME
    straight = build_model(lora=True, dropout=0.1)
    dist.wrap_fsdp(straight)
    opt = new_optimizer(straight)
    gen = seed_streams(100 + rank)
    run_random(straight, opt, 0, N, N, gen, {"rows_seen": 0})
    straight_sd = dist.full_state_dict(straight)

    ckpt = out / "ckpt"
    m1 = build_model(lora=True, dropout=0.1)
    dist.wrap_fsdp(m1)
    opt1 = new_optimizer(m1)
    gen = seed_streams(100 + rank)
    data = {"rows_seen": 0}
    run_random(m1, opt1, 0, N // 2, N, gen, data)
    save_checkpoint(ckpt, N // 2, m1, opt1, data=data, config={"run": "fsdp-test"},
                    extra_generators={"rollout": gen}, keep_last=2, trainable_only=True)
    del m1, opt1
    # fresh objects, scrambled RNG: everything must come from the checkpoint
    m2 = build_model(lora=True, dropout=0.1)  # same base ("pretrained") weights, adapters re-initialised
    with torch.no_grad():
        for n, p in m2.named_parameters():
            if "lora_" in n:
                p.add_(1.0)
    dist.wrap_fsdp(m2)
    opt2 = new_optimizer(m2)
    gen2 = seed_streams(12345 + rank)
    state = load_latest(ckpt, m2, opt2, extra_generators={"rollout": gen2})
    run_random(m2, opt2, state["step"], N, N, gen2, state["data"])
    resumed_sd = dist.full_state_dict(m2)
    # a checkpoint that does not fit the model: EVERY rank raises (no rank left waiting in a collective)
    bad = build_model(lora=False)
    dist.wrap_fsdp(bad)
    try:
        load_latest(ckpt, bad, None)
        raised = 0.0
    except KeyError:
        raised = 1.0
    n_raised = float(dist.all_reduce_sum(torch.tensor([raised])))
    if rank == 0:
        save_file(straight_sd, str(out / "resume_straight.safetensors"))
        save_file(resumed_sd, str(out / "resume_resumed.safetensors"))
        res["resume"] = {"step": state["step"], "data": state["data"], "config": state["config"],
                         "ranks_raised_on_bad_keys": n_raised}
        (out / "results.json").write_text(json.dumps(res))
    dist.barrier()
    dist.cleanup()


def resume_main(out: Path, ckpt_dir: Path, n_steps: int):
    """Fresh process: build new objects with different RNG, load the latest checkpoint, finish the run."""
    torch.set_num_threads(1)
    model = build_model(lora=True, dropout=0.1, train_norms=True, init_seed=777)  # wrong weights on purpose
    opt = new_optimizer(model)
    gen = seed_streams(4242)
    state = load_latest(ckpt_dir, model, opt, extra_generators={"rollout": gen})
    run_random(model, opt, state["step"], n_steps, n_steps, gen, state["data"])
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "resumed.safetensors"))
    (out / "resumed.json").write_text(json.dumps({"step": state["step"], "data": state["data"]}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "fsdp":
        fsdp_main(Path(sys.argv[2]))
    elif cmd == "resume":
        resume_main(Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
    else:
        raise SystemExit(f"unknown command {cmd!r}")
