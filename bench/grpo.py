"""One GRPO step, ours (train_grpo.py) in bf16 and fp32 vs TRL's GRPOTrainer in bf16, same model / prompts / K /
completion length, this CPU.

    python bench/grpo.py                                   # ours here, TRL in /work/bench-venv-trl (see below)
    python bench/grpo.py --dtypes float32,bfloat16 --trl-dtype bfloat16   # the defaults, spelled out
    python bench/grpo.py --steps 3 --K 8 --prompts 2 --new 32 --hidden 256 --layers 6    # the README numbers
    python bench/grpo.py --small-vocab                     # old mode: the fixture's ~940-id tokenizer, head_dim 64

Default mode runs at Gemma-3's real vocabulary: a random Gemma-3 with the gemma-3-270m preset's vocab (262,144, tied
LM head) and head_dim 256 (4 query heads, 1 KV head), but --layers/--hidden small enough for a CPU; the tokenizer is
the real converted one (--tokenizer, default ~/.cache/twice/gemma-3-270m/tokenizer.model), copied into the saved
model so both sides read the same file. At this vocab the [tokens x V] log-prob work and its memory dominate a step,
which a ~940-id vocab (--small-vocab) hides. Note: TRL >= 1.x scores through a chunked LM head too (no full [N, V]
logits); on CPU (no Triton) it scores every position, prompt included, in [<=4096 tokens, 32768 ids] fp32 tiles.

TRL lives ONLY in a separate venv; this script re-runs itself there with --trl-worker. To share the main venv's torch
and transformers instead of downloading them again:
    python -m venv /work/bench-venv-trl
    echo $VIRTUAL_ENV/lib/python3.11/site-packages > /work/bench-venv-trl/lib/python3.11/site-packages/main.pth
    /work/bench-venv-trl/bin/pip install trl
Without that venv the TRL column is skipped with a message saying so. Each configuration runs in its
own fresh process; we report the median seconds per step over the steps after the first (warm-up), the phase
breakdown (ours), and the process's peak RSS (VmHWM). Same random Gemma-3 (saved with save_pretrained, loaded by
transformers for TRL), same prompt token ids (TRL gets them through a word-level tokenizer whose words are our
token ids, so tokenisation cannot differ; its reward decodes them with our tokenizer), K completions per prompt, max
completion length N, full fine-tuning, beta 0, one optimizer step per rollout, temperature 1, no top-k/top-p,
1 thread per process. Dtypes (--dtypes): ours runs its `model.dtype` policy (twice/precision.py: bf16 = bf16 weights
and compute, fp32 master weights + AdamW state in MasterAdamW); TRL in bf16 (--trl-dtype) = transformers' Trainer
with bf16=True (CPU autocast over fp32 weights: its mixed precision), or fp32.
Timings on a shared machine are noisy: run it when `uptime` is low, compare ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vmhwm_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


# ---------------------------------------------------------------- setup (main venv)

def setup(work: Path, args) -> dict:
    import dataclasses

    import torch
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    from grpo_fixture import build
    from twice.gemma3 import PRESETS, Gemma3
    from twice.tokenizer import Tokenizer

    paths = build(work / "world", warm_steps=0)  # dataset, SASRec (and a tiny tokenizer, used only --small-vocab)
    real = PRESETS["gemma-3-270m"]
    if args.small_vocab:  # the fixture's tiny SentencePiece (~940 ids): logits are negligible
        tok_file, head_dim = Path(paths["model"]) / "tokenizer.model", 64
    else:  # Gemma's real 262,144-id tokenizer: V-sized logits dominate a materialising trainer's memory
        tok_file, head_dim = Path(args.tokenizer).expanduser(), real.head_dim
        if not tok_file.is_file():
            raise SystemExit(f"{tok_file}: no tokenizer.model (convert gemma-3-270m first, or pass --small-vocab)")
    tok = Tokenizer(tok_file)
    if not args.small_vocab and tok.vocab_size != real.vocab_size:
        raise SystemExit(f"{tok_file}: {tok.vocab_size} ids, Gemma-3 has {real.vocab_size}")
    cfg = dataclasses.replace(real, vocab_size=tok.vocab_size, hidden_size=args.hidden,
                              intermediate_size=4 * args.hidden, num_hidden_layers=args.layers, head_dim=head_dim,
                              query_pre_attn_scalar=head_dim, num_attention_heads=4, num_key_value_heads=1,
                              layer_types=None)  # re-derived: 5 sliding : 1 global
    torch.manual_seed(0)
    model = Gemma3.from_config(cfg)
    model.save_pretrained(work / "model", tokenizer_path=tok_file)  # both sides load exactly these weights
    paths["bench_model"] = str(work / "model")
    paths["n_params"] = model.num_params()
    paths["n_embed"] = model.embed_tokens.weight.numel()  # tied LM head: counted once
    return paths


def our_overrides(paths: dict, run_dir: Path, args, shared: bool, dtype: str = "float32") -> list[str]:
    from grpo_fixture import overrides
    return overrides(paths, run_dir, model="bench_model", steps=args.steps, threads=1, shared_prefix=shared,
                     **{"model.dtype": dtype},
                     **{"rollout.group_size": args.K, "rollout.prompts_per_step": args.prompts,
                        "rollout.max_new_tokens": args.new, "rollout.stop_strings": "[]",
                        "optim.micro_batch_size": args.K, "rewards.weights": "{cg: 1.0, format: 1.0}",
                        "log_every": 1, "rollout.log_completions": 0})


def run_ours(paths: dict, work: Path, args, shared: bool, dtype: str = "float32") -> dict:
    run_dir = work / f"ours_{'shared' if shared else 'naive'}_{dtype}"
    code = ("import sys, json; sys.path[:0] = [%r, %r]; import train_grpo; train_grpo.main(json.loads(sys.argv[1])); "
            "print('VMHWM', next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
            % (str(ROOT), str(ROOT / "tests")))
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    ov = our_overrides(paths, run_dir, args, shared, dtype)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code, json.dumps(ov)], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(res.stdout[-2000:] + res.stderr[-3000:])
    m = [json.loads(l) for l in open(run_dir / "metrics.jsonl")]
    later = m[1:] or m
    med = lambda k: statistics.median(r[k] for r in later)
    return {"s_per_step": med("time/step"), "sample": med("time/sample"), "reward": med("time/reward"),
            "logprobs": med("time/logprobs"), "update": med("time/update"),
            "completion_len": med("completion_len_mean"),
            "peak_rss_mib": int(res.stdout.split("VMHWM")[-1].split()[0]) / 1024}


def prompt_ids(paths: dict, args) -> list[list[int]]:
    """The exact prompt token ids our run uses, in order (so TRL sees the same prompts)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
    import train_grpo
    from twice.config import load_config
    from twice.data import load_dataset
    from twice.tokenizer import Tokenizer
    cfg = load_config(train_grpo.GRPORunConfig, None, our_overrides(paths, Path("/tmp/unused"), args, True))
    ds, tok = load_dataset(paths["data"]), Tokenizer.from_pretrained(paths["bench_model"])
    users = [u.idx for u in ds.users if len(u.items) >= 4]
    return [train_grpo.build_group(ds, tok, cfg, users, i).prompt for i in range(args.steps * args.prompts)]


