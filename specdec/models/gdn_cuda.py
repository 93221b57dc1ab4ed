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
    per k-head, bfloat16 v); True when they agree. A kernel that fails to build raises, and kernels.ready says so."""
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


# ---------------------------------------------------------------------------------------------------------------
# The whole GDN mixer of a decode or verify window in one launch.
#
# Everything between the input projection and the output projection: causal conv + silu of this head's q, k,
# v channels, l2 norms, the gates beta = sigmoid(b) and g = -exp(A_log) softplus(a + dt_bias), the recurrence,
# and the gated RMS norm rmsnorm(o) * w * silu(z). As separate MLX operations that is ~25 graph nodes a layer,
# and on MLX-CUDA every node costs ~10 us of launch and bookkeeping whatever its size: at S = 1 that overhead,
# not the arithmetic, is the step. One block per (batch, v-head), four lanes per state column as above; the
# conv and gates are recomputed by the two v-heads that share a k-head (a few hundred multiply-adds).
# Rounding follows the ops path (GatedDeltaNet._mixer_ops): the conv and silu round to CT after every
# operation as MLX's elementwise ops do, the norms and the recurrence run in float32.

MIXER_SOURCE = """
    constexpr int R = Dk / 4;
    constexpr int C = 2 * Hk * Dk + Hv * Dv;       // conv channels: q | k | v
    const int tid = threadIdx.x, part = tid & 3, j = tid >> 2;   // j: value column (blockDim.x == 4 * Dv)
    const int lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const int bh = blockIdx.x, b = bh / Hv, h = bh % Hv, kh = h / (Hv / Hk);
    const int S = proj_shape[1], P = proj_shape[2], L = conv_in_shape[1];
    const int i0 = part * R;
    __shared__ float qs[Dk], ks[Dk], vs[Dv], red[32], scal[4];

    float s[R];
    #pragma unroll
    for (int r = 0; r < R; ++r) s[r] = state_in[((size_t)bh * Dk + i0 + r) * Dv + j];

    for (int t = 0; t < S; ++t) {
        const size_t prow = ((size_t)b * S + t) * P;
        // conv + silu of this head's 2 Dk + Dv channels, rounded like MLX's elementwise ops in CT
        for (int c = tid; c < 2 * Dk + Dv; c += blockDim.x) {
            const int ch = c < Dk ? kh * Dk + c : c < 2 * Dk ? Hk * Dk + kh * Dk + (c - Dk) : 2 * Hk * Dk + h * Dv + (c - 2 * Dk);
            const T* x = conv_in + ((size_t)b * L + t) * C + ch;
            float acc = static_cast<float>(static_cast<CT>(static_cast<float>(x[0]) * static_cast<float>(conv_w[ch * K])));
            #pragma unroll
            for (int w = 1; w < K; ++w) {
                const float term = static_cast<float>(static_cast<CT>(static_cast<float>(x[(size_t)w * C]) * static_cast<float>(conv_w[ch * K + w])));
                acc = static_cast<float>(static_cast<CT>(acc + term));
            }
            const float sig = static_cast<float>(static_cast<CT>(1.f / (1.f + expf(-acc))));
            const float y = static_cast<float>(static_cast<CT>(acc * sig));
            if (c < Dk) qs[c] = y; else if (c < 2 * Dk) ks[c - Dk] = y; else vs[c - 2 * Dk] = y;
        }
        __syncthreads();
        // l2 norms (warp 0: q, warp 1: k) and the gates (warp 2)
        if (warp < 2) {
            const float* src = warp == 0 ? qs : ks;
            float ss = 0.f;
            for (int i = lane; i < Dk; i += 32) ss += src[i] * src[i];
            #pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
            if (lane == 0) scal[warp] = rsqrtf(ss + 1e-6f);
        } else if (warp == 2 && lane == 0) {
            const float bv = static_cast<float>(proj[prow + BO + h]);
            const float av = static_cast<float>(proj[prow + AO + h]) + static_cast<float>(dt_bias[h]);
            const float softplus = fmaxf(av, 0.f) + log1pf(expf(-fabsf(av)));
            scal[2] = -expf(static_cast<float>(A_log[h])) * softplus;
            scal[3] = 1.f / (1.f + expf(-bv));
        }
        __syncthreads();
        const float qscale = static_cast<float>(1.0 / sqrt(static_cast<double>(Dk)));  // as Python's Dk**-0.5
        for (int i = tid; i < Dk; i += blockDim.x) { qs[i] = qs[i] * scal[0] * qscale; ks[i] = ks[i] * scal[1]; }
        __syncthreads();
        if (TAPE) {  // the recurrence inputs, for a commit by replay (k is written by every v-head of its k-head)
            const size_t row = ((size_t)b * S + t) * Hv + h;
            for (int i = tid; i < Dk; i += blockDim.x) tape_k[(((size_t)b * S + t) * Hk + kh) * Dk + i] = ks[i];
            for (int i = tid; i < Dv; i += blockDim.x) tape_v[row * Dv + i] = static_cast<CT>(vs[i]);
            if (tid == 0) { tape_g[row] = scal[2]; tape_beta[row] = scal[3]; }
        }
        // the recurrence step for column j, rows i0 .. i0+R-1
        const float decay = expf(scal[2]), beta = scal[3];
        float recalled = 0.f;
        #pragma unroll
        for (int r = 0; r < R; ++r) { s[r] *= decay; recalled += ks[i0 + r] * s[r]; }
        recalled += __shfl_xor_sync(0xffffffff, recalled, 1);
        recalled += __shfl_xor_sync(0xffffffff, recalled, 2);
        const float delta = beta * (vs[j] - recalled);
        float o = 0.f;
        #pragma unroll
        for (int r = 0; r < R; ++r) { s[r] += ks[i0 + r] * delta; o += qs[i0 + r] * s[r]; }
        o += __shfl_xor_sync(0xffffffff, o, 1);
        o += __shfl_xor_sync(0xffffffff, o, 2);
        if (KEEP) {
            #pragma unroll
            for (int r = 0; r < R; ++r) states[((((size_t)b * S + t) * Hv + h) * Dk + i0 + r) * Dv + j] = s[r];
        }
        // gated RMS norm over this head's Dv outputs: o rounds to CT (the recurrence's output dtype) first
        const float ot = static_cast<float>(static_cast<CT>(o));
        float sq = part == 0 ? ot * ot : 0.f;
        #pragma unroll
        for (int m = 16; m > 0; m >>= 1) sq += __shfl_xor_sync(0xffffffff, sq, m);
        if (lane == 0) red[warp] = sq;
        __syncthreads();
        if (tid == 0) {
            float total = 0.f;
            for (int w = 0; w < warps; ++w) total += red[w];
            scal[0] = rsqrtf(total / Dv + eps[0]);
        }
        __syncthreads();
        if (part == 0) {
            const float normed = static_cast<float>(static_cast<RT>(ot * scal[0] * static_cast<float>(norm_w[j])));
            const float z = static_cast<float>(proj[prow + ZO + h * Dv + j]);
            const float gate = z * (1.f / (1.f + expf(-z)));
            out[((size_t)b * S + t) * (Hv * Dv) + h * Dv + j] = static_cast<CT>(normed * gate);
        }
        __syncthreads();
    }
    #pragma unroll
    for (int r = 0; r < R; ++r) state_out[((size_t)bh * Dk + i0 + r) * Dv + j] = s[r];
