"""Every script answers a configuration or input error with ONE line that names the field and the path (no
traceback), before any model is loaded. One subprocess per case; each fails within the imports' time.

    python -m pytest tests/test_bad_inputs.py -q
    python tests/test_bad_inputs.py          # prints the table: input -> the one line printed
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fakes(tmp: Path) -> dict:
    """Inputs that exist and pass the cheap checks (files present, headers intact) but hold no real model: a case
    fails at its bad input or, if that input were not checked first, at a model load (too late: the test fails)."""
    import torch
    from safetensors.torch import save_file
    data, model, sas, trunc = tmp / "data", tmp / "model", tmp / "sasrec", tmp / "trunc"
    for d in (data, model, sas, trunc):
        d.mkdir(parents=True, exist_ok=True)
    for n in ("items.jsonl", "users.jsonl", "meta.json"):
        (data / n).write_text("")
    for d in (model, trunc):
        (d / "config.json").write_text("{}")
        (d / "tokenizer.model").write_bytes(b"x")
        save_file({"w": torch.zeros(1000)}, str(d / "model.safetensors"))
    full = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(full[: len(full) // 3])           # a copy cut short
    (sas / "config.json").write_text("{}")
    save_file({"w": torch.zeros(4)}, str(sas / "model.safetensors"))
    (tmp / "empty.jsonl").write_text("\n")
    return {"DATA": str(data), "MODEL": str(model), "SASREC": str(sas), "TRUNC": str(trunc),
            "EMPTY": str(tmp / "empty.jsonl"), "NOPE": str(tmp / "nope")}


Q = "configs/quickstart/"
# (script argv, what the line must contain)
CASES = {
    "train_sasrec misspelled key": (["train_sasrec.py", Q + "sasrec.yaml", "train.epoch=3"], "train.epochs"),
    "train_sasrec missing data": (["train_sasrec.py", Q + "sasrec.yaml", "train.data_dir=NOPE"], "train.data_dir: NOPE does not exist"),
    "build_rationales misspelled key": (["build_rationales.py", Q + "rationales.yaml", "n_user=3"], "n_users"),
    "build_rationales missing data": (["build_rationales.py", Q + "rationales.yaml", "data_dir=NOPE"], "data_dir: NOPE does not exist"),
    "build_rationales missing teacher": (["build_rationales.py", Q + "rationales.yaml", "data_dir=DATA", "teacher.backend=local", "teacher.model_path=NOPE"], "teacher.model_path: NOPE does not exist"),
    "build_rationales malformed meta.json": (["build_rationales.py", Q + "rationales.yaml", "data_dir=DATA"], "DATA/meta.json: not valid JSON"),
    "train_sft misspelled key": (["train_sft.py", Q + "sft.yaml", "optim.lrate=1"], "optim.lr"),
    "train_sft missing data": (["train_sft.py", Q + "sft.yaml", "model.path=MODEL", "data_dir=NOPE"], "data_dir: NOPE does not exist"),
    "train_sft missing model": (["train_sft.py", Q + "sft.yaml", "model.path=NOPE", "data_dir=DATA"], "model.path: NOPE does not exist"),
    "train_sft truncated weights": (["train_sft.py", Q + "sft.yaml", "model.path=TRUNC", "data_dir=DATA"], "model.path: TRUNC/model.safetensors is truncated: "),
    "train_sft empty T3 pool": (["train_sft.py", Q + "sft.yaml", "model.path=MODEL", "data_dir=DATA", "mix.t3_source=EMPTY"], "mix.t3_source: EMPTY has no records"),
    "train_grpo misspelled key": (["train_grpo.py", Q + "grpo.yaml", "rollout.group=2"], "rollout.group_size"),
    "train_grpo missing sasrec": (["train_grpo.py", Q + "grpo.yaml", "model.path=MODEL", "data_dir=DATA", "sasrec_dir=NOPE", "rollout.max_new_tokens=8"], "sasrec_dir: NOPE does not exist"),
    "eval misspelled key": (["eval.py", Q + "eval.yaml", "max_user=3"], "max_users"),
    "eval missing model": (["eval.py", Q + "eval.yaml", "data_dir=DATA", "sasrec_dir=SASREC", "models.base.path=MODEL", "models.sft.path=NOPE", "models.grpo_E.path=MODEL"], "models.sft.path=NOPE: no such folder"),  # eval.py's own check_inputs (evalfix)
    "twice.data misspelled key": (["-m", "twice.data", "prepare", Q + "data.yaml", "k_cor=3"], "k_core"),
    "twice.data missing raw dir": (["-m", "twice.data", "prepare", "configs/data/recbole.yaml", "raw_dir=NOPE", "domain=x", "out_dir=NOPE/out"], "NOPE/x.inter not found"),
    "twice.serve missing model": (["-m", "twice.serve", "--model", "NOPE"], "--model: NOPE does not exist"),
    "twice.serve misspelled option": (["-m", "twice.serve", "--model", "MODEL", "--prot", "1"], "unrecognized arguments: --prot 1"),
    "twice.serve sasrec without data": (["-m", "twice.serve", "--model", "MODEL", "--sasrec", "SASREC"], "no train_sasrec.py config.yaml beside it names its dataset"),
    "twice.pipeline misspelled option": (["-m", "twice.pipeline", "--tinny"], "unrecognized arguments: --tinny"),
    "twice.pipeline missing configs": (["-m", "twice.pipeline", "--configs", "NOPE", "--out", "NOPE/out"], "--configs NOPE"),
}


def run_case(argv: list[str], paths: dict) -> subprocess.CompletedProcess:
    argv = [a for a in argv]
    for k, v in paths.items():
        argv = [a.replace(k, v) for a in argv]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable] + argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def output_lines(p) -> list[str]:
    """The error stream minus argparse's usage line (argparse prints `usage: ...` then the one error line). stdout may
    carry info lines (e.g. twice/precision.py's dtype choice); the error is the one stderr line."""
    return [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith(("usage:", "  "))]


@pytest.mark.parametrize("case", list(CASES))
def test_one_line_error(case, tmp_path):
    paths = fakes(tmp_path)
    argv, want = CASES[case]
    for k, v in paths.items():
        want = want.replace(k, v)
    p = run_case(argv, paths)
    lines = output_lines(p)
    assert p.returncode != 0, (case, p.stdout[-2000:], p.stderr[-2000:])
    assert "Traceback" not in p.stderr + p.stdout, (case, p.stderr[-3000:])
    assert len(lines) == 1, (case, lines)
    assert want in lines[0], (case, lines[0], want)


if __name__ == "__main__":   # the bad-input table for the README / a report
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        paths = fakes(Path(d))
        print("| input | the one line printed |\n|---|---|")
        for case, (argv, _) in CASES.items():
            line = output_lines(run_case(argv, paths))
            shown = " ".join(line).replace(d, "$TMP")
            print(f"| {case}: `{' '.join(argv)}` | `{shown}` |")
