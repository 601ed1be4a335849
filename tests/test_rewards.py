"""Golden values for twice.rewards: every branch of Eq. 2, every format case of Eq. 3-5, hand-derived."""
import json
import math
import re

import pytest

from twice.rewards import (REWARDS, RewardConfig, RewardContext, cf_reward, collaborative_guided_reward,
                           compute_rewards, format_reward, item_match, parse_completion, struct_reward, tag_reward)


# ---------------------------------------------------------------- Eq. 2, each branch and both sides of tau
@pytest.mark.parametrize("match, cf, expected", [
    (True, 0.5, 1 + 3 * 0.5),      # match, cf >= tau: 1 + lam*cf = 2.5
    (True, 0.3, 1 + 3 * 0.3),      # boundary cf == tau counts as ">=" : 1.9
    (True, 0.2999, 1.0),           # match, cf < tau: 1
    (True, 0.0, 1.0),              # match but SASRec says nothing (e.g. not in catalogue)
    (True, 1.0, 4.0),              # the maximum of rho_cg with lam=3
    (False, 0.5, 0.5),             # no match, cf >= tau: cf
    (False, 0.3, 0.3),             # boundary: cf
    (False, 0.2999, 0.0),          # no match, cf < tau: 0
    (False, 0.0, 0.0),
])
def test_cg_branches(match, cf, expected):
    assert collaborative_guided_reward(match, cf, lam=3.0, tau=0.3) == pytest.approx(expected, abs=1e-12)


def test_cg_defaults_and_lambda():
    assert collaborative_guided_reward(True, 0.5) == pytest.approx(2.5)  # lam=3, tau=0.3 by default
    assert collaborative_guided_reward(True, 0.5, lam=1.0, tau=0.6) == 1.0  # tau moves the branch
    assert collaborative_guided_reward(True, 0.8, lam=1.0, tau=0.6) == pytest.approx(1.8)
    assert collaborative_guided_reward(False, 0.59, lam=1.0, tau=0.6) == 0.0


@pytest.mark.parametrize("bad", [-0.1, 1.5, 3.2, float("nan")])
def test_cg_rejects_a_logit(bad):
    with pytest.raises(ValueError, match="rho_cf"):
        collaborative_guided_reward(True, bad)


# ---------------------------------------------------------------- rho_cf
def test_cf_reward_sigmoid():
    assert cf_reward("B01", 0.0) == 0.5
    assert cf_reward("B01", math.log(3.0)) == pytest.approx(0.75)      # 1/(1+1/3)
    assert cf_reward("B01", -math.log(3.0)) == pytest.approx(0.25)
    assert cf_reward("B01", -1000.0) == 0.0 and cf_reward("B01", 1000.0) == 1.0  # no overflow
    assert cf_reward("B01", None) == 0.0   # not in the catalogue
    assert cf_reward(None, 2.0) == 0.0     # no <item> at all
    with pytest.raises(ValueError, match="NaN"):
        cf_reward("B01", float("nan"))


# ---------------------------------------------------------------- item match
def test_item_match_whitespace_and_exactness():
    assert item_match("B01", "B01") == 1.0
    assert item_match("\n  B01 \t", "B01") == 1.0
    assert item_match("B01", " B01\n") == 1.0
    assert item_match("b01", "B01") == 0.0          # IDs are case-sensitive (ASINs)
    assert item_match("B011", "B01") == 0.0         # exact, not a prefix
    assert item_match("B0 1", "B01") == 0.0         # inner whitespace is not removed, only collapsed
    assert item_match("B0  1", "B0 1") == 1.0
    assert item_match("   ", "B01") == 0.0
    assert item_match(None, "B01") == 0.0


# ---------------------------------------------------------------- format: Eq. 3 (struct), Eq. 4 (tag), Eq. 5
GOOD = "<think>she buys spicy noodles</think> <item>B01</item>"

