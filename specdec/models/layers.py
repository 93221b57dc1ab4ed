"""Layers shared by every architecture: norm, RoPE, attention, MLP, and the fused sparse MoE."""

import math

import mlx.core as mx
import mlx.nn as nn

from . import attention_cuda, kernels, moe_cuda, qmm_cuda
from .config import ModelConfig


class QuantizedLinear(nn.QuantizedLinear):
    """MLX's quantized linear map. On CUDA a window of a few tokens runs through the tensor-core kernel
    (qmm_cuda.py), which reads the weights once rather than once per token, and some products through the
    dequantized matrix (below)."""

    # On CUDA some products run as the dequantized bfloat16 matrix times x:
    # - a prefill's (hundreds of tokens): on an H100 that is 2.2-2.8x faster than MLX-CUDA's quantized matmul
    #   from 1024 tokens on (in_proj at 1024 tokens: 0.20 vs 0.44 ms), level at 256, and it takes any output
    #   size (MLX's tiled kernel only multiples of 128). The bfloat16 copy is transient; matrices whose copy
    #   would pass DEQUANT_MAX_BYTES (the output head) stay.
    # - those whose K is a single tile of MLX's kernels (K <= max(64, group size)): MLX-CUDA 0.32.4 returns
    #   wrong products there (errors the size of the outputs, at times NaN), measured for K = 64 with 5 to 300
    #   tokens and 64 to 2048 outputs (1 token was right), while K = 128 and more agree with float32
    #   arithmetic. Only small models have such matrices (a 64-wide shared expert's down_proj), so all their
    #   products take this path.
    DEQUANT_MIN_TOKENS, DEQUANT_MAX_BYTES = 256, 256 * 2**20

    def __call__(self, x):
        if qmm_cuda.usable(self, x) and kernels.ready("qmm"):
            return qmm_cuda.matmul(self, x)
        if self.use_dequantized(x):
            if kernels.ready("qmm") and qmm_cuda.dequantize_usable(self):
                w = qmm_cuda.dequantize(self)
            else:
                w = mx.dequantize(self.weight, self.scales, self.get("biases"), self.group_size, self.bits,
                                  mode=self.mode)
            y = x @ w.T
            return y + self.bias if "bias" in self else y
        return super().__call__(x)

    def use_dequantized(self, x) -> bool:
        rows, cols = self.weight.shape[0], x.shape[-1]
        tokens = x.size // cols
        prefill = tokens >= self.DEQUANT_MIN_TOKENS and 2 * rows * cols <= self.DEQUANT_MAX_BYTES
        one_tile = cols <= max(64, self.group_size)
        return (prefill or one_tile) and self.mode == "affine" and kernels.on_cuda()


class Linear(nn.Linear):
    """nn.Linear whose quantized form is the QuantizedLinear above."""

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedLinear.from_linear(self, group_size, bits, mode)


class QuantizedEmbedding(nn.QuantizedEmbedding):
    """MLX's quantized embedding, its rows taken through the flattened tokens. MLX indexes the packed weights,
    scales and biases with the [B, S] tokens themselves: on an H100 (MLX-CUDA 0.32.4) that lookup took 140-158
    us against 51-56 us this way (1 and 1024 tokens); in the 8-layer Qwen3.5 bench, same process, taking turns,
    medians of S=1 / S=5 steps and 1024-token prefills 2.47 / 3.22 / 11.4 ms against 2.40 / 3.08 / 11.0."""

    def __call__(self, x):
        flat = x.reshape(-1)
        rows = lambda a: None if a is None else mx.take(a, flat, axis=0)
        out = mx.dequantize(rows(self["weight"]), rows(self["scales"]), rows(self.get("biases")),
                            group_size=self.group_size, bits=self.bits, mode=self.mode)
        return out.reshape(*x.shape, -1)


class Embedding(nn.Embedding):
    """nn.Embedding whose quantized form is the QuantizedEmbedding above."""

    def to_quantized(self, group_size: int = None, bits: int = None, mode: str = "affine", **_):
        return QuantizedEmbedding.from_embedding(self, group_size, bits, mode)


class RMSNorm(nn.Module):
    """y = x / rms(x) * weight. Zero-centred checkpoints (1 + w) are folded to this form at load."""

    def __init__(self, dims: int, eps: float = 1e-6):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, self.weight, self.eps).astype(x.dtype)  # the weight may be float32


