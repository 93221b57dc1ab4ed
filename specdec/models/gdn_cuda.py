"""The GDN token loop as one CUDA kernel (MLX's CUDA backend), replacing gdn._recurrence_ops there.

Four lanes of a warp own one column j of one head's state S [Dk, Dv], a quarter of its Dk rows each: S[:, j]
stays in registers for all S steps of a decode or verify window, so the state is read from memory once and
written once, and the k . S and q . S products need only two shuffles (every lane reads the same k_t, q_t).
(One lane per column was 4x fewer threads than an H100 has cores: too few to hide memory latency.)
It reads the layer's tensors as they are (k-heads shared by Hv / Hk v-heads, v in its own dtype), so no
repeat or cast runs before it, and writes the output in v's dtype. Optionally it writes the state after
every step (the "states" commit method). The window length comes from v's shape at run time: one build of
the kernel serves every S.

Numerics equal the ops path (same fp32 operations in the same order per column); `scripts/check_kernels.py`
compares the two on real-size random inputs on the GPU. `self_check()` runs once on a small case before the
kernel is used, and the caller falls back to the ops path if that check fails.
"""

import mlx.core as mx

SOURCE = """
    // Four lanes own one column j of one head's state; lane `part` holds rows part*R .. part*R+R-1.
    constexpr int R = Dk / 4;
    const int part = threadIdx.x & 3;
    const int j = blockIdx.x * (blockDim.x / 4) + (threadIdx.x >> 2);   // value column
    const int bh = blockIdx.y;                                          // batch * Hv + head
    const int S = v_shape[1], Hk = k_shape[2];
    const bool live = j < Dv;  // lanes past the last column still join the shuffles
    const int b = bh / Hv, h = bh % Hv;
    const int kh = h / (Hv / Hk);                                       // the k-head this v-head reads
    const int i0 = part * R;
    float s[R];
    #pragma unroll
    for (int r = 0; r < R; ++r) s[r] = live ? state_in[((size_t)bh * Dk + i0 + r) * Dv + j] : 0.f;
    for (int t = 0; t < S; ++t) {
        const size_t row = ((size_t)b * S + t) * Hv + h;    // index into [B, S, Hv]
        const size_t krow = ((size_t)b * S + t) * Hk + kh;  // index into [B, S, Hk]
        const auto* kt = k + krow * Dk + i0;
        const float decay = expf(static_cast<float>(g[row]));
        float recalled = 0.f;
        #pragma unroll
        for (int r = 0; r < R; ++r) { s[r] *= decay; recalled += static_cast<float>(kt[r]) * s[r]; }
        recalled += __shfl_xor_sync(0xffffffff, recalled, 1);
        recalled += __shfl_xor_sync(0xffffffff, recalled, 2);
        const float vj = live ? static_cast<float>(v[row * Dv + j]) : 0.f;
        const float delta = static_cast<float>(beta[row]) * (vj - recalled);
        float o = 0.f;
        const auto* qt = q + krow * Dk + i0;
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            s[r] += static_cast<float>(kt[r]) * delta;
            if (HAS_Q) o += static_cast<float>(qt[r]) * s[r];
        }
        if (HAS_Q) {
            o += __shfl_xor_sync(0xffffffff, o, 1);
            o += __shfl_xor_sync(0xffffffff, o, 2);
            if (live && part == 0) out[row * Dv + j] = static_cast<OutT>(o);
        }
        if (KEEP && live) {
            #pragma unroll
            for (int r = 0; r < R; ++r) states[(row * Dk + i0 + r) * Dv + j] = s[r];
        }
    }
    if (live) {
        #pragma unroll
        for (int r = 0; r < R; ++r) state_out[((size_t)bh * Dk + i0 + r) * Dv + j] = s[r];
    }
"""

_kernel = None
COLUMNS_PER_BLOCK = 32  # 128 threads a block


def _get_kernel():
    global _kernel
    if _kernel is None:
        _kernel = mx.fast.cuda_kernel(
            name="gdn_recurrence",
            input_names=["q", "k", "v", "g", "beta", "state_in"],
            output_names=["out", "state_out", "states"],
            source=SOURCE,
        )
    return _kernel


def usable(Dk: int) -> bool:
    return Dk % 4 == 0


def recurrence_cuda(q, k, v, g, beta, state, keep_states):
    """Same contract as gdn._recurrence_ops (Dk a multiple of 4: see `usable`)."""
    B, S, Hv, Dv = v.shape
    Dk = k.shape[-1]
    has_q = q is not None
    out, state_out, states = _get_kernel()(
        inputs=[q if has_q else k, k, v, g, beta, state],
        template=[("Dk", Dk), ("Dv", Dv), ("Hv", Hv), ("HAS_Q", has_q), ("KEEP", bool(keep_states)),
                  ("OutT", v.dtype)],
        grid=(-(-Dv // COLUMNS_PER_BLOCK) * 4 * COLUMNS_PER_BLOCK, B * Hv, 1),
        threadgroup=(4 * COLUMNS_PER_BLOCK, 1, 1),
        output_shapes=[(B, S, Hv, Dv) if has_q else (1,), (B, Hv, Dk, Dv), (B, S, Hv, Dk, Dv) if keep_states else (1,)],
        output_dtypes=[v.dtype, mx.float32, mx.float32],
    )
    return (out if has_q else None), state_out, (states if keep_states else None)


def self_check(reference) -> bool:
    """Run the kernel once against the ops path on a small random case shaped like the real ones (two v-heads
    per k-head, bfloat16 v); True when they agree."""
    try:
        B, S, Hk, Hv, Dk, Dv = 1, 3, 2, 4, 32, 64
        ks = mx.random.split(mx.random.key(0), 6)
        norm = lambda x: x / mx.linalg.norm(x, axis=-1, keepdims=True)
        q = norm(mx.random.normal((B, S, Hk, Dk), key=ks[0]))
        k = norm(mx.random.normal((B, S, Hk, Dk), key=ks[1]))
        v = mx.random.normal((B, S, Hv, Dv), key=ks[2]).astype(mx.bfloat16)
        g = -mx.random.uniform(shape=(B, S, Hv), key=ks[3])
        beta = mx.random.uniform(shape=(B, S, Hv), key=ks[4])
        state = mx.random.normal((B, Hv, Dk, Dv), key=ks[5])
        mine = recurrence_cuda(q, k, v, g, beta, state, True)
        ref = reference(q, k, v, g, beta, state, True)
        tolerance = [1e-2, 1e-4, 1e-4]  # the output is bfloat16
        return all(mx.allclose(a.astype(mx.float32), b.astype(mx.float32), rtol=t, atol=t).item()
                   for a, b, t in zip(mine, ref, tolerance))
    except Exception:
        return False