# (text, struct, tag) derived by hand: tag = 0.25 * number of the four tags occurring exactly once
FORMAT_CASES = [
    ("good", GOOD, 1, 1.0),
    ("good, text around and newlines", "Sure.\n<think>\nx\n</think>\n<item>\nB01\n</item>", 1, 1.0),
    ("no tags", "B01", 0, 0.0),
    ("missing think pair", "<item>B01</item>", 0, 0.5),
    ("missing item pair", "<think>x</think>", 0, 0.5),
    ("unclosed item", "<think>x</think><item>B01", 0, 0.75),
    ("unclosed think", "<think>x<item>B01</item>", 0, 0.75),
    ("repeated think", "<think>a</think><think>b</think><item>B01</item>", 0, 0.5),
    ("repeated item", "<think>a</think><item>B01</item><item>B02</item>", 0, 0.5),
    ("repeated closing item only", "<think>a</think><item>B01</item></item>", 0, 0.75),
    ("item before think", "<item>B01</item><think>x</think>", 0, 1.0),
    ("close before open", "</think>x<think><item>B01</item>", 0, 1.0),
    ("item nested in think", "<think>x <item>B01</item></think>", 0, 1.0),
    ("empty item", "<think>x</think><item>  </item>", 0, 1.0),
    ("empty think", "<think> \n</think><item>B01</item>", 0, 1.0),
]


@pytest.mark.parametrize("name, text, struct, tag", FORMAT_CASES, ids=[c[0] for c in FORMAT_CASES])
def test_format_cases(name, text, struct, tag):
    assert struct_reward(text) == struct
    assert tag_reward(text) == tag
    assert format_reward(text) == struct + tag
    assert 0.0 <= format_reward(text) <= 2.0


def test_parse_completion_fields():
    p = parse_completion(GOOD)
    assert p.think == "she buys spicy noodles" and p.item == "B01" and p.well_formed
    assert (p.n_think_open, p.n_think_close, p.n_item_open, p.n_item_close) == (1, 1, 1, 1)
    p = parse_completion("<think>a</think><item>B01</item><item>B02</item>")
    assert p.item == "B01" and p.n_item_open == 2 and not p.well_formed  # first pair names the item
    p = parse_completion("<think>x</think><item>B01")
    assert p.item is None and p.think == "x" and p.n_item_close == 0
    # custom tag names (the authors' data uses <item_id>)
    p = parse_completion("<reason>x</reason><item_id>B01</item_id>", think_tag="reason", item_tag="item_id")
    assert p.well_formed and p.item == "B01"
    assert format_reward("<reason>x</reason><item_id>B01</item_id>", "reason", "item_id") == 2.0
    assert format_reward("<reason>x</reason><item_id>B01</item_id>") == 0.0  # default tags absent


# ---------------------------------------------------------------- registry and weighted sum
CANDS = frozenset({"B01", "B02", "B03"})


def ctx(text, logit=None, target="B01", candidates=CANDS, **kw):
    return RewardContext(completion=text, target=target, candidates=candidates, cf_logit=logit, **kw)


def test_item_outside_candidates():
    c = ctx("<think>x</think><item>B99</item>", logit=0.0)  # B99 is a real item, but not offered in the prompt
    assert REWARDS["match"](c) == 0.0
    assert REWARDS["cf"](c) == 0.5                      # cf comes from the caller's lookup: sigmoid(0)
    assert REWARDS["cg"](c) == 0.5                      # no match, 0.5 >= 0.3
    assert REWARDS["format"](c) == 2.0
    # a candidate list that lacks the target is a data error, named clearly
    with pytest.raises(ValueError, match="not among"):
        ctx(GOOD, target="B77")
    # without a candidate list, any exact ID matches
    assert REWARDS["match"](ctx("<think>x</think><item>B99</item>", target="B99", candidates=None)) == 1.0


