"""SASRec (Kang & McAuley, ICDM'18): causal self-attention over a user's item sequence, next-item scores by dot
product with the (shared) item embedding table. Trained by `train_sasrec.py`; used by the GRPO reward
(sigmoid of `score`) and by eval.py.

    from twice.sasrec import SASRec
    model = SASRec.load("runs/sasrec-ml100k/best")
    logits = model.score(history_ids, item_ids)       # [B, L] left-padded, most recent last ; [B, C] -> [B, C]

Losses (config `loss`), all on packed sequences (every position of a sequence predicts the next item in one
forward, the original SASRec way):
  - "bce": one sampled negative per position, binary cross-entropy (original SASRec). `neg_sampling: unseen`
    draws it outside the user's whole training sequence (the original's `random_neq(1, n+1, set(seq))`;
    train_sasrec.py passes that sequence as `exclude`), `uniform` from every other item.
  - "ce": full softmax over all items (SASRec+ of Klenitskiy & Vasilev, RecSys'23; RecBole's loss_type CE).
  - "sampled_softmax": softmax over the positive and `n_negatives` uniform negatives shared by the whole batch
    (one [N, K] matmul), for catalogs where the full [N, n_items] logits do not fit.
Negatives are drawn with torch.randint on the model's device: no per-sample Python loop. A negative that
collides with the position's positive is masked out (uniform sampling, so no logQ correction is needed).

Positions: learned absolute embeddings counted from the OLDEST real item of the input window (position 0), not
from the left edge of the padded array. A prefix of length t then gets the same positions in packed training
(slot t of a longer row) as at inference (a history of length t), which the slot-index scheme of the original
code does not give for short users.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from twice.metrics import rank_of_target
from twice.fileio import atomic_path, write_json_atomic


@dataclass
class SASRecConfig:
    n_items: int = 0  # number of real items; ids are 1..n_items and 0 is padding (filled from the dataset)
    hidden: int = 64  # embedding / model width
    blocks: int = 2  # number of self-attention blocks
    heads: int = 2  # attention heads (hidden must be divisible by heads)
    inner: int = 256  # feed-forward width (RecBole: inner_size 256; original SASRec: = hidden)
    maxlen: int = 50  # longest history the model reads; longer histories keep the most recent maxlen items
    dropout: float = 0.2  # dropout on embeddings, attention probabilities, and residual branches
    norm: str = "pre"  # "pre": x + Dropout(g(LN(x))) + final LN (the SASRec paper's block and its code) | "post":
    #                    LN(x + Dropout(g(x))) (the original Transformer's; RecBole's SASRec)
    loss: str = "ce"  # "ce" (full softmax) | "bce" (1 sampled negative per position) | "sampled_softmax"
    neg_sampling: str = "uniform"  # loss=bce: "unseen" = the negative is never in the user's training sequence
    #                                (the original) | "uniform" = any item but the positive
    n_negatives: int = 256  # negatives shared by the batch for loss="sampled_softmax"
    init_std: float = 0.02  # std of the normal init of embeddings and linear weights
    ln_eps: float = 1e-8  # LayerNorm epsilon
    item_ids_sha: str = ""  # fingerprint of the dataset's item id map (filled by train_sasrec.py; checked by
    #                         check_dataset so a reward/eval never reads scores of another catalogue's ids)

    def __post_init__(self):
        if self.norm not in ("pre", "post"):
            raise ValueError(f"SASRecConfig.norm must be 'pre' or 'post', got {self.norm!r}")
        if self.loss not in ("ce", "bce", "sampled_softmax"):
            raise ValueError(f"SASRecConfig.loss must be 'ce', 'bce' or 'sampled_softmax', got {self.loss!r}")
        if self.neg_sampling not in ("uniform", "unseen"):
            raise ValueError(f"SASRecConfig.neg_sampling must be 'uniform' or 'unseen', got {self.neg_sampling!r}")
        if self.hidden % self.heads:
            raise ValueError(f"SASRecConfig.hidden ({self.hidden}) must be divisible by heads ({self.heads})")


class Block(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        self.cfg = cfg
        self.ln1 = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.ln2 = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)
        self.fc1 = nn.Linear(cfg.hidden, cfg.inner)
        self.fc2 = nn.Linear(cfg.inner, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def attn(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        H = self.cfg.heads
        q, k, v = self.qkv(x).view(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)  # each [B, H, L, hd]
        p = self.cfg.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)  # [B, H, L, hd]
        return self.proj(y.transpose(1, 2).reshape(B, L, D))

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.norm == "pre":
            x = x + self.drop(self.attn(self.ln1(x), mask))
            x = x + self.drop(self.ffn(self.ln2(x)))
        else:
            x = self.ln1(x + self.drop(self.attn(x, mask)))
            x = self.ln2(x + self.drop(self.ffn(x)))
        return x


class SASRec(nn.Module):
    def __init__(self, cfg: SASRecConfig):
        super().__init__()
        if cfg.n_items <= 0:
            raise ValueError("SASRecConfig.n_items must be set (> 0); train_sasrec.py fills it from the dataset")
        self.cfg = cfg
        self.item_emb = nn.Embedding(cfg.n_items + 1, cfg.hidden, padding_idx=0)  # row 0 = padding, kept at 0
        self.pos_emb = nn.Embedding(cfg.maxlen, cfg.hidden)
        # only the LayerNorm the variant uses exists (an unused parameter would break DDP and the key table)
        post = cfg.norm == "post"
        self.emb_ln = nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps) if post else None  # post-LN: normalise the input sum
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.blocks))
        self.final_ln = None if post else nn.LayerNorm(cfg.hidden, eps=cfg.ln_eps)  # pre-LN: normalise the output
        self.init_weights()

    def init_weights(self) -> None:
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)
            if isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    # ---------------------------------------------------------------- encoder
    def hidden_states(self, seq: torch.Tensor) -> torch.Tensor:
        """seq [B, L] item ids, left-padded with 0 (L <= maxlen) -> hidden states [B, L, D] (0 at padding slots).

        The output at slot t depends only on seq[:, :t+1] (causal mask), so packed training is exact."""
        B, L = seq.shape
        if L > self.cfg.maxlen:
            raise ValueError(f"sequence length {L} > maxlen {self.cfg.maxlen}; truncate to the most recent items")
        real = seq != 0  # [B, L]
        pos = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # [B, L], 0 = oldest real item in the window
        x = self.item_emb(seq) + self.pos_emb(pos)  # [B, L, D]
        if self.cfg.norm == "post":
            x = self.emb_ln(x)
        x = self.drop(x) * real[..., None]
        # Attend to earlier-or-same real slots. Each slot may always see itself, so padding rows (no real key)
        # are not fully masked (SDPA would return NaN); their outputs are zeroed below and never used.
        idx = torch.arange(L, device=seq.device)
        causal = idx[None, :] <= idx[:, None]  # [L, L] key <= query
        mask = causal[None] & (real[:, None, :] | torch.eye(L, dtype=torch.bool, device=seq.device)[None])
        mask = mask[:, None]  # [B, 1, L, L] bool, True = may attend
        for block in self.blocks:
            x = block(x, mask) * real[..., None]
        if self.cfg.norm == "pre":
            x = self.final_ln(x)
        return x * real[..., None]

    def user_vectors(self, history: torch.Tensor) -> torch.Tensor:
        """history [B, L] left-padded, most recent last (any L) -> user vector [B, D] from the last slot."""
        if history.shape[1] > self.cfg.maxlen:
            history = history[:, -self.cfg.maxlen :]
        return self.hidden_states(history)[:, -1]

    # ---------------------------------------------------------------- scoring (public API)
    def score(self, history_ids: torch.Tensor, item_ids: torch.Tensor) -> torch.Tensor:
        """history_ids [B, L] (left-padded with 0, most recent last), item_ids [B, C] -> logits [B, C].

        The GRPO reward is sigmoid(logit) of the named item. Padding (id 0) candidates score 0 as the
        embedding row is zero; callers should not pass them. An all-padding (empty) history gives a zero user
        vector, so every logit is 0 (sigmoid 0.5): no evidence either way."""
        u = self.user_vectors(history_ids)  # [B, D]
        return torch.einsum("bd,bcd->bc", u, self.item_emb(item_ids))

    def score_all(self, history_ids: torch.Tensor) -> torch.Tensor:
        """history_ids [B, L] -> logits over every item [B, n_items + 1]; column 0 (padding) is -inf."""
        logits = self.user_vectors(history_ids) @ self.item_emb.weight.T  # [B, V+1]
        logits[:, 0] = float("-inf")
        return logits

    # ---------------------------------------------------------------- training loss
    def forward(self, seq: torch.Tensor, targets: torch.Tensor, generator: torch.Generator | None = None,
                exclude: torch.Tensor | None = None):
        """Packed next-item loss. seq [B, L] inputs (left-padded), targets [B, L] next item at each slot
        (0 = no target, ignored). exclude [B, E] (0-padded): items a row's BCE negatives must avoid (its user's
        training sequence), used when neg_sampling == "unseen". Returns a scalar loss (mean over target positions)."""
        h = self.hidden_states(seq)  # [B, L, D]
        valid = targets != 0
        h, pos = h[valid], targets[valid]  # [N, D], [N]
        W = self.item_emb.weight  # [V+1, D]
        V = W.shape[0]
        if self.cfg.loss == "ce":
            logits = h @ W.T  # [N, V+1]
            logits[:, 0] = float("-inf")
            return F.cross_entropy(logits, pos)
        if self.cfg.loss == "bce":
            neg = torch.randint(1, V, pos.shape, device=pos.device, generator=generator)  # [N]
            if self.cfg.neg_sampling == "unseen":
                if exclude is None:
                    raise ValueError("SASRec: neg_sampling='unseen' needs `exclude` (each row's training sequence)")
                seen = torch.zeros(exclude.shape[0], V, dtype=torch.bool, device=pos.device)  # [B, V+1]
                seen.scatter_(1, exclude.to(pos.device), True)
                seen[:, 0] = False
                neg = sample_unseen(neg, valid.nonzero()[:, 0], seen, generator)  # [N]
            # F.embedding, not W[pos]: indexing's backward scatters into W.grad with parallel atomic float adds on a
            # multi-thread CPU (index_put_ accumulate), so the same run gave weights differing in the 8th digit
            pos_logit = (h * F.embedding(pos, W)).sum(-1)
            neg_logit = (h * F.embedding(neg, W)).sum(-1)
            keep = (neg != pos).float()  # a "negative" equal to the positive is not a negative
            loss = -F.logsigmoid(pos_logit) - F.logsigmoid(-neg_logit) * keep
            return loss.mean()
        # sampled softmax: K negatives shared by every position in the batch -> one [N, K] matmul
        neg = torch.randint(1, V, (self.cfg.n_negatives,), device=pos.device, generator=generator)  # [K]
        pos_logit = (h * F.embedding(pos, W)).sum(-1, keepdim=True)  # [N, 1] (deterministic backward, as above)
        neg_logit = h @ F.embedding(neg, W).T  # [N, K]
        neg_logit = neg_logit.masked_fill(neg[None, :] == pos[:, None], float("-inf"))
        logits = torch.cat([pos_logit, neg_logit], dim=1)  # [N, 1+K], the positive is class 0
        return F.cross_entropy(logits, torch.zeros_like(pos))

    # ---------------------------------------------------------------- checkpoint
    def save(self, out_dir: str | Path) -> None:
        """Write out_dir/model.safetensors and out_dir/config.json, each via a temp file + os.replace, weights
        first, so a reader never sees a config whose weights are half-written."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_path(out_dir / "model.safetensors") as tmp:
            save_file(state, tmp, metadata={"format": "pt", "model": "twice.sasrec"})
        write_json_atomic(out_dir / "config.json", dataclasses.asdict(self.cfg))

    @classmethod
    def load(cls, model_dir: str | Path, device: str | torch.device = "cpu") -> "SASRec":
        """Rebuild from config.json and load model.safetensors strictly (every key, every shape). Eval mode."""
        from safetensors.torch import load_file

        model_dir = Path(model_dir).expanduser()
        cfg_path, w_path = model_dir / "config.json", model_dir / "model.safetensors"
        for p in (cfg_path, w_path):
            if not p.exists():
                raise FileNotFoundError(f"SASRec checkpoint incomplete: {p} is missing")
        raw = json.loads(cfg_path.read_text())
        known = {f.name for f in dataclasses.fields(SASRecConfig)}
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"{cfg_path}: unknown SASRecConfig field(s) {sorted(unknown)}")
        model = cls(SASRecConfig(**raw))
        state = load_file(str(w_path))
        expected = model.state_dict()
        missing, extra = set(expected) - set(state), set(state) - set(expected)
        if missing or extra:
            raise ValueError(f"{w_path}: missing keys {sorted(missing)}, unexpected keys {sorted(extra)}")
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise ValueError(f"{w_path}: '{k}' has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}")
        model.load_state_dict(state, strict=True)
        return model.to(device).eval()


