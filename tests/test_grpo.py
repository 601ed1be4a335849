"""Golden values for twice.grpo, hand-computed here with Python floats (not by calling the code another way):
advantages (every scale, the std floor, zero-spread groups, G=1), the clipped loss under every normalisation,
clip-higher and the k3 KL; the loss gradient against the analytic policy gradient of a toy softmax policy;
and invariance of values and gradients to how a batch is split into micro-batches."""
import math

import pytest
import torch

from twice.grpo import ObjectiveConfig, group_advantages, policy_loss

approx = lambda x, **kw: pytest.approx(x, rel=1e-6, abs=1e-9, **kw)      # fp32 results
tight = lambda x, **kw: pytest.approx(x, rel=1e-10, abs=1e-13, **kw)    # fp64 results
LN2 = math.log(2.0)


# ====================================================================== advantages
def test_group_zscore_and_zero_spread():
    adv, st = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 5.0, 5.0, 5.0]), G=4)
    # group 1: mean 2.5, sample var = (2.25 + .25 + .25 + 2.25) / 3 = 5/3;  group 2: zero spread -> exactly 0
    s = math.sqrt(5 / 3) + 1e-6
    assert adv[:4].tolist() == approx([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s])
    assert adv[4:].tolist() == [0.0, 0.0, 0.0, 0.0]
    assert st["zero_std_groups"] == 1 and st["frac_zero_std"] == 0.5 and st["n_groups"] == 2
    assert adv.dtype == torch.float32
    # population std on request: var = 5/4
    adv, _ = group_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]), G=4, unbiased=False)
    assert adv.tolist() == approx([x / (math.sqrt(1.25) + 1e-6) for x in (-1.5, -0.5, 0.5, 1.5)])


def test_std_floor_honoured():
    # group std = 1e-5/sqrt(2) ~ 7.07e-6 is below the 1e-3 floor -> divide by 1e-3 (+eps), not by 7e-6
    adv, st = group_advantages(torch.tensor([0.0, 1e-5, 0.0, 1.0], dtype=torch.float64), G=2)
    assert adv[:2].tolist() == approx([-5e-6 / (1e-3 + 1e-6), 5e-6 / (1e-3 + 1e-6)])
    assert adv[2:].tolist() == approx([-0.5 / (math.sqrt(0.5) + 1e-6), 0.5 / (math.sqrt(0.5) + 1e-6)])
    assert st["floored_groups"] == 1 and st["zero_std_groups"] == 0
    # without the floor the same tiny spread is blown up to O(1) advantages (NeMo-RL #4161)
    adv0, _ = group_advantages(torch.tensor([0.0, 1e-5], dtype=torch.float64), G=2, std_floor=0.0)
    assert adv0.tolist() == approx([-5e-6 / (1e-5 / math.sqrt(2) + 1e-6), 5e-6 / (1e-5 / math.sqrt(2) + 1e-6)])
    assert abs(adv0[0]) > 0.6 and abs(adv[0]) < 0.006
    # fp32 residue: 0.1 + 0.2 != 0.3 in binary; |A| stays bounded by max|r - mean| / floor
    r = torch.tensor([0.1 + 0.2, 0.3, 0.3, 0.3], dtype=torch.float32)
    adv, _ = group_advantages(r, G=4)
    assert torch.isfinite(adv).all() and adv.abs().max() <= (r - r.mean()).abs().max() / 1e-3 + 1e-6


