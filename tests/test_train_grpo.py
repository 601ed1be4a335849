"""train_grpo.py: the shared-prefix forward, gradient invariance (micro-batch split, layout, world size 1 vs 2 on
FSDP2/gloo), rank-synchronous passes with zero-std groups and empty ranks, exact resume after a kill, and a tiny
end-to-end run whose reward rises.

    python -m pytest tests/test_train_grpo.py -q

The tiny world (dataset dir, SentencePiece, random + format-warmed Gemma-3, SASRec) comes from tests/grpo_fixture.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import train_grpo  # noqa: E402
from grpo_fixture import build, overrides  # noqa: E402
from twice.config import load_config  # noqa: E402
from twice.gemma3 import PRESETS, Gemma3  # noqa: E402
from twice.grpo import policy_loss  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build(tmp_path_factory.mktemp("grpo_world"))


def run(paths, run_dir, **kw) -> list[dict]:
    train_grpo.main(overrides(paths, run_dir, **kw))
    return [json.loads(l) for l in open(Path(run_dir) / "metrics.jsonl")]


def grads(run_dir, step=1) -> dict:
    return load_file(str(Path(run_dir) / "grads" / f"step_{step:06d}.safetensors"))


def assert_grads_close(a: dict, b: dict, rtol=1e-4):
    assert a.keys() == b.keys() and len(a) > 0
    scale = max(float(v.abs().max()) for v in a.values())
    assert scale > 1e-6, "gradients are all zero: the comparison would be vacuous"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=rtol, atol=rtol * scale, msg=k)


# ---------------------------------------------------------------- shared-prefix forward == K-times layout


def test_shared_prefix_forward_matches_naive_loss_and_grads():
    """fp64 tiny Gemma-3 (sliding window 4 < completion length: local layers reach back into the prompt), two
    groups with different prompt lengths, ragged completions: log-probs, entropy, loss and every parameter gradient
    of the shared layout equal the K-times layout."""
    torch.manual_seed(0)
    model = Gemma3.from_config(PRESETS["tiny"]).double()
    G, K, Tc = 2, 3, 7
    prompts = [torch.randint(3, 500, (n,)).tolist() for n in (9, 5)]
    comp = torch.randint(3, 500, (G * K, Tc))
    lens = torch.tensor([7, 2, 5, 6, 1, 4])
    mask = torch.arange(Tc)[None] < lens[:, None]
    adv = torch.randn(G * K, dtype=torch.float64)
    rows_prompts = prompts  # one prompt per group, K rows each
    out = {}
    for shared in (True, False):
        model.zero_grad()
        lp, ent = train_grpo.completion_logprobs(model, rows_prompts, comp, mask, K, 0.7, shared, True, "cpu")
        loss, _ = policy_loss(lp, None, adv, mask, loss_norm="seq_mean_token_mean")
        loss.backward()
        out[shared] = (lp.detach(), ent.detach(), loss.detach(),
                       {n: p.grad.clone() for n, p in model.named_parameters()})
    (lp1, e1, l1, g1), (lp0, e0, l0, g0) = out[True], out[False]
    assert float(lp0[mask].abs().min()) > 0  # real log-probs, not zeros
    # fp64 model; the fused log-prob kernel leaves ~1 fp32 ulp at a few positions, far below any layout error
    torch.testing.assert_close(lp1, lp0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(e1, e0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-7)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=2e-6, msg=n)
    # the prompt really is run once: the sliding layers' window (4) is shorter than prompt + completion, so a
    # wrong position or mask would change the numbers above; a sanity check that the test can fail:
    lp_bad = train_grpo.completion_logprobs(model, [prompts[1], prompts[0]], comp, mask, K, 0.7, True, False, "cpu")
    assert (lp_bad - lp1).abs().max() > 1e-3


# ---------------------------------------------------------------- invariance: micro-batches, layout, world size


def test_gradients_invariant_to_micro_batches_and_layout(world, tmp_path):
    """Same rollout (seeded rows), same global totals: one pass per group, two per group, both groups in one pass,
    and the K-times layout all give the same gradient."""
    ref = None
    for name, kw in [("mb4", {}), ("mb2", {"optim.micro_batch_size": 2}), ("mb8", {"optim.micro_batch_size": 8}),
                     ("naive", {"shared_prefix": False, "optim.micro_batch_size": 3})]:
        m = run(world, tmp_path / name, dump_grads=True, **kw)
        g = grads(tmp_path / name)
        if ref is None:
            ref, ref_m = g, m
            assert m[0]["zero_std_groups"] < m[0]["groups"]  # there is a signal to compare
        else:
            assert_grads_close(ref, g)
            assert m[0]["reward"] == ref_m[0]["reward"]


def torchrun(args: list[str], timeout: int = 240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), str(ROOT / "train_grpo.py")] + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_world_size_2_fsdp_matches_1_and_zero_std_groups_do_not_hang(world, tmp_path):
    """3 prompts over 2 ranks (2 groups vs 1: rank 1 runs a padding pass) under FSDP2 on gloo: the gradient equals
    the one-process gradient. Then 1 prompt over 2 ranks with a reward that is 0 for every completion: every group
    is zero-std and rank 1 has no prompt at all; the run completes (checkpoint + export are collectives too)."""
    kw = {"rollout.prompts_per_step": 3, "dump_grads": True}
    m1 = run(world, tmp_path / "w1", **kw)
    torchrun(overrides(world, tmp_path / "w2", **kw))
    m2 = [json.loads(l) for l in open(tmp_path / "w2" / "metrics.jsonl")]
    assert_grads_close(grads(tmp_path / "w1"), grads(tmp_path / "w2"))
    for k in ("reward", "groups", "zero_std_groups", "completion_len_mean", "logp_gap", "entropy"):
        assert m2[0][k] == pytest.approx(m1[0][k], rel=1e-4, abs=1e-7), k
    assert (tmp_path / "w2" / "final" / "model.safetensors").exists()

    torchrun(overrides(world, tmp_path / "z2", steps=2, dump_grads=True, **{"rollout.prompts_per_step": 1,
                                                                          "rewards.weights": "{match: 1.0}"}))
    mz = [json.loads(l) for l in open(tmp_path / "z2" / "metrics.jsonl")]
    assert [r["zero_std_groups"] for r in mz] == [1, 1] and [r["groups"] for r in mz] == [1, 1]
    assert all(float(g.abs().max()) == 0.0 for g in grads(tmp_path / "z2", 2).values())  # A = 0, beta = 0


# ---------------------------------------------------------------- resume


def sft_folder_with_delta(m, out):
    """An 'SFT final/' of model m: a rank-2 LoRA with small random B, exported -> (folder, its lora_delta)."""
    from twice.checkpoint import export_hf
    from twice.hf import read_delta
    from twice.lora import apply_lora, lora_modules
    apply_lora(m, r=2, alpha=4, seed=5)
    g = torch.Generator().manual_seed(0)
    for mod in lora_modules(m):
        mod.lora_B.data = torch.randn(mod.lora_B.shape, generator=g) * 1e-3
    sft = export_hf(m, out)
    return sft, read_delta(sft)[0]


def killed_after_step_2(monkeypatch, start_run) -> None:
    """start_run() dies (KeyboardInterrupt) right after writing its step-2 checkpoint; save_checkpoint restored."""
    real_save = train_grpo.save_checkpoint

    def save_then_die(ckpt_dir, step, *a, **k):
        out = real_save(ckpt_dir, step, *a, **k)
        if step == 2:
            raise KeyboardInterrupt("simulated kill after the step-2 checkpoint")
        return out

    monkeypatch.setattr(train_grpo, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        start_run()
    monkeypatch.setattr(train_grpo, "save_checkpoint", real_save)


def test_resume_after_kill_reproduces_next_step(world, tmp_path, monkeypatch):
    """Run 3 steps straight; separately run with a 'kill' right after the step-2 checkpoint, then resume in a new
    main(): step 3's metrics and the final weights are identical (rollout seeds, data cursor, AdamW, RNG)."""
    kw = {"steps": 3, "checkpoint_every": 1, "optim.warmup_steps": 1}
    straight = run(world, tmp_path / "a", **kw)

    killed_after_step_2(monkeypatch, lambda: run(world, tmp_path / "b", **kw))
    resumed = run(world, tmp_path / "b", **kw)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    a3, b3 = straight[2], resumed[2]
    for k in a3:
        if not k.startswith(("time/", "tokens_per_s")):
            assert b3[k] == a3[k], k
    wa, wb = load_file(str(tmp_path / "a" / "final" / "model.safetensors")), load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert "resumed from" in (tmp_path / "b" / "log.txt").read_text()


