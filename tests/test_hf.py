"""HF checkpoint folders in/out: logit parity with transformers' eager Gemma3ForCausalLM on tiny random checkpoints.

    pytest tests/test_hf.py -q

Fixture recipe (random norm weights, window 4 < 13 tokens, KV < heads,
query_pre_attn_scalar != head_dim, linear scaling on global layers, H*hd != D, sqrt(48) inexact in bf16).
One random model, written in four forms: what transformers writes (v5 config), the Hub's v4 config keys,
sharded, and multimodal-prefixed with a sparse text_config (two prefixes).
"""
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")
from transformers import Gemma3ForCausalLM, Gemma3TextConfig  # noqa: E402

from twice.gemma3 import PRESETS, Gemma3, Gemma3Config  # noqa: E402
from twice.hf import config_from_hf  # noqa: E402

LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention"] * 2
TEXT_KW = dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=6, num_attention_heads=4,
               num_key_value_heads=2, head_dim=24, query_pre_attn_scalar=32, sliding_window=4,
               max_position_embeddings=128, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=2, eos_token_id=1)
IDS = torch.tensor([[2, 17, 301, 5, 88, 450, 9, 9, 123, 64, 500, 3, 7],
                    [2, 44, 1, 250, 310, 77, 12, 499, 6, 8, 90, 200, 33]])  # [2, 13]: 13 > window 4


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_load(path, dtype):
    return Gemma3ForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=dtype).eval()


@torch.no_grad()
def hf_logits(model, ids=IDS):
    return model(ids).logits


@torch.no_grad()
def our_logits(model, ids=IDS):
    return model(ids)


def assert_bf16_close(ours, ref):
    """Within one bf16 step (spacing of bf16 numbers at the reference value) everywhere."""
    ref, ours = ref.float(), ours.float()
    step = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(2.0 ** -20))) - 7)
    diff = (ours - ref).abs()
    assert (diff <= step).all(), f"max |diff| {diff.max().item()} exceeds one bf16 step"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma3_hf")
    torch.manual_seed(0)
    cfg = Gemma3TextConfig(**TEXT_KW, layer_types=LAYER_TYPES, rope_theta=1e6, rope_local_base_freq=1e4,
                           rope_scaling={"rope_type": "linear", "factor": 8.0}, tie_word_embeddings=True)
    m = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-inits norms; random ones catch (1 + w) bugs
        for n, p in m.named_parameters():
            p.uniform_(-0.5, 0.5) if n.endswith("norm.weight") else p.normal_(0, 0.05)
    out = {"v5": root / "v5", "sharded": root / "sharded"}
    m.save_pretrained(out["v5"])  # transformers' own output: layer_types + rope_parameters
    m.save_pretrained(out["sharded"], max_shard_size="50KB")

    # v4 / Hub form: no layer_types, sliding_window_pattern, legacy RoPE keys
    out["v4"] = root / "v4"
    shutil.copytree(out["v5"], out["v4"])
    c = json.loads((out["v4"] / "config.json").read_text())
    for k in ("layer_types", "rope_parameters", "_sliding_window_pattern"):
        c.pop(k, None)
    c.update(sliding_window_pattern=3, rope_theta=1000000, rope_local_base_freq=10000,
             rope_scaling={"rope_type": "linear", "factor": 8.0}, transformers_version="4.50.0.dev0")
    (out["v4"] / "config.json").write_text(json.dumps(c))

    # multimodal: prefixed text weights + vision/projector tensors to skip + a sparse text_config
    state = load_file(out["v5"] / "model.safetensors")
    sparse = {k: TEXT_KW[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                      "num_attention_heads", "num_key_value_heads", "head_dim",
                                      "query_pre_attn_scalar", "sliding_window")}
    sparse.update(model_type="gemma3_text", sliding_window_pattern=3,  # rope_theta etc. left to the defaults
                  rope_scaling={"factor": 8.0, "rope_type": "linear"})
    mm_cfg = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "text_config": sparse,
              "vision_config": {"model_type": "siglip_vision_model", "hidden_size": 8}, "boi_token_index": 255999,
              "eoi_token_index": 256000, "image_token_index": 262144, "mm_tokens_per_image": 256,
              "eos_token_id": [1, 106]}
    for name, prefix in [("mm", "language_model.model."), ("mm_v5", "model.language_model.")]:
        d = out[name] = root / name
        d.mkdir()
        mm = {prefix + k.removeprefix("model."): v for k, v in state.items()}
        vis = "model.vision_tower." if prefix.startswith("model.") else "vision_tower."
        mm[vis + "vision_model.embeddings.patch_embedding.weight"] = torch.randn(8, 3, 2, 2)
        mm[vis.replace("vision_tower", "multi_modal_projector") + "mm_input_projection_weight"] = torch.randn(8, 48)
        save_file(mm, str(d / "model.safetensors"), metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(mm_cfg))
    return out


