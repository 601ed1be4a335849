"""Engine tests: the KV cache and the group sampler against cache-less full forwards of the same model.

    pytest tests/test_engine.py -q

A tiny random Gemma-3 (window 4, 6 layers [S, S, F, S, S, F], GQA 4/2 heads, random norm weights) stands in for
the real model; every sequence here is longer than the window, so the ring buffer wraps many times. The reference
is always the model's own cache-less forward (masks built by gemma3.build_mask, checked against transformers in
tests/test_gemma3.py).
"""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from twice.engine import Engine, FanoutKVCache, KVCache, sample_tokens
from twice.gemma3 import Gemma3, PRESETS

W = PRESETS["tiny"].sliding_window  # 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(one_thread):
    torch.manual_seed(0)
    m = Gemma3.from_config(PRESETS["tiny"], std=0.05).eval()
    with torch.no_grad():  # zero norm weights would hide (1 + w) mistakes; random ones make every layer matter
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(-0.5, 0.5)
    return m


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model)


P1 = [2, 5, 7, 9, 11, 13, 17, 19, 23]  # 9 tokens > W
P2 = [2, 40, 41]  # 3 tokens < W (the ring never wraps during its prefill)
P3 = [2, 60, 61, 62, 63, 64]


def full_logits(model, seq):
    """Cache-less forward of one sequence -> fp32 logits [T, V]."""
    with torch.no_grad():
        return model(torch.tensor([seq])).float()[0]


def naive_greedy(model, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(full_logits(model, seq)[-1].argmax()))
    return seq[len(prompt):]


# ---------------------------------------------------------------------------------------------------------------
# KV cache

@pytest.mark.parametrize("chunks", [[9, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [2, 7, 1, 1, 1, 6, 1, 1, 3]])
def test_cache_logits_match_full_forward(model, chunks):
    """Prefill, chunked prefill (multi-token steps after cached slots: [ring ; new] path) and single-token decode
    give the same logits as one cache-less forward over the whole sequence, far past the window."""
    seq = [2] + [int(x) for x in torch.randint(3, 512, (sum(chunks) - 1,), generator=torch.Generator().manual_seed(1))]
    ref = full_logits(model, seq)  # [T, V]
    cache = KVCache(model.config, 1, len(seq))
    got, p = [], 0
    with torch.no_grad():
        for c in chunks:
            ids = torch.tensor([seq[p:p + c]])
            got.append(model(ids, position_ids=cache.position_ids(c), kv_cache=cache).float()[0])
            p += c
    assert cache.pos == len(seq)
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-5, rtol=0)


def test_cache_ring_layout_and_mask_counts(model):
    """Sliding layers hold R = min(W, max_len) slots; a decode query sees exactly W keys once past the window,
    global layers see every slot so far."""
    cache = KVCache(model.config, 2, 20, start=torch.tensor([0, 3]))
    kinds = model.config.layer_types
    for l, kind in enumerate(kinds):
        assert cache.k[l].shape[2] == (W if kind == "sliding_attention" else 20)
    with torch.no_grad():
        model(torch.randint(3, 512, (2, 10)), position_ids=cache.position_ids(10), kv_cache=cache)
        m_slide = cache._build_mask("sliding_attention", 1)  # the next decode step's masks
        m_full = cache._build_mask("full_attention", 1)
    allowed = lambda m: (m == 0).sum(-1).flatten().tolist()  # noqa: E731
    assert allowed(m_slide) == [W, W]  # row 1's 3 left pads are already out of the window
    assert allowed(m_full) == [11, 8]  # 10 cached + the new token; row 1 minus its 3 pads
    assert cache.position_ids(1).tolist() == [[10], [7]]


