"""Decode and verify steps as compiled graphs: the whole target forward of a few tokens in one `mx.compile` call.

A step of a hybrid MoE model is a thousand small MLX operations. Run one by one, each costs its Python call
and its own launch, and on a GPU that overhead, not memory traffic, sets the step time. Compiled, the graph
is traced once per shape and replayed from C++, with chains of elementwise operations fused into single kernels.

What makes one trace serve every position: inside the compiled function the KV cache is the whole
fixed-size buffer with the offset as an array (written with `slice_update`, attended through a mask),
and the GDN layer's state arrays go in and out as plain inputs and outputs. The Python bookkeeping of the
real caches (offsets, speculative windows) happens outside, so commits work exactly as in the eager path.
A trace is made per (tokens, buffer size, outputs wanted); buffers grow by doubling, so retraces are rare.
"""

import os
from functools import partial

import mlx.core as mx

from ..cache import GDNCache, KVCache, ModelCache
from . import kernels

MAX_TOKENS = 32  # steps up to this size are compiled: decode and verify windows; prefills run eagerly


def enabled() -> bool:
    """SPECDEC_COMPILE=1/0 forces compiled steps on or off; by default they run on a GPU, where launch
    overhead dominates a step, and not on the CPU, where compute does and every new shape would be a trace."""
    env = os.environ.get("SPECDEC_COMPILE", "")
    if env in ("0", "1"):
        return env == "1"
    return mx.default_device() == mx.gpu


class _TracedKV:
    """A KVCache as the compiled function sees it: the full buffer and the offset as an array."""

    def __init__(self, keys, values, offset):
        self.keys, self.values, self.offset = keys, values, offset

    def update_and_fetch(self, k, v):
        at = self.offset.reshape(1)
        self.keys = mx.slice_update(self.keys, k, at, axes=(2,))
        self.values = mx.slice_update(self.values, v, at, axes=(2,))
        return self.keys, self.values

    def mask(self, S: int):
        # query i sits at position offset + i and sees every key up to it; the rest of the buffer is masked
        return mx.arange(self.keys.shape[2])[None, :] <= (self.offset + mx.arange(S))[:, None]


class _TracedGDN:
    """A GDNCache as the compiled function sees it: state in, what the layer produced recorded for the caller."""

    def __init__(self, conv_state, state, wants):
        self.conv_state, self.state = conv_state, state
        self.wants_states, self.wants_tape = wants
        self.produced = None

    def advance(self, conv_in, final_state, S, tape=None, states=None, conv_state=None):
        # a compiled step's windows (at most MAX_TOKENS) always build their conv inputs: conv_state is unused
        self.produced = (conv_in, final_state, tuple(tape or ()), (states,) if states is not None else ())


class CompiledSteps:
    """Runs `model(tokens, cache)` for up to MAX_TOKENS tokens on a filled ModelCache through mx.compile."""

    def __init__(self, model):
        self.model = model
        self._fns = {}

    def reset(self):
        """Forget every trace: a trace holds the weights it was made with (see Model.update)."""
        self._fns.clear()

    def accepts(self, tokens, cache) -> bool:
        return isinstance(cache, ModelCache) and tokens.shape[1] <= MAX_TOKENS and cache.filled

    def __call__(self, tokens, cache, return_hidden=False):
        S = tokens.shape[1]
        wants = tuple((c.wants_states, c.wants_tape) if isinstance(c, GDNCache) else None for c in cache)
        fn = self._fns.get((return_hidden, wants))
        if fn is None:
            kernels.prepare()  # the kernels' self-checks evaluate arrays: not inside a trace
            fn = self._fns[(return_hidden, wants)] = mx.compile(partial(self._forward, return_hidden, wants))
        offset = cache.offset
        inputs = []
        for c in cache:
            if isinstance(c, KVCache):
                c.reserve(offset + S, double=True)
                inputs.append((c.keys, c.values))
            else:
                inputs.append((c.conv_state, c.state))
        out, produced = fn(tokens, mx.array(offset, mx.int32), inputs)
        for c, p in zip(cache, produced):
            if isinstance(c, KVCache):
                c.keys, c.values = p
                c.offset += S
            else:
                conv_in, final, tape, states = p
                c.advance(conv_in, final, S, tape or None, states[0] if states else None)
        return out

    def _forward(self, return_hidden, wants, tokens, offset, inputs):
        traced = [
            _TracedGDN(a, b, w) if kind == "linear_attention" else _TracedKV(a, b, offset)
            for (a, b), w, kind in zip(inputs, wants, self.model.layer_types)
        ]
        out = self.model.forward(tokens, traced, return_hidden)
        return out, [(c.keys, c.values) if isinstance(c, _TracedKV) else c.produced for c in traced]
