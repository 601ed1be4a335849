"""The quickstart is reproducible: its SASRec stops on an epoch count, not on CPU seconds (the issue: 6 epochs on a
busy machine, more elsewhere, so the SASRec and GRPO rows changed), so the same seed gives the same numbers.

    pytest tests/test_quickstart_repro.py -q
"""
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.ml100k_like import write_ml100k_like  # noqa: E402

Q = ROOT / "configs" / "quickstart"


def test_quickstart_sasrec_is_capped_by_epochs_not_time():
    for f in ("sasrec.yaml", "sasrec-reward.yaml"):    # eval's SASRec row and GRPO's reward model
        train = yaml.safe_load((Q / f).read_text())["train"]
        assert not train.get("max_train_cpu_s") and not train.get("max_train_s") and train["epochs"] <= 20, f


@pytest.mark.usefixtures("one_thread")
def test_same_seed_same_numbers(tmp_path, monkeypatch):
    import train_sasrec
    from twice.config import parse_args
    from twice.data import DataConfig
    from twice.data.__main__ import prepare
    monkeypatch.setenv("TWICE_CACHE", str(tmp_path / "cache"))
    write_ml100k_like(tmp_path / "cache")
    data = prepare(parse_args(DataConfig, [str(Q / "data.yaml"), f"out_dir={tmp_path / 'data'}"]))
    tiny = ["sasrec.hidden=16", "sasrec.inner=32", "sasrec.blocks=1", "sasrec.heads=1", "sasrec.maxlen=20",
            "train.epochs=3", "train.threads=1", f"train.data_dir={data}"]
    runs = [train_sasrec.main([str(Q / "sasrec.yaml"), f"train.out_dir={tmp_path / f'sas{i}'}"] + tiny)
            for i in (0, 1)]
    drop = lambda r: {k: v for k, v in r.items() if k not in ("train_s", "train_cpu_s")}  # noqa: E731
    assert runs[0]["epochs_run"] == 3
    assert drop(runs[0]) == drop(runs[1])
    # and the weights are the same bits
    import torch
    from safetensors.torch import load_file
    a, b = (load_file(tmp_path / f"sas{i}/best/model.safetensors") for i in (0, 1))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