def test_too_long_prompts_are_counted_skips(world, tmp_path):
    m = run(world, tmp_path / "s", **{"task.max_prompt_tokens": 40})
    assert m[0]["skipped_prompts"] == 2 and m[0]["groups"] == 0
    assert "skip prompt 0" in (tmp_path / "s" / "log.txt").read_text()


# ---------------------------------------------------------------- end to end: the reward rises


def test_reward_rises_on_a_learnable_toy_reward(world, tmp_path, monkeypatch):
    """Toy task: reward 1 when the completion opens with `<think>` (the format-warmed model does so ~20% of the
    time). 16 GRPO steps must raise that rate on held-out sampling (same prompts, same seeds, 128 samples)."""
    from twice.data import load_dataset
    from twice.engine import Engine
    from twice.rewards import REWARDS
    from twice.tokenizer import Tokenizer

    opens = lambda text: float(text.startswith("<think>"))
    monkeypatch.setitem(REWARDS, "think_first", lambda ctx: opens(ctx.completion))
    kw = {"steps": 16, "optim.lr": "1.0e-3", "optim.min_lr_ratio": 1.0, "rollout.prompts_per_step": 4,
          "rollout.group_size": 8, "rollout.max_new_tokens": 4, "optim.micro_batch_size": 32,
          "rewards.weights": "{think_first: 1.0}"}
    metrics = run(world, tmp_path / "e2e", **kw)

    cfg = load_config(train_grpo.GRPORunConfig, None, overrides(world, tmp_path / "x"))
    ds, tok = load_dataset(world["data"]), Tokenizer.from_pretrained(world["warm"])
    users = [u.idx for u in ds.users]
    prompts = [train_grpo.build_group(ds, tok, cfg, users, 1000 + i).prompt for i in range(8)]

    def rate(path):
        res = Engine(Gemma3.from_pretrained(path).eval(), tok).generate(prompts, num_samples=16, max_new_tokens=4,
                                                                         seeds=123)
        return sum(opens(t) for t in res.texts) / len(res.texts)

    before, after = rate(world["warm"]), rate(tmp_path / "e2e" / "final")
    assert after > before + 0.1, (before, after, [m["reward"] for m in metrics])
    assert max(m["logp_gap"] for m in metrics) < 1e-4  # sampler and trainer agree (fp32, no top-k/p)