"""

_mixer_kernel = None


def _promote(a, b):
    """The dtype MLX gives a binary operation on a and b (builds nothing that is evaluated)."""
    return (mx.zeros((), a) + mx.zeros((), b)).dtype


def mixer_usable(layer) -> bool:
    """The fused mixer needs the four input projections in one Linear, and a block of 4 * Dv threads made of
    whole warps, at least three of them (q norm, k norm, gates), at most 1024 threads."""
    return len(layer.groups) == 1 and layer.Dk % 4 == 0 and layer.Dv % 8 == 0 and 24 <= layer.Dv <= 256


def mixer(layer, conv_in, proj, state, keep_states, keep_tape=False):
    """The GDN mixer of `layer` (a models.model.GatedDeltaNet) on one window: conv_in [B, kernel-1+S, C] (the
    carried conv inputs, then this window's qkv), proj [B, S, P] (the input projection, parts in the order of
    layer.groups[0]), state [B, Hv, Dk, Dv] float32 -> (out [B, S, Hv * Dv] before out_proj, final state,
    per-step states or None, the recurrence inputs (k, v, g, beta) or None), as GatedDeltaNet.mixer_ops."""
    global _mixer_kernel
    if _mixer_kernel is None:
        _mixer_kernel = mx.fast.cuda_kernel(
            name="gdn_mixer",
            input_names=["conv_in", "proj", "conv_w", "A_log", "dt_bias", "norm_w", "eps", "state_in"],
            output_names=["out", "state_out", "states", "tape_k", "tape_v", "tape_g", "tape_beta"],
            source=MIXER_SOURCE,
        )
    B, S, _ = proj.shape
    offsets = layer.offsets
    out_dtype = _promote(conv_in.dtype, layer.conv1d.weight.dtype)  # v's dtype after the conv
    Hk, Hv, Dk, Dv = layer.Hk, layer.Hv, layer.Dk, layer.Dv
    out, state_out, states, *tape = _mixer_kernel(
        inputs=[conv_in, proj, layer.conv1d.weight, layer.A_log, layer.dt_bias, layer.norm.weight,
                mx.array([layer.norm.eps], mx.float32), state],
        template=[("Dk", layer.Dk), ("Dv", layer.Dv), ("Hk", layer.Hk), ("Hv", layer.Hv), ("K", layer.kernel),
                  ("ZO", offsets["z"]), ("BO", offsets["b"]), ("AO", offsets["a"]), ("KEEP", bool(keep_states)), ("TAPE", bool(keep_tape)),
                  ("T", conv_in.dtype), ("CT", out_dtype),
                  ("RT", _promote(out_dtype, layer.norm.weight.dtype))],
        grid=(4 * layer.Dv * B * layer.Hv, 1, 1),
        threadgroup=(4 * layer.Dv, 1, 1),
        output_shapes=[(B, S, layer.value_dim), (B, Hv, Dk, Dv), (B, S, Hv, Dk, Dv) if keep_states else (1,)]
        + ([(B, S, Hk, Dk), (B, S, Hv, Dv), (B, S, Hv), (B, S, Hv)] if keep_tape else [(1,)] * 4),
        output_dtypes=[out_dtype, mx.float32, mx.float32, mx.float32, out_dtype, mx.float32, mx.float32],
    )
    return out, state_out, (states if keep_states else None), (tuple(tape) if keep_tape else None)