# ---------------------------------------------------------------- TRL worker (bench venv)

def trl_worker(spec: dict) -> None:
    import torch
    torch.set_num_threads(1)
    from datasets import Dataset
    from tokenizers import Tokenizer as HFTok
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    V = spec["vocab_size"]
    # word-level tokenizer whose word "t<id>" is token <id>: TRL's prompts are exactly our prompt ids
    core = HFTok(WordLevel({f"t{i}": i for i in range(V)}, unk_token="t3"))
    core.pre_tokenizer = WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="t0", eos_token="t1", bos_token="t2",
                                  unk_token="t3")
    tok.padding_side = "left"
    prompts = [" ".join(f"t{i}" for i in p) for p in spec["prompts"]]
    ds = Dataset.from_dict({"prompt": prompts})

    sys.path.insert(0, spec["root"])

    from twice.rewards import format_reward  # stdlib-only module
    from twice.tokenizer import Tokenizer  # sentencepiece only
    our_tok = Tokenizer.from_pretrained(spec["model"])

    def reward_fn(completions, **kw):  # words "t<id>" -> our ids -> our text -> the paper's format reward
        return [format_reward(our_tok.decode([int(w[1:]) for w in c.split() if w[1:].isdigit()])) for c in completions]

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, s, c, **kw):
            self.t = time.time()

        def on_step_end(self, a, s, c, **kw):
            times.append(time.time() - self.t)

    # fp32 weights; bf16 = the Trainer's CPU autocast (its mixed precision: fp32 master weights, bf16 matmuls)
    model = AutoModelForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.float32, attn_implementation="eager")
    bf16 = spec.get("dtype") == "bfloat16"
    K, P = spec["K"], spec["prompts_per_step"]
    cfg = GRPOConfig(output_dir=spec["out"], per_device_train_batch_size=P * K, num_generations=K,
                     max_completion_length=spec["new"], learning_rate=1e-3, beta=0.0, loss_type="grpo",
                     scale_rewards="group", max_steps=spec["steps"], logging_steps=1, report_to=[], use_cpu=True,
                     bf16=bf16, save_strategy="no", temperature=1.0, top_p=1.0, seed=0, shuffle_dataset=False,
                     gradient_accumulation_steps=1, num_iterations=1, dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=reward_fn, args=cfg, train_dataset=ds, processing_class=tok,
                          callbacks=[Timer()])
    trainer.train()
    lens = [h.get("completions/mean_length") for h in trainer.state.log_history if "completions/mean_length" in h]
    print("TRLRESULT", json.dumps({"times": times, "completion_len": lens, "peak_rss_mib": vmhwm_mib()}))


