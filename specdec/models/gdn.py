"""The Gated DeltaNet recurrence (Qwen3-Next / Qwen3.5 linear attention), in the forms the engine needs.

One definition, per v-head, with the state S [Dk, Dv] kept in float32:

    S = S * exp(g_t);  delta = beta_t * (v_t - k_t @ S);  S = S + outer(k_t, delta);  o_t = q_t @ S

Shapes: q, k [B, S, Hk, Dk] (l2-normalised, q already scaled by Dk**-0.5); v [B, S, Hv, Dv];
g (log decay, <= 0) and beta (in (0, 1)) [B, S, Hv]; state [B, Hv, Dk, Dv] float32, None meaning zeros.
v-head h reads k-head h // (Hv // Hk), as repeat_interleave does.

- `gdn_recurrent`: token by token, for decode (S=1) and verify windows; can return every per-step state.
- `gdn_chunked`: chunk-parallel (UT transform), for long prefills.
- `gdn_replay`: the state after the first n steps of a window (commit by tape replay).
- `gdn`: picks between recurrent and chunked by sequence length.
"""

import math

import mlx.core as mx

from ..errors import ShapeError
from . import gdn_cuda, kernels

# gdn() runs the token loop up to this many tokens and chunks beyond. Measured on a 2-core x86 CPU with
# Qwen3.5-35B-A3B shapes (32 v-heads, 128x128 state) and 16-token chunks: the two are level from 32 to 48 tokens,
# chunks win from 64 (37.8 vs 43.4 ms) and by far on long prompts (2048 tokens: 1.36 s vs 3.79 s).
RECURRENT_MAX_TOKENS = 32


def _check(k, v, g, beta, state, q=None):
    if v.ndim != 4 or k.ndim != 4:
        raise ShapeError(f"GDN: k and v must be [B, S, heads, dim], got k {k.shape}, v {v.shape}")
    B, S, Hv, Dv = v.shape
    Hk, Dk = k.shape[2:]
    if k.shape[:2] != (B, S):
        raise ShapeError(f"GDN: k {k.shape} and v {v.shape} disagree on batch or sequence length")
    if q is not None and q.shape != k.shape:
        raise ShapeError(f"GDN: q {q.shape} must have the shape of k {k.shape}")
    if Hv % Hk:
        raise ShapeError(f"GDN: value heads ({Hv}) must be a multiple of key heads ({Hk})")
    for name, x in (("g", g), ("beta", beta)):
        if x.shape != (B, S, Hv):
            raise ShapeError(f"GDN: {name} must be {(B, S, Hv)}, got {x.shape}")
    if state is not None and state.shape != (B, Hv, Dk, Dv):
        raise ShapeError(f"GDN: state must be {(B, Hv, Dk, Dv)}, got {state.shape}")