def test_batch_and_none_scales():
    r = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    # batch: group means 2, 2, 2 subtracted; std over all six: deviations -1 1 0 0 -2 2, sum sq 10, var 10/5 = 2
    adv, st = group_advantages(r, G=2, scale="batch")
    s = math.sqrt(2) + 1e-6
    assert adv.tolist() == approx([-1 / s, 1 / s, 0.0, 0.0, -2 / s, 2 / s])
    assert adv[2:4].tolist() == [0.0, 0.0] and st["zero_std_groups"] == 1
    # none (Dr. GRPO): r - group mean only
    adv, _ = group_advantages(r, G=2, scale="none")
    assert adv.tolist() == approx([-1.0, 1.0, 0.0, 0.0, -2.0, 2.0])
    adv, _ = group_advantages(torch.tensor([0.0, 0.1, 0.5], dtype=torch.float64), G=3, scale="none")
    assert adv.tolist() == approx([-0.2, -0.1, 0.3])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_all_equal_and_G1_give_exact_zeros(scale):
    # 0.1 * 3 / 3 != 0.1 in float64: the zero must come from the zero-spread rule, not from arithmetic luck
    for rewards, G in ([0.1] * 6, 3), ([0.7] * 8, 4), ([0.3, 0.7, 1.0], 1), ([2.5], 1):
        adv, st = group_advantages(torch.tensor(rewards, dtype=torch.float64), G=G, scale=scale)
        assert adv.tolist() == [0.0] * len(rewards)
        assert st["zero_std_groups"] == len(rewards) // G and st["adv_abs_mean"] == 0.0
        assert all(math.isfinite(v) for v in st.values())


def test_advantage_input_errors():
    with pytest.raises(ValueError, match="multiple of G"):
        group_advantages(torch.zeros(5), G=2)
    with pytest.raises(ValueError, match="non-finite"):
        group_advantages(torch.tensor([1.0, float("nan")]), G=2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), G=2, scale="grp")


# ====================================================================== clipped loss, golden values
# two sequences, T = 3; seq 2 has 2 real tokens (its 3rd position is padding with an absurd ratio 7)
# ratios r = pi/pi_old, built exactly as logp - old = log r:
R = [[1.5, 0.5, 1.1], [1.5, 0.5, 7.0]]
BASE = [[-1.0, -2.0, -0.5], [-0.3, -1.2, -4.0]]
ADV = [2.0, -1.0]
MASK = [[1, 1, 1], [1, 1, 0]]


def golden_inputs(ref_delta=None):
    old = torch.tensor(BASE, dtype=torch.float64)
    logp = old + torch.log(torch.tensor(R, dtype=torch.float64))
    ref = None if ref_delta is None else logp + torch.tensor(ref_delta, dtype=torch.float64)
    return logp, old, torch.tensor(ADV, dtype=torch.float64), torch.tensor(MASK, dtype=torch.float64), ref

# per-token -min(r A, clip(r, .8, 1.2) A), by hand:
#   seq 1, A=+2: r=1.5 -> -min(3.0, 2.4) = -2.4 (clipped high) ; r=.5 -> -min(1.0, 1.6) = -1.0 ; r=1.1 -> -2.2
#   seq 2, A=-1: r=1.5 -> -min(-1.5, -1.2) = 1.5             ; r=.5 -> -min(-.5, -.8) = .8 (clipped low)
PG1, PG2 = [-2.4, -1.0, -2.2], [1.5, 0.8]


@pytest.mark.parametrize("loss_norm, kw, expected", [
    ("seq_mean_token_mean", {}, (sum(PG1) / 3 + sum(PG2) / 2) / 2),   # (-5.6/3 + 2.3/2) / 2
    ("token_mean", {}, (sum(PG1) + sum(PG2)) / 5),                      # -3.3 / 5 = -0.66
    ("constant", {"max_len": 4}, (sum(PG1) + sum(PG2)) / (2 * 4)),      # -3.3 / 8 = -0.4125
])
def test_golden_loss_each_normalisation(loss_norm, kw, expected):
    logp, old, adv, mask, _ = golden_inputs()
    loss, m = policy_loss(logp, old, adv, mask, eps_low=0.2, loss_norm=loss_norm, **kw)
    assert loss.item() == tight(expected)
    assert m["pg_loss"].item() == tight(expected)
    assert m["clip_frac_low"].item() == approx(1 / 5) and m["clip_frac_high"].item() == approx(1 / 5)
    assert m["ratio_mean"].item() == approx((1.5 + 0.5 + 1.1 + 1.5 + 0.5) / 5)
    assert m["approx_kl"].item() == approx(sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1, 1.5, 0.5)) / 5)
    assert m["adv_abs_mean"].item() == approx(1.5) and m["kl"].item() == 0.0 and m["tokens"].item() == 5