def sample_unseen(neg: torch.Tensor, row: torch.Tensor, seen: torch.Tensor, generator=None, rounds: int = 1000) -> torch.Tensor:
    """neg [N] initial uniform draws in 1..V-1, row [N] which row of seen [B, V] (bool, True = that user has the
    item) each draw belongs to -> [N], every draw redrawn until unseen (rejection sampling: uniform over the unseen
    items). Vectorised over N; memory O(B * V), not O(N * V)."""
    V = seen.shape[1]
    for _ in range(rounds):
        bad = seen[row, neg]  # [N]
        if not bool(bad.any()):
            return neg
        neg = neg.masked_scatter(bad, torch.randint(1, V, (int(bad.sum()),), device=neg.device, generator=generator))
    raise ValueError("SASRec: could not draw an unseen negative: some user has interacted with almost every item")


def item_ids_sha(ds) -> str:
    """Fingerprint of a dataset's item id map (idx -> id, in idx order): equal iff the SASRec ids mean the same items."""
    import hashlib
    return hashlib.sha256("\n".join(it.id for it in ds.items[1:]).encode()).hexdigest()[:16]


def check_dataset(model: SASRec, ds, where: str) -> None:
    """Refuse, in one line, a SASRec trained on another catalogue: a different item count or id map would make every
    rho_cf (and the SASRec eval row) the score of some other item. A ConfigError (a ValueError): the scripts print
    it as one line."""
    from twice.config import ConfigError
    c = model.cfg
    if c.n_items != ds.n_items:
        raise ConfigError(f"{where}: SASRec has {c.n_items} items but dataset {ds.root} has {ds.n_items}; "
                         f"train SASRec on this dataset (python train_sasrec.py ... train.data_dir={ds.root})")
    if c.item_ids_sha and c.item_ids_sha != item_ids_sha(ds):
        raise ConfigError(f"{where}: SASRec's item id map (sha {c.item_ids_sha}) differs from dataset {ds.root}'s "
                         f"({item_ids_sha(ds)}); train SASRec on this dataset")