# ---------------------------------------------------------------- reward model, sampler/trainer agreement, logging


def test_first_update_ratio_is_exactly_one_and_lora_dropout_is_refused(world, tmp_path):
    """mu = 2 under LoRA: pi_old is recomputed, so at the first update every token's ratio is exactly 1 (no dropout
    anywhere: a GRPO config with LoRA dropout is refused, it would make pi_old != pi_theta). beta = 0 logs no kl;
    the grad norm covers both optimizer steps."""
    m = run(world, tmp_path / "mu2", **{"optim.mu": 2, "lora.enabled": True})[0]
    assert m["ratio_first_update_min"] == 1.0 and m["ratio_first_update_max"] == 1.0
    assert "kl" not in m
    assert m["grad_norm_max"] >= m["grad_norm"] > 0
    with pytest.raises(train_grpo.ConfigError, match="lora.dropout must be 0"):
        train_grpo.main(overrides(world, tmp_path / "drop", **{"lora.enabled": True, "lora.dropout": 0.1}))


def test_logp_gap_to_the_truncated_sampler_sees_top_k(world, tmp_path):
    """With top-k the tokens are drawn from the renormalised top-k distribution: the gap to the untruncated log-probs
    stays at rounding level, the gap to the sampler's own (truncated) log-probs and the sequence importance ratio
    pi_theta(o)/pi_sampler(o) < 1 show the mismatch. Without truncation both gaps agree and the ratio is ~1."""
    plain = run(world, tmp_path / "plain")[0]
    topk = run(world, tmp_path / "topk", **{"rollout.top_k": 3})[0]
    assert plain["logp_gap"] < 1e-4 and plain["logp_gap_sampler"] < 1e-4
    assert abs(plain["is_ratio_seq_min"] - 1) < 1e-3 and abs(plain["is_ratio_seq_mean"] - 1) < 1e-3
    assert topk["logp_gap"] < 1e-4 and topk["logp_gap_sampler"] > 1e-3
    assert topk["is_ratio_seq_min"] < 0.999 and topk["is_ratio_seq_mean"] < 1.0


