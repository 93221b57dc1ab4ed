"""Parity with mlx-lm on checkpoints that `mlx_lm.convert` quantized (group size 32).

mlx-lm loads the converted folder with its own model code; we load the same folder with ours; both run the
same tokens, as one prompt and as a prompt followed by cached decoding. The conversions cover mlx-lm's own
recipe for these models (4-bit, router gates 8-bit), a mixed-bit recipe, and a custom one that quantizes the
GDN `a`/`b` projections differently from `qkv`/`z`, which forces our loader to keep them separate.
"""

import contextlib
import io
import json

import mlx.core as mx
import numpy as np
import pytest

import hf_models
from specdec.cache import make_cache
from specdec.loading import load_model

mlx_lm = pytest.importorskip("mlx_lm")
from mlx_lm.models.cache import make_prompt_cache  # noqa: E402

TOL = 1e-3  # max|ours - mlx-lm| / max|mlx-lm|
PROMPT = [int(t) for t in np.random.RandomState(0).randint(0, hf_models.BASE["vocab_size"], 30)]
SEGMENTS = [12] + [1] * 6 + [5] + [1] * 7
ROUTER_BITS = {"group_size": 64, "bits": 8}  # what mlx-lm's own predicate gives the routers


def separate_a_b(path, module):
    """8-bit GDN a/b projections (packed `in_proj_ba` in Qwen3-Next), 8-bit routers, 4-bit elsewhere."""
    if path.endswith(("linear_attn.in_proj_a", "linear_attn.in_proj_b", "linear_attn.in_proj_ba")):
        return {"group_size": 32, "bits": 8}
    if path.endswith(("mlp.gate", "shared_expert_gate")):
        return dict(ROUTER_BITS)
    return True


# id -> (model_type, config overrides, quant_predicate for mlx_lm.convert; None = the model's own)
CASES = {
    "qwen3_5_moe-4bit": ("qwen3_5_moe", {}, None),
    "qwen3_5_moe-separate-a-b-tied": ("qwen3_5_moe", dict(tie_word_embeddings=True), separate_a_b),
    "qwen3_5_moe-mixed_3_6": ("qwen3_5_moe", {}, "mixed_3_6"),
    "qwen3_next-4bit": ("qwen3_next", {}, None),
    "qwen3_next-separate-a-b": ("qwen3_next", dict(norm_topk_prob=False), separate_a_b),
    "qwen3_next-mixed_3_4": ("qwen3_next", {}, "mixed_3_4"),
}


def write_hf_checkpoint(model_type, overrides, folder):
    """Save with transformers, then put the folder in the shape mlx-lm reads: Qwen3.5-MoE experts fused as on
    the Hub, and Qwen3-Next's RoPE settings also at the top level (mlx-lm does not read `rope_parameters`)."""
    hf = hf_models.build(model_type, **overrides)
    hf.save_pretrained(folder / "per_expert")
    if model_type == "qwen3_5_moe":
        src = hf_models.fuse_experts_on_disk(folder / "per_expert", folder / "hf")
    else:
        src = folder / "per_expert"
        config = json.loads((src / "config.json").read_text())
        config["rope_theta"] = config["rope_parameters"]["rope_theta"]
        config["partial_rotary_factor"] = config["rope_parameters"]["partial_rotary_factor"]
        (src / "config.json").write_text(json.dumps(config))
    hf_models.save_tokenizer(src, hf_models.BASE["vocab_size"])
    return src


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    built = {}

    def get(case_id):
        if case_id not in built:
            model_type, overrides, predicate = CASES[case_id]
            folder = tmp_path_factory.mktemp(case_id)
            src = write_hf_checkpoint(model_type, overrides, folder)
            with contextlib.redirect_stdout(io.StringIO()):
                mlx_lm.convert(str(src), str(folder / "mlx"), quantize=True, q_bits=4, q_group_size=32,
                               quant_predicate=predicate)
            built[case_id] = folder / "mlx"
        return built[case_id]

    return get


def rel_err(ours, ref) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def run_prompt(model, tokens) -> np.ndarray:
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def run_cached(model, cache, tokens, segments) -> np.ndarray:
    out, at = [], 0
    for n in segments:
        out.append(np.array(model(mx.array([tokens[at : at + n]]), cache=cache)[0].astype(mx.float32)))
        at += n
    return np.concatenate(out)


@pytest.mark.parametrize("case_id", list(CASES))
def test_logits_match_mlx_lm(converted, case_id):
    folder = converted(case_id)
    reference, _ = mlx_lm.load(str(folder))
    ours, _, _ = load_model(folder)
    assert ours.quantization is not None

    assert rel_err(run_prompt(ours, PROMPT), run_prompt(reference, PROMPT)) <= TOL
    expected = run_cached(reference, make_prompt_cache(reference), PROMPT, SEGMENTS)
    assert rel_err(run_cached(ours, make_cache(ours), PROMPT, SEGMENTS), expected) <= TOL


def quant_settings(layer):
    return (layer.group_size, layer.bits)


def test_default_recipe_keeps_routers_at_8_bits(converted):
    folder = converted("qwen3_5_moe-4bit")
    quant = json.loads((folder / "config.json").read_text())["quantization"]
    assert quant["bits"] == 4 and quant["language_model.model.layers.0.mlp.gate"]["bits"] == 8
    ours, _, _ = load_model(folder)
    layer = ours.model.layers[0]
    assert quant_settings(layer.mlp.gate) == (64, 8)
    assert quant_settings(layer.mlp.shared_expert_gate) == (64, 8)
    assert quant_settings(layer.mlp.experts.gate_up) == (32, 4)
    assert quant_settings(layer.linear_attn.in_proj[0]) == (32, 4)
    assert ours.config.in_proj_groups == [["qkv", "z", "b", "a"]]  # all four fused into one Linear


@pytest.mark.parametrize("case_id", ["qwen3_5_moe-separate-a-b-tied", "qwen3_next-separate-a-b"])
def test_differently_quantized_a_b_fall_back_to_separate_projections(converted, case_id):
    ours, _, _ = load_model(converted(case_id))
    assert ours.config.in_proj_groups == [["qkv", "z"], ["b", "a"]]
    gdn_layer = ours.model.layers[0].linear_attn
    assert [quant_settings(p) for p in gdn_layer.in_proj] == [(32, 4), (32, 8)]


def test_mixed_recipe_bits_reach_our_layers(converted):
    # mixed_3_4 gives 3 bits by default and 4 bits to some down_proj / v_proj and to lm_head; Qwen3-Next's packed
    # in_proj_qkvz / in_proj_ba carry their own entries, which must follow the parts we split them into.
    folder = converted("qwen3_next-mixed_3_4")
    quant = json.loads((folder / "config.json").read_text())["quantization"]
    ours, _, _ = load_model(folder)
    assert quant_settings(ours.lm_head) == (32, quant["lm_head"]["bits"]) == (32, 4)
    gdn_layer = ours.model.layers[0].linear_attn
    assert quant_settings(gdn_layer.in_proj[0]) == (32, quant["model.layers.0.linear_attn.in_proj_qkvz"]["bits"])
    down_bits = {quant[f"model.layers.{i}.mlp.switch_mlp.down_proj"]["bits"] for i in range(4)}
    assert down_bits == {3, 4}
    for i, layer in enumerate(ours.model.layers):
        assert layer.mlp.experts.down.bits == quant[f"model.layers.{i}.mlp.switch_mlp.down_proj"]["bits"]