class RoPE(nn.Module):
    """Rotary embedding on the first `dims` of each head (rotate-half convention, as in HF)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dims = int(cfg.head_dim * cfg.partial_rotary_factor)
        self.base = cfg.rope_theta
        self._freqs = None
        if cfg.rope_scaling:  # llama3 frequency-dependent scaling
            s = cfg.rope_scaling
            factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
            old_ctx = s["original_max_position_embeddings"]
            inv = self.base ** (-mx.arange(0, self.dims, 2, dtype=mx.float32) / self.dims)
            wavelen = 2 * math.pi / inv
            smooth = (old_ctx / wavelen - low) / (high - low)
            scaled = mx.where(wavelen > old_ctx / low, inv / factor, inv)
            mid = (wavelen <= old_ctx / low) & (wavelen >= old_ctx / high)
            scaled = mx.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
            self._freqs = 1.0 / scaled  # mx.fast.rope takes periods

    def __call__(self, x, offset: int):
        if self._freqs is not None:
            return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0, offset=offset, freqs=self._freqs)
        return mx.fast.rope(x, self.dims, traditional=False, base=self.base, scale=1.0, offset=offset)


class Attention(nn.Module):
    """Causal GQA attention with optional per-head q/k norms and (Qwen3.5/Next) a sigmoid output gate."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.gated = cfg.gated_attention
        bias = cfg.attention_bias
        q_out = self.n_heads * self.head_dim * (2 if self.gated else 1)
        self.q_proj = Linear(cfg.hidden_size, q_out, bias=bias)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.rope = RoPE(cfg)
        self.scale = self.head_dim**-0.5

    def __call__(self, x, cache=None):
        B, S, _ = x.shape
        q = self.q_proj(x)
        if self.gated:  # per head: [query (D) | gate (D)]
            q, gate = mx.split(q.reshape(B, S, self.n_heads, 2 * self.head_dim), 2, axis=-1)
            gate = gate.reshape(B, S, -1)
        else:
            q = q.reshape(B, S, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(B, S, self.n_kv, self.head_dim)
        v = self.v_proj(x).reshape(B, S, self.n_kv, self.head_dim)
        if "q_norm" in self:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset), self.rope(k, offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if attention_cuda.usable(q, k) and kernels.ready("attn_prefill"):  # a prefill's: one kernel, no scores kept
            out = attention_cuda.attention(q, k, v, self.scale)
        else:
            mask = cache.mask(S) if cache is not None else ("causal" if S > 1 else None)
            out = mx.fast.scaled_dot_product_attention(q, k, v, scale=self.scale, mask=mask)
            out = out.transpose(0, 2, 1, 3).reshape(B, S, -1)
        if self.gated:
            out = out * mx.sigmoid(gate)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, dims: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = Linear(dims, hidden, bias=bias)
        self.up_proj = Linear(dims, hidden, bias=bias)
        self.down_proj = Linear(hidden, dims, bias=bias)

    def __call__(self, x, residual=None):
        y = self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))
        return y if residual is None else residual + y


class ExpertLinear(nn.Module):
    """E stacked linear maps [E, out, in]; each token row is multiplied by the expert its index names."""

    def __init__(self, num_experts: int, in_dims: int, out_dims: int):
        super().__init__()
        scale = in_dims**-0.5
        self.weight = mx.random.uniform(-scale, scale, (num_experts, out_dims, in_dims))

    def __call__(self, x, indices, sorted_indices=False):
        w = self.weight
        if w.dtype != mx.float32 and mx.default_device() == mx.cpu:  # MLX's CPU gather_mm is float32-only
            y = mx.gather_mm(x.astype(mx.float32), w.astype(mx.float32).swapaxes(-1, -2), rhs_indices=indices,
                             sorted_indices=sorted_indices)
            return y.astype(x.dtype)
        # MLX-CUDA 0.32.4's gather_mm with sorted_indices=True returns wrong products (errors of the order of the
        # outputs, float32 and bfloat16 alike; scripts/check_kernels.py checks it). The rows are sorted either
        # way; without the hint the result is right.
        sorted_hint = sorted_indices and not kernels.on_cuda()
        return mx.gather_mm(x, w.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=sorted_hint)

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine", **_):
        return QuantizedExpertLinear.from_float(self, group_size, bits, mode)


