"""The ablation bench: objective variants of GRPO on a tiny Gemma-3 trained from scratch on MovieLens-100k, in minutes.

    python -m twice.ablate configs/ablations/bench.yaml                  # the table (<= 15 min on 2 CPU cores)
    python -m twice.ablate configs/ablations/bench.yaml seeds=[0] only=[paper,dapo]    # a quicker look

For people who patch the objective (twice/grpo.py) or the rewards (twice/rewards.py): edit, rerun, read the table.
What runs (every piece is the project's own: Gemma3, Tokenizer, Engine, grpo.group_advantages / policy_loss,
rewards.compute_rewards, SASRec):
  1. data      MovieLens-100k (configs/quickstart/data.yaml layout: 10 fixed valid candidates per user)
  2. tokenizer a tiny SentencePiece model in which every item ID is one token (extra_symbols)
  3. pretrain  a random tiny Gemma-3 (~1.4M params) learns T2-style prompts from scratch: history of item IDs +
               10 candidate IDs -> `<item>ID</item>`, cross-entropy on the answer, train-part instances only
  4. sasrec    a small SASRec on the train parts: its sigmoid(logit) is rho_cf of the collaborative-guided reward
  5. grpo      for every variant x seed: the SAME pretrained weights, the SAME prompts and sampling seeds per step
               (common random numbers: the paired differences measure the variant, not the luck of the draw);
               `steps` steps of P prompts x G samples, mu updates per rollout, then greedy valid HR@1
Steps 2-4 are cached in out_dir (keyed by their config), so a rerun after editing twice/grpo.py only reruns 5.

Variants are blocks of YAML overriding the paper's setting (`paper:` in the YAML: Eq. 1 with sequence-mean
token-mean normalisation, group-std advantages, symmetric clip 0.2, beta 0, mu 1, reward rho_cg with lambda 3,
tau 0.3); see configs/ablations/README.md ("The ablation bench"). Output in out_dir: results.jsonl (one line per
variant x seed; a rerun skips lines whose config is unchanged), runs/<variant>_s<seed>/metrics.jsonl (per step:
python -m twice.plot reads it), table.md (the table printed at the end).

Table: per variant, final valid HR@1 (greedy, mean +- sd over seeds), the paired difference to `paper` (mean over
seeds, its sd, and how many seeds it is > 0), the match rate and reward of the last `tail` GRPO steps.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from twice.config import ConfigError, from_dict, parse_args, save_config
from twice.fileio import write_json_atomic
from twice.grpo import ObjectiveConfig, group_advantages, policy_loss
from twice.rewards import RewardConfig, RewardContext, compute_rewards, parse_completion, normalize_item


@dataclass
class ModelConfig:
    hidden: int = 96            # D
    intermediate: int = 256     # GeGLU width
    layers: int = 3
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32


@dataclass
class PretrainConfig:
    steps: int = 500            # "SFT" steps from scratch (cached)
    batch_size: int = 32
    echo: float = 0.5           # fraction of examples that ask to repeat the candidate list (dense copy signal)
    lr: float = 3.0e-3          # at 1e-2 the copy task did not train (loss flat over 300 steps in our trials)
    warmup: int = 20
    seed: int = 0


@dataclass
class SASRecBench:
    hidden: int = 32
    epochs: int = 20
    lr: float = 1.0e-3
    batch_size: int = 128
    maxlen: int = 50


@dataclass
class GRPOBench:
    steps: int = 30             # GRPO steps per variant x seed
    prompts: int = 8            # prompts per step
    group_size: int = 8         # G samples per prompt
    max_new_tokens: int = 8     # `<item>ID</item>` + <end_of_turn> is 8 tokens with this tokenizer
    temperature: float = 1.0
    lr: float = 3.0e-4
    max_grad_norm: float = 1.0


@dataclass
class Variant:
    objective: dict = field(default_factory=dict)   # twice.grpo.ObjectiveConfig fields
    rewards: dict = field(default_factory=dict)     # twice.rewards.RewardConfig fields (weights, lam, tau)
    mu: int = 0                                     # updates per rollout; 0 = the paper's (base) value
    lr: float = 0.0                                 # GRPO learning rate; 0 = grpo.lr


@dataclass
class BenchConfig:
    data_dir: str = "runs/ablate/data"   # built from data_config when missing
    data_config: str = "configs/quickstart/data.yaml"
    out_dir: str = "runs/ablate"
    history: int = 3                     # most recent history items in a prompt
    n_negatives: int = 9                 # training prompts: target + 9 negatives (valid uses the fixed sets)
    valid_users: int = 300               # greedy valid HR@1 on the first N users (fixed list)
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    workers: int = 2                     # processes for the variant x seed runs (one torch thread each)
    tail: int = 5                        # "reward" / "match" columns: mean over the last `tail` GRPO steps
    only: list[str] = field(default_factory=list)   # run only these variants (+ paper); [] = all
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    sasrec: SASRecBench = field(default_factory=SASRecBench)
    grpo: GRPOBench = field(default_factory=GRPOBench)
    paper: Variant = field(default_factory=lambda: Variant(rewards={"weights": {"cg": 1.0}}, mu=1))
    variants: dict[str, Variant] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# resolving a variant: paper's setting + its overrides -> typed configs (unknown keys are errors)

def resolve(cfg: BenchConfig, name: str) -> tuple[ObjectiveConfig, RewardConfig, int, float]:
    v = cfg.paper if name == "paper" else cfg.variants[name]
    base = cfg.paper
    try:
        obj = from_dict(ObjectiveConfig, {**base.objective, **v.objective}, prefix=f"{name}.objective.")
        rew = from_dict(RewardConfig, {**base.rewards, **v.rewards}, prefix=f"{name}.rewards.")
    except ConfigError as e:
        raise ConfigError(f"variant {name}: {e}") from None
    if obj.loss_norm == "constant" and obj.max_len is None:
        obj = dataclasses.replace(obj, max_len=cfg.grpo.max_new_tokens)
    mu = v.mu or base.mu or 1
    return obj, rew, mu, v.lr or base.lr or cfg.grpo.lr


def variant_names(cfg: BenchConfig) -> list[str]:
    names = ["paper"] + [n for n in cfg.variants if not cfg.only or n in cfg.only]
    unknown = [n for n in cfg.only if n not in cfg.variants and n != "paper"]
    if unknown:
        raise ConfigError(f"only: unknown variant(s) {unknown}; defined: {sorted(cfg.variants)}")
    return names


def key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------------------------
# data -> prompts

INSTRUCTION = "Answer with the recommended item ID inside <item> </item>."
ECHO = "Repeat the [Candidate List]."


def bench_messages(ds, history: list[int], candidates: list[int], instruction: str = INSTRUCTION) -> list[dict]:
    """A T2 prompt (twice.prompts.recommendation_prompt's [Purchase History] / [Candidate List] / ***Instruction***
    layout) compacted for a CPU bench: item IDs only, space-separated, a one-line instruction, no system turn:
    ~40 tokens instead of ~210, which is most of the bench's cost."""
    hist = " ".join(ds.items[i].id for i in history)
    cands = " ".join(ds.items[c].id for c in candidates)
    return [{"role": "user", "content": f"***Instruction***\n{instruction}\n\n[Purchase History]\n{hist}\n\n"
                                        f"[Candidate List]\n{cands}"}]