def test_golden_clip_higher():
    logp, old, adv, mask, _ = golden_inputs()
    # eps_high .28: seq1 tok1 -> -min(3.0, 1.28*2) = -2.56; the A<0 side still clips at .8
    loss, m = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.28, loss_norm="token_mean")
    assert loss.item() == approx((-2.56 - 1.0 - 2.2 + 1.5 + 0.8) / 5)
    assert m["clip_frac_high"].item() == approx(1 / 5)
    # eps_high .6: 1.5 < 1.6 is no longer clipped -> -3.0
    loss, m = policy_loss(logp, old, adv, mask, eps_low=0.2, eps_high=0.6, loss_norm="token_mean")
    assert loss.item() == approx((-3.0 - 1.0 - 2.2 + 1.5 + 0.8) / 5)
    assert m["clip_frac_high"].item() == 0.0 and m["clip_frac_low"].item() == approx(1 / 5)


def test_golden_k3_kl():
    # ref - logp = d: k3 = e^d - d - 1 -> d=ln2: 1 - ln2 ; d=0: 0 ; d=-ln2: .5 + ln2 - 1 = ln2 - .5
    logp, old, adv, mask, ref = golden_inputs(ref_delta=[[LN2, 0.0, -LN2], [LN2, 0.0, 9.0]])
    K1, K2 = [1 - LN2, 0.0, LN2 - 0.5], [1 - LN2, 0.0]
    beta = 0.1
    loss, m = policy_loss(logp, old, adv, mask, loss_norm="token_mean", ref_logp=ref, beta=beta)
    assert loss.item() == approx((sum(PG1) + sum(PG2) + beta * (sum(K1) + sum(K2))) / 5)
    assert m["kl"].item() == approx((sum(K1) + sum(K2)) / 5)       # = (1.5 - ln2) / 5
    assert m["pg_loss"].item() == approx((sum(PG1) + sum(PG2)) / 5)
    loss, _ = policy_loss(logp, old, adv, mask, loss_norm="seq_mean_token_mean", ref_logp=ref, beta=beta)
    assert loss.item() == approx(((sum(PG1) + beta * sum(K1)) / 3 + (sum(PG2) + beta * sum(K2)) / 2) / 2)
    # beta = 0 with a reference: KL logged, not in the loss
    loss, m = policy_loss(logp, old, adv, mask, loss_norm="token_mean", ref_logp=ref, beta=0.0)
    assert loss.item() == approx((sum(PG1) + sum(PG2)) / 5) and m["kl"].item() == approx((1.5 - LN2) / 5)


def test_on_policy_value_is_minus_mean_advantage():
    # old_logp None: ratio = 1 everywhere, so the loss is -A aggregated (value), never clipped
    logp, _, adv, mask, _ = golden_inputs()
    for norm, kw, expected in [("seq_mean_token_mean", {}, (-2.0 + 1.0) / 2), ("token_mean", {}, (-2.0 * 3 + 1.0 * 2) / 5),
                               ("constant", {"max_len": 4}, (-2.0 * 3 + 1.0 * 2) / 8)]:
        loss, m = policy_loss(logp, None, adv, mask, loss_norm=norm, **kw)
        assert loss.item() == approx(expected)
        assert m["ratio_mean"].item() == 1.0 and m["clip_frac_low"].item() == 0 and m["clip_frac_high"].item() == 0


def test_policy_loss_errors():
    logp, old, adv, mask, _ = golden_inputs()
    with pytest.raises(ValueError, match="max_len"):
        policy_loss(logp, old, adv, mask, loss_norm="constant")
    with pytest.raises(ValueError, match="loss_norm"):
        policy_loss(logp, old, adv, mask, loss_norm="dapo")
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, old, adv, mask, beta=0.1)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        policy_loss(logp, old, adv[:1], mask)


# ====================================================================== gradient vs the analytic policy gradient
# toy policy: every token is drawn from one categorical with logits theta, so d log pi(a)/d theta = onehot(a) - p
THETA = [0.5, -0.3, 1.2, 0.0]
TOKENS = [[2, 0, 2], [1, 3, 0], [0, 0, 0]]    # padding positions hold token 0
LENS = [3, 2, 1]
A_TOY = [1.5, -0.5, -1.0]