def test_cf_history_prompt_or_full(world, tmp_path):
    """rewards.cf_history: prompt (default) makes SASRec read exactly the items the prompt shows (task.max_history of
    the fixture is 2 of 2+ items); full reads the split's whole history."""
    from twice.data import load_dataset
    from twice.tasks import TaskConfig, recommend_example
    from twice.tokenizer import Tokenizer
    ds, tok = load_dataset(world["data"]), Tokenizer.from_pretrained(world["warm"])
    users = [u.idx for u in ds.users]
    for mode in ("prompt", "full"):
        cfg = load_config(train_grpo.GRPORunConfig, None, overrides(world, tmp_path / "x", **{"rewards.cf_history": mode}))
        for i in range(4):
            g = train_grpo.build_group(ds, tok, cfg, users, i)
            full = ds.history(g.user, "train")
            shown = recommend_example(ds, ds.user(g.user), "train", g.candidates, cfg.task, tokenizer=tok,
                                      reasoning=True, with_response=False).history
            assert len(shown) == 2 < len(full) and shown == full[-2:]
            assert g.history == (shown if mode == "prompt" else full)
    with pytest.raises(train_grpo.ConfigError, match="cf_history"):
        load_config(train_grpo.GRPORunConfig, None, overrides(world, tmp_path / "x", **{"rewards.cf_history": "all"}))


def test_rho_cf_calibration_and_outside_rate_are_logged(world, tmp_path):
    """Per step: mean rho_cf of the targets and of the random candidates equals sigmoid(SASRec score) on the
    prompt's history, recomputed here; the non-candidate answer rate and the share of answers above tau are there."""
    from twice.data import load_dataset
    from twice.sasrec import SASRec, left_pad
    from twice.tokenizer import Tokenizer
    m = run(world, tmp_path / "cf", **{"rewards.weights": "{cg: 1.0, format: 1.0}"})[0]
    cfg = load_config(train_grpo.GRPORunConfig, None, overrides(world, tmp_path / "x"))
    ds, tok = load_dataset(world["data"]), Tokenizer.from_pretrained(world["warm"])
    users = [u.idx for u in ds.users]
    sas = SASRec.load(world["sasrec"])
    tgt, oth = [], []
    for i in range(2):  # step 0's two prompts
        g = train_grpo.build_group(ds, tok, cfg, users, i)
        p = torch.sigmoid(sas.score(left_pad([g.history], 8), torch.tensor([g.candidates])))[0].tolist()
        t = ds.item_by_id[g.target_id]
        tgt += [x for c, x in zip(g.candidates, p) if c == t]
        oth += [x for c, x in zip(g.candidates, p) if c != t]
    assert m["cf/target"] == pytest.approx(sum(tgt) / len(tgt), abs=1e-6)
    assert m["cf/random_candidate"] == pytest.approx(sum(oth) / len(oth), abs=1e-6)
    for k in ("cf/answer", "cf/answer_ge_tau", "outside_candidates_rate", "truncated_frac"):
        assert 0.0 <= m[k] <= 1.0, k


