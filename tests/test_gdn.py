"""The GDN recurrence: token loop vs a float64 numpy reference, chunked vs token loop, per-step states, replay,
dtypes, and transformers' own Qwen3-Next reference functions."""

import mlx.core as mx
import numpy as np
import pytest

from specdec.errors import ShapeError
from specdec.models.gdn import RECURRENT_MAX_TOKENS, gdn, gdn_chunked, gdn_recurrent, gdn_replay


def reference(q, k, v, g, beta, state=None):
    """The defining recurrence in float64, one head and one token at a time."""
    q, k, v, g, beta = (np.asarray(x, np.float64) for x in (q, k, v, g, beta))
    B, S, Hv, Dv = v.shape
    Hk, Dk = k.shape[2:]
    S_ = np.zeros((B, Hv, Dk, Dv)) if state is None else np.array(state, np.float64)
    out = np.zeros((B, S, Hv, Dv))
    for b in range(B):
        for h in range(Hv):
            kh = h // (Hv // Hk)
            for t in range(S):
                s = S_[b, h] * np.exp(g[b, t, h])
                delta = beta[b, t, h] * (v[b, t, h] - k[b, t, kh] @ s)
                S_[b, h] = s + np.outer(k[b, t, kh], delta)
                out[b, t, h] = q[b, t, kh] @ S_[b, h]
    return out, S_


def make_inputs(B=1, S=5, Hk=2, Hv=4, Dk=8, Dv=6, seed=0, with_state=True, raw=False):
    """Random inputs in the stated conventions (q, k l2-normalised, q scaled). raw=True also returns the
    un-normalised q, k (what transformers takes)."""
    rng = np.random.default_rng(seed)
    q_raw = rng.standard_normal((B, S, Hk, Dk))
    k_raw = rng.standard_normal((B, S, Hk, Dk))
    l2 = lambda x: x / np.sqrt((x * x).sum(-1, keepdims=True) + 1e-6)
    q = l2(q_raw) * Dk**-0.5
    k = l2(k_raw)
    v = rng.standard_normal((B, S, Hv, Dv))
    g = -np.exp(rng.standard_normal((B, S, Hv)) - 1)
    beta = 1 / (1 + np.exp(-rng.standard_normal((B, S, Hv))))
    state = rng.standard_normal((B, Hv, Dk, Dv)) * 0.5 if with_state else None
    f32 = lambda x: None if x is None else x.astype(np.float32)
    arrays = [f32(x) for x in (q, k, v, g, beta, state)]
    return (arrays, f32(q_raw), f32(k_raw)) if raw else arrays


def mlx_args(arrays):
    return [None if x is None else mx.array(x) for x in arrays]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("B,S,Hk,Hv,Dk,Dv", [(1, 1, 1, 1, 4, 4), (2, 7, 2, 4, 8, 6), (1, 17, 3, 6, 5, 9)])
def test_recurrent_matches_numpy(B, S, Hk, Hv, Dk, Dv, with_state):
    arrays = make_inputs(B, S, Hk, Hv, Dk, Dv, with_state=with_state)
    want_out, want_state = reference(*arrays)
    out, state = gdn_recurrent(*mlx_args(arrays))
    assert out.shape == (B, S, Hv, Dv) and out.dtype == mx.float32
    assert state.shape == (B, Hv, Dk, Dv) and state.dtype == mx.float32
    assert rel_err(out, want_out) < 1e-5
    assert rel_err(state, want_state) < 1e-5


@pytest.mark.parametrize("chunk_size", [16, 64])
@pytest.mark.parametrize("S", [1, 5, 63, 64, 65, 130, 200])
def test_chunked_matches_recurrent(S, chunk_size):
    for with_state in (False, True):
        args = mlx_args(make_inputs(B=2, S=S, Hk=2, Hv=4, Dk=16, Dv=8, seed=S, with_state=with_state))
        out, state = gdn_recurrent(*args)
        out_c, state_c = gdn_chunked(*args, chunk_size=chunk_size)
        assert out_c.shape == out.shape and state_c.shape == state.shape
        assert rel_err(out_c, out) < 1e-4, (S, chunk_size, with_state)
        assert rel_err(state_c, state) < 1e-4, (S, chunk_size, with_state)


def test_chunked_hard_cases():
    # Nearly parallel keys with beta near 1 and almost no decay make (I + A) as badly conditioned as it gets;
    # decays of -30 per token make exp(G) underflow inside a chunk. Both must stay finite and exact.
    arrays = make_inputs(B=1, S=150, Hk=2, Hv=2, Dk=16, Dv=16, seed=3)
    q, k, v, g, beta, state = arrays
    rng = np.random.default_rng(4)
    k = rng.standard_normal(16) + 0.01 * rng.standard_normal(k.shape)
    k = (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32)
    for g, beta in ((np.full_like(g, -1e-3), np.full_like(beta, 0.99)), (np.full_like(g, -30.0), beta)):
        args = mlx_args([q, k, v, g, beta, state])
        want_out, want_state = reference(q, k, v, g, beta, state)
        out_c, state_c = gdn_chunked(*args, chunk_size=64)
        assert np.isfinite(np.array(out_c)).all()
        assert rel_err(out_c, want_out) < 1e-4
        assert rel_err(state_c, want_state) < 1e-4


