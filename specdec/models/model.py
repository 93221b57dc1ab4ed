"""The decoder for every supported family, driven by ModelConfig.

Qwen3.5-MoE, Qwen3.5 (dense hybrid), Qwen3-Next, Qwen3 and Llama share one skeleton: pre-norm residual
blocks whose token mixer is gated attention or Gated DeltaNet and whose MLP is dense or sparse MoE.
What differs is read from the config, so there is one forward to test, not five.
Parameter names follow the Hugging Face checkpoints, so loading needs only a few renames.
"""

import mlx.core as mx
import mlx.nn as nn

from . import compiled, gdn_cuda, kernels
from .config import ModelConfig
from .gdn import RECURRENT_MAX_TOKENS, gdn
from .layers import MLP, Attention, Embedding, Linear, RMSNorm, SparseMoE

def l2norm(x, eps=1e-6):
    return x * mx.rsqrt((x * x).sum(axis=-1, keepdims=True) + eps)


class GatedRMSNorm(nn.Module):
    """rmsnorm(o) * weight * silu(z): the GDN output norm (its weight is not zero-centred)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x, gate):
        y = mx.fast.rms_norm(x, self.weight, self.eps).astype(mx.float32) * nn.silu(gate.astype(mx.float32))
        return y.astype(x.dtype)


class DepthwiseConv(nn.Module):
    """Causal depthwise conv1d over [carried inputs, new inputs]; weight [channels, kernel]."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, kernel))

    def __call__(self, x):  # x [B, kernel-1+S, C] -> [B, S, C]
        K = self.weight.shape[1]
        S = x.shape[1] - (K - 1)
        out = x[:, :S] * self.weight[:, 0]
        for j in range(1, K):
            out = out + x[:, j : j + S] * self.weight[:, j]
        return out


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.Hk, self.Hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.Dk, self.Dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        self.key_dim, self.value_dim = self.Hk * self.Dk, self.Hv * self.Dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.kernel = cfg.linear_conv_kernel_dim
        self.part_sizes = {"qkv": self.conv_dim, "z": self.value_dim, "b": self.Hv, "a": self.Hv}
        # One Linear per group of parts (`ModelConfig.in_proj_groups`): all four fused unless a
        # checkpoint quantizes them with different bits.
        self.groups = [tuple(g) for g in cfg.in_proj_groups]
        self.offsets = {}  # where each part starts in its group's output
        for group in self.groups:
            at = 0
            for p in group:
                self.offsets[p] = at
                at += self.part_sizes[p]
        self.in_proj = [
            Linear(cfg.hidden_size, sum(self.part_sizes[p] for p in g), bias=False) for g in self.groups
        ]
        self.conv1d = DepthwiseConv(self.conv_dim, self.kernel)
        self.dt_bias = mx.ones((self.Hv,))
        self.A_log = mx.zeros((self.Hv,))
        self.norm = GatedRMSNorm(self.Dv, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, cfg.hidden_size, bias=False)

    def part(self, proj, name):
        """Part `name` of the input projection's output where it is one Linear's (the kernels read it so)."""
        at = self.offsets[name]
        return proj[..., at : at + self.part_sizes[name]]

    def project(self, x):
        parts = {}
        for group, proj in zip(self.groups, self.in_proj):
            cuts = [self.offsets[p] for p in group[1:]]
            parts.update(zip(group, mx.split(proj(x), cuts, axis=-1)))
        return parts["qkv"], parts["z"], parts["b"], parts["a"]

    def __call__(self, x, cache=None):
        B, S, _ = x.shape
        state = cache.state if cache is not None else None
        keep_states = cache is not None and cache.wants_states
        keep_tape = cache is not None and cache.wants_tape
        short = S <= RECURRENT_MAX_TOKENS
        conv_state = None  # the new conv state, where no conv_in is built
        if short and kernels.ready("gdn_mixer") and gdn_cuda.mixer_usable(self):
            proj = self.in_proj[0](x)
            conv_in = self.conv_input(cache, self.part(proj, "qkv"))
            if state is None:
                state = mx.zeros((B, self.Hv, self.Dk, self.Dv), mx.float32)
            out, final, states, tape = gdn_cuda.mixer(self, conv_in, proj, state, keep_states, keep_tape)
        elif not (short or keep_states) and kernels.ready("gdn_prefill") and gdn_cuda.prefill_usable(self):
            # a prefill: the recurrence inputs and the gated norm each one kernel, the chunked recurrence between;
            # prep reads the conv inputs where they are, so [carried, qkv] is built only for a window's commit
            proj = self.in_proj[0](x)
            qkv = self.part(proj, "qkv")
            q, k, v, g, beta = gdn_cuda.prep(self, cache.conv_state if cache is not None else None, proj)
            out, final = gdn(q, k, v, g, beta, state)
            out, tape, states = gdn_cuda.gated_norm(self, out, proj), (k, v, g, beta), None
            conv_in = self.conv_input(cache, qkv) if keep_tape else None
            # a copy of the last rows, so that the cache does not hold the whole projection alive
            conv_state = mx.contiguous(qkv[:, S - (self.kernel - 1) :])
        else:
            qkv, z, b, a = self.project(x)
            conv_in = self.conv_input(cache, qkv)
            out, final, tape, states = self.mixer_ops(conv_in, z, b, a, state, keep_states)
        if cache is not None:
            cache.advance(conv_in, final, S, tape, states, conv_state)
        return self.out_proj(out)

    def conv_input(self, cache, qkv):
        """[the conv inputs carried from before, this window's qkv]: what the causal conv reads."""
        carried = cache.conv_state if cache is not None else None
        if carried is None:
            carried = mx.zeros((qkv.shape[0], self.kernel - 1, self.conv_dim), dtype=qkv.dtype)
        return mx.concatenate([carried, qkv], axis=1)

    def mixer_ops(self, conv_in, z, b, a, state, keep_states):
        """Conv, gates, recurrence and gated norm as MLX operations -> (out [B, S, value_dim], final state,
        recurrence inputs (k, v, g, beta) for a replay commit, per-step states or None)."""
        B, S = z.shape[:2]
        q, k, v, g, beta = self.recurrence_inputs(conv_in, b, a)
        out, final, *states = gdn(q, k, v, g, beta, state, return_states=keep_states)
        out = self.norm(out, z.reshape(B, S, self.Hv, self.Dv))
        return out.reshape(B, S, -1), final, (k, v, g, beta), (states[0] if states else None)

    def recurrence_inputs(self, conv_in, b, a):
        """Conv + silu, l2-normed q (scaled) and k in float32, v, and the gates g and beta in float32."""
        B, S = b.shape[:2]
        mixed = nn.silu(self.conv1d(conv_in))
        q, k, v = mx.split(mixed, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = l2norm(q.reshape(B, S, self.Hk, self.Dk).astype(mx.float32)) * self.Dk**-0.5
        k = l2norm(k.reshape(B, S, self.Hk, self.Dk).astype(mx.float32))
        v = v.reshape(B, S, self.Hv, self.Dv)
        beta = mx.sigmoid(b.astype(mx.float32))
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + self.dt_bias)
        return q, k, v, g, beta