@pytest.fixture(scope="module")
def ref(dirs):
    return {dt: hf_load(dirs["v5"], dt) for dt in (torch.float32, torch.bfloat16)}


def test_fixture_forms(dirs, ref):
    """The fixtures really are what they claim (else the parity tests below would prove less than they say)."""
    assert (dirs["sharded"] / "model.safetensors.index.json").exists()
    assert len(list(dirs["sharded"].glob("model-*.safetensors"))) > 2
    v4 = json.loads((dirs["v4"] / "config.json").read_text())
    assert "layer_types" not in v4 and "rope_parameters" not in v4
    # transformers itself reads the hand-written v4 form as the same model
    assert torch.equal(hf_logits(hf_load(dirs["v4"], torch.float32)), hf_logits(ref[torch.float32]))


@pytest.mark.parametrize("form", ["v5", "v4", "sharded", "mm", "mm_v5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logit_parity(dirs, ref, form, dtype):
    """Eager attention against transformers' eager attention: bit-level parity (what proves the loader right)."""
    ours = Gemma3.from_pretrained(dirs[form], dtype=dtype).set_attn_implementation("eager")
    assert ours.embed_tokens.weight.dtype == dtype
    a, b = our_logits(ours), hf_logits(ref[dtype])
    assert a.dtype == b.dtype == dtype and a.shape == (2, 13, 512)
    if dtype == torch.float32:
        assert (a - b).abs().max().item() <= 1e-5
    else:
        assert_bf16_close(a, b)


def assert_bf16_no_worse(ours, theirs, exact, slack=1.5):
    """bf16 fused attention vs transformers' bf16 eager attention, both measured against the fp32 model.

    SDPA keeps scores and probabilities in fp32 inside the kernel where eager rounds both to bf16 (relative 2**-9
    each), so the two bf16 results legitimately differ by more than one bf16 step; what must hold is that ours is
    not further from the exact (fp32) logits than transformers' bf16 is (slack for how the roundings land)."""
    err_ours = (ours.float() - exact.float()).abs().max().item()
    err_theirs = (theirs.float() - exact.float()).abs().max().item()
    assert err_ours <= slack * err_theirs, f"bf16 max|err| vs fp32: ours {err_ours}, transformers {err_theirs}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logit_parity_sdpa(dirs, ref, dtype):
    """The default (SDPA) path: fp32 within 1e-5 of transformers; bf16 no further from fp32 than transformers."""
    ours = Gemma3.from_pretrained(dirs["v5"], dtype=dtype)
    assert ours.config.attn_implementation == "sdpa"
    a, b = our_logits(ours), hf_logits(ref[dtype])
    if dtype == torch.float32:
        assert (a - b).abs().max().item() <= 1e-5
    else:
        assert_bf16_no_worse(a, b, hf_logits(ref[torch.float32]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("max_shard_bytes", [2_000_000_000, 30_000], ids=["single", "sharded"])
def test_save_pretrained_roundtrip(dirs, tmp_path, dtype, max_shard_bytes):
    # a multimodal source leaves as a text-only model; eager attention so logits can be compared bit for bit
    ours = Gemma3.from_pretrained(dirs["mm"], dtype=dtype).set_attn_implementation("eager")
    tok = tmp_path / "tok" / "tokenizer.model"
    tok.parent.mkdir()
    tok.write_bytes(b"not a real sentencepiece model")
    out = ours.save_pretrained(tmp_path / "out", max_shard_bytes=max_shard_bytes, tokenizer_path=tok.parent)
    assert (out / "tokenizer.model").read_bytes() == tok.read_bytes()
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "gemma3_text" and cfg["layer_types"] == LAYER_TYPES
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 8.0} and cfg["rope_local_base_freq"] == 1e4
    sharded = (out / "model.safetensors.index.json").exists()
    assert sharded == (max_shard_bytes < 1e6) and sharded != (out / "model.safetensors").exists()
    assert not list(tmp_path.glob(".out.tmp-*")), "temp dir left behind"

    hf = hf_load(out, dtype)  # transformers reads our folder as the same model
    assert hf.config.layer_types == LAYER_TYPES
    assert torch.equal(hf_logits(hf), our_logits(ours))
    assert torch.equal(hf_logits(hf), hf_logits(hf_load(dirs["v5"], dtype)))
    back = Gemma3.from_pretrained(out, dtype=dtype)  # and so do we
    for (n1, p1), (n2, p2) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_save_over_existing_folder_drops_stale_shards(dirs, tmp_path):
    ours = Gemma3.from_pretrained(dirs["v5"])
    out = tmp_path / "run"
    ours.save_pretrained(out, max_shard_bytes=30_000)
    (out / "notes.txt").write_text("keep me")  # a run dir's other files survive
    ours.save_pretrained(out)  # now single-file: the old shards and index must go
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                     "notes.txt"]
    assert torch.equal(our_logits(Gemma3.from_pretrained(out)), our_logits(ours))


def test_save_given_state_dict(dirs, tmp_path):
    """A sharded trainer gathers full tensors on rank 0 and hands them over: those are what gets written."""
    ours = Gemma3.from_pretrained(dirs["v5"])
    other = {k: v + 1 for k, v in ours.state_dict().items()}
    ours.save_pretrained(tmp_path / "out", state_dict=other)
    back = Gemma3.from_pretrained(tmp_path / "out")
    assert all(torch.equal(back.state_dict()[k], v) for k, v in other.items())
    with pytest.raises(KeyError, match="missing"):
        ours.save_pretrained(tmp_path / "bad", state_dict={k: v for k, v in other.items() if k != "norm.weight"})


def test_tokenizer_copied_from_source_dir(dirs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(dirs["v5"], src)
    (src / "tokenizer.model").write_bytes(b"spm")
    Gemma3.from_pretrained(src).save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == b"spm"


# ---- strict loading -------------------------------------------------------------------------------------------

def _rewrite(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(dst / "model.safetensors")
    edit(state)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_strict_missing_tensor_is_named(dirs, tmp_path):
    d = _rewrite(dirs["v5"], tmp_path / "d", lambda s: s.pop("model.layers.3.mlp.up_proj.weight"))
    with pytest.raises(KeyError, match=r"missing: \['model\.layers\.3\.mlp\.up_proj\.weight'\]"):
        Gemma3.from_pretrained(d)


def test_strict_unexpected_tensor_is_named(dirs, tmp_path):
    d = _rewrite(dirs["v5"], tmp_path / "d", lambda s: s.update({"model.layers.0.self_attn.rotary.inv_freq":
                                                                  torch.zeros(12)}))
    with pytest.raises(KeyError, match=r"unexpected: \['model\.layers\.0\.self_attn\.rotary\.inv_freq'\]"):
        Gemma3.from_pretrained(d)


def test_strict_missing_shard_tensor_is_named(dirs, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(dirs["sharded"], d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.norm.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(KeyError, match=r"model\.norm\.weight"):  # listed nowhere -> missing (also stray in file)
        Gemma3.from_pretrained(d)


def test_strict_shape_mismatch_is_named(dirs, tmp_path):
    d = _rewrite(dirs["v5"], tmp_path / "d", lambda s: s.update({"model.layers.2.self_attn.q_norm.weight":
                                                                  torch.zeros(23)}))
    with pytest.raises(ValueError, match=r"model\.layers\.2\.self_attn\.q_norm\.weight has shape \(23,\)"):
        Gemma3.from_pretrained(d)


def test_explicit_lm_head_only_if_tied(dirs, tmp_path):
    tied = _rewrite(dirs["v5"], tmp_path / "tied",
                    lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"].clone()}))
    assert torch.equal(our_logits(Gemma3.from_pretrained(tied)), our_logits(Gemma3.from_pretrained(dirs["v5"])))
    untied = _rewrite(dirs["v5"], tmp_path / "untied",
                      lambda s: s.update({"lm_head.weight": s["model.embed_tokens.weight"] + 1}))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        Gemma3.from_pretrained(untied)


def test_fewer_layers_in_config_than_weights_is_an_error(dirs, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(dirs["v4"], d)
    c = json.loads((d / "config.json").read_text())
    c["num_hidden_layers"] = 5
    (d / "config.json").write_text(json.dumps(c))
    with pytest.raises(KeyError, match=r"model\.layers\.5\.input_layernorm\.weight"):
        Gemma3.from_pretrained(d)


def test_loaded_on_meta_then_assigned(dirs):
    """No double memory: the loaded parameters ARE the tensors read from the file (no copy into an init'ed model)."""
    m = Gemma3.from_pretrained(dirs["v5"])
    assert all(p.device.type == "cpu" and not p.is_meta for p in m.parameters())
    with safe_open(dirs["v5"] / "model.safetensors", framework="pt") as f:
        assert torch.equal(m.layers[4].mlp.down_proj.weight, f.get_tensor("model.layers.4.mlp.down_proj.weight"))


# ---- config parsing -------------------------------------------------------------------------------------------

HUB_1B = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 1152,
          "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
          "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
          "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": None,
          "max_position_embeddings": 32768, "vocab_size": 262144, "rms_norm_eps": 1e-06, "eos_token_id": [1, 106],
          "attn_logit_softcapping": None, "final_logit_softcapping": None, "hidden_activation": "gelu_pytorch_tanh"}
# the real 27B text_config is this sparse (as published on the Hub): no vocab_size, no rope_theta
SPARSE_27B = {"model_type": "gemma3", "text_config": {
    "head_dim": 128, "hidden_size": 5376, "intermediate_size": 21504, "model_type": "gemma3_text",
    "num_attention_heads": 32, "num_hidden_layers": 62, "num_key_value_heads": 16, "query_pre_attn_scalar": 168,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024, "sliding_window_pattern": 6}}


def test_config_hub_1b_equals_preset():
    c = config_from_hf(HUB_1B, Gemma3Config)
    p = PRESETS["gemma-3-1b"]
    assert c.eos_token_id == [1, 106]
    c.eos_token_id = p.eos_token_id
    assert c == p
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17, 23]


def test_config_sparse_multimodal_27b_fills_defaults():
    c = config_from_hf(SPARSE_27B, Gemma3Config)
    p = PRESETS["gemma-3-27b"]
    assert (c.vocab_size, c.rope_theta, c.rope_local_base_freq, c.rope_scaling_factor) == (262208, 1e6, 1e4, 8.0)
    assert (c.head_dim, c.query_pre_attn_scalar, c.layer_types) == (128, 168, p.layer_types)


def test_config_v5_rope_parameters_win_and_bad_variants_fail():
    v5 = dict(HUB_1B, rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 2e4}})
    c = config_from_hf(v5, Gemma3Config)
    assert (c.rope_theta, c.rope_local_base_freq, c.rope_scaling_factor) == (5e5, 2e4, 4.0)
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        config_from_hf(dict(HUB_1B, rope_scaling={"rope_type": "yarn", "factor": 2.0}), Gemma3Config)
    with pytest.raises(ValueError, match="hidden_activation"):
        config_from_hf(dict(HUB_1B, hidden_activation="relu"), Gemma3Config)
    with pytest.raises(ValueError, match="layer_types has 3 entries"):
        config_from_hf(dict(HUB_1B, layer_types=["full_attention"] * 3), Gemma3Config)


def test_bf16_step_helper_can_fail():
    x = torch.tensor([1.0, -3.0], dtype=torch.bfloat16)
    assert_bf16_close(x, x)
    with pytest.raises(AssertionError):
        assert_bf16_close(torch.tensor([1.0, -3.0 - 2 * 2 ** -6]), x)  # two steps at |3| (step 2**-6)


# ---- the real Gemma-3-270m (converted by `python -m twice.convert gemma-3-270m`) --------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_real_270m_parity_past_the_window(dtype):
    from pathlib import Path
    path = Path("~/.cache/twice/gemma-3-270m").expanduser()
    if not (path / "model.safetensors").exists():
        pytest.skip(f"{path} is absent (python -m twice.convert gemma-3-270m)")
    torch.manual_seed(0)
    ids = torch.cat([torch.tensor([[2]]), torch.randint(200, 20000, (1, 539))], 1)  # 540 > window 512
    ours = Gemma3.from_pretrained(path, dtype=dtype).set_attn_implementation("eager")
    a = our_logits(ours, ids)
    a_sdpa = our_logits(ours.set_attn_implementation("sdpa"), ids)
    del ours
    b = hf_logits(hf_load(path, dtype), ids)
    if dtype == torch.float32:
        assert (a - b).abs().max().item() <= 1e-4  # measured 0.0 (bit-exact), |logits| up to 86
        assert (a_sdpa - b).abs().max().item() <= 1e-3  # |logits| up to 86: ~1e-5 relative
    else:
        assert_bf16_close(a, b)
        assert_bf16_no_worse(a_sdpa, b, hf_logits(hf_load(path, torch.float32), ids))
    assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_imports_are_one_way():
    """twice.hf never imports the model and importing the model loads no checkpoint code: no import cycle (a cycle
    made `import twice.hf` first half-initialise twice.gemma3). Fresh interpreters, so earlier imports don't count."""
    import subprocess
    import sys
    code = ("import sys, twice.hf; assert 'twice.gemma3' not in sys.modules, 'twice.hf imported twice.gemma3'; "
            "import twice.gemma3; assert 'kernels' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    code = ("import sys, twice.gemma3; bad = [m for m in ('twice.hf', 'safetensors') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
