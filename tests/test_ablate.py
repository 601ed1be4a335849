"""The ablation bench (twice/ablate.py) at toy size: the whole path (tokenizer, pretraining from scratch, SASRec,
GRPO variants x seeds, the paired table), its pairing (common random numbers), caching and config errors.

    python -m pytest tests/test_ablate.py -q
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from twice import ablate
from twice.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
N_ITEMS, N_USERS = 40, 24


def write_data(out: Path) -> Path:
    rng = random.Random(0)
    out.mkdir(parents=True)
    with open(out / "items.jsonl", "w") as f:
        for i in range(1, N_ITEMS + 1):
            f.write(json.dumps({"idx": i, "id": str(100 + i), "title": f"Film {i}", "description": "Drama",
                                "details": {}}) + "\n")
    cands = []
    with open(out / "users.jsonl", "w") as f:
        for u in range(1, N_USERS + 1):
            items = rng.sample(range(1, N_ITEMS + 1), rng.randint(6, 10))
            f.write(json.dumps({"idx": u, "id": str(u), "items": items, "ratings": [4] * len(items),
                                "reviews": [""] * len(items), "timestamps": list(range(len(items)))}) + "\n")
            negs = rng.sample([i for i in range(1, N_ITEMS + 1) if i not in items], 9)
            c = negs + [items[-2]]
            rng.shuffle(c)
            cands.append({"user": u, "target": items[-2], "candidates": c})
    (out / "candidates_valid.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cands))
    (out / "meta.json").write_text(json.dumps({"source": "movielens-100k", "version": 1}))
    return out


TOY = ["model.hidden=16", "model.intermediate=32", "model.layers=1", "model.heads=2", "model.kv_heads=1",
       "model.head_dim=8", "pretrain.steps=2", "pretrain.batch_size=4", "pretrain.warmup=1", "sasrec.hidden=8",
       "sasrec.epochs=1", "grpo.steps=2", "grpo.prompts=2", "grpo.group_size=3", "valid_users=4", "seeds=[0,1]",
       "workers=1", "tail=2", "history=3"]
VARIANTS = ("variants={same: {}, clip_high_mu1: {objective: {eps_high: 0.28}}, dapo: {objective: {loss_norm: "
            "token_mean}}, mu2: {mu: 2}, match: {rewards: {weights: {match: 1.0}}}, beta: {objective: {beta: 0.1}}}")


def test_bench_end_to_end_at_toy_size(tmp_path, capfd):
    torch.set_num_threads(1)
    data = write_data(tmp_path / "data")
    argv = [str(ROOT / "configs" / "ablations" / "bench.yaml"), f"data_dir={data}", f"out_dir={tmp_path / 'out'}",
            *TOY, VARIANTS]
    assert ablate.main(argv) == 0
    out = tmp_path / "out"
    res = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert sorted((r["variant"], r["seed"]) for r in res) == sorted(
        (v, s) for v in ("paper", "same", "clip_high_mu1", "dapo", "mu2", "match", "beta") for s in (0, 1))
    by = {(r["variant"], r["seed"]): r for r in res}
    for s in (0, 1):
        # common random numbers: a variant equal to the paper's setting reproduces it exactly, and so does
        # clip-higher with mu = 1 (pi_old == pi_theta: the ratio is 1, the clip never acts; grpo.py docstring)
        for v in ("same", "clip_high_mu1"):
            assert {k: by[(v, s)][k] for k in ("hr1", "reward", "match")} == \
                   {k: by[("paper", s)][k] for k in ("hr1", "reward", "match")}
    # per-run metrics for twice.plot, with the final valid line
    run = next(out.glob("base_*")) / "runs" / "dapo_s1"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 2] and "valid/hr@1" in lines[-1] and "clip_frac_high" in lines[0]
    table = (out / "table.md").read_text()
    assert "| same | " in table and "+0.000 +- 0.000" in table and "| paper |" in table
    assert table in capfd.readouterr().out
    # a rerun reuses every result (same config, same grpo.py / rewards.py) and the cached pretraining
    assert ablate.main(argv) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == len(res)
    assert "14 cached, 0 to run" in (out / "ablate.log").read_text()


def test_bad_variant_keys_fail_before_anything_runs(tmp_path):
    bench = str(ROOT / "configs" / "ablations" / "bench.yaml")
    with pytest.raises(ConfigError, match=r"variant oops: unknown config key 'oops.objective.loss_nrom'"):
        ablate.main([bench, f"out_dir={tmp_path}", "variants={oops: {objective: {loss_nrom: token_mean}}}"])
    with pytest.raises(ConfigError, match="only: unknown variant"):
        ablate.main([bench, f"out_dir={tmp_path}", "only=[nope]"])
    assert not (tmp_path / "results.jsonl").exists()


def test_shipped_bench_yaml_resolves_every_variant():
    cfg = load_config(ablate.BenchConfig, ROOT / "configs" / "ablations" / "bench.yaml")
    names = ablate.variant_names(cfg)
    assert names[0] == "paper" and {"dapo", "dr_grpo", "mu2_clip_higher", "beta_0.04", "reward_match",
                                    "lambda_0", "lambda_1", "lambda_5"} <= set(names)
    obj, rew, mu, lr = ablate.resolve(cfg, "paper")
    assert (obj.loss_norm, obj.scale_rewards, obj.eps_low, obj.eps_high, obj.beta, rew.weights, rew.lam, rew.tau,
            mu) == ("seq_mean_token_mean", "group", 0.2, None, 0.0, {"cg": 1.0}, 3.0, 0.3, 1)
    obj, _, _, _ = ablate.resolve(cfg, "dr_grpo")
    assert (obj.loss_norm, obj.scale_rewards, obj.max_len) == ("constant", "none", cfg.grpo.max_new_tokens)
    assert ablate.resolve(cfg, "mu2_clip_higher")[0].eps_high == 0.28 and ablate.resolve(cfg, "mu2_clip_higher")[2] == 2
    assert ablate.resolve(cfg, "lambda_5")[1].weights == {"cg": 1.0}     # lambda only; weights stay the paper's
