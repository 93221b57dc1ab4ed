"""The decoder for every supported family, driven by ModelConfig.

Qwen3.5-MoE, Qwen3.5 (dense hybrid), Qwen3-Next, Qwen3 and Llama share one skeleton: pre-norm residual
blocks whose token mixer is gated attention or Gated DeltaNet and whose MLP is dense or sparse MoE.
What differs is read from the config, so there is one forward to test, not five.
Parameter names follow the Hugging Face checkpoints, so loading needs only a few renames.
"""

import mlx.core as mx
import mlx.nn as nn

from . import compiled
from .config import ModelConfig
from .gdn import gdn
from .layers import MLP, Attention, RMSNorm, SparseMoE

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
        self.in_proj = [
            nn.Linear(cfg.hidden_size, sum(self.part_sizes[p] for p in g), bias=False) for g in self.groups
        ]
        self.conv1d = DepthwiseConv(self.conv_dim, self.kernel)
        self.dt_bias = mx.ones((self.Hv,))
        self.A_log = mx.zeros((self.Hv,))
        self.norm = GatedRMSNorm(self.Dv, cfg.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, cfg.hidden_size, bias=False)

    def project(self, x):
        parts = {}
        for group, proj in zip(self.groups, self.in_proj):
            y = proj(x)
            cuts, at = [], 0
            for p in group[:-1]:
                at += self.part_sizes[p]
                cuts.append(at)
            parts.update(zip(group, mx.split(y, cuts, axis=-1)))
        return parts["qkv"], parts["z"], parts["b"], parts["a"]

    def __call__(self, x, cache=None):
        B, S, _ = x.shape
        qkv, z, b, a = self.project(x)
        carried = cache.conv_state if cache is not None else None
        if carried is None:
            carried = mx.zeros((B, self.kernel - 1, self.conv_dim), dtype=qkv.dtype)
        conv_in = mx.concatenate([carried, qkv], axis=1)
        mixed = nn.silu(self.conv1d(conv_in))
        q, k, v = mx.split(mixed, [self.key_dim, 2 * self.key_dim], axis=-1)
        q = l2norm(q.reshape(B, S, self.Hk, self.Dk).astype(mx.float32)) * self.Dk**-0.5
        k = l2norm(k.reshape(B, S, self.Hk, self.Dk).astype(mx.float32))
        v = v.reshape(B, S, self.Hv, self.Dv)
        beta = mx.sigmoid(b.astype(mx.float32))
        g = -mx.exp(self.A_log.astype(mx.float32)) * nn.softplus(a.astype(mx.float32) + self.dt_bias)

        if cache is None:
            out, _ = gdn(q, k, v, g, beta, None)
        else:
            want_states = cache.wants_states
            out, final, *states = gdn(q, k, v, g, beta, cache.state, return_states=want_states)
            cache.advance(conv_in, final, tape=(k, v, g, beta), states=states[0] if states else None)

        out = self.norm(out, z.reshape(B, S, self.Hv, self.Dv))
        return self.out_proj(out.reshape(B, S, -1))


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
        return h + self.mlp(self.post_attention_layernorm(h))


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def __call__(self, tokens, cache=None):
        h = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, cache[i] if cache is not None else None)
        return h  # before the final norm


class Model(nn.Module):
    """tokens [B, S] -> logits [B, S, V]; with return_hidden also the last hidden states (for MTP)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._steps = compiled.CompiledSteps(self)

    def logits(self, h):
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def __call__(self, tokens, cache=None, return_hidden=False):
        """Decode and verify steps on a filled cache run as compiled graphs where that pays (see compiled.py)."""
        if cache is not None and compiled.enabled() and self._steps.accepts(tokens, cache):
            return self._steps(tokens, cache, return_hidden)
        return self.forward(tokens, cache, return_hidden)

    def forward(self, tokens, cache=None, return_hidden=False):
        h = self.model(tokens, cache)
        normed = self.model.norm(h)
        logits = self.logits(normed)
        return (logits, h) if return_hidden else logits

    @property
    def layer_types(self):
        return self.config.layer_types