def test_sasrec_of_another_catalogue_is_refused_in_one_line(world, tmp_path):
    from twice.sasrec import SASRec, SASRecConfig
    from grpo_fixture import N_ITEMS
    SASRec(SASRecConfig(n_items=N_ITEMS + 3, hidden=16, heads=1, inner=16, maxlen=8)).save(tmp_path / "other")
    with pytest.raises(train_grpo.ConfigError, match=r"SASRec has 13 items but dataset .* has 10") as e:
        train_grpo.main(overrides(world, tmp_path / "r", sasrec_dir=str(tmp_path / "other")))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # refused before any rollout


def test_epochs_and_warmup_ratio_set_steps_and_schedule(world, tmp_path):
    """epochs = 1 over the fixture's 8 users at 2 prompts/step -> 4 steps; warmup_ratio 0.3 -> ceil(1.2) = 2
    warmup steps: lr/2, lr, then the cosine from lr to lr * min_lr_ratio. authors.yaml (which uses both) loads and
    passes the config checks."""
    m = run(world, tmp_path / "ep", **{"epochs": 1, "optim.warmup_ratio": 0.3, "optim.min_lr_ratio": 0.1,
                                       "rollout.max_new_tokens": 4})
    assert [r["step"] for r in m] == [1, 2, 3, 4]
    assert [r["lr"] for r in m] == pytest.approx([5e-4, 1e-3, 1e-3, 1e-4])
    cfg = load_config(train_grpo.GRPORunConfig, ROOT / "configs" / "ablations" / "authors.yaml")
    train_grpo.check_config(cfg)
    assert cfg.epochs == 2 and cfg.optim.warmup_ratio == 0.05 and cfg.objective.beta == 0.04


def test_completion_budget_auto_from_the_sft_responses(world, tmp_path):
    """rollout.max_new_tokens: auto = the 95% quantile (nearest rank) of the T3 responses SFT trains on, each the
    exact response recommend_example renders (+1 for the end of turn); bad lines are counted; the run logs the
    budget, samples under it and logs its truncation rate."""
    from twice.data import load_dataset
    from twice.tasks import TaskConfig, recommend_example
    from twice.tokenizer import Tokenizer
    assert train_grpo.completion_budget([5, 1, 3, 2, 4], 0.95) == 5
    assert train_grpo.completion_budget([5, 1, 3, 2, 4], 0.5) == 3
    ds, tok = load_dataset(world["data"]), Tokenizer.from_pretrained(world["warm"])
    task = TaskConfig()
    recs, want = [], []
    for k, u in enumerate(ds.users[:6]):
        rat = "likes it " * (k + 1) + "<b>&</b>"  # markup is cleaned exactly as SFT cleans it
        hist, tgt = ds.history(u.idx, "train"), ds.target(u.idx, "train")
        recs.append({"user": u.idx, "history": hist, "target": tgt, "rationale": rat})
        ex = recommend_example(ds, u, "train", [tgt], task, rationale=rat, reasoning=True)
        want.append(len(tok.encode(ex.response)) + 1)
    path = tmp_path / "rationales.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\nnot json\n" + json.dumps({"target": 1}) + "\n")
    lens, bad = train_grpo.response_lengths(path, ds, tok, task.tags)
    assert lens == want and bad == 2
    budget = train_grpo.completion_budget(want, 0.95)
    m = run(world, tmp_path / "auto", **{"rollout.max_new_tokens": "auto", "rollout.budget_from": str(path)})[0]
    assert f"rollout.max_new_tokens auto = {budget}:" in (tmp_path / "auto" / "log.txt").read_text()
    assert m["completion_len_max"] <= budget and 0.0 <= m["truncated_frac"] <= 1.0
    with pytest.raises(train_grpo.ConfigError, match="budget_from"):
        train_grpo.main(overrides(world, tmp_path / "none", **{"rollout.max_new_tokens": "auto"}))
    (tmp_path / "empty.jsonl").write_text("not json\n")
    with pytest.raises(train_grpo.ConfigError, match="no usable T3 response"):
        train_grpo.main(overrides(world, tmp_path / "empty", **{"rollout.max_new_tokens": "auto",
                                                                "rollout.budget_from": str(tmp_path / "empty.jsonl")}))


