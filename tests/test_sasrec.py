"""SASRec: causality, packed == prefix inference, learning a deterministic sequence end to end through
train_sasrec.py, checkpoint round trip, each loss decreasing, and the evaluation protocols against brute force."""
import json
import math
import random

import pytest
import torch

import train_sasrec
from twice.data import load_dataset
from twice.sasrec import (SASRec, SASRecConfig, calibration, check_dataset, item_ids_sha, left_pad, rank_candidates,
                          rank_full, rank_sampled, sample_unseen)

N_ITEMS = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(norm="pre", loss="ce", **kw):
    torch.manual_seed(0)
    cfg = SASRecConfig(n_items=N_ITEMS, hidden=32, blocks=2, heads=2, inner=64, maxlen=12, dropout=0.0,
                       norm=norm, loss=loss, **kw)
    return SASRec(cfg)


def cycle_seq(start: int, length: int) -> list[int]:
    """Deterministic synthetic behaviour: after item i comes item i+1 (mod N_ITEMS), ids 1..N_ITEMS."""
    return [(start + t) % N_ITEMS + 1 for t in range(length)]


def write_dataset(root, n_users=48, length=10, n_neg=4, seed=0):
    """A dataset dir in the twice/data contract (items, users, candidates, meta, stats) with cyclic users."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "items.jsonl", "w") as f:
        for i in range(1, N_ITEMS + 1):
            f.write(json.dumps({"idx": i, "id": f"m{i}", "title": f"Item {i}", "description": "", "details": {}}) + "\n")
    users = []
    with open(root / "users.jsonl", "w") as f:
        for u in range(1, n_users + 1):
            items = cycle_seq(rng.randrange(N_ITEMS), length)
            users.append(items)
            f.write(json.dumps({"idx": u, "id": f"u{u}", "items": items, "ratings": [5] * length,
                                "reviews": [""] * length, "timestamps": list(range(length))}) + "\n")
    for split, back in (("valid", 2), ("test", 1)):
        with open(root / f"candidates_{split}.jsonl", "w") as f:
            for u, items in enumerate(users, 1):
                pool = [i for i in range(1, N_ITEMS + 1) if i not in items]
                cands = rng.sample(pool, n_neg) + [items[-back]]
                rng.shuffle(cands)
                f.write(json.dumps({"user": u, "target": items[-back], "candidates": cands}) + "\n")
    (root / "meta.json").write_text(json.dumps({"source": "synthetic", "version": 1}))
    (root / "stats.json").write_text(json.dumps({"users": n_users, "items": N_ITEMS}))
    return root


# ------------------------------------------------------------------------------------------ model
@pytest.mark.parametrize("norm", ["pre", "post"])
def test_no_information_from_future_positions(norm):
    model = tiny(norm).eval()
    seq = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 12, 5, 2, 8, 6], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]])
    h = model.hidden_states(seq)
    for j in (4, 8, 11):
        pert = seq.clone()
        pert[:, j] = (pert[:, j] % N_ITEMS) + 1  # a different real item at slot j
        hp = model.hidden_states(pert)
        torch.testing.assert_close(hp[:, :j], h[:, :j], rtol=0, atol=1e-6)
        assert (hp[:, j] - h[:, j]).abs().max() > 1e-4  # ...and slot j itself does see it (the test can fail)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_packed_slot_equals_prefix_inference(norm):
    """The output at slot t of a packed row equals scoring the prefix ending at t as a history on its own, so
    packed training trains exactly what inference uses (positions count from the oldest item)."""
    model = tiny(norm).eval()
    row = [0, 0, 0, 3, 7, 1, 9, 4, 12, 5, 2, 8]
    h = model.hidden_states(torch.tensor([row]))[0]
    for t in range(3, 12):
        prefix = left_pad([[i for i in row[: t + 1] if i]], model.cfg.maxlen)
        torch.testing.assert_close(model.user_vectors(prefix)[0], h[t], rtol=1e-5, atol=1e-5)
    # score() is the dot product with the item embedding
    cands = torch.tensor([[1, 2, 3]])
    u = model.user_vectors(torch.tensor([row]))
    torch.testing.assert_close(model.score(torch.tensor([row]), cands), u @ model.item_emb.weight[[1, 2, 3]].T)


def test_history_longer_than_maxlen_keeps_most_recent():
    model = tiny().eval()
    long = torch.tensor([cycle_seq(0, 20)])
    torch.testing.assert_close(model.score(long, torch.tensor([[5]])), model.score(long[:, -12:], torch.tensor([[5]])))


def test_checkpoint_round_trip(tmp_path):
    model = tiny("post", loss="bce").eval()
    with torch.no_grad():
        model.item_emb.weight[1:] += torch.randn_like(model.item_emb.weight[1:])  # not the init
    model.save(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    loaded = SASRec.load(tmp_path / "ck")
    assert loaded.cfg == model.cfg and not loaded.training
    hist = left_pad([cycle_seq(3, 7), cycle_seq(9, 2)], 12)
    items = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert torch.equal(loaded.score(hist, items), model.score(hist, items))
    # a broken checkpoint fails loudly, naming the file
    (tmp_path / "ck" / "config.json").write_text(json.dumps({**json.loads((tmp_path / "ck" / "config.json").read_text()),
                                                             "hidden": 16}))
    with pytest.raises(ValueError, match="model.safetensors"):
        SASRec.load(tmp_path / "ck")
    (tmp_path / "ck" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        SASRec.load(tmp_path / "ck")


@pytest.mark.parametrize("loss", ["ce", "bce", "sampled_softmax"])
def test_each_loss_decreases(loss):
    model = tiny(loss=loss, n_negatives=8)
    seqs = [cycle_seq(s, 13) for s in range(N_ITEMS)]
    inputs, targets, _ = train_sasrec.train_windows(seqs, 12, "all")
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(60):
        loss_value = model(inputs, targets, generator=gen)
        opt.zero_grad()
        loss_value.backward()
        opt.step()
        losses.append(loss_value.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (loss, first, last)


@pytest.mark.parametrize("loss", ["bce", "sampled_softmax"])
def test_sampled_losses_give_the_same_gradient_on_two_threads_every_time(loss):
    """The reward model's BCE (and sampled softmax) are bitwise reproducible with several CPU threads: their item
    gathers once backpropagated through indexing, whose CPU backward adds into the embedding's gradient with
    parallel atomic float adds in arbitrary order (a rerun of the main job's SASRec reward differed in the 8th digit
    from its first epoch on). Many positions hit each of the 24 items, so the adds really do collide."""
    model = tiny(loss=loss, n_negatives=8)
    seqs = [cycle_seq(s % N_ITEMS, 13) for s in range(2048)]
    inputs, targets, _ = train_sasrec.train_windows(seqs, 12, "all")  # [2048, 12]: 24k target positions
    grads, n = [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for _ in range(6):
            model.zero_grad()
            model(inputs, targets, generator=torch.Generator().manual_seed(0)).backward()
            grads.append(model.item_emb.weight.grad.clone())
    finally:
        torch.set_num_threads(n)
    assert all(torch.equal(g, grads[0]) for g in grads[1:])


def test_loss_values_at_init_match_their_definitions():
    """With all-zero item embeddings every logit is 0: CE = log(n_items), BCE = 2 log 2, sampled = log(1+K)."""
    seqs = torch.tensor([cycle_seq(0, 12)])
    tgt = torch.tensor([cycle_seq(1, 12)])
    for loss, expect in (("ce", math.log(N_ITEMS)), ("bce", 2 * math.log(2)), ("sampled_softmax", None)):
        model = tiny(loss=loss, n_negatives=8)
        with torch.no_grad():
            model.item_emb.weight.zero_()
        g = torch.Generator().manual_seed(0)
        value = model(seqs, tgt, generator=g).item()
        if expect is None:  # log(1 + K - #negatives equal to the positive); collisions are masked
            assert math.log(2) <= value <= math.log(9) + 1e-6
        else:
            assert value == pytest.approx(expect, rel=1e-5), loss


def test_sample_unseen_is_uniform_over_unseen_items():
    """Rejection sampling never returns a seen item and draws every unseen one about equally (chi-square)."""
    V = 11  # ids 1..10, column 0 = padding
    seen = torch.zeros(2, V, dtype=torch.bool)
    seen[0, [1, 2, 3, 4, 5, 6, 7]] = True  # row 0 may draw only 8, 9, 10
    seen[1, [10]] = True
    g = torch.Generator().manual_seed(0)
    row = torch.tensor([0] * 6000 + [1] * 9000)
    neg = sample_unseen(torch.randint(1, V, (15000,), generator=g), row, seen, g)
    assert not seen[row, neg].any()
    for r, allowed in ((0, [8, 9, 10]), (1, list(range(1, 10)))):
        counts = torch.bincount(neg[row == r], minlength=V)[allowed].double()
        assert int(counts.sum()) == int((row == r).sum())
        e = counts.mean()
        chi2 = float(((counts - e) ** 2 / e).sum())
        assert chi2 < 25.0, (r, counts.tolist())  # df <= 8: p < 0.002 above 25


def test_bce_unseen_negative_is_outside_the_users_history():
    """A user who has every item but one: with neg_sampling=unseen the negative of every position must be that item,
    so the loss equals the hand-computed BCE with it (uniform sampling would draw seen items and differ)."""
    seq = torch.tensor([cycle_seq(0, 12)])  # items 1..12
    tgt = torch.tensor([cycle_seq(1, 12)])  # items 2..13
    history = [i for i in range(1, N_ITEMS + 1) if i != 20]  # the user has seen every item but 20
    exclude = torch.tensor([history])
    values = {}
    for ns in ("unseen", "uniform"):
        model = tiny(loss="bce", neg_sampling=ns).eval()
        g = torch.Generator().manual_seed(0)
        values[ns] = model(seq, tgt, generator=g, exclude=exclude).item()
    h = model.hidden_states(seq)[0]  # [L, D] (eval: no dropout), same weights (tiny() seeds)
    W = model.item_emb.weight
    pos = (h * W[tgt[0]]).sum(-1)
    neg = h @ W[20]
    want = float((-torch.nn.functional.logsigmoid(pos) - torch.nn.functional.logsigmoid(-neg)).mean())
    assert values["unseen"] == pytest.approx(want, rel=1e-6)
    assert values["uniform"] != pytest.approx(want, rel=1e-3)
    with pytest.raises(ValueError, match="exclude"):
        tiny(loss="bce", neg_sampling="unseen")(seq, tgt)


def test_calibration_matches_brute_force():
    model = tiny().eval()
    hists = [cycle_seq(s, 5) for s in range(0, N_ITEMS, 5)]
    c = calibration(model, hists, tau=0.5, seed=3)
    p = torch.sigmoid(model.score_all(left_pad(hists, 12)).double())
    shares, top1 = [], []
    for u, h in enumerate(hists):
        unseen = [i for i in range(1, N_ITEMS + 1) if i not in h]
        shares.append(sum(float(p[u, i]) >= 0.5 for i in unseen) / len(unseen))
        top1.append(max(float(p[u, i]) for i in unseen))
    assert c["share_ge_tau"] == pytest.approx(sum(shares) / len(shares), abs=1e-6)
    assert c["top1_min"] == pytest.approx(min(top1), abs=1e-6)
    assert c["top1_median"] == pytest.approx(sorted(top1)[(len(top1) - 1) // 2], abs=1e-6)  # torch's lower median
    assert 0.0 < c["random_unseen_median"] < 1.0 and c["users"] == len(hists)


def test_check_dataset_refuses_another_catalogue(tmp_path):
    ds = load_dataset(write_dataset(tmp_path / "data"))
    model = tiny(item_ids_sha=item_ids_sha(ds))
    check_dataset(model, ds, "ck")  # the same catalogue passes
    with pytest.raises(ValueError, match=r"ck: SASRec has 23 items but dataset .* has 24"):
        check_dataset(SASRec(SASRecConfig(n_items=N_ITEMS - 1, hidden=8, heads=1)), ds, "ck")
    other = tiny(item_ids_sha=item_ids_sha(ds)[::-1])  # same count, another id map
    with pytest.raises(ValueError, match="item id map"):
        check_dataset(other, ds, "ck")
    ds.items[3].id = "renamed"
    with pytest.raises(ValueError, match="item id map"):
        check_dataset(model, ds, "ck")


def test_quickstart_and_amazon_rewards_read_a_calibrated_sasrec():
    """The GRPO configs' sasrec_dir is the out_dir of a SASRec config trained with BCE on unseen negatives (the
    authors' reward model: sigmoid(logit) is a probability), not the CE baseline row's."""
    from pathlib import Path
    import yaml
    root = Path(__file__).resolve().parents[1] / "configs"
    grpo = [root / "quickstart" / "grpo.yaml", root / "amazon-gemma3-1b" / "grpo.yaml", *sorted((root / "ablations").glob("*.yaml"))]
    sasrec = {}
    for p in list((root / "quickstart").glob("sasrec*.yaml")) + list((root / "amazon-gemma3-1b").glob("sasrec*.yaml")):
        c = yaml.safe_load(p.read_text())
        sasrec[c["train"]["out_dir"] + "/best"] = c["sasrec"]
    for p in grpo:
        d = yaml.safe_load(p.read_text()).get("sasrec_dir")
        if d is None:
            continue
        assert d in sasrec, (p, d)
        assert sasrec[d]["loss"] == "bce" and sasrec[d].get("neg_sampling") == "unseen", (p, d)


# ------------------------------------------------------------------------------------------ data windows
def test_train_windows_cover_every_target_once():
    seqs = [cycle_seq(0, 30), cycle_seq(5, 3), [7]]
    inp, tgt, owner = train_sasrec.train_windows(seqs, 12, "all")
    assert inp.shape[1] == tgt.shape[1] == 12
    # targets: every item of each sequence except the first, exactly once
    got = sorted(tgt[tgt != 0].tolist())
    want = sorted(i for s in seqs for i in s[1:])
    assert got == want
    # within a window, target[t] is the item right after input[t] in the original sequence
    nxt = {a: b for s in seqs for a, b in zip(s, s[1:])}
    m = tgt != 0
    assert all(nxt[a] == b for a, b in zip(inp[m].tolist(), tgt[m].tolist()))
    assert ((inp == 0) == (tgt == 0)).all()
    # each window's items all come from the sequence `owner` names
    assert all(set(inp[w][inp[w] != 0].tolist()) <= set(seqs[int(owner[w])]) for w in range(len(inp)))
    last_inp, last_tgt, _ = train_sasrec.train_windows(seqs, 12, "last")
    assert len(last_inp) == 2 and last_tgt[0, -1].item() == seqs[0][-1]


# ------------------------------------------------------------------------------------------ protocols
def _brute_rank(scores: list[float], target_col: int) -> int:
    return 1 + sum(1 for j, s in enumerate(scores) if j != target_col and s >= scores[target_col])


def test_full_ranking_excludes_history_but_not_target():
    model = tiny().eval()
    hists = [cycle_seq(s, 6) for s in range(0, N_ITEMS, 3)]
    tgts = [(h[-1] % N_ITEMS) + 1 for h in hists]
    ranks = rank_full(model, hists, tgts)
    all_scores = model.score_all(left_pad(hists, 12)).double()
    differs = 0
    for u, (h, t) in enumerate(zip(hists, tgts)):
        s = all_scores[u].tolist()
        masked = [(-math.inf if (i in h and i != t) or i == 0 else v) for i, v in enumerate(s)]
        assert ranks[u].item() == _brute_rank(masked, t)
        differs += _brute_rank([(-math.inf if i == 0 else v) for i, v in enumerate(s)], t) != ranks[u].item()
    assert differs > 0  # excluding history actually changed some ranks, so the check above has teeth
    # a target that is also in the history is still ranked (not excluded)
    h = cycle_seq(0, 6)
    r = rank_full(model, [h], [h[2]])
    s = model.score_all(left_pad([h], 12))[0].tolist()
    assert r.item() == _brute_rank([(-math.inf if (i in h and i != h[2]) or i == 0 else v) for i, v in enumerate(s)], h[2])


def test_candidate_and_sampled_protocols():
    model = tiny().eval()
    hists = [cycle_seq(s, 5) for s in range(8)]
    cands = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12][s % 3 :][:6] for s in range(8)]
    tgts = [c[s % 6] for s, c in enumerate(cands)]
    ranks = rank_candidates(model, hists, cands, tgts)
    sc = model.score(left_pad(hists, 12), torch.tensor(cands))
    assert ranks.tolist() == [_brute_rank(sc[u].tolist(), cands[u].index(tgts[u])) for u in range(8)]
    with pytest.raises(ValueError, match="target"):
        rank_candidates(model, hists[:1], [[1, 2]], [3])
    # sampled: deterministic for a seed, ranks within 1..101, different seed -> (almost surely) different ranks
    seqs = [h + [t] for h, t in zip(hists, tgts)]
    r1 = rank_sampled(model, hists, tgts, seqs, n_negatives=100, seed=0)
    assert torch.equal(r1, rank_sampled(model, hists, tgts, seqs, n_negatives=100, seed=0))
    assert r1.min() >= 1 and r1.max() <= 101


class RecordingModel:
    """Stands in for SASRec in rank_sampled and records the candidate lists it is asked to score."""

    def __init__(self, n_items):
        self.cfg = SASRecConfig(n_items=n_items, maxlen=12)
        self.item_emb = torch.nn.Embedding(n_items + 1, 2)
        self.seen_cands = []

    def score(self, hist, cands):
        self.seen_cands.append(cands.clone())
        return torch.zeros(cands.shape)  # all tied -> pessimistic rank = 1 + K


def test_sampled_negatives_avoid_user_items_and_are_seeded():
    rng = random.Random(0)
    seqs = [rng.sample(range(1, N_ITEMS + 1), 18) for _ in range(30)]  # 18 of 24 items seen: collisions are likely
    hists, tgts = [s[:-1] for s in seqs], [s[-1] for s in seqs]
    m = RecordingModel(N_ITEMS)
    ranks = rank_sampled(m, hists, tgts, seqs, n_negatives=100, seed=5, batch_size=7)
    cands = torch.cat(m.seen_cands)  # [30, 101]
    assert cands.shape == (30, 101)
    assert cands[:, 0].tolist() == tgts  # target first
    for u, s in enumerate(seqs):
        negs = set(cands[u, 1:].tolist())
        assert not negs & set(s) and negs <= set(range(1, N_ITEMS + 1))
    assert ranks.tolist() == [101] * 30  # ties are pessimistic here too
    m2 = RecordingModel(N_ITEMS)
    rank_sampled(m2, hists, tgts, seqs, n_negatives=100, seed=5, batch_size=7)
    assert torch.equal(torch.cat(m2.seen_cands), cands)


# ------------------------------------------------------------------------------------------ end to end
def test_train_sasrec_learns_deterministic_sequence(tmp_path):
    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    res = train_sasrec.main([
        f"train.data_dir={data}", f"train.out_dir={out}", "train.epochs=40", "train.batch_size=16",
        "train.lr=0.005", "train.patience=40", "train.eval_every=40", "train.threads=1", "train.ks=[1,5,10]",
        "sasrec.hidden=32", "sasrec.inner=64", "sasrec.maxlen=12", "sasrec.dropout=0.0", "train.max_train_s=30",
    ])
    t = res["test"]
    assert t["candidates"]["hr@1"] == 1.0
    assert t["full"]["hr@1"] == 1.0
    assert t["sampled100"]["hr@1"] == 1.0
    assert res["valid"]["full"]["hr@1"] == 1.0
    # the run dir is complete and the best checkpoint reproduces the test ranks
    assert (out / "config.yaml").exists() and (out / "results.json").exists()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and rows[-1]["epoch"] == res["epochs_run"]
    ds = load_dataset(data)
    model = SASRec.load(out / "best")
    hists = [u.items[:-1] for u in ds.users]
    assert rank_full(model, hists, [u.items[-1] for u in ds.users]).max().item() == 1
    # the checkpoint names its catalogue, and results.json says how sigmoid(logit) behaves (the reward's rho_cf)
    assert model.cfg.item_ids_sha == item_ids_sha(ds)
    check_dataset(model, ds, "best")
    assert set(res["calibration"]) >= {"share_ge_tau", "random_unseen_median", "top1_median", "top1_min"}


@pytest.mark.slow
def test_train_sasrec_under_torchrun_ddp(tmp_path):
    """Two gloo ranks on CPU: DDP-wrapped packed training, rank-0 evaluation, stop flag broadcast."""
    import subprocess
    import sys
    from pathlib import Path

    data = write_dataset(tmp_path / "data")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train_sasrec.py",
           f"train.data_dir={data}", f"train.out_dir={out}", "train.epochs=30", "train.eval_every=30",
           "train.batch_size=8", "train.lr=0.005", "train.threads=1", "sasrec.hidden=32", "sasrec.inner=64",
           "sasrec.maxlen=12", "sasrec.dropout=0.0"]
    p = subprocess.run(cmd, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["test"]["full"]["hr@1"] == 1.0


def test_eval_refuses_a_sasrec_of_another_catalogue(tmp_path):
    """eval.py's SASRec row goes through the same check: one ConfigError line, before any ranking."""
    import eval as eval_script
    from twice.config import ConfigError
    data = write_dataset(tmp_path / "data")
    SASRec(SASRecConfig(n_items=N_ITEMS + 5, hidden=8, heads=1)).save(tmp_path / "wrong")
    with pytest.raises(ConfigError, match=r"SASRec has 29 items but dataset .* has 24"):
        eval_script.main([f"data_dir={data}", f"sasrec_dir={tmp_path / 'wrong'}", "models={}",
                          f"run_dir={tmp_path / 'ev'}", "split=test"])