def test_registry_each_component():
    c = ctx(GOOD, logit=math.log(3.0))                  # match, cf = 0.75
    vals = {k: fn(c) for k, fn in REWARDS.items()}
    assert vals == pytest.approx({"match": 1.0, "cf": 0.75, "cg": 1 + 3 * 0.75, "format": 2.0, "struct": 1.0, "tag": 1.0,
                                  "tag_presence": 1.0, "only_tags": 1.0})
    c = ctx("<think>x</think><item> B01 ", logit=1.0)    # unclosed item: no item parsed -> no match, cf 0
    assert {k: fn(c) for k, fn in REWARDS.items()} == {"match": 0.0, "cf": 0.0, "cg": 0.0, "format": 0.75, "struct": 0.0, "tag": 0.75,
                                                         "tag_presence": 0.0, "only_tags": 1.0}
    c = ctx(GOOD, logit=2.0, lam=1.0, tau=0.9)          # lam/tau flow from the context: cf=0.8808 < 0.9 -> 1
    assert REWARDS["cg"](c) == 1.0


def test_compute_rewards_weights():
    ctxs = [
        ctx(GOOD, logit=0.0),                                      # match, cf .5: cg 2.5, fmt 2
        ctx("<think>x</think><item>B02</item>", logit=math.log(3.0)),  # no match, cf .75: cg .75, fmt 2
        ctx("<item>B03</item>", logit=-math.log(3.0)),             # no match, cf .25 < tau: cg 0, fmt .5
    ]
    total, parts = compute_rewards(ctxs, {"cg": 1.0, "format": 1.0})
    assert total == pytest.approx([2.5 + 2.0, 0.75 + 2.0, 0.0 + 0.5])
    assert set(parts) == set(REWARDS)                              # every component logged
    assert parts["match"] == [1.0, 0.0, 0.0] and parts["cf"] == pytest.approx([0.5, 0.75, 0.25])
    assert parts["struct"] == [1.0, 1.0, 0.0] and parts["tag"] == [1.0, 1.0, 0.5]
    # ablation D of RQ3: item match + format only; cf still reported with weight 0
    total, parts = compute_rewards(ctxs, {"match": 1.0, "format": 0.5, "cf": 0.0})
    assert total == pytest.approx([1.0 + 1.0, 0.0 + 1.0, 0.0 + 0.25])
    assert parts["cf"] == pytest.approx([0.5, 0.75, 0.25])


def test_compute_rewards_bad_weights():
    with pytest.raises(ValueError, match="did you mean 'format'"):
        compute_rewards([ctx(GOOD)], {"fromat": 1.0})
    with pytest.raises(ValueError, match="nonzero"):
        compute_rewards([ctx(GOOD)], {"cg": 0.0})
    assert compute_rewards([], {"cg": 1.0}) == ([], {k: [] for k in REWARDS})


def test_config_defaults_match_the_paper():
    cfg = RewardConfig()
    assert cfg.weights == {"cg": 1.0, "format": 1.0} and (cfg.lam, cfg.tau) == (3.0, 0.3)
    assert all(k in REWARDS for k in cfg.weights)


# ---------------------------------------------------------------- the authors' real teacher completions
def test_real_completions_from_the_authors_sample(official_sample_dir):
    """Task-3 targets (`<think>..</think> <item_nm>title</item_nm> <item_id>ASIN</item_id>`, the authors' tags) are
    well formed with item_tag='item_id', and the parsed ASIN is one of the prompt's candidates; the non-reasoning
    test targets have no think pair: struct 0, two of four tags."""
    recs = json.loads((official_sample_dir / "amazon_Grocery_and_Gourmet_Food_llm_train_case_1_sample.json").read_text())
    assert len(recs) == 100
    for r in recs:
        assert format_reward(r["output"], "think", "item_id") == 2.0
        asin = parse_completion(r["output"], "think", "item_id").item.strip()
        cands = re.findall(r"item_id:(\S+)", r["input"].split("[Candidate List]")[1])
        c = RewardContext(r["output"], target=asin, candidates=frozenset(cands), cf_logit=0.0, item_tag="item_id")
        assert REWARDS["match"](c) == 1.0 and REWARDS["cg"](c) == 1 + 3 * 0.5
    recs = json.loads((official_sample_dir / "amazon_Grocery_and_Gourmet_Food_llm_test_sample.json").read_text())
    assert {format_reward(r["output"], "think", "item_id") for r in recs} == {0.5}


