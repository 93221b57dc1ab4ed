"""The CUDA kernels' Python side, which runs everywhere: the SPECDEC_KERNELS switch, which layers and shapes
each kernel takes, the float32 reference the MoE kernels are checked against on the GPU, and the quantized
layers staying exactly MLX's own wherever the kernels do not run. The kernels themselves need MLX's CUDA
backend: scripts/check_kernels.py checks them there, and each self-checks before first use."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from specdec.bench import arch_config
from specdec.cache import make_cache
from specdec.loading import quantize_model
from specdec.models import attention_cuda, gdn, gdn_cuda, kernels, moe_cuda, qmm_cuda
from specdec.models.config import ModelConfig
from specdec.models.layers import Linear, QuantizedLinear, SparseMoE


@pytest.mark.parametrize("setting, on", [
    (None, {"attn_prefill", "gdn_chunked", "gdn_mixer", "gdn_prefill", "gdn_recurrence", "moe", "moe_grouped", "qmm"}),
    ("all", {"attn_prefill", "gdn_chunked", "gdn_mixer", "gdn_prefill", "gdn_recurrence", "moe", "moe_grouped",
             "qmm"}),
    ("attn", {"attn_prefill"}),
    ("none", set()),
    ("0", set()),
    ("gdn", {"gdn_chunked", "gdn_mixer", "gdn_prefill", "gdn_recurrence"}),
    ("moe, qmm", {"moe", "moe_grouped", "qmm"}),
])
def test_kernel_switch(monkeypatch, setting, on):
    if setting is None:
        monkeypatch.delenv("SPECDEC_KERNELS", raising=False)
    else:
        monkeypatch.setenv("SPECDEC_KERNELS", setting)
    names = {"attn_prefill", "gdn_chunked", "gdn_mixer", "gdn_prefill", "gdn_recurrence", "moe", "moe_grouped", "qmm"}
    assert {n for n in names if kernels.allowed(n)} == on


def test_no_kernel_runs_off_cuda():
    device = mx.default_device()
    mx.set_default_device(mx.cpu)  # the CPU of a CUDA machine too
    try:
        assert not any(kernels.ready(name) for name in kernels._checks)
    finally:
        mx.set_default_device(device)


def moe_block(bits=4, dtype=mx.bfloat16, cfg=None, **overrides):
    """A SparseMoE quantized as mlx-community does (lazily: the shape checks evaluate nothing)."""
    fields = dict(model_type="qwen3_5_moe", vocab_size=16, hidden_size=1024, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=16,
                  num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=64)
    block = SparseMoE(cfg or ModelConfig(**{**fields, **overrides}))
    block.set_dtype(dtype)
    if bits:
        quantize_model(block, bits)
    return block


def test_moe_kernels_take_the_mlx_community_layouts():
    for arch in ("qwen3.5-35b-a3b", "qwen3-next-80b-a3b"):
        block = moe_block(cfg=arch_config(arch, 1))
        assert moe_cuda.usable(block, mx.zeros((1, block.hidden), mx.bfloat16))
    x = mx.zeros((3, 1024), mx.bfloat16)
    assert moe_cuda.usable(moe_block(8), x)
    assert moe_cuda.usable(moe_block(4, shared_expert_intermediate_size=0), x)
    assert not moe_cuda.usable(moe_block(4), x.astype(mx.float32))


@pytest.mark.parametrize("why, block", [
    ("float weights", lambda: moe_block(None)),
    ("3-bit", lambda: moe_block(3)),
    ("float16 (the self-check runs bfloat16)", lambda: moe_block(4, dtype=mx.float16)),
    ("shared expert wider than the routed ones", lambda: moe_block(4, shared_expert_intermediate_size=128)),
    ("hidden not a multiple of 32 x 16 bytes", lambda: moe_block(4, hidden_size=512 + 64)),
])
def test_moe_kernels_refuse_what_they_cannot_read(why, block):
    b = block()
    assert not moe_cuda.usable(b, mx.zeros((1, b.hidden), mx.bfloat16)), why


@pytest.mark.parametrize("bits", [4, None])
def test_moe_reference_is_the_blocks_arithmetic(bits):
    """moe_cuda.reference (the GPU check's yardstick) computes what SparseMoE.ops does: on a float32 block,
    quantized or not, the two agree closely when routed alike."""
    block = moe_block(bits, dtype=mx.float32)
    x = mx.random.normal((5, 1024), key=mx.random.key(0))
    logits = block.gate(x)
    experts = mx.argpartition(logits, kth=-block.top_k, axis=-1)[:, -block.top_k:]
    want, got = block.ops(x), moe_cuda.reference(block, x, experts)
    assert np.allclose(np.array(got), np.array(want), rtol=1e-4, atol=1e-5 * float(mx.abs(want).max()))


def quantized(rows, cols, bits=4):
    layer = Linear(cols, rows, bias=False)
    layer.set_dtype(mx.bfloat16)
    return layer.to_quantized(64, bits)


@pytest.mark.parametrize("rows, cols, tokens, used", [
    (248320, 2048, 1, True),    # the output head: faster here from 1 token on
    (248320, 2048, 16, True),
    (248320, 2048, 17, False),  # past the kernel's two 8-token tiles
    (12352, 2048, 1, False),    # a GDN input projection: MLX's qmv reads it once at 1 token
    (12352, 2048, 2, True),     # ... and once per token from 2; its tiled kernels are slower from 8
    (12352, 2048, 16, True),
    (512, 2048, 1, False),
    (512, 2048, 5, True),
])
def test_tensor_core_matmul_takes_the_products_it_speeds_up(rows, cols, tokens, used):
    layer = Linear(cols, rows, bias=False)  # unevaluated weights: only shapes are read
    layer = layer.to_quantized(64, 4)
    layer.scales = layer.scales.astype(mx.bfloat16)
    x = mx.zeros((1, tokens, cols), mx.bfloat16)
    assert qmm_cuda.usable(layer, x) == used


def test_tensor_core_matmul_needs_bfloat16_and_mlx_affine_weights():
    x = mx.zeros((3, 2048), mx.bfloat16)
    assert qmm_cuda.usable(quantized(8192, 2048), x)
    assert not qmm_cuda.usable(quantized(8192, 2048), x.astype(mx.float16))
    assert not qmm_cuda.usable(quantized(8192, 2048, bits=3), x)


def test_quantized_linear_is_mlx_s_own_off_cuda():
    layer = quantized(96, 128)
    assert isinstance(layer, QuantizedLinear)
    x = mx.random.normal((3, 128)).astype(mx.bfloat16)
    assert mx.array_equal(layer(x), nn.QuantizedLinear.__call__(layer, x)).item()


@pytest.mark.parametrize("rows, bias", [(320, False), (300, True)])
def test_many_tokens_multiply_the_dequantized_matrix(monkeypatch, rows, bias):
    """A prefill's products on CUDA (forced here) use the dequantized matrix: MLX's own result, to rounding."""
    layer = Linear(128, rows, bias=bias)
    layer.weight = 0.1 * mx.random.normal(layer.weight.shape, key=mx.random.key(1))
    layer = layer.to_quantized(64, 4)
    monkeypatch.setattr(kernels, "on_cuda", lambda: True)
    few, many = (mx.random.normal((2, n, 128), key=mx.random.key(2)) for n in (100, 200))
    assert not layer.use_dequantized(few) and layer.use_dequantized(many)
    assert mx.allclose(layer(many), nn.QuantizedLinear.__call__(layer, many), atol=1e-5).item()
    monkeypatch.setattr(QuantizedLinear, "DEQUANT_MAX_BYTES", 2 * rows * 128 - 1)  # a matrix too large to copy
    assert not layer.use_dequantized(many)


def test_one_tile_of_k_avoids_mlx_cuda_quantized_matmul(monkeypatch):
    """MLX-CUDA 0.32.4 multiplies K = 64 (one tile of its kernels) wrongly: such products use the dequantized
    matrix there."""
    layer = Linear(64, 128, bias=False).to_quantized(64, 4)
    monkeypatch.setattr(kernels, "on_cuda", lambda: True)
    for tokens in (1, 5, 8):
        x = mx.random.normal((tokens, 64), key=mx.random.key(tokens))
        assert layer.use_dequantized(x)
        want = x @ mx.dequantize(layer.weight, layer.scales, layer.biases, 64, 4).T  # not MLX's product: on CUDA
        assert mx.allclose(layer(x), want, atol=1e-4).item()                        # that is the wrong one
    assert not Linear(128, 128, bias=False).to_quantized(64, 4).use_dequantized(mx.ones((8, 128)))


def test_expert_tiles_cover_each_experts_rows_in_whole_tiles():
    idx = mx.array([0] * 3 + [1] * 17 + [3] * 40 + [4], mx.int32)
    tile_end, start, count = qmm_cuda.expert_tiles(idx, 6, 16)
    assert count.tolist() == [3, 17, 0, 40, 1, 0]
    assert start.tolist() == [0, 3, 20, 20, 60, 61]
    assert tile_end.tolist() == [1, 3, 3, 6, 7, 7]  # 1 + 2 + 0 + 3 + 1 tiles; the grid's bound covers them
    assert tile_end[-1].item() <= -(-idx.size // 16) + 6
    default = qmm_cuda.expert_tiles(idx, 6)[0]  # the grouped product's own tile size for 61 rows
    assert default.tolist() == qmm_cuda.expert_tiles(idx, 6, qmm_cuda.group_shape(idx.size)[0])[0].tolist()


def test_grouped_product_shape_follows_its_rows():
    """A verify window's rows (tens) stream weights: small tiles, more stages; a prefill's fill the tensor cores."""
    assert qmm_cuda.group_shape(128) == (qmm_cuda.SMALL_TILE, qmm_cuda.SMALL_STAGES)
    assert qmm_cuda.group_shape(8192) == (qmm_cuda.GROUP_TILE, qmm_cuda.GROUP_STAGES)
    assert qmm_cuda.SMALL_TILE < qmm_cuda.GROUP_TILE


def test_interleave_pairs_x_as_the_codes_pair():
    """A 4-bit word's codes pair up as (c, c+4) and an 8-bit word's as (c, c+2): interleaved x lays each run out
    so that a pair is adjacent, which the grouped product then reads as one word."""
    x = mx.arange(2 * 16).reshape(2, 16)
    assert qmm_cuda.interleave(x, 4)[0].tolist() == [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15]
    assert qmm_cuda.interleave(x, 8)[1].tolist() == [16, 18, 17, 19, 20, 22, 21, 23, 24, 26, 25, 27, 28, 30, 29, 31]


def test_prefill_experts_take_interleaved_x_only_from_prefill_sizes(monkeypatch):
    """grouped_experts interleaves x for a prefill's rows (and asks the SwiGLU product for output the down product
    reads interleaved); a verify window's rows go in as they are. The scores go to the down product alone."""
    calls = []
    monkeypatch.setattr(qmm_cuda, "grouped_matmul", lambda layer, x, *a, **kw: calls.append(kw) or x)
    layer = type("Experts", (), {"bits": 4, "weight": mx.zeros((4, 8, 8))})()
    for rows in (128, qmm_cuda.INTERLEAVE_MIN_ROWS):
        calls.clear()
        sorted_rows = qmm_cuda.SortedRows(mx.zeros((rows,), mx.int32), mx.zeros((rows,), mx.int32), None)
        qmm_cuda.grouped_experts(layer, layer, mx.zeros((2, 16)), sorted_rows, mx.ones((rows // 4, 4)))
        on = rows >= qmm_cuda.INTERLEAVE_MIN_ROWS
        assert [(c["x_interleaved"], c.get("out_bits", 0)) for c in calls] == [(on, 4 if on else 0), (on, 0)]
        assert calls[0].get("row_scale") is None and calls[1]["row_scale"].shape == (rows,)


def test_many_rows_take_the_routing_kernels_and_grouped_product_with_their_contracts(monkeypatch):
    """Where the routing kernels and the grouped product may run, SparseMoE sends windows of many rows through
    them (fewer stay with the operations); stand-ins computing their contracts with operations give ops' output:
    the rows' tokens and (token, slot) places, the scores folded into the down product, the k rows summed with the
    shared expert and the residual."""
    block = moe_block(4)
    k, E = block.top_k, block.num_experts
    calls = []

    def route(logits, top_k, norm_topk, tile):
        indices = mx.argpartition(logits, kth=E - top_k, axis=-1)[:, E - top_k:]
        scores = mx.softmax(mx.take_along_axis(logits, indices, axis=-1), axis=-1, precise=True)
        flat = indices.flatten()
        order = mx.argsort(flat)
        calls.append((logits.shape[0], tile))
        rows = qmm_cuda.SortedRows(order // top_k, order, qmm_cuda.expert_tiles(flat[order], E, tile))
        return indices, scores.astype(mx.float32), rows

    def grouped_experts(gate_up, down, x, rows, scores):
        indices = mx.argpartition(block.gate(x), kth=E - k, axis=-1)[:, E - k:].flatten()[rows.slot]
        y = block.experts(x[rows.token], indices[:, None]).squeeze(1) * scores.flatten()[rows.slot][:, None]
        return mx.zeros_like(y).at[rows.slot].add(y)  # each sorted row to its (token, slot) place

    def combine(rows, top_k, shared=None, shared_logit=None, residual=None):
        calls.append(("combine", shared is not None, residual is not None))
        y = rows.reshape(-1, top_k, rows.shape[-1]).sum(axis=1)
        y = y if shared is None else y + mx.sigmoid(shared_logit) * shared
        return y if residual is None else residual + y

    monkeypatch.setattr(kernels, "ready", lambda name: name in ("qmm", "moe_grouped"))
    monkeypatch.setattr(qmm_cuda, "usable", lambda linear, x: False)  # the few-token matmul: not what is tested
    monkeypatch.setattr(moe_cuda, "route", route)
    monkeypatch.setattr(qmm_cuda, "grouped_experts", grouped_experts)
    monkeypatch.setattr(moe_cuda, "combine", combine)
    x = mx.random.normal((1, 40, block.hidden), key=mx.random.key(5)).astype(mx.bfloat16)
    residual = mx.ones_like(x)
    assert kernels.close(block(x, residual), residual + block.ops(x[0]), 2e-2)
    assert calls == [(40, qmm_cuda.group_shape(40 * k)[0]), ("combine", block.shared, True)]
    assert kernels.close(block(x), block.ops(x[0]), 2e-2)
    assert calls[-1] == ("combine", block.shared, False)
    calls.clear()
    block(x[:, :2])  # 2 tokens x 4 experts: below the sort threshold
    assert calls == []


def test_long_inputs_go_to_the_chunk_kernels_with_their_contract(monkeypatch):
    """Where the chunk kernels may run, gdn() hands them inputs past the token loop's length with a float32 state
    or None; a stand-in computing the contract with operations gives the token loop's result."""
    calls = []

    def stand_in(q, k, v, g, beta, state):
        calls.append((v.shape[1], None if state is None else (state.shape, state.dtype)))
        return gdn.gdn_chunked(q, k, v, g, beta, state)

    monkeypatch.setattr(kernels, "ready", lambda name: name == "gdn_chunked")
    monkeypatch.setattr(gdn_cuda, "chunked_cuda", stand_in)
    q, k, v, g, beta, state = gdn_cuda.random_inputs(1, 40, 2, 4, 128, 32, seed=3)
    for initial in (None, state.astype(mx.bfloat16)):
        out, final = gdn.gdn(q, k, v, g, beta, initial)
        want_out, want_final = gdn.gdn_recurrent(q, k, v, g, beta, initial)
        assert kernels.close(out, want_out, 1e-2) and kernels.close(final, want_final, 1e-2)
    assert calls == [(40, None), (40, ((1, 4, 128, 32), mx.float32))]
    gdn.gdn(q[:, :8], k[:, :8], v[:, :8], g[:, :8], beta[:, :8])  # a verify window: the token loop
    assert len(calls) == 2

def test_prefills_take_the_prefill_kernels_with_their_contracts(tiny, monkeypatch):
    """Where the prefill kernels may run, a prefill's GDN layers take their recurrence inputs from gdn_cuda.prep and
    their gated norm from gdn_cuda.gated_norm, both reading the input projection; short windows take neither.
    Stand-ins computing those contracts with operations give the same logits."""
    from test_engine import random_prompt

    model = tiny.model("moe")
    tokens = mx.array([random_prompt(40, seed=4)])
    want = model.forward(tokens, make_cache(model))
    calls = []

    def parts(layer, proj):
        return {name: layer.part(proj, name) for name in ("qkv", "z", "b", "a")}

    def prep(layer, carried, proj):
        calls.append(("prep", carried, proj.shape))
        p = parts(layer, proj)
        before = mx.zeros((1, layer.kernel - 1, layer.conv_dim), proj.dtype) if carried is None else carried
        conv_in = mx.concatenate([before, p["qkv"]], axis=1)
        return layer.recurrence_inputs(conv_in, p["b"], p["a"])

    def gated_norm(layer, o, proj):
        calls.append(("norm", o.shape, proj.shape))
        return layer.norm(o, parts(layer, proj)["z"].reshape(o.shape)).reshape(*o.shape[:2], -1)

    monkeypatch.setattr(kernels, "ready", lambda name: name == "gdn_prefill")
    monkeypatch.setattr(gdn_cuda, "prep", prep)
    monkeypatch.setattr(gdn_cuda, "gated_norm", gated_norm)
    monkeypatch.setattr(gdn_cuda, "prefill_usable", lambda layer: True)  # the real kernels need whole-warp heads
    got = model.forward(tokens, make_cache(model))
    layer = next(l.linear_attn for l in model.model.layers if "linear_attn" in l)
    proj = (1, 40, layer.in_proj[0].weight.shape[0])
    o = (1, 40, layer.Hv, layer.Dv)
    assert calls == [("prep", None, proj), ("norm", o, proj)] * model.layer_types.count("linear_attention")
    assert mx.array_equal(got, want).item()
    # in two parts: the second reads the conv inputs the first left in the cache (no [carried, qkv] was built)
    calls.clear()
    cache, longer = make_cache(model), mx.array([random_prompt(80, seed=5)])
    want = model.forward(longer, make_cache(model))
    model.forward(longer[:, :40], cache)
    assert kernels.close(model.forward(longer[:, 40:], cache), want[:, 40:], 1e-2)
    gdn_layers = model.layer_types.count("linear_attention")
    assert [c[1] is None for c in calls if c[0] == "prep"] == [True] * 2 * gdn_layers + [False] * gdn_layers
    monkeypatch.setattr(kernels, "ready", lambda name: False)  # the operations' conv state after the first part
    ops_cache = make_cache(model)
    model.forward(longer[:, :40], ops_cache)
    last_gdn = max(i for i, t in enumerate(model.layer_types) if t == "linear_attention")
    assert mx.array_equal(calls[-2][1], ops_cache[last_gdn].conv_state).item()
    monkeypatch.setattr(kernels, "ready", lambda name: name == "gdn_prefill")
    calls.clear()
    model.forward(tokens[:, :8], make_cache(model))  # a window of the token loop's length
    assert calls == []


def test_prefill_attention_takes_the_kernel_with_its_contract(tiny, monkeypatch):
    """Where the attention kernel may run, a prefill's attention layers hand it q [B, Hq, S, D] and the keys and
    values of all L positions so far (queries at the last S); a stand-in computing that contract with MLX's
    attention gives the same logits, from empty and after earlier positions; short windows keep MLX's."""
    from test_engine import random_prompt

    model = tiny.model("moe")
    tokens = mx.array([random_prompt(150, seed=6)])
    want = model.forward(tokens, make_cache(model))
    calls = []

    def attention(q, k, v, scale):
        calls.append((q.shape[2], k.shape[2]))
        S, L = q.shape[2], k.shape[2]
        mask = mx.arange(L)[None, :] <= (L - S + mx.arange(S))[:, None]
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(q.shape[0], S, -1)

    monkeypatch.setattr(kernels, "ready", lambda name: name == "attn_prefill")
    monkeypatch.setattr(attention_cuda, "attention", attention)
    real_usable = attention_cuda.usable
    monkeypatch.setattr(attention_cuda, "usable", lambda q, k: real_usable(q.astype(mx.bfloat16), k.astype(mx.bfloat16)))
    attention_layers = model.layer_types.count("full_attention")
    assert attention_layers > 0
    cache = make_cache(model)
    first, second = model.forward(tokens[:, :80], cache), model.forward(tokens[:, 80:], cache)
    assert calls == [(80, 80)] * attention_layers + [(70, 150)] * attention_layers
    assert kernels.close(mx.concatenate([first, second], axis=1), want, 1e-3)
    calls.clear()
    model.forward(tokens[:, :8], make_cache(model))  # a verify window's length
    assert calls == []
