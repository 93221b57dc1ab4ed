"""Logits parity with transformers (PyTorch CPU, float32) on checkpoints transformers itself saves.

Every supported family over config variants (GQA ratios, GDN k-heads != v-heads, layer layouts, partial
RoPE, tied embeddings, Qwen3-Next's sparse-step / mlp-only layers / unnormalised top-k, Llama biases and
llama3 RoPE), each for a whole prompt and for a prompt followed by cached decoding. Also the HF fused-expert
layout, sharded checkpoints, the bf16 option, and the fused MoE against a per-expert reference.
"""

import copy
import json

import mlx.core as mx
import numpy as np
import pytest
import torch

import hf_models
from specdec.cache import make_cache
from specdec.loading import load_model
from specdec.models import gdn, layers

TOL = 1e-4  # max|ours - ref| / max|ref|, float32
L, F = "linear_attention", "full_attention"


def rope(partial: float, theta: float = 10000.0) -> dict:
    return {"rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial}


LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# id -> (model_type, config overrides). hf_models defaults: 4 heads, 2 kv heads, GDN 2 k-heads / 4 v-heads,
# layers [L, L, L, F], 6 experts top-2 with a shared expert, partial rotary 0.25 for the hybrids.
CASES = {
    "moe": ("qwen3_5_moe_text", {}),
    "moe-gqa1-kheads=vheads-tied-rope0.5": (
        "qwen3_5_moe_text",
        dict(num_key_value_heads=4, linear_num_key_heads=4, tie_word_embeddings=True, rope_parameters=rope(0.5)),
    ),
    "moe-gqa4-attention-first-rope1.0": (
        "qwen3_5_moe_text",
        dict(num_key_value_heads=1, linear_num_key_heads=1, layer_types=[F, F, L, L], rope_parameters=rope(1.0, 5000.0)),
    ),
    "moe-multimodal": ("qwen3_5_moe", {}),
    "moe-multimodal-tied": ("qwen3_5_moe", dict(tie_word_embeddings=True, layer_types=[L, F, L, F])),
    "dense-hybrid-attention-first-tied": ("qwen3_5_text", dict(layer_types=[F, L, L, F], tie_word_embeddings=True)),
    "dense-hybrid-gqa4-rope0.5": ("qwen3_5_text", dict(num_key_value_heads=1, rope_parameters=rope(0.5))),
    "next": ("qwen3_next", {}),
    "next-unnormed-sparse-step2-mlp-only": (
        "qwen3_next",
        dict(norm_topk_prob=False, decoder_sparse_step=2, mlp_only_layers=[1], linear_num_key_heads=1),
    ),
    "next-gqa1-two-attention-tied-rope1.0": (
        "qwen3_next",
        dict(num_key_value_heads=4, layer_types=[L, F, F, L], tie_word_embeddings=True, rope_parameters=rope(1.0)),
    ),
    "qwen3": ("qwen3", {}),
    "qwen3-gqa1-tied": ("qwen3", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "qwen3-gqa4": ("qwen3", dict(num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "llama-bias-llama3-rope": ("llama", dict(attention_bias=True, mlp_bias=True, rope_parameters=LLAMA3)),
    "llama-gqa4": ("llama", dict(num_key_value_heads=1)),
}

PROMPT = [int(t) for t in np.random.RandomState(0).randint(0, hf_models.BASE["vocab_size"], 30)]
# Cached decoding: a 12-token prompt, single tokens, a 5-token window (as a verify step feeds), single tokens.
SEGMENTS = [12] + [1] * 6 + [5] + [1] * 7


def rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


def forward(model, tokens) -> np.ndarray:
    return np.array(model(mx.array([tokens]))[0].astype(mx.float32))


def forward_cached(model, tokens, segments) -> np.ndarray:
    assert sum(segments) == len(tokens)
    cache, out, at = make_cache(model), [], 0
    for n in segments:
        out.append(np.array(model(mx.array([tokens[at : at + n]]), cache)[0].astype(mx.float32)))
        at += n
    assert cache.offset == len(tokens)
    return np.concatenate(out)


class Checkpoint:
    """A transformers model, its saved folder, our model loaded from it, and the reference logits."""

    def __init__(self, model_type, overrides, folder, seed):
        self.hf = hf_models.build(model_type, seed=seed, **overrides)
        self.hf.save_pretrained(folder)
        self.folder = folder
        self.ours, _, _ = load_model(folder)
        self.ref = hf_models.logits(self.hf, PROMPT)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    built = {}

    def get(case_id):
        if case_id not in built:
            model_type, overrides = CASES[case_id]
            seed = list(CASES).index(case_id)
            built[case_id] = Checkpoint(model_type, overrides, tmp_path_factory.mktemp(case_id), seed)
        return built[case_id]

    return get


@pytest.mark.parametrize("case_id", list(CASES))
def test_prompt_and_cached_decode_match_transformers(checkpoint, case_id):
    ck = checkpoint(case_id)
    cfg = ck.ours.config
    overrides = CASES[case_id][1]
    # The variant really is what the case says (transformers did not silently ignore an override).
    if "layer_types" in overrides:
        assert cfg.layer_types == overrides["layer_types"]
    if overrides.get("tie_word_embeddings"):
        assert "lm_head" not in ck.ours and ck.hf.config.tie_word_embeddings
    if "rope_parameters" in overrides and "partial_rotary_factor" in overrides["rope_parameters"]:
        assert cfg.partial_rotary_factor == overrides["rope_parameters"]["partial_rotary_factor"]

    assert rel_err(forward(ck.ours, PROMPT), ck.ref) <= TOL
    assert rel_err(forward_cached(ck.ours, PROMPT, SEGMENTS), ck.ref) <= TOL


def test_variants_reach_the_config(checkpoint):
    nxt = checkpoint("next-unnormed-sparse-step2-mlp-only").ours
    assert not nxt.config.norm_topk_prob
    # decoder_sparse_step=2 makes layers 1 and 3 sparse; mlp_only_layers=[1] turns layer 1 back to dense.
    assert [type(layer.mlp).__name__ for layer in nxt.model.layers] == ["MLP", "MLP", "MLP", "SparseMoE"]
    assert checkpoint("llama-bias-llama3-rope").ours.config.rope_scaling["factor"] == 8.0
    assert "bias" in checkpoint("llama-bias-llama3-rope").ours.model.layers[0].mlp.down_proj


@pytest.mark.parametrize("case_id", ["moe", "next"])
def test_long_prompt_uses_chunked_gdn_and_matches(checkpoint, case_id):
    ck = checkpoint(case_id)
    n = gdn.RECURRENT_MAX_TOKENS + 37  # past the token loop: the chunk-parallel form runs
    tokens = [int(t) for t in np.random.RandomState(1).randint(0, hf_models.BASE["vocab_size"], n)]
    ref = hf_models.logits(ck.hf, tokens)
    assert rel_err(forward(ck.ours, tokens), ref) <= TOL
    assert rel_err(forward_cached(ck.ours, tokens, [n - 10] + [1] * 10), ref) <= TOL


def test_batch_rows_match_transformers(checkpoint):
    ck = checkpoint("moe")
    rows = [PROMPT, PROMPT[::-1]]
    with torch.no_grad():
        ref = ck.hf(torch.tensor(rows)).logits.float().numpy()
    ours = np.array(ck.ours(mx.array(rows)))
    for b in range(2):
        assert rel_err(ours[b], ref[b]) <= TOL


@pytest.mark.parametrize("case_id", ["moe", "moe-multimodal"])
def test_hf_fused_expert_layout_loads_to_same_logits(checkpoint, case_id, tmp_path):
    ck = checkpoint(case_id)
    fused = hf_models.fuse_experts_on_disk(ck.folder, tmp_path / "fused")
    from safetensors import safe_open

    with safe_open(str(fused / "model.safetensors"), "np") as f:
        keys = list(f.keys())
        gate_up = next(k for k in keys if k.endswith("mlp.experts.gate_up_proj"))
        E, I, H = 6, hf_models.MOE["moe_intermediate_size"], hf_models.BASE["hidden_size"]
        assert f.get_slice(gate_up).get_shape() == [E, 2 * I, H]
        assert not any(".experts.0." in k for k in keys)
    model, _, _ = load_model(fused)
    assert rel_err(forward(model, PROMPT), ck.ref) <= TOL


def test_multimodal_wrapper_key_decides_tied_embeddings(checkpoint, tmp_path):
    # transformers ties lm_head by the top-level key; a text_config that disagrees must not drop lm_head.
    ck = checkpoint("moe-multimodal")
    for f in ck.folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    config["text_config"]["tie_word_embeddings"] = True
    (tmp_path / "config.json").write_text(json.dumps(config))
    model, _, _ = load_model(tmp_path)
    assert "lm_head" in model
    assert rel_err(forward(model, PROMPT), ck.ref) <= TOL


def test_sharded_checkpoint_loads(checkpoint, tmp_path):
    ck = checkpoint("next")
    ck.hf.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (tmp_path / "model.safetensors").exists()
    model, _, _ = load_model(tmp_path)
    assert rel_err(forward(model, PROMPT), ck.ref) <= TOL


def bf16_close(ours, ref) -> bool:
    """Loose: bf16 rounding flips a top-k routing choice now and then (transformers' own bf16 run too), which
    moves a few positions a lot; typical positions stay within a few percent."""
    per_position = np.abs(ours - ref).max(axis=-1) / np.abs(ref).max()
    return np.median(per_position) <= 6e-2 and per_position.max() <= 0.5


@pytest.mark.parametrize("case_id", ["moe", "next", "dense-hybrid-gqa4-rope0.5"])
def test_bfloat16_option_stays_close(checkpoint, case_id):
    ck = checkpoint(case_id)
    model, _, _ = load_model(ck.folder, dtype="bfloat16")
    gdn_layer = next(layer.linear_attn for layer in model.model.layers if "linear_attn" in layer)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert gdn_layer.in_proj[0].weight.dtype == mx.bfloat16
    assert gdn_layer.A_log.dtype == mx.float32  # decay rates stay exact
    assert model.model.norm.weight.dtype == mx.float32  # 1 + w is not rounded to bf16
    assert model(mx.array([PROMPT])).dtype == mx.bfloat16
    assert bf16_close(forward(model, PROMPT), ck.ref)
    assert bf16_close(forward_cached(model, PROMPT, SEGMENTS), ck.ref)


def test_bfloat16_checkpoint_matches_transformers_in_bfloat16(checkpoint, tmp_path):
    # HF originals are stored in bf16: loaded as they are (dtype=None), we compute in bf16 like transformers does.
    ck = checkpoint("dense-hybrid-gqa4-rope0.5")
    hf_bf16 = copy.deepcopy(ck.hf).to(torch.bfloat16)
    hf_bf16.save_pretrained(tmp_path)
    model, _, _ = load_model(tmp_path)
    assert model.model.embed_tokens.weight.dtype == mx.bfloat16
    assert bf16_close(forward(model, PROMPT), hf_models.logits(hf_bf16, PROMPT))


# ------------------------------------------------------------------------------------------ fused experts


def silu(x):
    return x / (1.0 + np.exp(-x))


def experts_reference(gate_up, down, x, indices):
    """Per (token, slot): down[e] @ (silu(gate) * up) with gate, up = split(gate_up[e] @ x), in float64."""
    gate_up, down, x = (np.asarray(a, np.float64) for a in (gate_up, down, x))
    N, k = indices.shape
    I = gate_up.shape[1] // 2
    out = np.zeros((N, k, x.shape[1]))
    for n in range(N):
        for j in range(k):
            e = indices[n, j]
            h = gate_up[e] @ x[n]
            out[n, j] = down[e] @ (silu(h[:I]) * h[I:])
    return out


@pytest.mark.parametrize("tokens", [5, 50])  # 5 * 3 slots: below SORT_THRESHOLD; 50 * 3: above
def test_fused_experts_match_per_expert_reference(monkeypatch, tokens):
    E, H, I, k = 8, 32, 24, 3
    assert 5 * k < layers.SORT_THRESHOLD <= 50 * k
    rng = np.random.RandomState(tokens)
    experts = layers.Experts(E, H, I)
    gate_up = rng.normal(0, 0.2, (E, 2 * I, H)).astype(np.float32)
    down = rng.normal(0, 0.2, (E, H, I)).astype(np.float32)
    experts.gate_up.weight, experts.down.weight = mx.array(gate_up), mx.array(down)
    x = rng.normal(0, 1, (tokens, H)).astype(np.float32)
    indices = np.stack([rng.choice(E, k, replace=False) for _ in range(tokens)]).astype(np.int32)
    ref = experts_reference(gate_up, down, x, indices)

    # The default choice, then both paths forced on the same input: token order and sorted by expert.
    for threshold in (layers.SORT_THRESHOLD, tokens * k + 1, 1):
        monkeypatch.setattr(layers, "SORT_THRESHOLD", threshold)
        out = np.array(experts(mx.array(x), mx.array(indices)))
        assert out.shape == (tokens, k, H)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