@torch.no_grad()
def calibration(model: SASRec, histories: list[list[int]], tau: float = 0.3, seed: int = 0,
                batch_size: int = 512) -> dict:
    """How sigmoid(logit) behaves as a probability (the GRPO reward's rho_cf), over the given histories:
    share of the unseen catalogue with rho_cf >= tau (mean over users), median rho_cf of one seeded random unseen
    item per user, and SASRec's own top-1 unseen item's rho_cf (median and min over users)."""
    dev = model.item_emb.weight.device
    g = torch.Generator().manual_seed(seed)
    share, rand, top1 = [], [], []
    for s, e in _batches(len(histories), batch_size):
        p = torch.sigmoid(model.score_all(left_pad(histories[s:e], model.cfg.maxlen).to(dev)).float()).cpu()  # [B, V+1]
        seen = _seen_mask(histories[s:e], p.shape[1], "cpu")
        seen[:, 0] = True
        unseen = ~seen
        share.append(((p >= tau) & unseen).sum(1) / unseen.sum(1).clamp(min=1))
        top1.append(p.masked_fill(seen, -1.0).max(1).values)
        r = torch.multinomial(unseen.float(), 1, generator=g)[:, 0]  # one uniform unseen item per user
        rand.append(p.gather(1, r[:, None])[:, 0])
    share, rand, top1 = torch.cat(share), torch.cat(rand), torch.cat(top1)
    return {"tau": tau, "users": len(histories), "share_ge_tau": float(share.mean()),
            "random_unseen_median": float(rand.median()), "random_unseen_ge_tau": float((rand >= tau).float().mean()),
            "top1_median": float(top1.median()), "top1_min": float(top1.min())}