def test_per_step_states_are_prefix_final_states():
    args = mlx_args(make_inputs(B=2, S=9, Hk=2, Hv=4, Dk=8, Dv=6))
    out, final, states = gdn_recurrent(*args, return_states=True)
    assert states.shape == (2, 9, 4, 8, 6) and states.dtype == mx.float32
    q, k, v, g, beta, state = args
    for t in range(9):
        _, prefix_state = gdn_recurrent(q[:, : t + 1], k[:, : t + 1], v[:, : t + 1], g[:, : t + 1], beta[:, : t + 1], state)
        assert np.array_equal(np.array(states[:, t]), np.array(prefix_state)), t
    assert np.array_equal(np.array(states[:, -1]), np.array(final))
    assert np.array_equal(np.array(out), np.array(gdn_recurrent(*args)[0]))


def test_replay_equals_state_after_n_steps():
    q, k, v, g, beta, state = mlx_args(make_inputs(B=2, S=6, Hk=2, Hv=4, Dk=8, Dv=6))
    _, _, states = gdn_recurrent(q, k, v, g, beta, state, return_states=True)
    assert np.array_equal(np.array(gdn_replay(k, v, g, beta, state, 0)), np.array(state))
    for n in range(1, 7):
        replayed = gdn_replay(k, v, g, beta, state, n)
        assert replayed.dtype == mx.float32
        assert np.array_equal(np.array(replayed), np.array(states[:, n - 1])), n
    # No initial state means zeros.
    zeros_replay = gdn_replay(k, v, g, beta, None, 3)
    _, want = gdn_recurrent(q[:, :3], k[:, :3], v[:, :3], g[:, :3], beta[:, :3])
    assert np.array_equal(np.array(zeros_replay), np.array(want))


def test_bf16_inputs():
    q, k, v, g, beta, state = mlx_args(make_inputs(B=1, S=40, Hk=2, Hv=4, Dk=16, Dv=8))
    q16, k16, v16 = (x.astype(mx.bfloat16) for x in (q, k, v))
    for fn in (gdn_recurrent, gdn_chunked, gdn):
        out, new_state = fn(q16, k16, v16, g, beta, state)
        assert out.dtype == mx.bfloat16 and new_state.dtype == mx.float32
    out32, _ = gdn_recurrent(q16.astype(mx.float32), k16.astype(mx.float32), v16.astype(mx.float32), g, beta, state)
    out16, _ = gdn_recurrent(q16, k16, v16, g, beta, state)
    assert rel_err(out16.astype(mx.float32), out32) < 1e-2  # only the final cast to bf16 differs


def test_dispatcher():
    short = mlx_args(make_inputs(S=RECURRENT_MAX_TOKENS))
    long = mlx_args(make_inputs(S=RECURRENT_MAX_TOKENS + 9))
    assert np.array_equal(np.array(gdn(*short)[0]), np.array(gdn_recurrent(*short)[0]))
    assert rel_err(gdn(*long)[0], gdn_recurrent(*long)[0]) < 1e-4
    out, final, states = gdn(*long, return_states=True)  # per-step states force the token loop
    assert states.shape[1] == RECURRENT_MAX_TOKENS + 9


def test_bad_inputs():
    q, k, v, g, beta, state = mlx_args(make_inputs(S=4, Hk=3, Hv=4))
    with pytest.raises(ShapeError, match="multiple of key heads"):
        gdn_recurrent(q, k, v, g, beta)
    q, k, v, g, beta, state = mlx_args(make_inputs(S=4))
    with pytest.raises(ShapeError, match="outside 0..4"):
        gdn_replay(k, v, g, beta, state, 5)
    with pytest.raises(ShapeError, match="power of two"):
        gdn_chunked(q, k, v, g, beta, state, chunk_size=48)
    with pytest.raises(ShapeError, match="beta"):
        gdn(q, k, v, g, beta[:, :3], state)
    with pytest.raises(ShapeError, match="state"):
        gdn(q, k, v, g, beta, state[:, :2])


@pytest.mark.parametrize("S", [5, 70])
def test_matches_transformers_qwen3_next(S):
    torch = pytest.importorskip("torch")
    hf = pytest.importorskip("transformers.models.qwen3_next.modeling_qwen3_next")
    arrays, q_raw, k_raw = make_inputs(B=2, S=S, Hk=2, Hv=4, Dk=16, Dv=8, seed=11, raw=True)
    _, _, v, g, beta, state = arrays
    t = lambda x: torch.from_numpy(np.ascontiguousarray(x))
    # transformers takes raw q, k and normalises + scales inside (use_qk_l2norm_in_kernel); make_inputs did the
    # same to our q, k (l2norm with eps 1e-6, then q * Dk**-0.5).
    hf_args = dict(initial_state=t(state), output_final_state=True, use_qk_l2norm_in_kernel=True)
    hf_rec = hf.torch_recurrent_gated_delta_rule(t(q_raw), t(k_raw), t(v), t(g), t(beta), **hf_args)
    hf_chunk = hf.torch_chunk_gated_delta_rule(t(q_raw), t(k_raw), t(v), t(g), t(beta), chunk_size=32, **hf_args)
    out, final = gdn_recurrent(*mlx_args(arrays))
    out_c, final_c = gdn_chunked(*mlx_args(arrays), chunk_size=32)
    for hf_out, hf_state in (hf_rec, hf_chunk):
        assert rel_err(out, hf_out.numpy()) < 1e-4
        assert rel_err(final, hf_state.numpy()) < 1e-4
        assert rel_err(out_c, hf_out.numpy()) < 1e-4
        assert rel_err(final_c, hf_state.numpy()) < 1e-4