def test_fan_out_copies_rows(model):
    cache = KVCache(model.config, 2, 6, start=torch.tensor([0, 2]))
    with torch.no_grad():
        model(torch.randint(3, 512, (2, 6)), position_ids=cache.position_ids(6), kv_cache=cache)
    big = cache.fan_out(3, 16)
    assert big.pos == 6 and big.start.tolist() == [0, 0, 0, 2, 2, 2]
    for l in range(len(cache.k)):
        n = cache.k[l].shape[2]
        for r in range(6):
            torch.testing.assert_close(big.k[l][r, :, :n], cache.k[l][r // 3], atol=0, rtol=0)
            torch.testing.assert_close(big.v[l][r, :, :n], cache.v[l][r // 3], atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Greedy

def test_cached_greedy_equals_recompute_past_window(model, engine):
    res = engine.greedy([P1, P2], max_new_tokens=14, stop_ids=[])  # batched, left-padded
    for prompt, toks in zip([P1, P2], res.tokens):
        assert toks == naive_greedy(model, prompt, 14)
    assert len(set(res.tokens[0])) > 3  # the random model does not just repeat one token
    # greedy full_logprobs are log_softmax(logits) at the argmax (temperature 1)
    seq = P1 + res.tokens[0]
    lsm = torch.log_softmax(full_logits(model, seq), -1)
    ref = [lsm[len(P1) - 1 + i, t].item() for i, t in enumerate(res.tokens[0])]
    assert res.full_logprobs[0] == pytest.approx(ref, abs=1e-5)
    assert res.logprobs[0] == [0.0] * 14


def test_chunked_prefill_same_samples(model, engine):
    kw = dict(num_samples=2, max_new_tokens=8, temperature=1.0, stop_ids=[], seeds=9)
    a = engine.generate([P1, P3], **kw)
    b = Engine(model, prefill_chunk=3).generate([P1, P3], **kw)  # 9 slots -> chunks of 3 (< W, then wrapping)
    assert a.tokens == b.tokens
    for x, y in zip(a.full_logprobs, b.full_logprobs):
        assert x == pytest.approx(y, abs=1e-5)


def test_top_k_1_equals_greedy(engine):
    g = engine.greedy([P1, P3], max_new_tokens=10, stop_ids=[])
    s = engine.generate([P1, P3], num_samples=2, max_new_tokens=10, temperature=0.8, top_k=1, stop_ids=[], seeds=3)
    assert s.tokens == [g.tokens[0]] * 2 + [g.tokens[1]] * 2
    assert all(lp == 0.0 for row in s.logprobs for lp in row)  # one kept token: probability 1


# ---------------------------------------------------------------------------------------------------------------
# Sampling

def test_fan_out_equals_independent_runs(engine):
    """One prefill fanned out to K rows == K separate runs, each with its row's seed."""
    seeds = [11, 12, 13, 14]
    kw = dict(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, stop_ids=[])
    group = engine.generate([P1], num_samples=4, seeds=seeds, **kw)
    for k, s in enumerate(seeds):
        solo = engine.generate([P1], num_samples=1, seeds=[s], **kw)
        assert group.tokens[k] == solo.tokens[0]
        assert group.logprobs[k] == pytest.approx(solo.logprobs[0], abs=1e-5)
    assert len({tuple(t) for t in group.tokens}) == 4  # different seeds, different samples


def test_left_padding_invariance(engine):
    """A batch of prompts of different lengths (left-padded, prompt-major rows) == each prompt alone."""
    prompts, K = [P1, P2, P3], 2
    seeds = list(range(100, 100 + K * len(prompts)))
    kw = dict(max_new_tokens=10, temperature=0.9, stop_ids=[])
    batch = engine.generate(prompts, num_samples=K, seeds=seeds, **kw)
    for i, p in enumerate(prompts):
        solo = engine.generate([p], num_samples=K, seeds=seeds[i * K:(i + 1) * K], **kw)
        assert batch.tokens[i * K:(i + 1) * K] == solo.tokens
        for a, b in zip(batch.full_logprobs[i * K:(i + 1) * K], solo.full_logprobs):
            assert a == pytest.approx(b, abs=1e-5)


def test_sampler_logprobs_match_full_forward(model, engine):
    """full_logprobs == log_softmax(full-forward logits / T) at the sampled tokens (what the trainer computes);
    logprobs == the same after top-k and top-p renormalisation (recomputed here in float64 by sorting)."""
    T, k, p = 0.7, 20, 0.8
    res = engine.generate([P3, P1], num_samples=2, max_new_tokens=9, temperature=T, top_k=k, top_p=p,
                          stop_ids=[], seeds=7)
    for r, prompt in enumerate([P3, P3, P1, P1]):
        toks = res.tokens[r]
        logits = full_logits(model, prompt + toks).double()[len(prompt) - 1:-1] / T  # [n, V] predicting toks
        full = torch.log_softmax(logits, -1)
        assert res.full_logprobs[r] == pytest.approx([full[i, t].item() for i, t in enumerate(toks)], abs=1e-5)
        ref = []
        for i, t in enumerate(toks):
            vals, idx = torch.sort(logits[i], descending=True)
            vals, idx = vals[:k], idx[:k]
            probs = torch.softmax(vals, -1)
            keep = (torch.cumsum(probs, -1) - probs) < p
            assert t in idx[keep].tolist()  # the sampled token is inside the processed support
            ref.append(torch.log_softmax(vals[keep], -1)[idx[keep].tolist().index(t)].item())
        assert res.logprobs[r] == pytest.approx(ref, abs=1e-5)
        assert all(a >= b - 1e-6 for a, b in zip(res.logprobs[r], res.full_logprobs[r]))  # truncation only adds mass


def test_untruncated_logprobs_equal_full(engine):
    res = engine.generate([P1], num_samples=3, max_new_tokens=6, temperature=1.3, stop_ids=[], seeds=0)
    for a, b in zip(res.logprobs, res.full_logprobs):
        assert a == pytest.approx(b, abs=1e-5)


def test_seeds_reproducible(engine):
    kw = dict(num_samples=3, max_new_tokens=8, temperature=1.0, stop_ids=[])
    a = engine.generate([P2], seeds=[1, 2, 3], **kw)
    b = engine.generate([P2], seeds=[1, 2, 3], **kw)
    c = engine.generate([P2], seeds=[4, 5, 6], **kw)
    assert a.tokens == b.tokens and a.logprobs == b.logprobs
    assert a.tokens != c.tokens
    torch.manual_seed(0)
    d = engine.generate([P2], **kw)  # seeds=None: drawn from torch's global RNG
    torch.manual_seed(0)
    e = engine.generate([P2], **kw)
    assert d.tokens == e.tokens


def test_sample_tokens_inverse_cdf_quantiles():
    """With evenly spaced uniforms, inverse-CDF sampling hits each kept token in proportion to its processed
    probability (to within one draw), and never a truncated one."""
    torch.manual_seed(0)
    logits = torch.randn(1, 30) * 2
    n = 20000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    tok, logp, full = sample_tokens(logits.expand(n, 30), u, temperature=0.9, top_k=12, top_p=0.9)
    x = logits[0].double() / 0.9
    vals, idx = torch.sort(x, descending=True)
    vals, idx = vals[:12], idx[:12]
    probs = torch.softmax(vals, -1)
    keep = (torch.cumsum(probs, -1) - probs) < 0.9
    kept = torch.softmax(vals[keep], -1)
    counts = torch.bincount(tok, minlength=30).double() / n
    expected = torch.zeros(30, dtype=torch.float64)
    expected[idx[keep]] = kept
    assert (counts - expected).abs().max() <= 2.0 / n
    torch.testing.assert_close(logp.double(), torch.log(expected[tok]), atol=1e-5, rtol=0)
    torch.testing.assert_close(full.double(), torch.log_softmax(x, -1)[tok], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# Stops

def test_stop_ids_and_masks(model, engine):
    free = engine.greedy([P1, P3], max_new_tokens=12, stop_ids=[])
    stop = free.tokens[0][4]  # make row 0's 5th greedy token a stop id
    n3 = free.tokens[1].index(stop) + 1 if stop in free.tokens[1] else 12
    res = engine.greedy([P1, P3], max_new_tokens=12, stop_ids=[stop])
    first = free.tokens[0].index(stop) + 1
    assert res.tokens[0] == free.tokens[0][:first] and res.stop_reasons[0] == "stop_id"  # stop token kept
    assert res.tokens[1] == free.tokens[1][:n3]
    assert res.stop_reasons[1] == ("stop_id" if n3 < 12 or free.tokens[1][-1] == stop else "length")
    assert res.mask[0].tolist() == [True] * first + [False] * (12 - first)
    assert res.tokens_padded[0, first:].eq(0).all() and res.logprobs_padded[0, first:].eq(0).all()
    # min_new_tokens bans stop ids before it
    res = engine.greedy([P1], max_new_tokens=12, stop_ids=[stop])
    late = engine.generate([P1], 1, 12, temperature=0.0, stop_ids=[stop], min_new_tokens=first + 1, seeds=0)
    assert len(late.tokens[0]) > len(res.tokens[0]) and late.tokens[0][:first - 1] == res.tokens[0][:first - 1]
    assert stop not in late.tokens[0][:first + 1]
    # the ban shapes the sampler's distribution only: full_logprobs stay those of the untouched model
    lsm = torch.log_softmax(full_logits(model, P1 + late.tokens[0]), -1)
    ref = [lsm[len(P1) - 1 + i, t].item() for i, t in enumerate(late.tokens[0])]
    assert late.full_logprobs[0] == pytest.approx(ref, abs=1e-5)


class CharTokenizer:
    """Token id i decodes to a fixed 1-2 character string; enough to exercise text-level stop strings."""
    stop_ids = [1, 106]

    def decode(self, ids, skip_special=True):
        return "".join("ab<>/xyz"[i % 8] + ("" if i % 3 else "q") for i in ids)


@pytest.mark.parametrize("check_every", [1, 3, 4, 5])  # some cadence splits the string across two checks
@pytest.mark.parametrize("offset", [9, 30])  # 30: past the first checks, so only a tail is decoded
def test_stop_strings(model, offset, check_every):
    eng = Engine(model, CharTokenizer())
    kw = dict(num_samples=4, max_new_tokens=24, temperature=1.0, stop_ids=[], seeds=21)
    free = eng.generate([P1], **kw)
    # pick a 2-character string from row 0's text (it may appear earlier too: the reference below finds the first)
    tok = CharTokenizer()
    text = free.texts[0]
    s = text[offset:offset + 2]
    res = eng.generate([P1], stop_strings=[s, "NEVER"], check_every=check_every, **kw)
    for r in range(4):
        toks = free.tokens[r]
        n = next((n for n in range(1, 25) if s in tok.decode(toks[:n])), None)
        if n is None:
            assert res.tokens[r] == toks and res.stop_reasons[r] == "length"
        else:  # cut at the token that completes the string, whatever the check cadence
            assert res.tokens[r] == toks[:n] and res.stop_reasons[r] == "stop_string"
            assert s in res.texts[r]
            assert s not in tok.decode(toks[:n - 1])
    assert res.stop_reasons[0] == "stop_string"
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model).generate([P1], stop_strings=["x"])


# ---------------------------------------------------------------------------------------------------------------
# Scoring

def test_score_matches_full_forward(model, engine):
    conts = [[3, 4, 5], [6], [7, 8, 9, 10, 11, 12, 13], [300, 301]]
    got = engine.score(P1, conts, batch_size=3)  # two chunks, right-padded
    per_tok = engine.score(P1, conts, per_token=True)
    for c, s, pt in zip(conts, got, per_tok):
        lsm = torch.log_softmax(full_logits(model, P1 + c).double(), -1)
        ref = [lsm[len(P1) - 1 + i, t].item() for i, t in enumerate(c)]
        assert pt == pytest.approx(ref, abs=1e-5)
        assert s == pytest.approx(math.fsum(ref), abs=1e-4)
    assert engine.score(P1, []) == []


def test_compaction_changes_nothing(engine, monkeypatch):
    """Dropping finished rows from the cache mid-decode gives the same samples as keeping them (static shapes)."""
    calls = []
    orig = KVCache.select
    monkeypatch.setattr(KVCache, "select", lambda self, idx: (calls.append(len(idx)), orig(self, idx))[1])
    kw = dict(num_samples=4, max_new_tokens=16, temperature=1.0, stop_ids=list(range(3, 512, 4)), seeds=40,
              check_every=2)
    a = engine.generate([P1, P2], compact=True, **kw)
    assert calls and min(calls) < 8  # it did compact
    b = engine.generate([P1, P2], compact=False, **kw)
    assert a.tokens == b.tokens and a.stop_reasons == b.stop_reasons
    assert len({len(t) for t in a.tokens}) > 2  # rows really finished at different steps
    for x, y in zip(a.logprobs, b.logprobs):
        assert x == pytest.approx(y, abs=1e-5)


@pytest.mark.parametrize("with_prefill", [False, True])
def test_shared_prompt_decode_equals_copied_cache(model, monkeypatch, with_prefill):
    """FanoutKVCache (each prompt's cache read in place by its K rows) == KVCache.fan_out (K copies), fp32: the same
    tokens, stop reasons and log-probs, with left padding (P2, P3 shorter than P1), a prompt longer than the window
    (its ring wrapped in the prefill), decodes that push prompt keys and then the rows' own oldest keys out of the
    window (14 new tokens > W = 4), mixed greedy/sampled slots of different lengths, and compaction."""
    made, selected = [], []
    init, select = FanoutKVCache.__init__, FanoutKVCache.select
    monkeypatch.setattr(FanoutKVCache, "__init__", lambda self, *a: (made.append(a[1]), init(self, *a))[1])
    monkeypatch.setattr(FanoutKVCache, "select", lambda self, idx: (selected.append(len(idx)), select(self, idx))[1])
    prompts, K = [P1, P2, P3], 4
    kw = dict(max_new_tokens=[14, 5, 14, 9], temperature=[0.0, 1.0, 1.0, 1.0], top_k=40, top_p=0.95, seeds=7,
              stop_ids=list(range(3, 512, 9)), check_every=2)
    shared, copied = Engine(model, share_prompt=True), Engine(model, share_prompt=False)
    a = shared.generate(prompts, K, prefill=shared.prefill(prompts) if with_prefill else None, **kw)
    b = copied.generate(prompts, K, **kw)
    assert made == [K] and selected and min(selected) < len(prompts) * K  # the shared path ran, and compacted
    assert a.tokens == b.tokens and a.stop_reasons == b.stop_reasons
    assert max(len(t) for t in a.tokens) > W + 1 and len({len(t) for t in a.tokens}) > 2
    for x, y in zip(a.logprobs, b.logprobs):
        assert x == pytest.approx(y, abs=1e-5)
    for x, y in zip(a.full_logprobs, b.full_logprobs):
        assert x == pytest.approx(y, abs=1e-5)


def test_shared_prompt_is_the_half_precision_default(model):
    """share_prompt=None: on for bf16 caches, off for fp32 ones (whose samples stay bit-identical whatever the batch)."""
    assert Engine(model).share_prompt is False
    assert Engine(model, dtype=torch.bfloat16).share_prompt is True


# ---------------------------------------------------------------------------------------------------------------
# Scripted streams: a fake model whose next token is a fixed function of the current one

class ScriptedModel(torch.nn.Module):
    """Deterministic "model": the logits after token i are 50 at succ[i] and 0 elsewhere (a one-hot hidden state
    through an identity tied head), so greedy and T=1 sampling both follow the script exactly (the other tokens
    carry e^-50 of mass). It speaks the cache protocol (one full-attention layer, 1 head of dim 1) like Gemma3."""

    def __init__(self, succ: dict[int, int], vocab: int):
        super().__init__()
        self.config = SimpleNamespace(layer_types=["full_attention"], sliding_window=4, num_key_value_heads=1,
                                      head_dim=1, vocab_size=vocab, pad_token_id=0, final_logit_softcapping=None)
        self.embed_tokens = torch.nn.Embedding(vocab, vocab)
        with torch.no_grad():
            self.embed_tokens.weight.copy_(torch.eye(vocab))
        nxt = torch.arange(vocab)
        for a, b in succ.items():
            nxt[a] = b
        self.register_buffer("nxt", nxt)

    def forward(self, ids, position_ids=None, kv_cache=None, return_hidden=True):
        B, T = ids.shape
        z = torch.zeros(B, 1, T, 1)
        kv_cache.update(0, z, z)  # advances the slot counter like a real one-layer model
        return F.one_hot(self.nxt[ids], self.config.vocab_size).float() * 50.0  # [B, T, V]


class ScriptTokenizer:
    """Decodes each scripted id to its text piece; 1 and 106 are stop ids (special: decode to nothing)."""
    stop_ids = [1, 106]

    def __init__(self, pieces: dict[int, str]):
        self.pieces = pieces

    def decode(self, ids, skip_special=True):
        return "".join(self.pieces.get(i, "") for i in ids)


def stop_scripts():
    """One script per (gap g in 1..3, lead o in 0..15, split of "</item>" into 1..3 tokens): o filler tokens, the
    stop string (the last split's completing token also carries a newline, which the text must drop), g tokens of
    extra text ("<item>" pieces), then <end_of_turn> (106). Chains share their tails (the successor map is all
    the "model" knows), which keeps the vocabulary, and so the one-hot head, small. Script s starts after its
    prompt token."""
    succ, pieces, scripts = {}, {}, []
    nid = iter(range(200, 10 ** 6))
    item = [next(nid) for _ in range(3)]  # item[k] = "<item>" with k more to go before the stop id
    for k, i in enumerate(item):
        pieces[i], succ[i] = "<item>", (item[k - 1] if k else 106)
    splits = [["</item>"], ["</it", "em>"], ["<", "/ite", "m>"], ["</item", ">\n"]]  # last: text after it in-token
    for g in (1, 2, 3):
        for parts in splits:
            chain = [next(nid) for _ in range(15)] + [next(nid) for _ in parts] + [item[g - 1]]  # 15 fillers first
            pieces.update(zip(chain[:15], ["x"] * 15))
            pieces.update(zip(chain[15:-1], parts))
            succ.update(zip(chain[:-1], chain[1:]))
            for o in range(16):
                start = next(nid)
                succ[start] = chain[15 - o]
                scripts.append((start, o + len(parts)))  # prompt token, tokens kept (through the stop string)
    return succ, pieces, scripts, next(nid)


@pytest.mark.parametrize("check_every", list(range(1, 17)))
def test_stop_string_beats_later_stop_id(check_every):
    """A stop id 1-3 tokens after `</item>` never keeps the text between them, whatever the check cadence and
    the row's position relative to the scans: the earliest of (stop string, stop id, length) wins."""
    succ, pieces, scripts, V = stop_scripts()
    eng = Engine(ScriptedModel(succ, V), ScriptTokenizer(pieces))
    prompts = [[2, s] for s, _ in scripts]
    for T in (0.0, 1.0):
        res = eng.generate(prompts, max_new_tokens=30, temperature=T, stop_strings=["</item>"], seeds=0,
                           check_every=check_every)
        for (s, n), toks, text, why in zip(scripts, res.tokens, res.texts, res.stop_reasons):
            assert len(toks) == n and text.endswith("</item>") and why == "stop_string", (s, toks, text)


def test_on_done_reports_each_row_once_as_it_finishes():
    """generate(on_done=...): every row reported exactly once, with its final tokens and stop reason (== the
    result's), rows that stop early at the first sync after they stop (per-instance progress for stage 1)."""
    succ, pieces, scripts, V = stop_scripts()
    eng = Engine(ScriptedModel(succ, V), ScriptTokenizer(pieces))
    prompts = [[2, s] for s, _ in scripts[:40]] + [[2, 7]]   # the last row never stops: length
    calls = []
    res = eng.generate(prompts, max_new_tokens=30, temperature=0.0, stop_strings=["</item>"], seeds=0,
                       check_every=4, on_done=lambda rows: calls.append(rows))
    got = {r: (t, why) for rows in calls for r, t, why in rows}
    assert sum(len(rows) for rows in calls) == len(prompts) == len(got)            # once each
    assert all(got[r] == (res.tokens[r], res.stop_reasons[r]) for r in got)
    assert got[len(prompts) - 1][1] == "length" and any(len(c) for c in calls[:-1])  # early rows reported early
    first = {r: k for k, rows in enumerate(calls) for r, _, _ in rows}
    for (_, n), r in zip(scripts[:40], range(40)):                                 # at the sync after stopping
        assert first[r] == min((n + 3) // 4, len(calls)) - 1 or first[r] == len(calls) - 1


# ---------------------------------------------------------------------------------------------------------------
# The draw itself (issue 10 items 2-4)

def test_former_zero_width_bin_is_drawable():
    """On a 262,144-token vocabulary a token of probability 1.7e-10 sitting after half the mass had a zero-width
    bin under the fp32 cumsum (no uniform could reach it); the float64 two-level search hits it with the uniform
    that falls in its bin, and still never returns a zero-probability (banned) token."""
    V, j = 262144, 200_000
    logits = torch.zeros(1, V)
    logits[0, j] = -10.0  # p_j = e^-10 / V ~ 1.7e-10, far below half an fp32 step (3e-8) of the running sum
    logits[0, j + 1] = float("-inf")  # a banned neighbour: must never absorb the bin
    p = torch.softmax(logits.double(), -1)[0]
    c = torch.cumsum(p, 0)
    u = ((c[j - 1] + p[j] / 2) / c[-1]).reshape(1)  # the middle of token j's bin
    tok, logp, full = sample_tokens(logits, u, temperature=1.0, top_k=None, top_p=1.0)
    assert tok.item() == j
    assert logp.item() == pytest.approx(math.log(p[j].item()), abs=1e-4)
    cdf32 = torch.cumsum(torch.softmax(logits, -1), -1)[0]  # what the fp32 draw saw: no room for j at all
    assert cdf32[j] == cdf32[j - 1]
    # neighbours of the bin, and the two ends of [0, 1), land on real tokens
    for uu in (c[j - 1] / c[-1] - 1e-12, (c[j] + p[j + 2] / 2) / c[-1], 0.0, 1 - 2 ** -53):
        t = sample_tokens(logits, torch.tensor([uu], dtype=torch.float64), 1.0, None, 1.0)[0].item()
        assert t != j + 1 and p[t] > 0


@pytest.mark.parametrize("V,block", [(40, 8), (45, 8), (40, 1024)])  # two-level (padded), single level
def test_draw_frequencies_chi_square(V, block):
    """Seeded per-row generators, as generate() draws them: token counts match the distribution (Pearson
    chi-square below its 99.9% quantile), through both the two-level search and the single-level one."""
    from twice.engine import _inverse_cdf
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(V, generator=g) * 1.5, -1)
    n = 40000
    u = torch.rand(n, generator=g, dtype=torch.float64)
    tok = _inverse_cdf(p.expand(n, V).contiguous(), u, block=block)[:, 0]
    counts = torch.bincount(tok, minlength=V).double()
    expected = p.double() * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    crit = {39: 72.05, 44: 78.75}[V - 1]  # scipy.stats.chi2.ppf(0.999, V - 1)
    assert chi2 < crit, chi2
    assert len(counts) == V  # padding never drawn


def test_bf16_head_refines_the_top_logits_exactly(monkeypatch):
    """bf16 weights: one bf16 head, then the REFINE_TOP largest logits per row recomputed in fp32. Those (every
    token a top-k <= REFINE_TOP sampler or the argmax can pick) equal the float64 head to ~1e-6 and the trainer's
    fused kernel (kernels.token_logprobs) gives their log-probs up to the tail's rounding in the normaliser; the
    rest keep the bf16 head's value, which is off by up to 2^-8 |z| (~3e-2 here), so the refinement is real."""
    from kernels import token_logprobs
    import twice.engine as E
    monkeypatch.setattr(E, "REFINE_TOP", 100)  # of 512 rows
    torch.manual_seed(0)
    m = Gemma3.from_config(PRESETS["tiny"], dtype=torch.bfloat16, std=1.0).eval()
    eng = Engine(m)
    h = torch.randn(6, m.config.hidden_size).to(torch.bfloat16)
    W = m.embed_tokens.weight
    ref = h.double() @ W.double().T  # [6, V]: bf16 products are exact, the sum is what fp32 must keep
    got = eng._logits(h)
    assert got.dtype == torch.float32
    top = ref.topk(100, -1).indices  # [6, 100] the exact top 100
    err = (got.double() - ref).abs()
    assert err.gather(1, top).max() < 1e-5 * ref.abs().max()  # refined: exact
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    tail = torch.ones_like(err, dtype=torch.bool).scatter_(1, top, False)
    assert err[tail].max() > 1e-2  # the bf16 head really is off where it is not refined
    assert err[tail].max() < 2 ** -7 * ref.abs().max()  # by bf16 rounding, no more
    y = top[:, :10].reshape(-1)  # tokens a top-10 sampler can draw
    rows = torch.arange(6).repeat_interleave(10)
    lp = torch.log_softmax(got, -1)[rows, y]
    torch.testing.assert_close(lp, token_logprobs(h[rows], W, y).float(), atol=2e-3, rtol=0)


def test_never_samples_outside_tokenizer_or_image_ids(tmp_path):
    """A model with 64 more embedding rows than its tokenizer (like Gemma-3 4B's image rows): ids the tokenizer
    cannot decode are never drawn, greedy or sampled (without the ban a random model draws them often and decode
    raises), and neither are image pieces; decodable specials (<unusedN>, <eos>, <end_of_turn>) stay drawable."""
    from twice.engine import never_sample_mask
    from twice.gemma3 import Gemma3Config
    from twice.tokenizer import Tokenizer
    tok = Tokenizer.train_tiny(tmp_path, ["a tiny corpus of words for a tiny tokenizer, twice"] * 20, vocab_size=400)
    V = tok.vocab_size + 64
    cfg = Gemma3Config(**{**PRESETS["tiny"].__dict__, "vocab_size": V})
    torch.manual_seed(0)
    m = Gemma3.from_config(cfg, std=0.02).eval()  # near-uniform logits: every id is likely somewhere
    banned = set(never_sample_mask(tok, V).nonzero()[:, 0].tolist())
    assert banned == set(range(tok.vocab_size, V))  # the tiny tokenizer has no image pieces
    image = SimpleNamespace(vocab_size=8, special_ids={1, 3, 5}, id_to_piece=lambda i: {
        1: "<eos>", 3: "<start_of_image>", 5: "<image_soft_token>"}[i])
    assert never_sample_mask(image, 10).nonzero()[:, 0].tolist() == [3, 5, 8, 9]
    eng = Engine(m, tok)
    res = eng.generate([[2, 10, 11]], num_samples=8, max_new_tokens=24, temperature=1.0, stop_ids=[], seeds=0)
    drawn = {t for row in res.tokens for t in row}
    assert drawn.isdisjoint(banned) and len(res.texts) == 8
    assert all(a >= b for row_a, row_b in zip(res.logprobs, res.full_logprobs) for a, b in zip(row_a, row_b))
    m.embed_tokens.weight.data[V - 1] *= 100  # make an undecodable id the clear argmax: greedy must skip it
    g = eng.greedy([[2, 10, 11]], max_new_tokens=6, stop_ids=[])
    assert set(g.tokens[0]).isdisjoint(banned)
    free = Engine(m).generate([[2, 10, 11]], num_samples=8, max_new_tokens=24, temperature=1.0, stop_ids=[], seeds=0)
    assert any(t in banned for row in free.tokens for t in row)  # the same draw without a tokenizer hits them


# ---------------------------------------------------------------------------------------------------------------
# Static (graph-capturable) decode (issue 14 item 1)

def test_static_decode_equals_recompute_past_window(model):
    """The static cache (whole-buffer attention under on-device masks, index_copy_ writes, device slot counter)
    gives the tokens of cache-less recomputation far past the sliding window, with left-padded rows."""
    res = Engine(model, decode="static").greedy([P1, P2], max_new_tokens=14, stop_ids=[])
    for prompt, toks in zip([P1, P2], res.tokens):
        assert toks == naive_greedy(model, prompt, 14)


def test_static_decode_equals_eager(model, engine):
    """Sampled (top-k/top-p, stops, finished rows kept in the batch) == the eager reference with compaction."""
    kw = dict(num_samples=3, max_new_tokens=16, temperature=1.0, top_k=40, top_p=0.9, seeds=5,
              stop_ids=list(range(3, 512, 5)), check_every=2)
    a = engine.generate([P1, P2, P3], **kw)
    b = Engine(model, decode="static").generate([P1, P2, P3], **kw)
    assert a.tokens == b.tokens and a.stop_reasons == b.stop_reasons
    assert len({len(t) for t in a.tokens}) > 2  # rows really finished at different steps
    for x, y in zip(a.full_logprobs + a.logprobs, b.full_logprobs + b.logprobs):
        assert x == pytest.approx(y, abs=1e-5)
    with pytest.raises(ValueError, match="decode"):
        Engine(model, decode="graph")


def test_static_decode_buckets_the_batch(model, engine, monkeypatch):
    """Static/compiled decode pads the prompt count to a power of two (1, 2, 3 prompts -> batches of 1, 2, 4 prompts),
    so one compiled step serves every batch up to its bucket; the padding rows never reach the caller."""
    import twice.engine as E
    sizes, init = [], E.StaticKVCache.__init__

    def spy(self, cache):
        sizes.append(cache.batch_size)
        init(self, cache)
    monkeypatch.setattr(E.StaticKVCache, "__init__", spy)
    kw = dict(num_samples=2, max_new_tokens=6, temperature=1.0, seeds=1, stop_ids=[])
    for ps in ([P1], [P1, P2], [P1, P2, P3]):
        done = []
        b = Engine(model, decode="static").generate(ps, on_done=done.extend, **kw)
        a = engine.generate(ps, **kw)
        assert a.tokens == b.tokens and len(b.tokens) == len(b.stop_reasons) == b.mask.shape[0] == 2 * len(ps)
        assert sorted(r for r, _, _ in done) == list(range(2 * len(ps)))
    assert sizes == [2, 4, 8]


@pytest.mark.slow  # one inductor compilation of the tiny model's decode step (~1-2 min on a 2-core box)
def test_compiled_decode_equals_eager(model, engine):
    """torch.compile(mode="reduce-overhead") of the static step (inductor on CPU): same tokens at T=0 and T=1,
    log-probs within fp32 tolerance of the eager reference."""
    eng = Engine(model, decode="compiled")
    for kw in (dict(temperature=0.0), dict(temperature=1.0, top_k=50)):
        kw.update(num_samples=2, max_new_tokens=10, stop_ids=[], seeds=3)
        a = engine.generate([P1, P3], **kw)
        b = eng.generate([P1, P3], **kw)
        assert a.tokens == b.tokens
        for x, y in zip(a.full_logprobs + a.logprobs, b.full_logprobs + b.logprobs):
            assert x == pytest.approx(y, abs=1e-4)


def test_compiled_step_has_a_recompile_entry_per_layer(monkeypatch):
    """Under FSDP2 dynamo traces each block as its own frame, specialised on layer_idx: the compiled decode step must
    run with a recompile_limit above the layer count, or layers past dynamo's default (8) silently fall back to
    eager (H200: compiled GRPO rollouts 2.13 s/step vs eager 1.44). torch.compile is stubbed to record the limit
    each call sees; the tokens must equal the static (uncompiled) path's."""
    import dataclasses
    cfg = dataclasses.replace(PRESETS["tiny"], num_hidden_layers=12, layer_types=None)
    torch.manual_seed(0)
    m = Gemma3.from_config(cfg, std=0.05).eval()
    seen = []

    def fake_compile(fn, **kw):
        def run(*a):
            seen.append(torch._dynamo.config.recompile_limit)
            return fn(*a)
        return run
    monkeypatch.setattr(torch, "compile", fake_compile)
    before = torch._dynamo.config.recompile_limit
    kw = dict(num_samples=2, max_new_tokens=5, stop_ids=[], seeds=1, temperature=1.0)
    a = Engine(m, decode="static").generate([P1, P3], **kw)
    b = Engine(m, decode="compiled").generate([P1, P3], **kw)
    assert a.tokens == b.tokens and len(seen) == 4  # the prefill's draw + 4 decode steps
    assert min(seen) >= 12 + 8 and torch._dynamo.config.recompile_limit == before  # raised only inside the step


# ---------------------------------------------------------------------------------------------------------------
# One prefill, several uses (eval: greedy + sampled slots in one decode, then exact scoring from the same prefill)

@pytest.mark.parametrize("decode", ["eager", "static"])
def test_greedy_and_sampled_slots_in_one_decode_equal_separate_calls(model, engine, decode):
    """Per-slot temperatures and lengths: slot 0 greedy (its own max_new_tokens), slots 1..K sampled with their
    seeds == greedy() and generate() called apart, token for token, with the same stop reasons and log-probs;
    also when the prompts' batch prefill is passed in (it is copied, so a second use gives the same result)."""
    prompts, K = [P1, P2, P3], 3
    stops = dict(stop_ids=list(range(3, 512, 7)), check_every=2)
    seeds = [100 + 10 * i + k for i in range(len(prompts)) for k in range(K)]
    g = engine.generate(prompts, 1, max_new_tokens=6, temperature=0.0, seeds=0, **stops)  # == greedy()
    s = engine.generate(prompts, K, max_new_tokens=11, temperature=0.9, top_k=40, top_p=0.9, seeds=seeds, **stops)
    eng = engine if decode == "eager" else Engine(model, decode="static")
    joint_seeds = [x for i in range(len(prompts)) for x in [0] + seeds[i * K:(i + 1) * K]]
    pre = engine.prefill(prompts)
    for prefill in (None, pre, pre):
        j = eng.generate(prompts, K + 1, max_new_tokens=[6] + [11] * K, temperature=[0.0] + [0.9] * K, top_k=40,
                         top_p=0.9, seeds=joint_seeds, prefill=prefill, **stops)
        for i in range(len(prompts)):
            r = i * (K + 1)
            assert j.tokens[r] == g.tokens[i] and j.stop_reasons[r] == g.stop_reasons[i]
            assert j.full_logprobs[r] == pytest.approx(g.full_logprobs[i], abs=1e-5)
            assert j.tokens[r + 1:r + K + 1] == s.tokens[i * K:(i + 1) * K]
            assert j.stop_reasons[r + 1:r + K + 1] == s.stop_reasons[i * K:(i + 1) * K]
            for x, y in zip(j.logprobs[r + 1:r + K + 1], s.logprobs[i * K:(i + 1) * K]):
                assert x == pytest.approx(y, abs=1e-5)
    assert "length" in j.stop_reasons and len({len(t) for t in j.tokens}) > 2  # limits and stops both exercised
    with pytest.raises(ValueError, match="same prompts"):
        engine.generate([P1, P3, P2], 2, max_new_tokens=4, prefill=pre)
    with pytest.raises(ValueError, match="nonzero"):
        engine.generate([P1], 2, max_new_tokens=4, temperature=[0.5, 1.0])


def test_score_from_a_batch_prefill_row_equals_its_own_prefill(engine):
    """score(prefix=(batch cache, row, logits)): the prompt's ids already in a left-padded batch prefill row are
    not run again, only the rest; the log-probs equal score() with its own prefill (which matches cache-less
    forwards: test_score_matches_full_forward), and the shared cache is left as it was."""
    conts = [[30, 31], [32], [33, 34, 35, 36, 37]]
    prompts = [P2, P1, P3]
    cache, logits = engine.prefill(prompts)
    k0 = [t.clone() for t in cache.k]
    for i, p in enumerate(prompts):
        for extra in ([], [70, 71, 72]):
            ref = engine.score(p + extra, conts, per_token=True)
            got = engine.score(p + extra, conts, per_token=True, prefix=(cache, i, logits))
            for a, b in zip(got, ref):
                assert a == pytest.approx(b, abs=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(cache.k, k0))


def test_prefill_called_directly_with_bf16_weights():
    """eval calls Engine.prefill itself (outside generate's inference mode): with bf16 weights the head's out=
    matmul must not see grad-tracking tensors, and the kept prefill gives generate() its own prefill's tokens."""
    torch.manual_seed(0)
    eng = Engine(Gemma3.from_config(PRESETS["tiny"], dtype=torch.bfloat16).eval())
    pre = eng.prefill([P1, P2])
    kw = dict(num_samples=2, max_new_tokens=6, temperature=1.0, seeds=3, stop_ids=[])
    assert eng.generate([P1, P2], prefill=pre, **kw).tokens == eng.generate([P1, P2], **kw).tokens


def _bf16_head(V=4096, D=64, B=12, seed=0):
    """A bf16 tied head with near-duplicate rows (ties in bf16 across the top-R boundary, as a real vocabulary has)
    -> Engine._head's (logits, top, exact top logits, bound) for B hidden states."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(V, D, generator=g)
    W[V // 2:] = W[:V // 2] + 1e-3 * torch.randn(V // 2, D, generator=g)  # pairs within bf16 rounding
    ns = SimpleNamespace(model=SimpleNamespace(embed_tokens=SimpleNamespace(weight=W.bfloat16())),
                         config=SimpleNamespace(final_logit_softcapping=None))
    h = (torch.randn(B, D, generator=g) / D ** 0.5 * 3).bfloat16()
    return Engine._head(ns, h)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, 1.0), (1.0, 64, 0.95), (1.5, 120, 0.95),
                                                     (0.7, 1, 1.0), (1.5, 200, 1.0)])
@pytest.mark.parametrize("ban", ["none", "mask", "ids"])
@pytest.mark.parametrize("mixed", [False, True])
def test_sample_top_equals_full_vocabulary_sampler(temperature, top_k, top_p, ban, mixed):
    """The candidate-set draw (sample_top) gives bit for bit what sample_tokens gives over the whole vocabulary --
    tokens, sampler log-probs and full log-probs -- for sampled rows and, mixed, for greedy rows (sample_tokens'
    temperature-0 call), with banned ids among the top candidates."""
    from twice.engine import sample_top
    logits, top, ctop, bound = _bf16_head()
    B, V = logits.shape
    assert not torch.equal(logits, logits.bfloat16().float())  # the head really refined something
    banned = None
    if ban != "none":  # ban a few of each row's best candidates, and a block of the tail
        ids = torch.cat([top[:, :3].reshape(-1), torch.arange(V - 100, V)]).unique()
        banned = torch.zeros(V, dtype=torch.bool).index_fill_(0, ids, True) if ban == "mask" else ids
    greedy = torch.arange(B) % 3 == 0 if mixed else None
    u = torch.rand(B, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    got = sample_top(top, ctop, bound, u, temperature, greedy, top_k, top_p, banned, logits)
    assert got is not None
    lean = sample_top(top, ctop, bound, u, temperature, greedy, top_k, top_p, banned)  # no full_logprobs
    assert lean[2] is None and torch.equal(lean[0], got[0]) and torch.equal(lean[1], got[1])
    ref = sample_tokens(logits, u, temperature, top_k, top_p, banned)
    if mixed:
        rg = sample_tokens(logits, u, 0.0, None, 1.0, banned)
        ref = tuple(torch.where(greedy, a, b) for a, b in zip(rg, ref))
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    if banned is not None:
        assert not (banned if ban == "mask" else torch.isin(torch.arange(V), banned))[got[0]].any()


def test_sample_top_declines_when_the_tail_could_compete():
    """No answer rather than a wrong one: when a row's k-th usable candidate does not beat every logit outside the
    candidate set (here: all but 2 candidates banned for a top-k of 5), sample_top returns None."""
    from twice.engine import sample_top
    logits, *cand = _bf16_head()
    top = cand[0]
    banned = torch.zeros(logits.shape[1], dtype=torch.bool)
    banned[top[0, 2:]] = True  # row 0 keeps only 2 of its candidates
    u = torch.rand(logits.shape[0], dtype=torch.float64)
    assert sample_top(*cand, u, 1.0, None, 5, 1.0, banned) is None
    assert sample_top(*cand, u, 0.0, None, None, 1.0, banned) is not None  # greedy needs one
    assert sample_top(*cand, u, 1.0, None, top.shape[1] + 1, 1.0) is None  # k beyond the set
    assert sample_top(*cand, u, 1.0, None, None, 0.9) is None  # top-p alone: a full sort


def test_generate_draws_from_candidates_with_the_same_results():
    """Engine.generate with a bf16 model: drawing from the head's candidates (the CPU default) and over the whole
    vocabulary give identical outputs (mixed greedy + sampled slots, compaction, stop ids), and the candidate path
    really ran (only the first step, from the prefill's logits, is full-vocabulary)."""
    torch.manual_seed(0)
    m = Gemma3.from_config(PRESETS["tiny"], dtype=torch.bfloat16, std=0.5).eval()
    kw = dict(num_samples=4, max_new_tokens=12, temperature=[0.0, 1.5, 1.5, 1.5], top_k=40, top_p=0.95,
              stop_ids=[3, 4], seeds=7, check_every=2)
    fast, full = Engine(m), Engine(m)
    full.draw_from_top = False
    a, b = fast.generate([P1, P2, P3], **kw), full.generate([P1, P2, P3], **kw)
    N = b.mask.shape[1]
    assert fast.draws == {"top": N - 1, "full": 1, "declined": 0}  # the first step: the prefill's logits
    assert full.draws == {"top": 0, "full": N, "declined": 0}
    lean = fast.generate([P1, P2, P3], **kw, full_logprobs=False)  # the head skips its fp32 vocabulary passes
    assert lean.tokens == a.tokens and torch.equal(lean.logprobs_padded, a.logprobs_padded)
    assert lean.full_logprobs is None and lean.full_logprobs_padded is None
    assert a.tokens == b.tokens and a.stop_reasons == b.stop_reasons
    assert torch.equal(a.logprobs_padded, b.logprobs_padded) and torch.equal(a.full_logprobs_padded,
                                                                             b.full_logprobs_padded)
    assert len({tuple(t) for t in a.tokens}) > 3  # sampled rows differ: the draw is not degenerate


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_attend_prompt_fanout_equals_attention_over_copied_keys(dtype, tol):
    """gemma3.attend_prompt_fanout on compacted rows (prompt 1 lost two of its rows, prompt 0 one) == attend_eager's
    decode branch over each row's [prompt keys ; own keys] copied out, masks included (a pad slot, a window cut)."""
    from twice.gemma3 import PromptFanout, attend_eager, attend_prompt_fanout
    g = torch.Generator().manual_seed(0)
    P, K, H, KV, hd, Sp, n = 3, 4, 4, 2, 8, 7, 3
    slot = torch.tensor([0, 2, 3, 4, 7, 8, 9, 10, 11])  # rows still decoding, as compaction leaves them
    N = len(slot)
    q, k, v = (torch.randn(N, H if i == 0 else KV, 1 if i == 0 else n, hd, generator=g).to(dtype) for i in range(3))
    pk, pv = (torch.randn(P, KV, Sp, hd, generator=g).to(dtype) for _ in range(2))
    neg = torch.finfo(dtype).min
    pb = torch.zeros(P, 1, 1, Sp, dtype=dtype)
    pb[0, ..., 0] = neg          # prompt 0 is left-padded by one slot
    pb[2, ..., :3] = neg         # prompt 2's oldest slots are out of a sliding window
    ob = torch.zeros(N, 1, 1, n, dtype=dtype)
    ob[..., 0] = neg             # and every row's oldest own key too
    got = attend_prompt_fanout(q, k, v, PromptFanout(pk, pv, pb, ob, slot, K), 0.3)
    p = slot // K
    want = attend_eager(q, torch.cat([pk[p], k], 2), torch.cat([pv[p], v], 2), torch.cat([pb[p], ob], -1), 0.3)
    assert got.shape == want.shape == (N, 1, H * hd)
    assert torch.allclose(got.double(), want.double(), atol=tol, rtol=tol)