def left_pad(histories: list[list[int]], maxlen: int) -> torch.Tensor:
    """Python lists of item ids (oldest first) -> LongTensor [B, min(maxlen, longest)] left-padded with 0,
    keeping the most recent `maxlen` items of each."""
    L = max(1, min(maxlen, max((len(h) for h in histories), default=1)))
    out = torch.zeros(len(histories), L, dtype=torch.long)
    for i, h in enumerate(histories):
        h = h[-L:]
        if h:
            out[i, L - len(h) :] = torch.as_tensor(h, dtype=torch.long)
    return out


# -------------------------------------------------------------------- evaluation (ranks; metrics in twice.metrics)
def _batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield s, min(n, s + batch_size)


@torch.no_grad()
def rank_candidates(model: SASRec, histories: list[list[int]], candidates: list[list[int]], targets: list[int],
                    batch_size: int = 512) -> torch.Tensor:
    """Fixed candidate sets (the paper's protocol): 1-based rank of each target inside its candidate list [U]."""
    dev = model.item_emb.weight.device
    out = []
    for s, e in _batches(len(histories), batch_size):
        cands = torch.as_tensor(candidates[s:e], dtype=torch.long, device=dev)  # [B, C]
        tgt = torch.as_tensor(targets[s:e], dtype=torch.long, device=dev)
        hit = cands == tgt[:, None]
        if not bool(hit.any(dim=1).all()):
            raise ValueError("a candidate set does not contain its target")
        scores = model.score(left_pad(histories[s:e], model.cfg.maxlen).to(dev), cands)
        out.append(rank_of_target(scores, hit.float().argmax(dim=1)).cpu())
    return torch.cat(out)