_CHECK_CONFIG = ModelConfig(model_type="qwen3_5_moe", vocab_size=16, hidden_size=64, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=1, head_dim=32, linear_num_key_heads=2,
                            linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32)


def _check_layer():
    """A small random bfloat16 GDN layer shaped like the real ones (_CHECK_CONFIG), for the kernels' self-checks."""
    layer = GatedDeltaNet(_CHECK_CONFIG)
    keys = iter(mx.random.split(mx.random.key(0), 16))
    rnd = lambda shape, scale: scale * mx.random.normal(shape, key=next(keys))
    layer.in_proj[0].weight = rnd(layer.in_proj[0].weight.shape, 0.2)
    layer.conv1d.weight = rnd(layer.conv1d.weight.shape, 0.5)
    layer.dt_bias, layer.A_log = rnd((layer.Hv,), 1.0), mx.log(mx.random.uniform(1, 16, (layer.Hv,), key=next(keys)))
    layer.norm.weight = 1 + rnd((layer.Dv,), 0.1)
    layer.set_dtype(mx.bfloat16)
    layer.A_log = layer.A_log.astype(mx.float32)
    return layer


def _mixer_self_check() -> bool:
    """The fused mixer against mixer_ops on the self-check layer."""
    layer = _check_layer()
    x = mx.random.normal((1, 3, _CHECK_CONFIG.hidden_size), key=mx.random.key(1)).astype(mx.bfloat16)
    state = 0.3 * mx.random.normal((1, layer.Hv, layer.Dk, layer.Dv), key=mx.random.key(3))
    proj = layer.in_proj[0](x)
    qkv, z, b, a = layer.project(x)
    conv_in = layer.conv_input(None, qkv)
    want = layer.mixer_ops(conv_in, z, b, a, state, True)
    got = gdn_cuda.mixer(layer, conv_in, proj, state, True, True)
    close = kernels.close
    return (close(got[0], want[0], 5e-2) and close(got[1], want[1], 1e-2) and close(got[2], want[3], 1e-2)
            and all(close(u, w, 5e-2) for u, w in zip(got[3], want[2])))