def toy_logp():
    theta = torch.tensor(THETA, dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(theta, 0)[torch.tensor(TOKENS)]    # [3, 3]
    mask = torch.tensor([[1.0 if t < n else 0.0 for t in range(3)] for n in LENS], dtype=torch.float64)
    return theta, logp, mask


def softmax_by_hand():
    z = [math.exp(x) for x in THETA]
    return [v / sum(z) for v in z]


def dlogp_by_hand(a):
    p = softmax_by_hand()
    return [(1.0 if k == a else 0.0) - p[k] for k in range(4)]


def expected_grad(weight):
    """sum over real tokens (i, t) of weight(i, t) * (onehot(a_it) - p)."""
    g = [0.0] * 4
    for i, n in enumerate(LENS):
        for t in range(n):
            w = weight(i, t)
            g = [gk + w * dk for gk, dk in zip(g, dlogp_by_hand(TOKENS[i][t]))]
    return g


@pytest.mark.parametrize("loss_norm, kw, weight", [
    # L = -(1/N) sum_i A_i/n_i sum_t log pi  ->  dL = -(1/3) sum_i A_i/n_i sum_t (e_a - p)
    ("seq_mean_token_mean", {}, lambda i, t: -A_TOY[i] / LENS[i] / 3),
    ("token_mean", {}, lambda i, t: -A_TOY[i] / 6),                    # M = 3 + 2 + 1 tokens
    ("constant", {"max_len": 5}, lambda i, t: -A_TOY[i] / (3 * 5)),
])
def test_gradient_is_policy_gradient_on_policy(loss_norm, kw, weight):
    theta, logp, mask = toy_logp()
    loss, _ = policy_loss(logp, None, torch.tensor(A_TOY, dtype=torch.float64), mask, loss_norm=loss_norm, **kw)
    loss.backward()
    assert theta.grad.tolist() == tight(expected_grad(weight))


def test_gradient_with_old_policy_and_clipping():
    # pi/pi_old per token (real tokens only); eps = .2. With A>0 the clip binds when r > 1.2; with A<0 when r < .8
    r = [[1.5, 0.9, 0.5], [0.7, 1.3, 1.0], [0.6, 1.0, 1.0]]
    clipped = [[True, False, False],    # A=+1.5: 1.5 > 1.2 clipped; .9 inside; .5 low side is NOT clipped for A>0
               [True, False, None],     # A=-.5: .7 < .8 clipped; 1.3 high side is NOT clipped for A<0
               [True, None, None]]      # A=-1: .6 < .8 clipped
    theta, logp, mask = toy_logp()
    old = logp.detach() - torch.log(torch.tensor(r, dtype=torch.float64))
    loss, m = policy_loss(logp, old, torch.tensor(A_TOY, dtype=torch.float64), mask, loss_norm="token_mean")
    loss.backward()
    # d(-r A)/d theta = -A r (e_a - p) for unclipped tokens (paper Eq. 6), 0 for clipped ones
    assert theta.grad.tolist() == tight(expected_grad(lambda i, t: 0.0 if clipped[i][t] else -A_TOY[i] * r[i][t] / 6))
    assert m["clip_frac_high"].item() == approx(1 / 6) and m["clip_frac_low"].item() == approx(2 / 6)


def test_gradient_of_k3_kl():
    # d/d theta [e^(ref-logp) - (ref-logp) - 1] = (1 - e^(ref-logp)) (e_a - p); e^d = 2, 1, .5 below
    d = [[LN2, 0.0, -LN2], [-LN2, LN2, 0.0], [0.0, 0.0, 0.0]]
    ed = [[2.0, 1.0, 0.5], [0.5, 2.0, 1.0], [1.0, 1.0, 1.0]]
    theta, logp, mask = toy_logp()
    ref = logp.detach() + torch.tensor(d, dtype=torch.float64)
    beta = 0.25
    loss, _ = policy_loss(logp, None, torch.tensor(A_TOY, dtype=torch.float64), mask, loss_norm="token_mean",
                          ref_logp=ref, beta=beta)
    loss.backward()
    assert theta.grad.tolist() == tight(expected_grad(lambda i, t: (-A_TOY[i] + beta * (1 - ed[i][t])) / 6))


# ====================================================================== micro-batch / rank split invariance
def random_batch(B=6, T=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, T + 1, (B,), generator=g)
    mask = (torch.arange(T)[None, :] < lens[:, None]).double()
    param = torch.randn(B, T, generator=g, dtype=torch.float64).mul(0.3).sub(2.0).requires_grad_()
    old = param.detach() + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64)   # some tokens clip
    ref = param.detach() + 0.25 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    return param, old, ref, adv, mask