def _seen_mask(histories: list[list[int]], n_cols: int, device) -> torch.Tensor:
    """[B, n_cols] bool, True where the item is in the user's list (one scatter, no per-item Python loop)."""
    rows = torch.repeat_interleave(torch.arange(len(histories)), torch.tensor([len(h) for h in histories]))
    cols = torch.as_tensor([i for h in histories for i in h], dtype=torch.long)
    mask = torch.zeros(len(histories), n_cols, dtype=torch.bool)
    mask[rows, cols] = True
    return mask.to(device)


@torch.no_grad()
def rank_full(model: SASRec, histories: list[list[int]], targets: list[int], batch_size: int = 512) -> torch.Tensor:
    """Full ranking over every item, the user's history items excluded (score -inf) but never the target [U]."""
    dev = model.item_emb.weight.device
    out = []
    for s, e in _batches(len(histories), batch_size):
        scores = model.score_all(left_pad(histories[s:e], model.cfg.maxlen).to(dev))  # [B, V+1]
        tgt = torch.as_tensor(targets[s:e], dtype=torch.long, device=dev)
        seen = _seen_mask(histories[s:e], scores.shape[1], dev)
        seen[torch.arange(len(tgt), device=dev), tgt] = False  # a re-consumed target still counts
        scores = scores.masked_fill(seen, float("-inf"))
        out.append(rank_of_target(scores, tgt).cpu())
    return torch.cat(out)


@torch.no_grad()
def rank_sampled(model: SASRec, histories: list[list[int]], targets: list[int], exclude: list[list[int]],
                 n_negatives: int = 100, seed: int = 0, batch_size: int = 512) -> torch.Tensor:
    """Original SASRec protocol: the target against `n_negatives` uniform items outside `exclude[u]` (the user's
    whole sequence here), drawn with replacement from a seeded generator (same negatives on every run) [U]."""
    dev = model.item_emb.weight.device
    V = model.cfg.n_items
    g = torch.Generator().manual_seed(seed)
    out = []
    for s, e in _batches(len(histories), batch_size):
        seen = _seen_mask(exclude[s:e], V + 1, "cpu")
        seen[:, 0] = True
        neg = torch.randint(1, V + 1, (e - s, n_negatives), generator=g)  # [B, K]
        for _ in range(1000):  # resample collisions; vectorised over the batch
            bad = seen.gather(1, neg)
            if not bool(bad.any()):
                break
            neg[bad] = torch.randint(1, V + 1, (int(bad.sum()),), generator=g)
        else:
            raise ValueError("could not draw negatives: some user has interacted with almost every item")
        tgt = torch.as_tensor(targets[s:e], dtype=torch.long)[:, None]
        cands = torch.cat([tgt, neg], dim=1).to(dev)  # [B, 1+K], the target is column 0
        scores = model.score(left_pad(histories[s:e], model.cfg.maxlen).to(dev), cands)
        out.append(rank_of_target(scores, 0).cpu())
    return torch.cat(out)