def _prefill_self_check() -> bool:
    """A prefill's kernels against the operations on the self-check layer, 40 tokens: the recurrence inputs (prep)
    against recurrence_inputs, with no conv inputs carried and with some, the gated norm against GatedRMSNorm."""
    layer = _check_layer()
    x = mx.random.normal((1, 40, _CHECK_CONFIG.hidden_size), key=mx.random.key(2)).astype(mx.bfloat16)
    carried = mx.random.normal((1, layer.kernel - 1, layer.conv_dim), key=mx.random.key(5)).astype(mx.bfloat16)
    proj = layer.in_proj[0](x)
    qkv, z, b, a = layer.project(x)
    for before in (None, carried):
        conv_in = mx.concatenate([mx.zeros_like(carried) if before is None else before, qkv], axis=1)
        got, want = gdn_cuda.prep(layer, before, proj), layer.recurrence_inputs(conv_in, b, a)
        if not all(kernels.close(u, w, 1e-2) for u, w in zip(got, want)):
            return False
    o = mx.random.normal((1, 40, layer.Hv, layer.Dv), key=mx.random.key(4)).astype(mx.bfloat16)
    normed = layer.norm(o, z.reshape(o.shape)).reshape(1, 40, -1)
    return kernels.close(gdn_cuda.gated_norm(layer, o, proj), normed, 1e-2)


# On MLX's CUDA backend, after a self-check against the operations (see kernels.py), decode and verify windows
# run the GDN mixer as one kernel (gdn_cuda.mixer), and prefills compute the recurrence inputs in one (prep) and
# the gated norm in one (gated_norm).
kernels.register("gdn_mixer", _mixer_self_check)
kernels.register("gdn_prefill", _prefill_self_check)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, i: int):
        super().__init__()
        if cfg.layer_types[i] == "linear_attention":
            self.linear_attn = GatedDeltaNet(cfg)
        else:
            self.self_attn = Attention(cfg)
        if cfg.is_moe_layer(i):
            self.mlp = SparseMoE(cfg)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, x, cache=None):
        mixer = self.linear_attn if "linear_attn" in self else self.self_attn
        h = x + mixer(self.input_layernorm(x), cache)
        return self.mlp(self.post_attention_layernorm(h), residual=h)


# A prefill's graph takes milliseconds of Python to build (2.8 ms for 1023 tokens of the 8-layer Qwen3.5 bench
# on an H100, against 12.9 ms on the device). Handed to the device layer by layer, it runs while the host builds
# the rest. Compiled steps (at most compiled.MAX_TOKENS tokens) stay below this: no evaluation inside a trace.
PIPELINE_MIN_TOKENS = 64


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, tokens, cache=None):
        h = self.embed_tokens(tokens)
        pipelined = tokens.shape[1] >= PIPELINE_MIN_TOKENS
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None)
            if pipelined:
                mx.async_eval(h)
        return h  # before the final norm


class Model(nn.Module):
    """tokens [B, S] -> logits [B, S, V]; with return_hidden also the last hidden states (for MTP)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._steps = compiled.CompiledSteps(self)

    def logits(self, h):
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def __call__(self, tokens, cache=None, return_hidden=False, last_only=False):
        """Decode and verify steps on a filled cache run as compiled graphs where that pays (see compiled.py).
        `last_only`: the logits of the last position alone [B, 1, V]: a prefill's, which runs eagerly."""
        if not last_only and cache is not None and compiled.enabled() and self._steps.accepts(tokens, cache):
            return self._steps(tokens, cache, return_hidden)
        return self.forward(tokens, cache, return_hidden, last_only)

    # A compiled step holds the weights it was traced with, so changing them through the root module (loading,
    # quantizing, casting) drops the traces. Assigning arrays to submodules directly does not: call
    # `model.reset_compiled_steps()` after that.
    def update(self, parameters: dict, strict: bool = True):
        self.reset_compiled_steps()
        return super().update(parameters, strict)

    def update_modules(self, modules: dict, strict: bool = True):
        self.reset_compiled_steps()
        return super().update_modules(modules, strict)

    def set_dtype(self, dtype, *args, **kwargs):
        self.reset_compiled_steps()
        return super().set_dtype(dtype, *args, **kwargs)

    def reset_compiled_steps(self):
        if "_steps" in self.__dict__:
            self._steps.reset()

    def forward(self, tokens, cache=None, return_hidden=False, last_only=False):
        h = self.model(tokens, cache)
        normed = self.model.norm(h[:, -1:] if last_only else h)
        logits = self.logits(normed)
        return (logits, h) if return_hidden else logits

    @property
    def layer_types(self):
        return self.config.layer_types
