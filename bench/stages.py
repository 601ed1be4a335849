"""CPU seconds per pipeline stage in float32 vs `dtype: auto` (vs bfloat16), every model stage of the main job at a
reduced but identical size in each dtype: issue 12's "main job <= 1/3 of the fp32 CPU-seconds", without running the
main job twice.

    python bench/stages.py --data /work/runs/mainjob/data --reward /work/runs/mainjob/sasrec-reward/best --threads 2
    python bench/stages.py --data runs/quickstart/data --work /tmp/stagebench --out stages.json   # the defaults
    python bench/stages.py --tiny --data DIR --stages sft,eval_base --also ''     # the tiny model, 1 step (CI-sized)
    python bench/stages.py ... --dry-run                # print every (stage, dtype) command, run nothing

Inputs: a prepared data folder (`python -m twice.data prepare configs/quickstart/data.yaml out_dir=DIR`; read only)
and the real model (~/.cache/twice/gemma-3-270m; --tiny: the pipeline's random tiny Gemma-3, built from --data into
WORK/model). GRPO also needs a SASRec reward model (--reward, default DATA/../sasrec-reward/best); without one a tiny
SASRec (the pipeline's --tiny sizes) is trained into WORK/sasrec-reward first, untimed (SASRec is dtype-independent).

Each (stage, dtype) runs as its own subprocess: the command twice.pipeline runs for that stage (`stage_command`, the
same script and configs/quickstart YAML), followed by overrides that shrink it (identical in every dtype), relocate its
run_dir under WORK/runs/ (emptied first: the scripts resume) and set the script's dtype key:
    rationales  build_rationales.py, local teacher (the 270m)   teacher.dtype   n_users (--teacher-users) users
    sft         train_sft.py, LoRA, T1 + T2 + T3                model.dtype     --sft-steps x --sft-batch, + end eval
    grpo        train_grpo.py (variant E) from one SFT folder   model.dtype     --grpo-steps x (2 prompts x 4 samples)
    eval_base   eval.py, the base model                         dtype           --users users, greedy+exact+sampling
    eval_sft    eval.py, the SFT model                          dtype           the same
T3 rationales for SFT (and GRPO's completion budget) come from the evidence teacher (no model, < 1 s, untimed), as in
the quickstart. GRPO and eval_sft start from ONE SFT folder in every dtype (--sft, default the first dtype's SFT run of
this bench). A fine-tuned folder stores float32 weights, which `auto` computes in fp32 (twice/precision.py): so every
stage runs in float32 and auto (--dtypes), and grpo and eval_sft also in bfloat16 (--also; on the base model auto is
bf16 already on a bf16 CPU); each cell says what the child recorded as its compute dtype (metrics.jsonl /
results.json `compute_dtype`) where it differs from the one asked. Not run: data, SASRec and SASRec-reward (fp32 SASRec whatever the
dtype key) and the tiny-model conversion.

CPU seconds are the child's rusage (RUSAGE_CHILDREN delta: user + system over the child and what it waited for), wall
too; every child gets OMP_NUM_THREADS = MKL_NUM_THREADS = --threads. Timings on a shared box are noisy: CPU seconds
less than wall, but contention still inflates them; the load average is printed before and after.
Prints a markdown table (stage | CPU-s per dtype | fp32/other | what the stage did) and writes everything as JSON to
--out (default WORK/stages.json).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twice.fileio import write_json_atomic  # noqa: E402
from twice.pipeline import TINY, build_tiny_model, stage_command  # noqa: E402

STAGES = ("rationales", "sft", "grpo", "eval_base", "eval_sft")
PIPELINE_STAGE = {"rationales": "rationales", "sft": "sft", "grpo": "grpo_E", "eval_base": "eval", "eval_sft": "eval"}
DTYPE_KEY = {"rationales": "teacher.dtype", "sft": "model.dtype", "grpo": "model.dtype", "eval_base": "dtype",
             "eval_sft": "dtype"}   # each script's config field for the compute dtype
NOT_RUN = {"data": "no model", "sasrec": "fp32 SASRec, no dtype key", "sasrec_reward": "fp32 SASRec, no dtype key"}


def sizes(a) -> dict[str, list[str]]:
    """Overrides that shrink each stage, identical in every dtype (appended after the pipeline's own: they win)."""
    return {
        "rationales": ["teacher.backend=local", f"n_users={a.teacher_users}", f"chunk={a.teacher_users}",
                       f"teacher.batch_size={a.teacher_users}"],
        "sft": [f"steps={a.sft_steps}", f"optim.batch_size={a.sft_batch}", "eval.every=0", "eval.patience=0",
                f"eval.loss_users={a.sft_batch}", f"eval.hr_users={max(1, a.sft_batch // 2)}", "checkpoint_every=0"],
        "grpo": [f"steps={a.grpo_steps}", "checkpoint_every=0"],
        "eval_base": [f"max_users={a.users}", "sasrec_dir="],
        "eval_sft": [f"max_users={a.users}", "sasrec_dir="],
    }


def command(stage: str, dtype: str, work: Path, model_dir: Path, sft_dir: Path, a) -> list[str]:
    """argv of one (stage, dtype) run: twice.pipeline's stage command + the bench's size, run_dir and dtype."""
    cmd = stage_command(PIPELINE_STAGE[stage], work, model_dir, a.tiny)
    extra = sizes(a)[stage] + [f"run_dir={work / 'runs' / f'{stage}-{dtype}'}"]
    if stage == "grpo":
        extra.append(f"model.path={sft_dir}")
    if stage.startswith("eval_"):   # one model per run (the pipeline's four rows would be 4x the work)
        name, path = ("base", model_dir) if stage == "eval_base" else ("sft", sft_dir)
        extra.append(f"models={{{name}: {{path: '{path}', label: {name}, reasoning: true}}}}")
    return cmd + extra + [f"{DTYPE_KEY[stage]}={dtype}"]


def _jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def describe(stage: str, run_dir: Path) -> tuple[str | None, str]:
    """(compute dtype the child recorded, what it did) from its run_dir's metrics.jsonl / stats.json / results.json."""
    if stage == "rationales":
        m = [r for r in _jsonl(run_dir / "metrics.jsonl") if "compute_dtype" in r]
        st = json.loads((run_dir / "stats.json").read_text()) if (run_dir / "stats.json").exists() else {}
        tok = st.get("tokens", {})
        return (m[-1]["compute_dtype"] if m else None,
                f"{st.get('done', '?')} users, {tok.get('prompt', '?')} prompt + {tok.get('completion', '?')} "
                f"completion tokens, kept {st.get('kept', '?')}")
    if stage == "sft":
        m = [r for r in _jsonl(run_dir / "metrics.jsonl") if "tokens" in r and "compute_dtype" in r]
        return (m[-1]["compute_dtype"] if m else None,
                f"{len(m)} steps, {sum(r['examples'] for r in m)} examples, {sum(r['tokens'] for r in m)} tokens "
                f"({sum(r['response_tokens'] for r in m)} response) + end eval")
    if stage == "grpo":
        m = [r for r in _jsonl(run_dir / "metrics.jsonl") if "completion_len_mean" in r]
        return (m[-1]["compute_dtype"] if m else None,
                f"{len(m)} steps, completion length mean "
                f"{' / '.join('%.0f' % r['completion_len_mean'] for r in m)} tokens "
                f"(max {max((r['completion_len_max'] for r in m), default=0)})")
    res = run_dir / "results.json"
    r = json.loads(res.read_text()) if res.exists() else {}
    cd = r.get("compute_dtype", {})
    model = "base" if stage == "eval_base" else "sft"
    protos = [p for p in ("greedy", "exact", "sampling") if p in r.get("models", {}).get(model, {})]
    return cd.get(model), f"{r.get('n_users', '?')} users: {' + '.join(protos)}"


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_one(cmd: list[str], env: dict, log: Path) -> tuple[int, float, float]:
    """-> (exit code, CPU seconds, wall seconds) of one child; its output goes to `log`."""
    t0, c0 = time.perf_counter(), _children_cpu()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    return rc, _children_cpu() - c0, time.perf_counter() - t0


def table(rows: list[dict], dtypes: list[str]) -> str:
    """Markdown: stage | CPU-s (wall) per dtype, with the compute dtype each recorded | fp32 / each other dtype |
    what the stage did (first dtype's run; the others' in the JSON). Totals over the stages every dtype ran."""
    base, others = dtypes[0], dtypes[1:]
    head = (["stage"] + [f"{d} CPU-s (wall)" for d in dtypes] + [f"{base}/{d}" for d in others] +
            [f"what it did ({base} run)"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["stage"]]
        for d in dtypes:
            c = r["runs"].get(d)
            if c is None or c["rc"] != 0:
                cells.append("-" if c is None else f"FAILED (exit {c['rc']})")
                continue
            shown = "" if c["compute_dtype"] in (None, d) else f" [{c['compute_dtype']}]"
            cells.append(f"{c['cpu_s']:.1f} ({c['wall_s']:.1f}){shown}")
        ok = {d: r["runs"][d]["cpu_s"] for d in dtypes if d in r["runs"] and r["runs"][d]["rc"] == 0}
        cells += [f"{ok[base] / ok[d]:.2f}x" if base in ok and d in ok and ok[d] > 0 else "-" for d in others]
        cells.append(r["runs"].get(base, {}).get("what", "-"))
        lines.append("| " + " | ".join(cells) + " |")
    # totals: the baseline over every stage it ran; each other dtype over the stages both ran, its ratio on those
    okrun = [{d: c["cpu_s"] for d, c in r["runs"].items() if c["rc"] == 0} for r in rows]
    tb = sum(o[base] for o in okrun if base in o)
    cells, ratios, notes = [f"{tb:.1f}"], [], []
    for d in others:
        both = [(o[base], o[d]) for o in okrun if base in o and d in o]
        td = sum(x for _, x in both)
        cells.append(f"{td:.1f}" if both else "-")
        ratios.append(f"{sum(b for b, _ in both) / td:.2f}x" if td > 0 else "-")
        if len(both) < sum(base in o for o in okrun):
            notes.append(f"{d} over {', '.join(r['stage'] for r, o in zip(rows, okrun) if base in o and d in o)}")
    lines.append("| total | " + " | ".join(cells + ratios) + " | " + "; ".join(notes) + " |")
    lines.append("")
    lines.append("[x] = the compute dtype the child recorded when it differs from the requested one (`auto` on a "
                 "folder of float32 weights computes in float32). Not run: " +
                 "; ".join(f"{s} ({why})" for s, why in NOT_RUN.items()) + ".")
    return "\n".join(lines) + "\n"


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python bench/stages.py", description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--data", default="runs/quickstart/data", help="prepared data folder (read only)")
    ap.add_argument("--model", default="~/.cache/twice/gemma-3-270m", help="HF folder (ignored with --tiny)")
    ap.add_argument("--reward", default="", help="SASRec reward model folder (default DATA/../sasrec-reward/best)")
    ap.add_argument("--sft", default="", help="SFT final/ folder for grpo and eval_sft (default: this bench's SFT "
                                             "run in the first dtype)")
    ap.add_argument("--work", default="/tmp/stagebench", help="scratch folder (its runs/ are emptied per run)")
    ap.add_argument("--out", default="", help="JSON results (default WORK/stages.json)")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("--dtypes", default="float32,auto", help="every stage runs in these; the first is the baseline")
    ap.add_argument("--also", default="bfloat16:grpo,eval_sft",
                    help="DTYPE:STAGE,STAGE extra runs (default: bf16 forced where auto meets a fine-tuned folder's "
                         "float32 weights; on the base model auto is already bf16 on a bf16 CPU); '' = none")
    ap.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every child")
    ap.add_argument("--tiny", action="store_true", help="the pipeline's random tiny Gemma-3 and --tiny sizes (CI)")
    ap.add_argument("--teacher-users", type=int, default=None, help="rationales: users (default 4; tiny 2)")
    ap.add_argument("--sft-steps", type=int, default=None, help="default 3; tiny 1")
    ap.add_argument("--sft-batch", type=int, default=None, help="default 4; tiny 2")
    ap.add_argument("--grpo-steps", type=int, default=None, help="default 2; tiny 1")
    ap.add_argument("--users", type=int, default=None, help="eval: test users (default 4; tiny 1)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = ap.parse_args(argv)
    for k, real, tiny in (("teacher_users", 4, 2), ("sft_steps", 3, 1), ("sft_batch", 4, 2), ("grpo_steps", 2, 1),
                          ("users", 4, 1)):
        if getattr(a, k) is None:
            setattr(a, k, tiny if a.tiny else real)
    stages = [s for s in a.stages.split(",") if s]
    bad = [s for s in stages if s not in STAGES]
    if bad:
        sys.exit(f"bench/stages.py: error: --stages {','.join(bad)}: not one of {','.join(STAGES)}")
    dtypes = [d for d in a.dtypes.split(",") if d]
    also_d, _, also_s = a.also.partition(":")
    also = {s: [also_d] for s in also_s.split(",") if s and also_d and also_d not in dtypes}
    if also:
        dtypes.append(also_d)
    runs = {s: [d for d in dtypes if d != also_d or s in also] for s in stages}   # stage -> dtypes it runs in
    data = Path(a.data).expanduser().resolve()
    if not (data / "users.jsonl").is_file():
        sys.exit(f"bench/stages.py: error: --data {data}: no users.jsonl (python -m twice.data prepare "
                 f"configs/quickstart/data.yaml out_dir={a.data})")
    work = Path(a.work).expanduser().resolve()
    (work / "runs").mkdir(parents=True, exist_ok=True)
    # stage_command reads its inputs at WORK/{data, sasrec-reward/best, rationales}: point them at ours
    link = work / "data"
    if link.is_symlink() or link.exists():
        if link.resolve() != data:
            if not link.is_symlink():
                sys.exit(f"bench/stages.py: error: {link} exists and is not a link to {data}: use another --work")
            link.unlink()
    if not link.exists():
        link.symlink_to(data, target_is_directory=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    model_dir = work / "model" if a.tiny else Path(a.model).expanduser().resolve()
    sft_dir = Path(a.sft).expanduser().resolve() if a.sft else work / "runs" / f"sft-{dtypes[0]}" / "final"

    if a.dry_run:
        for s in stages:
            for d in runs[s]:
                print(f"{s} {d}: " + " ".join(command(s, d, work, model_dir, sft_dir, a)))
        return 0
    print(f"stages {','.join(stages)} x dtypes {','.join(dtypes)}, {a.threads} threads per child, "
          f"{'tiny model' if a.tiny else model_dir}; load average before: {_loadavg()}", flush=True)

    # untimed inputs: the tiny model, the reward SASRec, the evidence teacher's T3 rationales
    if a.tiny and not (model_dir / "config.json").exists():
        build_tiny_model(data, model_dir)
    if not (model_dir / "config.json").is_file():
        sys.exit(f"bench/stages.py: error: --model {model_dir}: no config.json (python -m twice.convert gemma-3-270m)")
    reward = Path(a.reward).expanduser().resolve() if a.reward else data.parent / "sasrec-reward" / "best"
    rlink = work / "sasrec-reward"
    if "grpo" in stages:
        if (reward / "model.safetensors").is_file():   # WORK/sasrec-reward/best -> --reward
            rlink.mkdir(exist_ok=True)
            if (rlink / "best").is_symlink():
                (rlink / "best").unlink()
            if (rlink / "best").exists():
                sys.exit(f"bench/stages.py: error: {rlink / 'best'} exists and is not a link: use another --work")
            (rlink / "best").symlink_to(reward, target_is_directory=True)
        elif not (rlink / "best" / "model.safetensors").is_file():
            print(f"no reward SASRec at {reward}: training a tiny one (untimed)", flush=True)
            cmd = stage_command("sasrec_reward", work, model_dir, False) + TINY["sasrec"]
            if run_one(cmd, env, work / "sasrec-reward.log")[0] != 0:
                sys.exit(f"bench/stages.py: reward SASRec failed, see {work / 'sasrec-reward.log'}")
    if {"sft", "grpo"} & set(stages):
        cmd = stage_command("rationales", work, model_dir, a.tiny) + [
            "teacher.backend=evidence", "teacher.evidence_style=brief", "n_users=150"]
        shutil.rmtree(work / "rationales", ignore_errors=True)
        if run_one(cmd, env, work / "rationales-evidence.log")[0] != 0:
            sys.exit(f"bench/stages.py: evidence rationales failed, see {work / 'rationales-evidence.log'}")

    out = Path(a.out).expanduser() if a.out else work / "stages.json"
    load_before = _loadavg()

    def save(rows: list[dict]) -> str:
        text = table(rows, dtypes)
        write_json_atomic(out, {"threads": a.threads, "dtypes": dtypes, "tiny": a.tiny, "model": str(model_dir),
                                "sft": str(sft_dir), "data": str(data), "load_before": load_before,
                                "load_now": _loadavg(), "rows": rows, "table": text})
        return text

    rows = []
    for s in stages:
        row = {"stage": s, "runs": {}}
        rows.append(row)
        for d in runs[s]:
            if s in ("grpo", "eval_sft") and not (sft_dir / "config.json").is_file():
                print(f"{s} {d}: skipped, no SFT folder at {sft_dir} (run the sft stage or pass --sft)", flush=True)
                continue
            cmd = command(s, d, work, model_dir, sft_dir, a)
            run_dir = work / "runs" / f"{s}-{d}"
            shutil.rmtree(run_dir, ignore_errors=True)   # the scripts resume: a stale run would be skipped
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            log = work / "runs" / f"{s}-{d}.log"
            print(f"{s} {d}: running ({log})", flush=True)
            rc, cpu, wall = run_one(cmd, env, log)
            try:
                compute, what = describe(s, run_dir) if rc == 0 else (None, "")
            except (OSError, ValueError, KeyError) as e:   # a record we misread must not lose the timing
                compute, what = None, f"(could not read its records: {e!r})"
            row["runs"][d] = {"rc": rc, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "compute_dtype": compute,
                              "what": what, "cmd": cmd}
            print(f"{s} {d}: exit {rc}, {cpu:.1f} CPU-s, {wall:.1f} s wall, computed in {compute}; {what}",
                  flush=True)
            if rc != 0:
                print("".join(log.read_text().splitlines(keepends=True)[-20:]), flush=True)
            save(rows)   # after every run: an interrupted bench keeps what it measured
    text = save(rows)
    print("\n" + text + f"\n{a.threads} threads per child; load average after: {_loadavg()}")
    print(f"(written to {out})")
    return 0 if all(c["rc"] == 0 for r in rows for c in r["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