class QuantizedExpertLinear(nn.Module):
    def __init__(self, num_experts: int, in_dims: int, out_dims: int, group_size=64, bits=4, mode="affine"):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        w = mx.zeros((num_experts, out_dims, in_dims))
        self.weight, self.scales, *biases = mx.quantize(w, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        self.freeze()

    @classmethod
    def from_float(cls, layer: ExpertLinear, group_size, bits, mode):
        E, out_dims, in_dims = layer.weight.shape
        q = cls(E, in_dims, out_dims, group_size, bits, mode)
        q.weight, q.scales, *biases = mx.quantize(layer.weight, group_size, bits, mode=mode)
        if biases:
            q.biases = biases[0]
        return q

    def __call__(self, x, indices, sorted_indices=False):
        return mx.gather_qmm(
            x, self.weight, self.scales, self.get("biases"), rhs_indices=indices, transpose=True,
            group_size=self.group_size, bits=self.bits, mode=self.mode, sorted_indices=sorted_indices,
        )


# Below this many (token, expert) pairs, gathering in token order is cheaper than sorting first. Measured
# on a 2-core CPU, and on an H100 with MLX-CUDA (8-layer Qwen3.5-35B-A3B bench, top-8): sorting from 16 pairs
# made 2- and 3-token windows 0.3-0.4 ms slower and 4- to 6-token windows 0.3 ms faster.
SORT_THRESHOLD = 64
SORT_THRESHOLD_GPU = 32


def sort_threshold() -> int:
    return SORT_THRESHOLD if mx.default_device() == mx.cpu else SORT_THRESHOLD_GPU


class Experts(nn.Module):
    """SwiGLU experts with gate and up fused into one [E, 2I, H] tensor: two gather matmuls per layer."""

    def __init__(self, num_experts: int, dims: int, hidden: int):
        super().__init__()
        self.gate_up = ExpertLinear(num_experts, dims, 2 * hidden)
        self.down = ExpertLinear(num_experts, hidden, dims)

    def __call__(self, x, indices):
        # x [N, H], indices [N, k] -> [N, k, H]
        N, k = indices.shape
        if indices.size < sort_threshold():
            gate, up = mx.split(self.gate_up(x[:, None, None, :], indices), 2, axis=-1)
            return self.down(nn.silu(gate) * up, indices).squeeze(-2)
        # group rows by expert so each expert's weights are read once, contiguously
        flat = indices.flatten()
        order = mx.argsort(flat)
        idx = flat[order]
        matmul = lambda layer, a: layer(a[:, None, :], idx, True).squeeze(-2)
        gate, up = mx.split(matmul(self.gate_up, x[order // k]), 2, axis=-1)
        y = matmul(self.down, nn.silu(gate) * up)
        return y[mx.argsort(order)].reshape(N, k, -1)


class SparseMoE(nn.Module):
    """Top-k routed experts plus a sigmoid-gated shared expert (Qwen2/3-MoE family)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.num_experts, self.hidden = cfg.num_experts, cfg.hidden_size
        self.intermediate = cfg.moe_intermediate_size
        self.shared_intermediate = cfg.shared_expert_intermediate_size or 0
        self.shared = bool(self.shared_intermediate)
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        if self.shared:
            self.shared_expert = MLP(cfg.hidden_size, self.shared_intermediate)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)

    def __call__(self, x, residual=None):
        """x [..., H] -> the block's output, plus `residual` if given (the kernels fold that add in)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        flat_residual = None if residual is None else residual.reshape(x.shape)
        if x.shape[0] <= moe_cuda.MAX_TOKENS and kernels.ready("moe") and moe_cuda.usable(self, x):
            return moe_cuda.moe(self, x, flat_residual).reshape(shape)
        if self.grouped_usable(x):
            return self.grouped(x, flat_residual).reshape(shape)
        y = self.ops(x).reshape(shape)
        return y if residual is None else residual + y

    def grouped_usable(self, x) -> bool:
        """On CUDA, quantized experts of many rows (a prefill's, a long verify window's) run through the routing
        kernels (moe_cuda.route) and the grouped product (qmm_cuda.grouped_matmul)."""
        gate_up, down = (getattr(self.experts, name, None) for name in ("gate_up", "down"))
        return (x.shape[0] * self.top_k >= sort_threshold() and isinstance(gate_up, QuantizedExpertLinear)
                and qmm_cuda.formats_ok(gate_up, x) and qmm_cuda.formats_ok(down, x) and moe_cuda.combine_usable(x)
                and self.num_experts <= moe_cuda.MAX_EXPERTS and kernels.ready("qmm") and kernels.ready("moe_grouped"))

    def grouped(self, x, residual=None):
        """`ops` (plus `residual`) for `grouped_usable` x [N, H]: the rows sorted by expert in two launches, the
        experts in two (their scores folded into the down product), then in one the sum of each token's k weighted
        rows, the gated shared expert and the residual."""
        N, H = x.shape
        tile = qmm_cuda.group_shape(N * self.top_k)[0]
        _, scores, rows = moe_cuda.route(self.gate(x), self.top_k, self.norm_topk_prob, tile)
        y = qmm_cuda.grouped_experts(self.experts.gate_up, self.experts.down, x, rows, scores)
        shared, logit = (self.shared_expert(x), self.shared_expert_gate(x)) if self.shared else (None, None)
        return moe_cuda.combine(y, self.top_k, shared, logit, residual)

    def ops(self, x):
        """x [N, H] -> [N, H] as MLX operations."""
        logits = self.gate(x)  # in the model's dtype: casting it first would cost a launch and change no order
        E, k = logits.shape[-1], self.top_k
        # The k largest router logits are the k largest probabilities. Renormalised over those k, the
        # probabilities are the softmax of their logits (the full softmax's denominator cancels).
        indices = mx.argpartition(logits, kth=E - k, axis=-1)[:, E - k :]
        if logits.shape[0] == 1:  # decode: a plain take (take_along_axis builds index grids, two more launches)
            top = mx.take(logits, indices[0], axis=-1)
        else:
            top = mx.take_along_axis(logits, indices, axis=-1)
        if self.norm_topk_prob:
            scores = mx.softmax(top, axis=-1, precise=True)  # computed in float32, rounded once
        else:
            f32 = lambda a: a.astype(mx.float32)
            scores = mx.exp(f32(top) - mx.logsumexp(f32(logits), axis=-1, keepdims=True)).astype(x.dtype)
        # the score-weighted sum of the k expert outputs, as one batched [1, k] @ [k, H] product per token
        y = (scores[:, None, :] @ self.experts(x, indices)).squeeze(-2)
        if self.shared:
            y = y + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return y


def _moe_self_check() -> bool:
    """The kernels on a small random 4-bit bfloat16 block (8-bit router and shared gate, as mlx-community
    checkpoints quantize them) against its float32 arithmetic (moe_cuda.reference), and the residual add."""
    cfg = ModelConfig(model_type="qwen3_5_moe", vocab_size=16, hidden_size=1024, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=32, num_experts=16,
                      num_experts_per_tok=4, moe_intermediate_size=64, shared_expert_intermediate_size=64)
    block = SparseMoE(cfg)
    block.set_dtype(mx.bfloat16)
    nn.quantize(block, 64, 8, class_predicate=lambda path, m: path in ("gate", "shared_expert_gate"))
    nn.quantize(block, 64, 4, class_predicate=lambda path, m: hasattr(m, "to_quantized"))
    x, residual = mx.random.normal((2, 4, cfg.hidden_size), key=mx.random.key(1)).astype(mx.bfloat16)
    if not moe_cuda.usable(block, x):
        raise ValueError("the self-check block is not one the kernels read")
    found = moe_cuda.compare(block, x)
    summed = moe_cuda.moe(block, x, residual)
    residual_exact = mx.array_equal(summed, residual + moe_cuda.moe(block, x)).item()
    if not (found["top_k"] and found["error"] <= 2e-2 and residual_exact):
        raise ValueError(f"kernels vs float32 reference: {found}")
    return True


# On MLX's CUDA backend, after a self-check against `SparseMoE.ops` (see kernels.py), windows of up to
# moe_cuda.MAX_TOKENS tokens run the block as two kernels (moe_cuda.py).
kernels.register("moe", _moe_self_check)


def _qmm_self_check() -> bool:
    """The tensor-core matmul against float32 arithmetic on dequantized weights: 4- and 8-bit, 3 and 11 tokens,
    a K split between warps (few rows) and none (many); the dequantized matrix against MLX's; and the grouped
    form, 4- and 8-bit, rows sorted over uneven experts, plain, through row indices, scaled, with the SwiGLU of
    gate and up, and with x interleaved as a prefill passes it."""
    keys = iter(mx.random.split(mx.random.key(2), 16))
    for bits, rows, tokens, split in ((4, 96, 3, 1), (8, 40, 11, None), (4, 4096, 5, 2)):
        linear = Linear(1024, rows, bias=False)
        linear.weight = (0.05 * mx.random.normal(linear.weight.shape, key=next(keys))).astype(mx.bfloat16)
        linear = linear.to_quantized(64, bits)
        x = mx.random.normal((tokens, 1024), key=next(keys)).astype(mx.bfloat16)
        want = x.astype(mx.float32) @ mx.dequantize(linear.weight, linear.scales, linear.biases, 64, bits).T
        got = qmm_cuda.matmul(linear, x, split)
        if not kernels.close(got, want, 1e-2):
            error = mx.abs(got.astype(mx.float32) - want).max().item()
            raise ValueError(f"{bits}-bit, {rows} rows, {tokens} tokens: max error {error:.3g} "
                             f"of {mx.abs(want).max().item():.3g}")
        dequantized = mx.dequantize(linear.weight, linear.scales, linear.biases, 64, bits)
        if not kernels.close(qmm_cuda.dequantize(linear), dequantized, 1e-2):
            raise ValueError(f"{bits}-bit dequantized matrix differs from MLX's")
    idx = mx.array([0] * 3 + [1] * 17 + [3] * 41 + [4], mx.int32)  # 1, 2, 3 small tiles (2 prefill ones); no expert 2
    x = mx.random.normal((idx.size, 1024), key=next(keys)).astype(mx.bfloat16)
    shuffle = mx.random.permutation(idx.size, key=next(keys)).astype(mx.uint32)
    spread = mx.zeros_like(x).at[shuffle].add(x)  # spread[shuffle[i]] = x[i]
    row_scale = mx.random.uniform(shape=(idx.size,), key=next(keys))
    small, prefill = qmm_cuda.group_shape(idx.size), qmm_cuda.group_shape(qmm_cuda.SMALL_ROWS)
    tiles, prefill_tiles = (qmm_cuda.expert_tiles(idx, 5, shape[0]) for shape in (small, prefill))
    for bits in (4, 8):
        experts = ExpertLinear(5, 1024, 96)
        experts.weight = (0.05 * mx.random.normal(experts.weight.shape, key=next(keys))).astype(mx.bfloat16)
        experts = experts.to_quantized(64, bits)
        w = mx.dequantize(experts.weight, experts.scales, experts.biases, 64, bits).astype(mx.float32)
        want = (x.astype(mx.float32)[:, None, :] @ w[idx].swapaxes(-1, -2)).squeeze(1)
        gate, up = mx.split(want, 2, axis=-1)
        swiglu = gate * mx.sigmoid(gate) * up
        interleaved = dict(shape=prefill, x_interleaved=True)  # a prefill's form
        product = lambda *a, **kw: qmm_cuda.grouped_matmul(experts, *a, **kw)
        found = {
            "grouped": (product(x, tiles), want),
            "a prefill's tiles": (product(x, prefill_tiles, shape=prefill), want),
            # the same rows read from a shuffled x and written to shuffled places, scaled there
            "rows through indices": (product(spread, tiles, x_rows=shuffle, out_rows=shuffle)[shuffle], want),
            "scaled": (product(x, tiles, out_rows=shuffle, row_scale=row_scale)[shuffle],
                       want * row_scale[shuffle][:, None]),
            "SwiGLU": (product(x, tiles, swiglu=True), swiglu),
            "x interleaved": (product(qmm_cuda.interleave(x, bits), prefill_tiles, **interleaved), want),
            # and the SwiGLU's output interleaved for a down product of the same bits
            "SwiGLU interleaved": (product(qmm_cuda.interleave(x, bits), prefill_tiles, swiglu=True, out_bits=bits,
                                           **interleaved), qmm_cuda.interleave(swiglu, bits)),
        }
        for name, (got, expected) in found.items():
            if not kernels.close(got, expected, 1e-2):
                error = mx.abs(got.astype(mx.float32) - expected).max().item()
                raise ValueError(f"{bits}-bit grouped product, {name}: max error {error:.3g}")
    return True


kernels.register("qmm", _qmm_self_check)
# A prefill's causal attention (Attention), after a self-check against MLX's.
kernels.register("attn_prefill", attention_cuda.self_check)
# Many tokens' routing and the block's final sums (SparseMoE.grouped), after a self-check against the operations.
kernels.register("moe_grouped", moe_cuda.grouped_self_check)