def run_trl(paths: dict, work: Path, args, prompts) -> dict:
    spec = {"model": paths["bench_model"], "prompts": prompts, "K": args.K, "prompts_per_step": args.prompts,
            "new": args.new, "steps": args.steps, "out": str(work / "trl"), "root": str(ROOT), "dtype": args.trl_dtype,
            "vocab_size": json.load(open(Path(paths["bench_model"]) / "config.json"))["vocab_size"]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    res = subprocess.run([args.trl_python, __file__, "--trl-worker", json.dumps(spec)], capture_output=True,
                         text=True, env=env, cwd=str(work))
    if res.returncode or "TRLRESULT" not in res.stdout:
        raise RuntimeError("TRL run failed:\n" + res.stdout[-3000:] + res.stderr[-5000:])
    r = json.loads(res.stdout.split("TRLRESULT", 1)[1].strip().splitlines()[0])
    later = r["times"][1:] or r["times"]
    return {"s_per_step": statistics.median(later), "completion_len": statistics.median(r["completion_len"][1:] or r["completion_len"]),
            "peak_rss_mib": r["peak_rss_mib"]}


def import_baseline_mib(python: str, imports: str, path: str) -> float:
    """VmHWM of a process that only imports the stack (torch + the trainer's modules): the floor of each RSS."""
    code = f"import sys; sys.path.insert(0, {path!r}); {imports}; " \
           "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1])"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    res = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env, cwd="/tmp")
    return int(res.stdout.strip().splitlines()[-1]) / 1024 if res.returncode == 0 else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--K", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--small-vocab", action="store_true",
                    help="old mode: the fixture's ~940-id tokenizer and head_dim 64 (logits negligible)")
    ap.add_argument("--tokenizer", default="~/.cache/twice/gemma-3-270m/tokenizer.model",
                    help="Gemma-3's 262,144-id tokenizer.model (default mode; head_dim 256 as in gemma-3-270m)")
    ap.add_argument("--trl-python", default="/work/bench-venv-trl/bin/python")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="our compute dtypes, side by side (model.dtype)")
    ap.add_argument("--trl-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--no-layout", action="store_true", help="skip ours with the shared prefix off")
    ap.add_argument("--trl-worker", default=None)
    args = ap.parse_args()
    if args.trl_worker:
        return trl_worker(json.loads(args.trl_worker))
    work = Path(tempfile.mkdtemp(prefix="bench_grpo_"))
    t0 = time.time()
    paths = setup(work, args)
    prompts = prompt_ids(paths, args)
    plen = statistics.mean(len(p) for p in prompts)
    V = json.load(open(Path(paths["bench_model"]) / "config.json"))["vocab_size"]
    print(f"model: random Gemma-3 {paths['n_params'] / 1e6:.1f}M params ({paths['n_embed'] / 1e6:.1f}M of them the "
          f"tied embedding; hidden {args.hidden}, {args.layers} layers, head_dim {256 if not args.small_vocab else 64}, "
          f"vocab {V}); {args.prompts} prompts x K={args.K}, prompt {plen:.0f} tokens, <= {args.new} new tokens, "
          f"{args.steps} steps (median of steps 2..); 1 thread per process")
    print(f"one step's completion logits [P*K, N, V] in fp32 would be "
          f"{args.prompts * args.K * args.new * V * 4 / 2**20:.0f} MiB; neither side builds them (ours: fused kernel; "
          f"TRL >= 1.x: chunked LM head, which on CPU scores every position, prompt included, in [<=4096, 32768] tiles); "
          f"weights + grads + AdamW state, same on both sides: {16 * paths['n_params'] / 2**20:.0f} MiB", flush=True)
    rows = {}
    dtypes = args.dtypes.split(",")
    short = {"float32": "fp32", "bfloat16": "bf16"}
    runs = [(f"ours {short[d]} (shared prefix)", lambda d=d: run_ours(paths, work, args, True, d)) for d in dtypes]
    if not args.no_layout:
        runs.append((f"ours {short[dtypes[0]]} (prefix off)", lambda: run_ours(paths, work, args, False, dtypes[0])))
    trl_name = f"TRL GRPOTrainer {short[args.trl_dtype]}"
    have_trl = Path(args.trl_python).is_file()
    if have_trl:
        runs.append((trl_name, lambda: run_trl(paths, work, args, prompts)))
    else:
        print(f"TRL: skipped: no {args.trl_python} (see the module docstring to make that venv)")
    for name, fn in runs:
        t1 = time.time()
        try:
            rows[name] = fn()
        except Exception as e:  # say exactly why, keep the other numbers
            if not name.startswith("TRL"):
                raise
            print(f"TRL: could not run ({e})")
        print(f"  {name}: process wall {time.time() - t1:.0f}s", flush=True)
    base = {"ours": import_baseline_mib(sys.executable, "import train_grpo", str(ROOT)),
            "TRL": import_baseline_mib(args.trl_python, "import trl, transformers; from trl import GRPOTrainer", "/tmp")
            if have_trl else float("nan")}
    for name, r in rows.items():
        r["rss_above_import"] = r["peak_rss_mib"] - base["TRL" if name.startswith("TRL") else "ours"]
    print(f"\nimport-only peak RSS: ours {base['ours']:.0f} MiB, TRL {base['TRL']:.0f} MiB")
    print(f"\n{'':28s} {'s/step':>8s} {'peak RSS MiB':>13s} {'above import':>12s} {'compl len':>9s}   phases (sample / reward / logp / update s)")
    for name, r in rows.items():
        ph = (f"{r['sample']:.2f} / {r['reward']:.3f} / {r['logprobs']:.2f} / {r['update']:.2f}" if "sample" in r
              else "n/a (not exposed by TRL)")
        print(f"{name:28s} {r['s_per_step']:8.2f} {r['peak_rss_mib']:13.0f} {r['rss_above_import']:12.0f} "
              f"{r['completion_len']:9.1f}   {ph}")
    first = rows[f"ours {short[dtypes[0]]} (shared prefix)"]
    off = rows.get(f"ours {short[dtypes[0]]} (prefix off)")
    if off:
        print(f"\nshared prefix ({short[dtypes[0]]}): update phase {off['update'] / first['update']:.2f}x faster, "
              f"step {off['s_per_step'] / first['s_per_step']:.2f}x")
    last = rows[f"ours {short[dtypes[-1]]} (shared prefix)"]
    if len(dtypes) > 1:
        ph = " / ".join(f"{first[k] / max(last[k], 1e-9):.2f}x" for k in ("sample", "logprobs", "update"))
        print(f"ours {short[dtypes[-1]]} vs {short[dtypes[0]]}: {first['s_per_step'] / last['s_per_step']:.2f}x faster per "
              f"step (target bf16 vs fp32 >= 3x; phases sample / logp / update {ph}), peak RSS "
              f"{last['peak_rss_mib'] / first['peak_rss_mib']:.2f}x")
    if trl_name in rows:
        trl = rows[trl_name]
        same = rows.get(f"ours {short[args.trl_dtype]} (shared prefix)", last)
        print(f"vs {trl_name}: ours {short[args.trl_dtype]} {trl['s_per_step'] / same['s_per_step']:.2f}x faster per step, "
              f"peak RSS ratio ours/TRL {same['peak_rss_mib'] / trl['peak_rss_mib']:.2f} (above the import floor: "
              f"{same['rss_above_import'] / trl['rss_above_import']:.2f})")
    print(f"(total bench wall {time.time() - t0:.0f}s; work dir {work})")


if __name__ == "__main__":
    main()