def _per_value_head(x, Hv):
    """[B, S, Hk, D] -> [B, S, Hv, D]: each k-head serves Hv // Hk consecutive v-heads."""
    return x if x.shape[2] == Hv else mx.repeat(x, Hv // x.shape[2], axis=2)


def _initial(state, B, Hv, Dk, Dv):
    return mx.zeros((B, Hv, Dk, Dv), mx.float32) if state is None else state.astype(mx.float32)


# ---------------------------------------------------------------------------------------------------------------
# Token by token


def gdn_step(state, k, v, g, beta):
    """One token for all heads. state [B, H, Dk, Dv]; k [B, H, Dk]; v [B, H, Dv]; g, beta [B, H]; all float32."""
    state = state * mx.exp(g)[..., None, None]
    recalled = (k[..., :, None] * state).sum(-2)  # k_t @ S: what the state already returns for k_t
    delta = beta[..., None] * (v - recalled)
    return state + k[..., :, None] * delta[..., None, :]


def _recurrence_ops(q, k, v, g, beta, state, keep_states):
    """Python loop over tokens. q, k [B, S, Hk, Dk]; v [B, S, Hv, Dv]; g, beta [B, S, Hv]; state float32;
    q None means no outputs. Returns (out [B, S, Hv, Dv] in v.dtype or None, final state, per-step states
    [B, S, Hv, Dk, Dv] or None); the kernel in gdn_cuda.py keeps the same contract."""
    Hv, out_dtype = v.shape[2], v.dtype
    k = _per_value_head(k, Hv)
    q = _per_value_head(q, Hv) if q is not None else None
    q, k, v, g, beta = (x if x is None else x.astype(mx.float32) for x in (q, k, v, g, beta))
    outs, states = [], []
    for t in range(v.shape[1]):
        state = gdn_step(state, k[:, t], v[:, t], g[:, t], beta[:, t])
        if q is not None:
            outs.append((q[:, t, :, None, :] @ state)[..., 0, :])
        if keep_states:
            states.append(state)
    out = mx.stack(outs, axis=1).astype(out_dtype) if q is not None else None
    return out, state, (mx.stack(states, axis=1) if keep_states else None)


# On MLX's CUDA backend the token loop runs as one kernel (gdn_cuda.py) with the state in registers, once it has
# passed a self-check against the ops path (see kernels.py). (mx.compile of gdn_step was measured on the CPU:
# 1.35-1.6x slower than plain ops, so it is not used.)
kernels.register("gdn_recurrence", lambda: gdn_cuda.self_check(_recurrence_ops))


def _recurrence(q, k, *rest):
    # THE dispatch point for the token loop
    if kernels.ready("gdn_recurrence") and gdn_cuda.usable(k.shape[-1]):
        return gdn_cuda.recurrence_cuda(q, k, *rest)
    return _recurrence_ops(q, k, *rest)


def gdn_recurrent(q, k, v, g, beta, state=None, *, return_states=False):
    """Token-by-token GDN. Returns (out [B, S, Hv, Dv] in v.dtype, final state float32), plus, with
    return_states, states [B, S, Hv, Dk, Dv] float32 where states[:, t] is the state after step t."""
    _check(k, v, g, beta, state, q)
    B, S, Hv, Dv = v.shape
    if S == 0:
        raise ShapeError("GDN: empty sequence (S == 0)")
    out, state, states = _recurrence(q, k, v, g, beta, _initial(state, B, Hv, k.shape[-1], Dv), return_states)
    return (out, state, states) if return_states else (out, state)


def gdn_replay(k, v, g, beta, state, n: int):
    """The state after the first n of the S steps (n in 0..S), float32, without queries or outputs.
    Commit by tape replay: keep a verify window's inputs and the state before it, then replay the accepted ones."""
    _check(k, v, g, beta, state)
    B, S, Hv, Dv = v.shape
    if not 0 <= n <= S:
        raise ShapeError(f"GDN replay: n={n} is outside 0..{S}")
    state = _initial(state, B, Hv, k.shape[-1], Dv)
    if n == 0:
        return state
    if n < S:
        k, v, g, beta = k[:, :n], v[:, :n], g[:, :n], beta[:, :n]
    _, state, _ = _recurrence(None, k, v, g, beta, state, False)
    return state


def replay_masked(k, v, g, beta, state, keep):
    """gdn_replay(..., n=keep) with keep an array, for compiled commits: the steps from `keep` on get g = 0 and
    beta = 0, which leaves the state exactly as it is (S * 1 + k * 0), so one trace serves every keep."""
    live = mx.arange(v.shape[1])[None, :, None] < keep
    return gdn_replay(k, v, mx.where(live, g, 0.0), mx.where(live, beta, 0.0), state, v.shape[1])


# ---------------------------------------------------------------------------------------------------------------
# Chunk-parallel
#
# Inside a chunk of C tokens that starts from state S0, let G_r be the cumulative log decay through row r.
# Unrolling the recurrence, the deltas d_r satisfy the unit-lower-triangular system
#     d_r + sum_{j<r} beta_r (k_r . k_j) exp(G_r - G_j) d_j = beta_r v_r - beta_r exp(G_r) k_r @ S0,
# so with (I + A) the matrix on the left, D = U - W @ S0 where U = (I + A)^-1 (beta V) and
# W = (I + A)^-1 (beta exp(G) K) depend only on the chunk's own inputs. Then
#     o_r = exp(G_r) q_r @ S0 + sum_{j<=r} exp(G_r - G_j) (q_r . k_j) d_j
#     S_C = exp(G_C) S0 + sum_j exp(G_C - G_j) outer(k_j, d_j)
# Everything except the S0 terms is computed for all chunks at once; a short loop carries S across chunks.
# Every exponent above is <= 0, so nothing overflows however strong the decay.


def _unit_lower_inverse(A):
    """(I + A)^-1 for A strictly lower triangular [..., C, C], C a power of two.

    Recursive block forward substitution: [[T1, 0], [X, T2]] with X = -T2 @ A21 @ T1 doubles the solved block
    size each level, log2(C) levels of batched matmuls. Every product is of true sub-inverses, so it stays as
    accurate as row-by-row substitution (unlike power series of A, whose terms grow huge and cancel)."""
    C = A.shape[-1]
    lead = A.shape[:-2]
    T = mx.ones((*lead, C, 1, 1), A.dtype)  # C solved 1x1 diagonal blocks
    b = 1
    while b < C:
        P = C // (2 * b)  # pairs of solved blocks to merge
        # Diagonal 2b x 2b blocks of A, then their lower-left b x b quarter.
        A21 = mx.diagonal(A.reshape(*lead, P, 2 * b, P, 2 * b), axis1=-4, axis2=-2)
        A21 = mx.moveaxis(A21, -1, -3)[..., b:, :b]  # [..., P, b, b]
        T1, T2 = T[..., 0::2, :, :], T[..., 1::2, :, :]
        X = -(T2 @ A21 @ T1)
        top = mx.concatenate([T1, mx.zeros_like(T1)], axis=-1)
        bottom = mx.concatenate([X, T2], axis=-1)
        T = mx.concatenate([top, bottom], axis=-2)
        b *= 2
    return T[..., 0, :, :]


def gdn_chunked(q, k, v, g, beta, state=None, *, chunk_size=64):
    """Chunk-parallel GDN for prefill; same result as gdn_recurrent. Returns (out in v.dtype, final state float32).
    chunk_size must be a power of two; the tail chunk is padded with tokens that leave the state untouched."""
    _check(k, v, g, beta, state, q)
    if chunk_size < 1 or chunk_size & (chunk_size - 1):
        raise ShapeError(f"GDN: chunk_size must be a power of two, got {chunk_size}")
    B, S, Hv, Dv = v.shape
    if S == 0:
        raise ShapeError("GDN: empty sequence (S == 0)")
    Dk, out_dtype = k.shape[-1], v.dtype
    C = chunk_size
    N = math.ceil(S / C)
    pad = N * C - S

    def to_chunks(x):  # [B, S, H, ...] -> [B, H, N, C, ...], padded with zeros (beta = 0, g = 0: a no-op step)
        x = x.astype(mx.float32)
        if pad:
            x = mx.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return mx.moveaxis(x.reshape(B, N, C, *x.shape[2:]), 3, 1)

    q, k, v, g, beta = map(to_chunks, (_per_value_head(q, Hv), _per_value_head(k, Hv), v, g, beta))
    G = mx.cumsum(g, axis=-1)  # [B, H, N, C]
    rows, cols = mx.arange(C)[:, None], mx.arange(C)[None, :]
    decay = mx.exp(mx.where(cols <= rows, G[..., :, None] - G[..., None, :], -mx.inf))  # exp(G_r - G_j), j <= r

    k_beta = k * beta[..., None]
    A = mx.where(cols < rows, (k_beta @ k.swapaxes(-1, -2)) * decay, 0.0)
    T = _unit_lower_inverse(A)
    U = T @ (v * beta[..., None])
    W = T @ (k_beta * mx.exp(G)[..., None])

    attn = (q @ k.swapaxes(-1, -2)) * decay  # causal, diagonal included
    q_decayed = q * mx.exp(G)[..., None]
    k_to_end = (k * mx.exp(G[..., -1:] - G)[..., None]).swapaxes(-1, -2)  # [B, H, N, Dk, C]
    chunk_decay = mx.exp(G[..., -1])[..., None, None]  # [B, H, N, 1, 1]

    state = _initial(state, B, Hv, Dk, Dv)
    outs = []
    for n in range(N):
        d = U[:, :, n] - W[:, :, n] @ state
        outs.append(q_decayed[:, :, n] @ state + attn[:, :, n] @ d)
        state = state * chunk_decay[:, :, n] + k_to_end[:, :, n] @ d
    out = mx.stack(outs, axis=2).reshape(B, Hv, N * C, Dv)[:, :, :S]
    return out.swapaxes(1, 2).astype(out_dtype), state


# ---------------------------------------------------------------------------------------------------------------


# On MLX's CUDA backend the chunked form runs as two kernels (gdn_cuda.chunked_cuda), after a self-check.
kernels.register("gdn_chunked", lambda: gdn_cuda.chunked_self_check(gdn_chunked))


def gdn(q, k, v, g, beta, state=None, *, return_states=False):
    """What the GDN layer calls: the token loop for short inputs (decode, verify windows), chunks for prefills.
    return_states needs the token loop, so it forces it."""
    if return_states or v.shape[1] <= RECURRENT_MAX_TOKENS:
        return gdn_recurrent(q, k, v, g, beta, state, return_states=return_states)
    if kernels.ready("gdn_chunked") and gdn_cuda.chunked_usable(k.shape[-1], v.shape[-1]):
        _check(k, v, g, beta, state, q)
        return gdn_cuda.chunked_cuda(q, k, v, g, beta, None if state is None else state.astype(mx.float32))
    # Small chunks on the CPU, whose reference BLAS makes the in-chunk C x C work dear (2048 tokens: 1.36 s with
    # 16, 2.0 s with 64); 64 elsewhere, the usual size for GPU matmuls.
    chunk_size = 16 if mx.default_device() == mx.cpu else 64
    return gdn_chunked(q, k, v, g, beta, state, chunk_size=chunk_size)
