"""The README's stage-by-stage block, run as written at tiny size: every command of the quickstart chain, in order,
from a fresh working directory, with only size overrides added (and `mix.reason=0` when stage 1 keeps nothing, as
the README says). No download: ~/.cache/twice (HOME is a temp dir) holds the tiny random Gemma-3 in place of the
converted 270m and a small synthetic ml-100k (tests/fixtures/ml100k_like.py) in place of the recbole wheel's files.

    python -m pytest tests/test_readme_chain.py -q        # ~1-2 CPU-min
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from fixtures.ml100k_like import write_ml100k_like  # noqa: E402
from twice.pipeline import STAGES, TASK_TINY, TINY, stage_command  # noqa: E402

SCRIPT_STAGE = {"train_sasrec.py": "sasrec", "build_rationales.py": "rationales", "train_sft.py": "sft",
                "train_grpo.py": "grpo", "eval.py": "eval", "twice.data": "data", "twice.convert": "model",
                "twice.serve": "serve"}


def readme_chain() -> list[list[str]]:
    """The commands of the first ```bash block under '## Stage by stage' (comments stripped, shell-split)."""
    text = (ROOT / "README.md").read_text()
    sec = text[text.index("## Stage by stage"):]
    block = sec[sec.index("```bash\n") + 8:]
    block = block[:block.index("```")]
    return [shlex.split(ln, comments=True) for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]


def stage_of(argv: list[str]) -> str:
    key = argv[2] if argv[1] == "-m" else argv[1]
    if key == "train_sasrec.py" and argv[2].endswith("sasrec-reward.yaml"):
        return "sasrec_reward"      # GRPO's reward model (BCE); sasrec.yaml is eval's SASRec row
    return SCRIPT_STAGE[key]


def _yaml_value(cfg_path: Path, dotted: str):
    from twice.config import read_yaml
    node = read_yaml(cfg_path)
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def test_readme_chain_is_the_pipeline(tmp_path, monkeypatch):
    """The pipeline runs the README's commands: same module/script, same config, the README's own overrides, and
    path overrides that, for an --out named runs/quickstart, restate the paths the YAMLs already hold (so the
    stage-by-stage chain and `python -m twice.pipeline` write the same files with the same settings)."""
    monkeypatch.delenv("TWICE_CACHE", raising=False)
    from twice.convert import default_cache
    cmds = {}
    for argv in readme_chain():
        st = stage_of(argv)
        if st == "grpo":
            st = "grpo_E"
        cmds[st] = argv
    assert set(STAGES) <= set(cmds), sorted(set(STAGES) - set(cmds))
    out = tmp_path / "runs" / "quickstart"          # tmp_path stands for the clone's root
    (out / "rationales").mkdir(parents=True)
    (out / "rationales" / "rationales.jsonl").write_text('{"user": 1}\n')   # stage 1 kept something
    model = default_cache() / "gemma-3-270m"
    assert model == Path("~/.cache/twice/gemma-3-270m").expanduser()

    def where(v: str) -> Path:    # a YAML path as the pipeline would see it, run from the clone's root
        v = os.path.expanduser(v)
        return Path(v) if os.path.isabs(v) else (ROOT if v.startswith("configs/") else tmp_path) / v

    for st in STAGES:
        readme, pipe = cmds[st], stage_command(st, out, model, tiny=False)
        if pipe is None:
            continue
        assert Path(pipe[0]) == Path(sys.executable) and readme[0] == "python"
        pipe = [str(Path(a).relative_to(ROOT)) if a.startswith(str(ROOT) + "/") else a for a in pipe[1:]]
        if st == "model":
            assert pipe == readme[1:]
            continue
        n = 3 if readme[1] == "-m" else 1      # -m twice.data prepare CFG | script.py CFG (then the config)
        assert pipe[:n + 1] == readme[1:n + 2], (st, pipe, readme)
        cfg = ROOT / readme[n + 1]
        readme_over = dict(a.split("=", 1) for a in readme[n + 2:])
        for a in pipe[n + 1:]:
            k, v = a.split("=", 1)
            if k in readme_over:
                rv = readme_over.pop(k)
                assert yaml.safe_load(rv) == yaml.safe_load(v) or where(rv) == Path(v), (st, k, rv, v)
                continue
            yv = _yaml_value(cfg, k)
            assert yv is not None, (st, k)
            assert (where(yv) == Path(v)) if isinstance(yv, str) else yv == yaml.safe_load(v), (st, k, yv, v)
        assert not readme_over, (st, readme_over)   # the pipeline passes every override the README shows