def test_progress_bar_with_live_reward_and_the_log_lines_stay(world, tmp_path, capsys):
    """Rank 0 shows a tqdm bar over the steps (count, ETA, live reward); log.txt keeps one full line per step."""
    run(world, tmp_path / "bar", steps=2, **{"rollout.max_new_tokens": 4})
    err = capsys.readouterr().err
    assert "GRPO" in err and "2/2" in err and "reward=" in err
    log = (tmp_path / "bar" / "log.txt").read_text()
    assert "step     1/2 | reward" in log and "step     2/2 | reward" in log
    run(world, tmp_path / "nobar", steps=1, progress=False, **{"rollout.max_new_tokens": 4})
    assert "reward=" not in capsys.readouterr().err


def test_static_decode_rollouts_equal_eager(world, tmp_path):
    """rollout.decode=static (the fixed-shape, graph-capturable decode; `compiled` traces it) samples the same
    completions as the eager reference engine, so a run's rewards do not depend on the decode path."""
    def completions(d):
        run(world, tmp_path / d, steps=2, **{"rollout.decode": d})
        return [(r["step"], r["text"]) for r in map(json.loads, (tmp_path / d / "completions.jsonl").open())]
    assert completions("static") == completions("eager")
    with pytest.raises(train_grpo.ConfigError, match="rollout.decode"):
        train_grpo.main(overrides(world, tmp_path / "x", **{"rollout.decode": "graph"}))


def test_attn_implementation_eager_matches_sdpa(world, tmp_path):
    """model.attn_implementation=eager (the CPU quickstart's setting): the same rollouts and step-1 gradients as
    SDPA up to fp32 reduction order; an unknown name is refused before any work."""
    m = {impl: run(world, tmp_path / impl, steps=1, dump_grads=True, **{"model.attn_implementation": impl})
         for impl in ("sdpa", "eager")}
    texts = {impl: [r["text"] for r in map(json.loads, (tmp_path / impl / "completions.jsonl").open())]
             for impl in m}
    assert texts["eager"] == texts["sdpa"] and texts["sdpa"]
    assert_grads_close(grads(tmp_path / "eager"), grads(tmp_path / "sdpa"))
    assert m["eager"][0]["loss"] == pytest.approx(m["sdpa"][0]["loss"], rel=1e-4, abs=1e-6)
    with pytest.raises(train_grpo.ConfigError, match="attn_implementation"):
        train_grpo.main(overrides(world, tmp_path / "x", **{"model.attn_implementation": "flash"}))


def test_grpo_on_a_delta_folder_exports_the_concatenated_delta(world, tmp_path):
    """GRPO trains a fresh LoRA on SFT's final/, which carries SFT's lora_delta (twice/hf.py): build_policy loads it
    merged with the delta riding along, and the export records base -> total delta, rank r_sft + r_grpo, SFT's part
    first, with the merged weights = base + that delta."""
    from twice.hf import read_delta
    from twice.lora import delta_dense
    sft, d1 = sft_folder_with_delta(Gemma3.from_pretrained(world["warm"]), tmp_path / "sft")
    run(dict(world, sft=str(sft)), tmp_path / "grpo", model="sft", **{"lora.enabled": True, "lora.r": 4,
                                                                      "lora.alpha": 8})
    final = tmp_path / "grpo" / "final"
    d, meta = read_delta(final)
    assert meta["modules"] == {k: 6 for k in d1}
    base = Gemma3.from_pretrained(world["warm"]).state_dict()
    merged = Gemma3.from_pretrained(final, dtype=torch.float32).state_dict()
    for k, (A, B) in d.items():
        assert torch.equal(A[:2], d1[k][0]) and torch.equal(B[:, :2], d1[k][1])
        torch.testing.assert_close(merged[k + ".weight"], base[k + ".weight"] + delta_dense(A, B), rtol=0,
                                   atol=1e-6)