# ---------------------------------------------------------------- rho_cf of an answer outside the candidate list
def test_cf_outside_candidates_score_or_zero():
    """An ID that is not among the prompt's candidates never matches; its rho_cf is SASRec's sigmoid ("score",
    the authors') or 0 ("zero"). Candidates themselves are scored either way."""
    logit = math.log(3.0)  # sigmoid 0.75 >= tau
    out = "<think>r</think><item>B99</item>"
    inside = "<think>r</think><item>B02</item>"
    cands = frozenset({"B01", "B02"})
    score = RewardContext(out, "B01", cands, logit)
    zero = RewardContext(out, "B01", cands, logit, cf_outside_candidates="zero")
    assert REWARDS["match"](score) == 0.0 and REWARDS["cf"](score) == pytest.approx(0.75)
    assert REWARDS["cg"](score) == pytest.approx(0.75)  # no match, rho_cf >= tau: rho_cf
    assert REWARDS["cf"](zero) == 0.0 and REWARDS["cg"](zero) == 0.0
    assert REWARDS["cf"](RewardContext(inside, "B01", cands, logit, cf_outside_candidates="zero")) == pytest.approx(0.75)
    assert RewardConfig().cf_outside_candidates == "score" and RewardConfig().cf_history == "prompt"


# ---------------------------------------------------------------- the authors' format terms (configs/ablations/authors.yaml)
@pytest.mark.parametrize("text, presence, count, only", [
    ("<think>a</think><item>B</item>", 1.0, 1.0, 1.0),             # the expected answer
    ("<item>B</item><think>a</think>", 1.0, 1.0, 1.0),             # order free for presence
    ("<think>a<item>B</item>", 0.0, 0.75, 1.0),                    # no </think>: the think pair is missing
    ("<think>a</think><item>B</item><item>C</item>", 1.0, 0.5, 1.0),  # repeated item pair: 0.25 x 2 tags once
    ("<think>a</think><item>B</item></answer>", 1.0, 1.0, 0.0),    # a foreign tag
    ("<think>a<b>x</b></think><item>B</item>", 1.0, 1.0, 0.0),     # markup inside the rationale
    ("a < b and c > d", 0.0, 0.0, 1.0),                            # comparison signs are no tags
    ("", 0.0, 0.0, 1.0),
])
def test_authors_format_terms_hand_values(text, presence, count, only):
    ctx = RewardContext(text, "B")
    assert REWARDS["tag_presence"](ctx) == presence
    assert REWARDS["tag"](ctx) == count
    assert REWARDS["only_tags"](ctx) == only


def test_authors_weights_total():
    """authors.yaml's weights on a matching, well-formed answer with rho_cf 0.75 >= tau: 4 * (1 + 3 * 0.75) + 1 + 1 + 1."""
    import yaml
    from pathlib import Path
    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "ablations" / "authors.yaml").read_text())
    w = cfg["rewards"]["weights"]
    assert w == {"cg": 4.0, "tag_presence": 1.0, "tag": 1.0, "only_tags": 1.0}
    ctx = RewardContext("<think>a</think><item>B</item>", "B", frozenset({"B", "C"}), math.log(3.0))
    total, parts = compute_rewards([ctx], w)
    assert total[0] == pytest.approx(4 * (1 + 3 * 0.75) + 3.0)
    ctx = RewardContext("<think>a</think><item>C</item><br>", "B", frozenset({"B", "C"}), math.log(3.0))
    assert compute_rewards([ctx], w)[0][0] == pytest.approx(4 * 0.75 + 1 + 1 + 0)