@pytest.mark.usefixtures("one_thread")
def test_readme_chain_runs_as_written(tmp_path):
    work, home = tmp_path / "clone", tmp_path / "home"
    work.mkdir()
    for name in ("configs", "train_sasrec.py", "build_rationales.py", "train_sft.py", "train_grpo.py", "eval.py"):
        (work / name).symlink_to(ROOT / name)
    write_ml100k_like(home / ".cache" / "twice")
    env = {k: v for k, v in os.environ.items() if k not in ("TWICE_CACHE", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(HOME=str(home), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ran = []
    for argv in readme_chain():
        st = stage_of(argv)
        if st == "model":   # instead of downloading the 270m: the tiny model, built once the data exists (below)
            continue
        if st == "serve":   # a server blocks (tests/test_serve.py serves); here: its inputs are what the chain wrote
            serve = argv
            continue
        extra = list(TINY.get("sasrec" if st == "sasrec_reward" else st, [])) + (
            TASK_TINY if st in ("sft", "grpo", "eval") else [])
        if st == "sft" and not (work / "runs/quickstart/rationales/rationales.jsonl").read_text().strip():
            extra.append("mix.reason=0")   # what the README says to do when stage 1 kept nothing
        t0 = time.time()
        p = subprocess.run([sys.executable] + argv[1:] + extra, cwd=work, env=env, capture_output=True, text=True,
                           timeout=600)
        assert p.returncode == 0, (argv, p.stdout[-2000:], p.stderr[-3000:])
        print(f"$ {shlex.join(argv)}   (+ {' '.join(extra)})  -> exit 0, {time.time() - t0:.1f} s wall")
        ran.append(st)
        if st == "data":
            from twice.pipeline import build_tiny_model
            build_tiny_model(work / "runs/quickstart/data", home / ".cache/twice/gemma-3-270m")
    assert ran == ["data", "sasrec", "sasrec_reward", "rationales", "sft", "grpo", "eval"]

    q = work / "runs" / "quickstart"
    res = json.loads((q / "eval" / "results.json").read_text())
    assert set(res["models"]) == {"sasrec", "base", "sft", "grpo_E"}
    assert res["data_dir"].endswith("runs/quickstart/data")
    # one prompt layout, by construction: the resolved task blocks of SFT, GRPO and eval are identical
    tasks = [yaml.safe_load((q / d / "config.yaml").read_text())["task"] for d in ("sft", "grpo_E", "eval")]
    assert tasks[0] == tasks[1] == tasks[2]
    assert tasks[0]["max_history"] == 3 and tasks[0]["n_negatives"] == 9   # task.yaml + the tiny override
    # each stage read the previous stage's output
    g = yaml.safe_load((q / "grpo_E" / "config.yaml").read_text())
    assert g["model"]["path"] == "runs/quickstart/sft/final" and g["sasrec_dir"] == "runs/quickstart/sasrec-reward/best"
    assert yaml.safe_load((q / "sasrec-reward" / "config.yaml").read_text())["sasrec"]["loss"] == "bce"
    assert g["rewards"]["weights"] == {"cg": 1.0, "format": 1.0}
    for d in ("sft", "grpo_E"):
        assert (q / d / "final" / "model.safetensors").is_file()
    from twice.config import check_inputs
    opt = dict(zip(serve[3::2], serve[4::2]))
    check_inputs(*((o, work / opt[o], k) for o, k in (("--model", "model"), ("--sasrec", "sasrec"),
                                                       ("--data", "dataset"))))