def test_grpo_on_a_delta_folder_under_auto_stacks_in_bf16_and_resumes_exactly(world, tmp_path, monkeypatch, capsys):
    """`model.dtype: auto` on a delta folder where bf16 is fast (the CPU flag is faked: the same code path as a GPU):
    the policy is the exact bf16 base + SFT's frozen fp32 delta + the new LoRA stacked on it, metrics say
    bfloat16, the KL reference is the SFT model (lora_disabled keeps the delta), a kill after the step-2 checkpoint
    resumes to the same step 3 and final weights, and the export holds the concatenated delta (rank 2 + 4)."""
    from twice import precision
    from twice.hf import read_delta
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda *a: ["avx512_bf16"])
    monkeypatch.setattr(precision, "_logged", set())
    warm16 = Gemma3.from_pretrained(world["warm"], dtype=torch.bfloat16).save_pretrained(tmp_path / "warm16")
    # a bf16 base (as Google's), SFT's LoRA in fp32
    sft, d1 = sft_folder_with_delta(Gemma3.from_pretrained(warm16, delta="merged"), tmp_path / "sft")
    paths = dict(world, sft=str(sft))
    kw = {"steps": 3, "checkpoint_every": 1, "optim.warmup_steps": 1, "model.dtype": "auto", "lora.enabled": True,
          "lora.r": 4, "lora.alpha": 8, "objective.beta": 0.04}
    train_grpo.main(overrides(paths, tmp_path / "a", model="sft", **kw))
    straight = [json.loads(l) for l in open(tmp_path / "a" / "metrics.jsonl")]
    assert "frozen fp32 lora_delta, the new LoRA stacked on it" in capsys.readouterr().out
    assert {r["compute_dtype"] for r in straight} == {"bfloat16"}
    killed_after_step_2(monkeypatch, lambda: train_grpo.main(overrides(paths, tmp_path / "b", model="sft", **kw)))
    train_grpo.main(overrides(paths, tmp_path / "b", model="sft", **kw))
    resumed = [json.loads(l) for l in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for k in straight[2]:
        if not k.startswith(("time/", "tokens_per_s")):
            assert resumed[2][k] == straight[2][k], k
    wa = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    d, meta = read_delta(tmp_path / "a" / "final")
    assert meta["modules"] == {k: 6 for k in d1}
    assert all(torch.equal(d[k][0][:2], d1[k][0]) and torch.equal(d[k][1][:, :2], d1[k][1]) for k in d1)
    assert any(float(d[k][1][:, 2:].abs().max()) > 0 for k in d)    # GRPO's own part trained


def test_world_size_2_bf16_on_a_delta_folder_runs_and_exports_the_total_delta(world, tmp_path):
    """FSDP2 (2 gloo ranks) with bf16 compute on a delta folder: fp32 master shards of the exact bf16 base, the
    frozen delta as replicated buffers, the stacked LoRA sharded; rollouts run with a bf16 KV cache (the Engine
    takes the compute dtype: the weights are fp32 masters, the activations bf16) and the export gathers base +
    [SFT's delta; GRPO's]."""
    from twice.checkpoint import export_hf
    from twice.hf import read_delta
    from twice.lora import apply_lora, lora_modules
    w16 = Gemma3.from_pretrained(world["warm"], dtype=torch.bfloat16).save_pretrained(tmp_path / "warm16")
    m = Gemma3.from_pretrained(w16, delta="merged")
    apply_lora(m, r=2, alpha=4, seed=5)
    for mod in lora_modules(m):
        mod.lora_B.data = torch.randn(mod.lora_B.shape, generator=torch.Generator().manual_seed(0)) * 1e-3
    sft = export_hf(m, tmp_path / "sft")
    res = torchrun(overrides(dict(world, sft=str(sft)), tmp_path / "w2", model="sft", **{
        "model.dtype": "bfloat16", "lora.enabled": True, "lora.r": 4, "lora.alpha": 8, "objective.beta": 0.04,
        "rollout.prompts_per_step": 3}))
    assert "the new LoRA stacked on it" in res.stdout
    assert [json.loads(l)["compute_dtype"] for l in open(tmp_path / "w2" / "metrics.jsonl")] == ["bfloat16"]
    d, meta = read_delta(tmp_path / "w2" / "final")
    assert set(meta["modules"].values()) == {6}
    assert any(float(d[k][1][:, 2:].abs().max()) > 0 for k in d)