@pytest.mark.parametrize("loss_norm, kw", [("seq_mean_token_mean", {}), ("token_mean", {}), ("constant", {"max_len": 7})])
@pytest.mark.parametrize("splits", [[3, 3], [1, 5], [2, 1, 3]])
def test_microbatch_split_invariance(loss_norm, kw, splits):
    param, old, ref, adv, mask = random_batch()
    common = dict(loss_norm=loss_norm, eps_high=0.28, beta=0.04, **kw)
    full, _ = policy_loss(param * 1.0, old, adv, mask, ref_logp=ref, **common)
    (g_full,) = torch.autograd.grad(full, param)
    tot_tok, tot_seq = mask.sum().item(), mask.shape[0]   # what the loop all-reduces over ranks and micro-batches
    total, lo = 0.0, 0
    for n in splits:
        sl = slice(lo, lo + n)
        part, _ = policy_loss(param[sl], old[sl], adv[sl], mask[sl], ref_logp=ref[sl],
                              global_tokens=tot_tok, global_seqs=tot_seq, **common)
        total = total + part
        lo += n
    (g_split,) = torch.autograd.grad(total, param)
    assert total.item() == approx(full.item())
    torch.testing.assert_close(g_split, g_full, rtol=1e-12, atol=1e-14)


def test_split_without_global_counts_is_not_invariant():
    # the check above can fail: averaging per-micro-batch token means (bnpo-like) gives a different loss
    param, old, ref, adv, mask = random_batch()
    full, _ = policy_loss(param, old, adv, mask, loss_norm="token_mean")
    a, _ = policy_loss(param[:1], old[:1], adv[:1], mask[:1], loss_norm="token_mean")
    b, _ = policy_loss(param[1:], old[1:], adv[1:], mask[1:], loss_norm="token_mean")
    assert abs(((a + b) / 2).item() - full.item()) > 1e-3


def test_bf16_inputs_compute_in_fp32():
    logp, old, adv, mask, _ = golden_inputs()
    lb, ob = logp.bfloat16(), old.bfloat16()
    loss, _ = policy_loss(lb, ob, adv.float(), mask.bool(), loss_norm="token_mean")
    ref, _ = policy_loss(lb.float(), ob.float(), adv.float(), mask.float(), loss_norm="token_mean")
    assert loss.dtype == torch.float32 and loss.item() == ref.item()


def test_config_defaults():
    cfg = ObjectiveConfig()
    assert (cfg.scale_rewards, cfg.eps_low, cfg.eps_high, cfg.loss_norm, cfg.beta) == ("group", 0.2, None, "seq_mean_token_mean", 0.0)
    assert cfg.std_floor == 1e-3


def test_lr_at_single_optimizer_step_is_the_configured_lr():
    """A run of one optimizer step (steps=1, mu=1, no warmup) trains at optim.lr, not at lr * min_lr_ratio."""
    from twice.optim import lr_at
    assert lr_at(0, 1, 0, 2e-5, 0.1) == 2e-5
    assert lr_at(0, 2, 0, 2e-5, 0.1) == 2e-5 and lr_at(1, 2, 0, 2e-5, 0.1) == pytest.approx(2e-6)
    assert lr_at(1, 2, 1, 2e-5, 0.1) == 2e-5  # warmup ends on the last step: nothing left to decay