def train_instances(ds) -> list[tuple[int, int]]:
    """(user idx, position t) for every target inside a user's train part: items[t] for 1 <= t <= len - 3."""
    return [(u.idx, t) for u in ds.users for t in range(1, len(u.items) - 2)]


def make_instance(ds, user: int, t: int, H: int, n_neg: int, rng: random.Random) -> dict:
    u = ds.user(user)
    seen = set(u.items)
    negs: set[int] = set()
    while len(negs) < n_neg:
        c = rng.randint(1, ds.n_items)
        if c not in seen:
            negs.add(c)
    cands = sorted(negs) + [u.items[t]]
    rng.shuffle(cands)
    return {"user": user, "history": u.items[max(0, t - H):t], "full": u.items[:t], "target": u.items[t],
            "candidates": cands}


def valid_instances(ds, n: int, H: int) -> list[dict]:
    return [{"user": c.user, "history": ds.history(c.user, "valid")[-H:], "target": c.target,
             "candidates": list(c.candidates)} for c in ds.candidates("valid")[:n]]


def encode_prompt(tok, ds, inst: dict, instruction: str = INSTRUCTION) -> list[int]:
    return tok.apply_chat_template(bench_messages(ds, inst["history"], inst["candidates"], instruction),
                                   add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------------------------
# the cached pieces: data, tokenizer + pretrained model, SASRec

def ensure_data(cfg: BenchConfig):
    from twice.data import DataConfig, load_dataset
    d = Path(cfg.data_dir).expanduser()
    if not (d / "users.jsonl").exists():
        from twice.data.__main__ import prepare
        prepare(parse_args(DataConfig, [cfg.data_config, f"out_dir={d}"]))
    return load_dataset(d)


def build_tokenizer(ds, out: Path):
    from twice.tokenizer import Tokenizer
    if (out / "tokenizer.model").exists():
        return Tokenizer(out / "tokenizer.model")
    ids = [it.id for it in ds.items[1:]]
    corpus = [f"***Instruction***\n{INSTRUCTION}\n\n[Purchase History]\n1 2\n\n[Candidate List]\n3 4", ECHO,
              "<item>1</item>"] * 20
    return Tokenizer.train_tiny(out, corpus, vocab_size=363 + len(ids) + 200, extra_symbols=ids)


def batch_ids(seqs: list[list[int]], masks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, L] ids and next-token targets (-100 where the mask is 0): causal attention never lets a real
    token see the pads after it, so no attention mask is needed."""
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    tgt = torch.full((len(seqs), L), -100, dtype=torch.long)
    for b, (s, m) in enumerate(zip(seqs, masks)):
        ids[b, :len(s)] = torch.tensor(s)
        for t in range(1, len(s)):
            if m[t]:
                tgt[b, t - 1] = s[t]   # position t-1 predicts token t
    return ids, tgt


def pretrain(cfg: BenchConfig, ds, tok, out: Path, log) -> Path:
    """A random tiny Gemma-3 learns `<item>ID</item>` answers to T2-style prompts from scratch (cached).
    A fraction `echo` of the examples ask instead to repeat the candidate list (answer: the 10 IDs): a dense copy
    signal. With one answer ID per ~70-token prompt the T2 task alone did not teach a model this small to copy a
    candidate within our CPU budget (it first learns the items' popularity: the loss sat at the unigram level);
    with the echo task mixed in, the bench's own log shows the mixture loss fall from 2.5 (step 100) to 0.2
    (step 250), and the pretrained model answers a valid candidate for 95% of valid users."""
    from twice.gemma3 import Gemma3, Gemma3Config
    path = out / "model.safetensors"
    if path.exists():
        return out
    m, p = cfg.model, cfg.pretrain
    gcfg = Gemma3Config(vocab_size=tok.vocab_size, hidden_size=m.hidden, intermediate_size=m.intermediate,
                        num_hidden_layers=m.layers, num_attention_heads=m.heads, num_key_value_heads=m.kv_heads,
                        head_dim=m.head_dim, query_pre_attn_scalar=m.head_dim, sliding_window=512,
                        sliding_window_pattern=m.layers, max_position_embeddings=1024)
    torch.manual_seed(p.seed)
    model = Gemma3.from_config(gcfg)
    log(f"pretrain: tiny Gemma-3 {model.num_params() / 1e6:.2f}M params, vocab {tok.vocab_size}, {p.steps} steps "
        f"x {p.batch_size}")
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.0, betas=(0.9, 0.98))
    rng = random.Random(p.seed)
    pool = train_instances(ds)
    answer = lambda inst: tok.encode(f"<item>{ds.items[inst['target']].id}</item>") + [tok.end_of_turn_id]  # noqa
    t0, c0 = time.time(), time.process_time()
    model.train()
    for step in range(p.steps):
        lr = p.lr * min(1.0, (step + 1) / p.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / p.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        seqs, masks = [], []
        for _ in range(p.batch_size):
            inst = make_instance(ds, *rng.choice(pool), cfg.history, cfg.n_negatives, rng)
            if rng.random() < p.echo:
                q = encode_prompt(tok, ds, inst, ECHO)
                a = tok.encode(" ".join(ds.items[c].id for c in inst["candidates"])) + [tok.end_of_turn_id]
            else:
                q, a = encode_prompt(tok, ds, inst), answer(inst)
            seqs.append(q + a)
            masks.append([0] * len(q) + [1] * len(a))
        ids, tgt = batch_ids(seqs, masks)
        logp = model(ids, targets=tgt)                     # [B, L] fp32, 0 where ignored
        loss = -logp.sum() / (tgt != -100).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0 or step == 0:
            log(f"pretrain step {step + 1}/{p.steps} loss {loss.item():.3f} lr {lr:.2e} ({time.time() - t0:.0f} s, "
                f"{time.process_time() - c0:.0f} CPU-s)")
    model.save_pretrained(out, tokenizer_path=out.parent / "tok" / "tokenizer.model")
    return out


def train_sasrec(cfg: BenchConfig, ds, out: Path, log) -> Path:
    """A small SASRec (full-softmax CE) on every user's train part items[:-2] (cached)."""
    from twice.sasrec import SASRec, SASRecConfig, left_pad
    if (out / "model.safetensors").exists():
        return out
    s = cfg.sasrec
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(n_items=ds.n_items, hidden=s.hidden, blocks=2, heads=1, inner=s.hidden * 2,
                                maxlen=s.maxlen, dropout=0.2))
    seqs = [u.items[:-2][-(s.maxlen + 1):] for u in ds.users if len(u.items) >= 4]
    inp = left_pad([q[:-1] for q in seqs], s.maxlen)        # [U, L]
    tgt = left_pad([q[1:] for q in seqs], s.maxlen)         # [U, L] next item per slot, 0 = none
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    for ep in range(s.epochs):
        model.train()
        perm = torch.randperm(len(inp), generator=g)
        for i in range(0, len(perm), s.batch_size):
            idx = perm[i:i + s.batch_size]
            loss = model(inp[idx], tgt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    log(f"sasrec: {s.epochs} epochs in {time.time() - t0:.0f} s, last loss {loss.item():.3f}")
    model.save(out)
    return out


# ---------------------------------------------------------------------------------------------------------------
# one GRPO run (variant x seed): the loop a researcher reads

@torch.no_grad()
def valid_metrics(model, engine, tok, ds, insts: list[dict], prompts_ids: list[list[int]], bs: int = 64) -> dict:
    """Valid HR@1 two ways. exact: the candidates ranked by log p(ID | prompt, "<item>") (each ID is one token
    here: one forward per prompt; ties pessimistic) -- defined even for a model that cannot yet copy a candidate.
    greedy: the greedy answer names the target; valid: it names one of the candidates."""
    open_ids = tok.encode("<item>")
    exact = greedy = valid = 0
    for i in range(0, len(insts), bs):
        batch, pids = insts[i:i + bs], prompts_ids[i:i + bs]
        seqs = [p + open_ids for p in pids]
        L = max(len(q) for q in seqs)
        ids = torch.zeros(len(seqs), L, dtype=torch.long)
        for b, q in enumerate(seqs):
            ids[b, :len(q)] = torch.tensor(q)              # right-padded: causal attention never sees the pads
        h = model(ids, return_hidden=True)                  # [B, L, D]
        last = h[torch.arange(len(seqs)), torch.tensor([len(q) - 1 for q in seqs])]   # [B, D]
        logits = last @ model.embed_tokens.weight.T          # [B, V] tied head
        for b, x in enumerate(batch):
            cand_tok = [tok.encode(ds.items[c].id)[0] for c in x["candidates"]]
            sc = logits[b, cand_tok]                        # [C]
            t = x["candidates"].index(x["target"])
            exact += int((sc >= sc[t]).sum()) == 1          # strictly above every other candidate
        res = engine.greedy(pids, max_new_tokens=8)
        for x, text in zip(batch, res.texts):
            item = parse_completion(text).item
            name = normalize_item(item) if item else None
            valid += name in {ds.items[c].id for c in x["candidates"]}
            greedy += name == ds.items[x["target"]].id
    n = len(insts)
    return {"hr1": exact / n, "greedy_hr1": greedy / n, "valid_rate": valid / n}


def run_grpo(cfg: BenchConfig, name: str, seed: int, root: Path) -> dict:
    """Pretrained weights -> `steps` GRPO steps under variant `name` -> final valid HR@1. Deterministic per seed."""
    from twice.data import load_dataset
    from twice.engine import Engine
    from twice.gemma3 import Gemma3, SharedPrefix
    from twice.sasrec import SASRec, left_pad
    from twice.tokenizer import Tokenizer

    torch.set_num_threads(1)
    obj, rew, mu, lr = resolve(cfg, name)
    g = cfg.grpo
    ds = load_dataset(cfg.data_dir)
    tok = Tokenizer(root / "tok" / "tokenizer.model")
    torch.manual_seed(seed)
    model = Gemma3.from_pretrained(root / "pretrain")
    ref = copy.deepcopy(model).eval().requires_grad_(False) if obj.beta > 0 else None
    sas = SASRec.load(root / "sasrec").eval()
    engine = Engine(model, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    pool = train_instances(ds)
    rng = random.Random(1_000_003 * seed + 17)   # the same prompts for every variant of this seed
    run_dir = root / "runs" / f"{name}_s{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").write_text("")
    vinst = valid_instances(ds, cfg.valid_users, cfg.history)
    vids = [encode_prompt(tok, ds, x) for x in vinst]
    hist = []
    t0, c0 = time.time(), time.process_time()
    for step in range(g.steps):
        # ---- 1. sample: P prompts x G completions (seeds fixed by (seed, step): paired across variants)
        insts = [make_instance(ds, *rng.choice(pool), cfg.history, cfg.n_negatives, rng) for _ in range(g.prompts)]
        pids = [encode_prompt(tok, ds, x) for x in insts]
        model.eval()
        res = engine.generate(pids, num_samples=g.group_size, max_new_tokens=g.max_new_tokens,
                              temperature=g.temperature, seeds=(seed * 7919 + step) * 4096)
        # ---- 2. rewards (twice.rewards): rho_cf from SASRec's logit of the named item given the history
        with torch.no_grad():
            seen = [x["history"] if rew.cf_history == "prompt" else x["full"] for x in insts]  # what SASRec reads
            logits = sas.score_all(left_pad(seen, sas.cfg.maxlen))  # [P, n_items + 1]
        ctxs = []
        for r, text in enumerate(res.texts):
            x = insts[r // g.group_size]
            item = parse_completion(text).item
            idx = ds.item_by_id.get(normalize_item(item)) if item else None
            ctxs.append(RewardContext(text, ds.items[x["target"]].id, [ds.items[c].id for c in x["candidates"]],
                                      float(logits[r // g.group_size, idx]) if idx else None, rew.lam, rew.tau,
                                      cf_outside_candidates=rew.cf_outside_candidates))
        rewards, parts = compute_rewards(ctxs, rew.weights)
        # ---- 3. advantages (twice.grpo)
        adv, st = group_advantages(torch.tensor(rewards), g.group_size, obj.scale_rewards, obj.adv_eps, obj.std_floor)
        # ---- 4. mu policy updates on this rollout (twice.grpo.policy_loss), shared-prefix forward
        comp, mask = res.tokens_padded, res.mask                 # [R, Tc]
        targets = comp.masked_fill(~mask, -100)
        P = max(len(p) for p in pids)
        prompt = torch.zeros(len(pids), P, dtype=torch.long)
        for i, p in enumerate(pids):
            prompt[i, :len(p)] = torch.tensor(p)
        sp = SharedPrefix(prompt, torch.tensor([len(p) for p in pids]), g.group_size)
        lp = lambda m: m(comp, shared_prefix=sp, targets=targets, temperature=g.temperature)  # noqa: E731  [R, Tc]
        model.train()
        with torch.no_grad():
            old = lp(model) if mu > 1 else None
            ref_lp = lp(ref) if ref is not None else None
        m = {}
        for _ in range(mu):
            loss, m = policy_loss(lp(model), old, adv, mask, eps_low=obj.eps_low, eps_high=obj.eps_high,
                                  loss_norm=obj.loss_norm, max_len=obj.max_len, ref_logp=ref_lp, beta=obj.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), g.max_grad_norm)
            opt.step()
        rec = {"step": step + 1, "reward": statistics.fmean(rewards),
               **{f"reward/{k}": statistics.fmean(v) for k, v in parts.items()},
               "match_rate": statistics.fmean(parts["match"]), "cf_mean": statistics.fmean(parts["cf"]),
               "zero_std_groups": st["zero_std_groups"], "groups": st["n_groups"],
               "clip_frac_low": float(m["clip_frac_low"]), "clip_frac_high": float(m["clip_frac_high"]),
               "kl": float(m["kl"]), "loss": float(m["loss"]), "grad_norm": float(gnorm),
               "truncated_frac": sum(r == "length" for r in res.stop_reasons) / len(res.stop_reasons),
               "time/step": time.time() - t0}
        hist.append(rec)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    model.eval()
    vm = valid_metrics(model, engine, tok, ds, vinst, vids)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": g.steps, "valid/hr@1": vm["hr1"], "valid/greedy_hr@1": vm["greedy_hr1"],
                            "valid/valid_rate": vm["valid_rate"]}) + "\n")
    tail = hist[-cfg.tail:]
    return {"variant": name, "seed": seed, **vm,
            "reward": statistics.fmean(r["reward"] for r in tail), "match": statistics.fmean(r["match_rate"] for r in tail),
            "seconds": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1)}


