"""The whole TWiCE-Rec pipeline from one command, on MovieLens-100k with Gemma-3-270m on CPU.

    python -m twice.pipeline                        # real Gemma-3-270m + ml-100k (both from PyPI) -> runs/quickstart
    python -m twice.pipeline --tiny --out /tmp/tq   # random tiny Gemma-3 + tiny SentencePiece: what CI runs (minutes)
    python -m twice.pipeline --redo sft             # rerun one stage (and every stage after it)
    python -m twice.pipeline --threads 1            # OMP/torch threads per stage (0 = torch's default)
    python -m twice.pipeline --preset study         # issue 13's study: configs/study/, + GRPO (C), RQ3 paired table
    python -m twice.pipeline --eval-procs 1         # eval in one process (default: 2 one-thread processes under
                                                    # torchrun, gloo on CPU; --tiny: 1)

Stages, each a subprocess running the README's stage-by-stage command (configs/quickstart/<stage>.yaml, whose paths
already chain: runs/quickstart/{data,sasrec,sasrec-reward,rationales,sft,grpo_E,eval}) plus overrides that relocate
those paths under --out (identical to the YAMLs' own for the default out) and, under --tiny, shrink the sizes:
    data       python -m twice.data prepare            -> OUT/data
    model      python -m twice.convert gemma-3-270m   (--tiny: a random tiny Gemma-3 + a SentencePiece model trained
                                                        on the dataset's text, saved as an HF folder: OUT/model)
    sasrec     python train_sasrec.py                  -> OUT/sasrec/best          (eval's SASRec row: CE)
    sasrec_reward  python train_sasrec.py              -> OUT/sasrec-reward/best   (GRPO's reward model: BCE, calibrated)
    rationales python build_rationales.py              -> OUT/rationales/rationales.jsonl (evidence teacher, brief;
                                                        --tiny: the tiny model as the local teacher)
    sft        python train_sft.py                     -> OUT/sft/final          (LoRA, T1 + T2 + T3)
    grpo_C     python train_grpo.py  (--preset study)  -> OUT/grpo_C/final       (E's rewards, from the base model)
    grpo_D     python train_grpo.py  (--preset study)  -> OUT/grpo_D/final       (rewards: item match + format)
    grpo_E     python train_grpo.py                    -> OUT/grpo_E/final       (rewards: rho_cg + format, the paper)
    eval       python eval.py                          -> OUT/eval/results.json, results.md, predictions_*.jsonl
Resumable: a stage whose outputs are complete (its script exited 0 and its outputs exist; OUT/pipeline.json
records it) is skipped; an interrupted stage is rerun and resumes from its own checkpoints. Stage 1 keeps no
rationale when the teacher writes nothing usable (an LLM teacher as small as the 270m often does not): SFT then
trains T1 + T2 only, and the pipeline says so. The final table (SASRec, base, +SFT, +SFT+GRPO (E), random; HR@1,
HR@5, NDCG@5 under the paper's sampling protocol and under exact ranking, with 95% intervals, greedy validity and
format; then the paired tests of each stage against the one it builds on) is printed and written to OUT/results.md; the wall and CPU seconds of every stage go to OUT/pipeline.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from twice.fileio import write_atomic, write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "quickstart"
# The main job trains the paper's GRPO (E) only: the RQ3 ablations C and D are the study's (--preset study), which
# is where their comparison has the users to mean something (D cost the quickstart 7 of its 36 minutes).
STAGES = ("data", "model", "sasrec", "sasrec_reward", "rationales", "sft", "grpo_E", "eval")
# GRPO variants of the paper's RQ3 (reward weights, twice/rewards.py registry names); C: E's rewards from the base model
VARIANTS = {"grpo_D": "{match: 1.0, format: 1.0}", "grpo_E": "{cg: 1.0, format: 1.0}"}
ROWS = (("sasrec", "SASRec"), ("base", "base"), ("sft", "+SFT"), ("grpo_E", "+SFT+GRPO (E)"))

# The real quickstart's sizing lives in configs/quickstart/*.yaml (so the README's stage-by-stage commands ARE the main
# job): SASRec 10 epochs (an epoch count, not a time cap: same seed, same numbers on any machine), stage 1 asks the
# evidence teacher about 300 users (~200 kept), SFT one epoch (59 LoRA steps of 4 examples), GRPO (E) 6 steps
# (2 prompts x 4 samples, auto completion budget), eval 100 test users (batches of 25, 88-token completions).
# Wall seconds each stage took in the README's main-job run (3e4f8e2, 2 CPU cores, quiet), for the overall ETA; "model"
# is the one-time conversion (about 2 min when ~/.cache/twice/gemma-3-270m is not there yet).
BUDGET_S = {"data": 1, "model": 100, "sasrec": 38, "sasrec_reward": 27, "rationales": 1, "sft": 450, "grpo_E": 118,
            "eval": 625}
# The same for --preset study, from the README's study run (2757be6, 2 CPU cores, quiet; eval = five models, 300 users)
BUDGET_STUDY_S = {"data": 1, "model": 100, "sasrec": 41, "sasrec_reward": 33, "rationales": 1, "sft": 1346,
                  "grpo_C": 198, "grpo_D": 255, "grpo_E": 269, "eval": 4850}
BUDGET_TINY_S = {"data": 1, "model": 5, "sasrec": 8, "sasrec_reward": 8, "rationales": 10, "sft": 10, "grpo_C": 10,
                 "grpo_D": 10, "grpo_E": 10, "eval": 15}

# --tiny: step counts and sizes small enough for CI (a few minutes on 2 shared cores), every stage still real
TINY = {
    "data": [],
    "sasrec": ["sasrec.hidden=16", "sasrec.inner=32", "sasrec.blocks=1", "sasrec.heads=1", "sasrec.maxlen=20",
               "train.epochs=1", "train.patience=1"],
    "rationales": ["n_users=4", "chunk=4", "teacher.batch_size=4", "teacher.max_tokens=12", "rationale.n_shots=1",
                   "rationale.max_history=3"],
    "sft": ["steps=3", "optim.batch_size=2", "max_seq_len=1024", "optim.micro_batch_tokens=2048", "eval.every=0",
            "eval.patience=0",  # no evals to watch in 3 steps (the study's sft.yaml stops early on them)
            "eval.loss_users=2", "eval.hr_users=1", "eval.max_new_tokens=8", "checkpoint_every=0", "optim.lr=1.0e-3",
            "mix.describe=0.01", "mix.recommend=0.02"],
    "grpo": ["steps=2", "rollout.group_size=2", "rollout.prompts_per_step=2", "rollout.max_new_tokens=8",
             "optim.micro_batch_size=4", "checkpoint_every=0", "optim.lr=1.0e-3"],
    "eval": ["max_users=4", "sampling.max_new_tokens=8", "greedy.max_new_tokens=8", "batch_size=4"],
}
# SFT, GRPO and eval share one prompt layout: configs/quickstart/task.yaml, included by each of their YAMLs. --tiny
# changes it the same way for the three (the tiny tokenizer needs ~2x the tokens; 3 history items keep it short).
TASK_TINY = ["task.max_history=3", "task.max_prompt_tokens=4096"]

# --preset study (issue 13; README "The study"): the stages read configs/study/*.yaml, whose sizes are the study's
# (300 test users, SFT to a valid-loss plateau (120-step cap), 10 GRPO steps per variant, the evidence teacher); GRPO
# variant C (from the base model, rewards of E) joins D and E; the table is twice.study's RQ3 table with paired
# tests against +SFT and SASRec. With --tiny it runs the tiny model and the TINY sizes (what the test runs).
STUDY_STAGES = STAGES[:STAGES.index("sft") + 1] + ("grpo_C", "grpo_D") + STAGES[STAGES.index("sft") + 1:]
STUDY_CONFIGS = ROOT / "configs" / "study"


def preset_stages(preset: str) -> tuple[str, ...]:
    """The stages a preset runs, in order ("" = the main job)."""
    return STUDY_STAGES if preset == "study" else STAGES


# ---------------------------------------------------------------------------------------------------------------
# the tiny model (stage "model" under --tiny)

def build_tiny_model(data_dir: Path, out: Path, seed: int = 0) -> Path:
    """Random tiny Gemma-3 + a tiny SentencePiece model trained on the dataset's text (item titles and ids, the
    prompt scaffolding and the answer tags), saved as an HF folder: out/{config.json, model.safetensors,
    tokenizer.model}."""
    import torch

    from twice import prompts
    from twice.data import load_dataset
    from twice.gemma3 import PRESETS, Gemma3
    from twice.tokenizer import Tokenizer

    ds = load_dataset(data_dir)
    corpus = [prompts.render_item(it.title, it.id, desc_chars=0) for it in ds.items[1:]]
    corpus += [prompts.recommendation_prompt("", "", True), prompts.recommendation_prompt("", "", False),
               prompts.SYSTEM_RECOMMENDER, prompts.SYSTEM_ITEM_EXPERT, prompts.item_description_prompt("x"),
               prompts.teacher_prompt("", "", [])]
    corpus += [f"<think>likes {it.title}</think><item>{it.id}</item>" for it in ds.items[1:200]]
    tmp = out.with_name(out.name + ".tmp")
    tok = Tokenizer.train_tiny(tmp / "tok", corpus, vocab_size=512)
    torch.manual_seed(seed)
    model = Gemma3.from_config(PRESETS["tiny"])
    model.save_pretrained(out, tokenizer_path=tmp / "tok" / "tokenizer.model")   # written atomically
    import shutil
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"tiny model: {sum(p.numel() for p in model.parameters())} parameters, vocab {tok.vocab_size} -> {out}")
    return out


# ---------------------------------------------------------------------------------------------------------------
# stages

def _kept_rationales(run_dir: Path) -> int:
    f = run_dir / "rationales.jsonl"
    if not f.exists():
        return 0
    return sum(1 for line in f.read_text().splitlines() if line.strip())


def stage_command(stage: str, out: Path, model_dir: Path, tiny: bool, configs: Path = CONFIGS,
                  preset: str = "", eval_procs: int = 1) -> list[str] | None:
    """argv of a stage's subprocess (None for the in-process tiny model). eval_procs > 1: eval runs under torchrun
    as that many processes (users strided over ranks: eval.py's multi-process path, gloo on CPU)."""
    py = sys.executable
    data, sas = out / "data", out / "sasrec"
    task = TASK_TINY if tiny else []
    t = lambda key: TINY.get(key, []) if tiny else []  # noqa: E731
    if stage == "model":
        return None if tiny else [py, "-m", "twice.convert", "gemma-3-270m"]
    if stage == "data":
        return [py, "-m", "twice.data", "prepare", str(configs / "data.yaml"), f"out_dir={data}"] + t("data")
    if stage == "sasrec":
        return [py, str(ROOT / "train_sasrec.py"), str(configs / "sasrec.yaml"), f"train.data_dir={data}",
                f"train.out_dir={sas}"] + t("sasrec")
    if stage == "sasrec_reward":
        return [py, str(ROOT / "train_sasrec.py"), str(configs / "sasrec-reward.yaml"), f"train.data_dir={data}",
                f"train.out_dir={out / 'sasrec-reward'}"] + t("sasrec")
    if stage == "rationales":
        return [py, str(ROOT / "build_rationales.py"), str(configs / "rationales.yaml"), f"data_dir={data}",
                f"run_dir={out / 'rationales'}", f"teacher.model_path={model_dir}",
                f"rationale.exemplars={ROOT / 'configs' / 'teacher_exemplars.jsonl'}"] + t("rationales")
    if stage == "sft":
        kept = _kept_rationales(out / "rationales")
        mix = ([f"mix.t3_source={out / 'rationales' / 'rationales.jsonl'}"] if kept else
               ["mix.t3_source=", "mix.reason=0"])
        if not kept and (out / "rationales" / "stats.json").exists():
            print("pipeline: stage 1 kept no rationale (see OUT/rationales/stats.json); SFT trains T1 + T2 only")
        return [py, str(ROOT / "train_sft.py"), str(configs / "sft.yaml"), f"run_dir={out / 'sft'}",
                f"model.path={model_dir}", f"data_dir={data}"] + mix + task + t("sft")
    if stage in VARIANTS or stage == "grpo_C":  # C (study): GRPO straight from the base model, E's rewards
        return [py, str(ROOT / "train_grpo.py"), str(configs / "grpo.yaml"), f"run_dir={out / stage}",
                f"model.path={model_dir if stage == 'grpo_C' else out / 'sft' / 'final'}", f"data_dir={data}",
                f"sasrec_dir={out / 'sasrec-reward' / 'best'}",
                f"rollout.budget_from={out / 'rationales' / 'rationales.jsonl'}",
                f"rewards.weights={VARIANTS.get(stage, VARIANTS['grpo_E'])}"] + task + t("grpo")
    if stage == "eval":
        launch = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={eval_procs}"] \
            if eval_procs > 1 else [py]
        grpo = [s for s in preset_stages(preset) if s.startswith("grpo_")]
        return launch + [
            str(ROOT / "eval.py"), str(configs / "eval.yaml"), f"run_dir={out / 'eval'}", f"data_dir={data}",
            f"sasrec_dir={sas / 'best'}", f"models.base.path={model_dir}", f"models.sft.path={out / 'sft' / 'final'}"
        ] + [f"models.{s}.path={out / s / 'final'}" for s in grpo] + task + t("eval")
    raise ValueError(f"unknown stage {stage!r}")


def stage_outputs(stage: str, out: Path, model_dir: Path) -> list[Path]:
    """Files whose existence (with a recorded exit code 0) means the stage is complete."""
    return {
        "model": [model_dir / "config.json", model_dir / "tokenizer.model"],
        "data": [out / "data" / "users.jsonl", out / "data" / "candidates_test.jsonl"],
        "sasrec": [out / "sasrec" / "best" / "model.safetensors", out / "sasrec" / "results.json"],
        "sasrec_reward": [out / "sasrec-reward" / "best" / "model.safetensors", out / "sasrec-reward" / "results.json"],
        "rationales": [out / "rationales" / "stats.json"],
        "sft": [out / "sft" / "final" / "config.json"],
        "grpo_D": [out / "grpo_D" / "final" / "config.json"],
        "grpo_E": [out / "grpo_E" / "final" / "config.json"],
        "grpo_C": [out / "grpo_C" / "final" / "config.json"],
        "eval": [out / "eval" / "results.json", out / "eval" / "results.md"],
    }[stage]


UNPACED = ("data", "model")   # downloads / conversions, usually cache hits: they say nothing about compute speed


def eta_s(budgets: dict[str, float], done: dict[str, float], todo: list[str]) -> float:
    """Seconds left: the remaining stages' budgets, scaled by how long the compute stages run so far took against
    theirs (a slower or busier machine than the budgets' stretches the estimate)."""
    done = {s: t for s, t in done.items() if s not in UNPACED}
    ran = sum(budgets[s] for s in done)
    speed = sum(done.values()) / ran if ran > 0 and sum(done.values()) > 0 else 1.0
    return speed * sum(budgets[s] for s in todo)


def _fmt_s(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ---------------------------------------------------------------------------------------------------------------
# the table

PAIRS = (("sft", "base"), ("grpo_E", "sft"), ("grpo_E", "sasrec"))  # A vs B: eval.py's paired


def _cell(m: dict | None) -> str:
    """{'value', 'ci95'} -> '0.875 [0.53, 0.98]' (a closed-form baseline has no interval)."""
    if not m:
        return "-"
    ci = m.get("ci95")
    return f"{m['value']:.3f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else "")


def _diff(c: dict | None) -> str:
    if not c:
        return "-"
    p = f", p = {c['mcnemar']['p']:.3g}" if "mcnemar" in c else ""
    return f"{c['diff']:+.3f} [{c['ci95'][0]:+.3f}, {c['ci95'][1]:+.3f}]{p}"


def final_table(results: dict) -> str:
    """Markdown: SASRec, base, +SFT, +SFT+GRPO (E), random x HR@1, HR@5, NDCG@5 under both protocols (95%
    intervals) + greedy validity and format; then the paired tests of each stage against the one it builds on."""
    cols = [("sampling", "hr@1"), ("sampling", "hr@5"), ("sampling", "ndcg@5"),
            ("exact", "hr@1"), ("exact", "hr@5"), ("exact", "ndcg@5"), ("greedy", "valid"), ("greedy", "format")]
    name = {"sampling": "paper sampling", "exact": "exact", "greedy": "greedy"}
    head = ["model"] + [f"{name[p]} {m.upper() if p != 'greedy' else m}" for p, m in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    random = results.get("baselines", {}).get("random")
    rows = [(key, label, results["models"].get(key)) for key, label in ROWS]
    rows += [("random", "random (expectation)", random)] if random else []
    for key, label, m in rows:
        if m is None:
            continue
        cells = [_cell(m.get(p, {}).get(k)) if not (key in ("sasrec", "random") and p == "greedy") else "-"
                 for p, k in cols]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    n = results["n_users"]
    unsampled = [label for key, label, m in rows if m and key not in ("sasrec", "random") and "sampling" not in m]
    skipped = (f" {', '.join(unsampled)}: the sampling protocol was not run (`sampling: false` in eval.yaml: it never "
               f"answers in format, see its greedy valid rate), so no sampling test involves it." if unsampled else "")
    lines += ["", f"MovieLens-100k, {n} test users x {results['n_candidates']} candidates (target + negatives never "
                  f"seen by the user); 95% intervals in brackets (Wilson / bootstrap). paper sampling: 5 samples at "
                  f"T=1.5 (top-k 120, top-p 0.95), item IDs in sample order; exact: every candidate ranked by "
                  f"log p(<item>ID</item> | prompt, greedy rationale); greedy valid = the greedy answer names a "
                  f"candidate, format = `<think>...</think><item>ID</item>` well formed. SASRec's own ranking fills "
                  f"both protocols. Everything: eval/results.json." + skipped, "",
              "| paired, same users (A - B) | protocol | HR@1 (McNemar p) | HR@5 (McNemar p) | NDCG@5 |",
              "|---|---|---|---|---|"]
    labels = dict(ROWS)
    for a, b in PAIRS:
        c = results.get("paired", {}).get(f"{a} vs {b}")
        for proto in ("exact", "sampling"):
            if c and proto in c:
                lines.append(f"| {labels[a]} vs {labels[b]} | {proto} | " +
                             " | ".join(_diff(c[proto].get(k)) for k in ("hr@1", "hr@5", "ndcg@5")) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m twice.pipeline", description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="random tiny Gemma-3 + tiny tokenizer, tiny step counts (CI)")
    ap.add_argument("--out", default=None, help="output root (default runs/quickstart, or runs/quickstart-tiny)")
    ap.add_argument("--redo", default=None, choices=STUDY_STAGES, help="rerun this stage and every stage after it")
    ap.add_argument("--threads", type=int, default=0, help="torch/OMP threads per stage (0 = torch's default)")
    ap.add_argument("--eval-procs", type=int, default=0,
                    help="eval as N processes of one thread each (torchrun; on 2 CPU cores 2 x 1 thread decodes "
                         "~1.2x faster than 1 x 2 threads: the small decode matmuls scale poorly across threads); "
                         "0 = 2, or 1 under --tiny (there a second process costs more to start than it saves)")
    ap.add_argument("--configs", default=str(CONFIGS), help="folder of the stage YAMLs (default configs/quickstart)")
    ap.add_argument("--dry-run", action="store_true", help="print the stage commands, run nothing")
    ap.add_argument("--preset", default="", choices=["", "study"], help="study: issue 13's study (configs/study/)")
    args = ap.parse_args(argv)
    args.eval_procs = args.eval_procs or (1 if args.tiny else 2)
    STAGES_RUN = preset_stages(args.preset)
    if args.preset == "study" and args.configs == str(CONFIGS):
        args.configs = str(STUDY_CONFIGS)
    configs = Path(args.configs).expanduser().resolve()
    missing = [f"{n}.yaml" for n in ("data", "sasrec", "sasrec-reward", "rationales", "sft", "grpo", "eval")
               if not (configs / f"{n}.yaml").is_file()]
    if missing:
        sys.exit(f"pipeline: error: --configs {configs}: no {', '.join(missing)} there")
    name = "study" if args.preset == "study" else "quickstart"
    out = Path(args.out or (f"runs/{name}-tiny" if args.tiny else f"runs/{name}")).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "pipeline.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if state.get("tiny", args.tiny) != args.tiny:
        sys.exit(f"pipeline: {out} holds a {'tiny' if state['tiny'] else 'real'} run; use another --out")
    state["tiny"] = args.tiny
    state.setdefault("stages", {})
    if args.redo:
        for s in STAGES_RUN[STAGES_RUN.index(args.redo):]:
            state["stages"].pop(s, None)

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    model_dir = out / "model"
    t_all = time.time()
    budgets = BUDGET_TINY_S if args.tiny else BUDGET_STUDY_S if args.preset == "study" else BUDGET_S
    ran: dict[str, float] = {}  # wall seconds of the stages run in this invocation (ETA scaling)

    def pending(i: int) -> list[str]:  # stages from index i on that will run (not recorded complete)
        return [s for s in STAGES_RUN[i:] if state["stages"].get(s, {}).get("rc") != 0]

    if not args.dry_run:
        print(f"pipeline: {len(pending(0))} stage(s) to run, about {_fmt_s(eta_s(budgets, {}, pending(0)))} "
              f"(stage budgets measured on 2 CPU cores: {', '.join(f'{s} {budgets[s]} s' for s in pending(0))})",
              flush=True)
    for i, stage in enumerate(STAGES_RUN, 1):
        if stage == "model" and not args.tiny:  # the cached conversion's path is what convert prints
            from twice.convert import default_cache
            model_dir = default_cache() / "gemma-3-270m"
        cmd = stage_command(stage, out, model_dir, args.tiny, configs, args.preset, args.eval_procs)
        outputs = stage_outputs(stage, out, model_dir)
        rec = state["stages"].get(stage, {})
        if rec.get("rc") == 0 and all(p.exists() for p in outputs):
            print(f"[{i}/{len(STAGES_RUN)}] {stage}: complete, skipped ({rec.get('wall_s', '?')} s when it ran)",
                  flush=True)
            continue
        print(f"\n[{i}/{len(STAGES_RUN)}] {stage}: " + (" ".join(cmd) if cmd else "build the tiny model in-process"),
              flush=True)
        if args.dry_run:
            continue
        t0, c0 = time.time(), _children_cpu() + _self_cpu()
        if cmd is None:
            build_tiny_model(out / "data", model_dir)
            rc = 0
        else:
            multi = stage == "eval" and args.eval_procs > 1  # one thread per process unless --threads says more
            rc = subprocess.run(cmd, cwd=ROOT, env={**env, "OMP_NUM_THREADS": str(args.threads or 1)} if multi
                                else env).returncode
        rec = {"rc": rc, "wall_s": round(time.time() - t0, 1),
               "cpu_s": round(_children_cpu() + _self_cpu() - c0, 1), "cmd": cmd}
        state["stages"][stage] = rec
        write_json_atomic(state_path, state)
        if rc != 0:
            print(f"pipeline: stage {stage} failed (exit {rc}); fix it and rerun: finished stages are skipped",
                  file=sys.stderr)
            return rc
        missing = [str(p) for p in outputs if not p.exists()]
        if missing:
            print(f"pipeline: stage {stage} exited 0 but did not write {missing}", file=sys.stderr)
            state["stages"][stage]["rc"] = -1
            write_json_atomic(state_path, state)
            return 1
        ran[stage] = rec["wall_s"]
        left = pending(i)
        print(f"[{i}/{len(STAGES_RUN)}] {stage}: done in {rec['wall_s']} s wall, {rec['cpu_s']} s CPU "
              f"({time.time() - t_all:.0f} s so far" + (f", ETA {_fmt_s(eta_s(budgets, ran, left))} for "
                                                        f"{', '.join(left)})" if left else ")"), flush=True)
    if args.dry_run:
        return 0
    results = json.loads((out / "eval" / "results.json").read_text())
    table = final_table(results)
    state["total_wall_s"] = round(sum(s.get("wall_s", 0) for s in state["stages"].values()), 1)
    state["total_cpu_s"] = round(sum(s.get("cpu_s", 0) for s in state["stages"].values()), 1)
    write_json_atomic(state_path, state)
    timing = "\n".join(f"| {s} | {state['stages'][s]['wall_s']} | {state['stages'][s]['cpu_s']} |" for s in STAGES_RUN)
    if args.preset == "study":  # the RQ3 table with paired tests (twice/study.py) instead of the quickstart's
        from twice.study import rq3_table
        table = rq3_table(out)
    text = (table + "\n| stage | wall s | CPU s |\n|---|---|---|\n" + timing +
            f"\n| total | {state['total_wall_s']} | {state['total_cpu_s']} |\n")
    write_atomic(out / "results.md", text)
    print("\n" + text + f"\n(written to {out / 'results.md'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