def _worker(args):
    cfg, name, seed, root = args
    return run_grpo(cfg, name, seed, Path(root))


# ---------------------------------------------------------------------------------------------------------------
# the table

def table(results: list[dict], names: list[str], before: dict) -> str:
    by = {(r["variant"], r["seed"]): r for r in results}
    seeds = sorted({r["seed"] for r in results if r["variant"] == "paper"})
    sd = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    lines = [f"pretrained model before GRPO: valid HR@1 {before['hr1']:.3f} exact, {before['greedy_hr1']:.3f} greedy "
             f"(valid answers {before['valid_rate']:.3f})", "",
             "| variant | valid HR@1 exact (mean +- sd) | d vs paper (mean +- sd) | seeds > paper | greedy HR@1 | "
             "valid answers | match (last steps) | reward (last steps) | s/run |", "|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        rows = [by[(n, s)] for s in seeds if (n, s) in by]
        if not rows:
            continue
        hr = [r["hr1"] for r in rows]
        d = [by[(n, r["seed"])]["hr1"] - by[("paper", r["seed"])]["hr1"] for r in rows if ("paper", r["seed"]) in by]
        dcell = "-" if n == "paper" else f"{statistics.fmean(d):+.3f} +- {sd(d):.3f}"
        wins = "-" if n == "paper" else f"{sum(x > 0 for x in d)}/{len(d)} ({sum(x < 0 for x in d)} below)"
        lines.append(f"| {n} | {statistics.fmean(hr):.3f} +- {sd(hr):.3f} | {dcell} | {wins} | "
                     f"{statistics.fmean(r['greedy_hr1'] for r in rows):.3f} | "
                     f"{statistics.fmean(r['valid_rate'] for r in rows):.3f} | "
                     f"{statistics.fmean(r['match'] for r in rows):.3f} | {statistics.fmean(r['reward'] for r in rows):.3f} | "
                     f"{statistics.fmean(r['seconds'] for r in rows):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    cfg = parse_args(BenchConfig, argv)
    names = variant_names(cfg)
    for n in names:
        resolve(cfg, n)   # every variant's keys checked before anything runs
    root = Path(cfg.out_dir).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    logf = open(root / "ablate.log", "a")

    def log(msg):
        line = f"{time.strftime('%H:%M:%S')} {msg}"
        print(line, flush=True)
        logf.write(line + "\n")
        logf.flush()

    t_all, c_all = time.time(), time.process_time()
    torch.set_num_threads(max(1, cfg.workers))
    ds = ensure_data(cfg)
    cfg.data_dir = str(Path(cfg.data_dir).expanduser().resolve())
    # cached pieces live under a key of what they depend on: an edit to grpo.py reuses them, a model change does not
    base_key = key([cfg.data_dir, cfg.history, cfg.n_negatives, dataclasses.asdict(cfg.model),
                    dataclasses.asdict(cfg.pretrain)])
    cache = root / f"base_{base_key}"
    tok = build_tokenizer(ds, cache / "tok")
    pretrain(cfg, ds, tok, cache / "pretrain", log)
    train_sasrec(cfg, ds, cache / f"sasrec_{key(dataclasses.asdict(cfg.sasrec))}", log)
    sas_dir = cache / f"sasrec_{key(dataclasses.asdict(cfg.sasrec))}"
    (cache / "sasrec").unlink(missing_ok=True)
    (cache / "sasrec").symlink_to(sas_dir.name)
    before_path = cache / f"before_{cfg.valid_users}.json"
    if not before_path.exists():
        from twice.engine import Engine
        from twice.gemma3 import Gemma3
        model = Gemma3.from_pretrained(cache / "pretrain").eval()
        vinst = valid_instances(ds, cfg.valid_users, cfg.history)
        vm = valid_metrics(model, Engine(model, tok), tok, ds, vinst, [encode_prompt(tok, ds, x) for x in vinst])
        write_json_atomic(before_path, vm)
    before = json.loads(before_path.read_text())
    log(f"pretrained: valid HR@1 {before['hr1']:.3f} (exact), greedy {before['greedy_hr1']:.3f}, valid answers "
        f"{before['valid_rate']:.3f} "
        f"({time.time() - t_all:.0f} s so far)")

    # results.jsonl: one line per (variant, seed), reused while the run's resolved config and the code it runs
    # (grpo.py, rewards.py, the sampler, the model, this file) are unchanged
    code = key([(Path(__file__).parent / f).read_text() for f in ("grpo.py", "rewards.py", "engine.py", "gemma3.py",
                                                                   "ablate.py")])
    res_path = root / "results.jsonl"
    done = {}
    if res_path.exists():
        for line in res_path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                done[(r["variant"], r["seed"], r["key"])] = r
    jobs, results = [], []
    for n in names:
        rk = key([base_key, dataclasses.asdict(cfg.grpo), cfg.valid_users, cfg.tail, code,
                  [dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x for x in resolve(cfg, n)]])
        for s in cfg.seeds:
            if (n, s, rk) in done:
                results.append(done[(n, s, rk)])
            else:
                jobs.append((n, s, rk))
    log(f"{len(names)} variants x {len(cfg.seeds)} seeds: {len(results)} cached, {len(jobs)} to run "
        f"on {cfg.workers} worker(s)")
    args = [(cfg, n, s, str(cache)) for n, s, _ in jobs]
    if cfg.workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        with mp.get_context("spawn").Pool(cfg.workers) as pool:
            outs = pool.imap(_worker, args)
            for (n, s, rk), r in zip(jobs, outs):
                results.append(_record(res_path, r, rk, log))
    else:
        for (n, s, rk), a in zip(jobs, args):
            results.append(_record(res_path, _worker(a), rk, log))
    text = table(results, names, before)
    text += (f"\n{len(cfg.seeds)} seeds, {cfg.grpo.steps} GRPO steps x {cfg.grpo.prompts} prompts x "
             f"{cfg.grpo.group_size} samples; valid HR@1 on {cfg.valid_users} users x 10 candidates: exact = the "
             f"candidates ranked by log p(ID | prompt, <item>), greedy = the greedy answer; "
             f"total {time.time() - t_all:.0f} s wall; CPU: {time.process_time() - c_all:.0f} s in this process (data, "
             f"pretraining, SASRec: cached when 0) + {sum(r.get('cpu_s', 0) for r in results):.0f} s in the "
             f"GRPO runs\n")
    (root / "table.md").write_text(text)
    log("\n" + text)
    return 0


def _record(path: Path, r: dict, rk: str, log) -> dict:
    r = {**r, "key": rk}
    with open(path, "a") as f:
        f.write(json.dumps(r) + "\n")
    log(f"{r['variant']} seed {r['seed']}: valid HR@1 {r['hr1']:.3f} (greedy {r['greedy_hr1']:.3f}, valid "
        f"{r['valid_rate']:.3f}), match {r['match']:.3f}, reward "
        f"{r['reward']:.3f} ({r['seconds']} s)")
    return r


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as e:
        sys.exit(f"twice.ablate: config error: {e}")
