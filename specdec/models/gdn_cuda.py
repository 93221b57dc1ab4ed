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

from .kernels import close, cuda_kernel


def random_inputs(B, S, Hk, Hv, Dk, Dv, seed, max_decay=2.0, state_scale=1.0):
    """(q, k, v, g, beta, state) of the GDN contract (gdn.py) at random, shaped as a layer gives them: unit q and k
    (q scaled by Dk**-0.5), bfloat16 v, log decays g in [-max_decay, 0]: for the self-checks and the GPU check."""
    ks = mx.random.split(mx.random.key(seed), 6)
    unit = lambda x: x / mx.linalg.norm(x, axis=-1, keepdims=True)
    q = unit(mx.random.normal((B, S, Hk, Dk), key=ks[0])) * Dk**-0.5
    k = unit(mx.random.normal((B, S, Hk, Dk), key=ks[1]))
    v = mx.random.normal((B, S, Hv, Dv), key=ks[2]).astype(mx.bfloat16)
    g = -mx.random.uniform(0.0, max_decay, (B, S, Hv), key=ks[3])
    beta = mx.random.uniform(shape=(B, S, Hv), key=ks[4])
    state = state_scale * mx.random.normal((B, Hv, Dk, Dv), key=ks[5])
    return q, k, v, g, beta, state

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

COLUMNS_PER_BLOCK = 32  # 128 threads a block


def usable(Dk: int) -> bool:
    return Dk % 4 == 0


def recurrence_cuda(q, k, v, g, beta, state, keep_states):
    """Same contract as gdn._recurrence_ops (Dk a multiple of 4: see `usable`)."""
    B, S, Hv, Dv = v.shape
    Dk = k.shape[-1]
    has_q = q is not None
    kernel = cuda_kernel("gdn_recurrence", ["q", "k", "v", "g", "beta", "state_in"],
                         ["out", "state_out", "states"], SOURCE)
    out, state_out, states = kernel(
        inputs=[q if has_q else k, k, v, g, beta, state],
        template=[("Dk", Dk), ("Dv", Dv), ("Hv", Hv), ("HAS_Q", has_q), ("KEEP", bool(keep_states)),
                  ("OutT", v.dtype), ("SPLIT", SCAN_SPLIT)],
        grid=(-(-Dv // COLUMNS_PER_BLOCK) * 4 * COLUMNS_PER_BLOCK, B * Hv, 1),
        threadgroup=(4 * COLUMNS_PER_BLOCK, 1, 1),
        output_shapes=[(B, S, Hv, Dv) if has_q else (1,), (B, Hv, Dk, Dv), (B, S, Hv, Dk, Dv) if keep_states else (1,)],
        output_dtypes=[v.dtype, mx.float32, mx.float32],
    )
    return (out if has_q else None), state_out, (states if keep_states else None)


def self_check(reference) -> bool:
    """Run the kernel once against the ops path on a small random case shaped like the real ones (two v-heads
    per k-head, bfloat16 v); True when they agree. A kernel that fails to build raises, and kernels.ready says so."""
    q, k, v, g, beta, state = random_inputs(1, 3, 2, 4, 32, 64, seed=0, max_decay=1.0)
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
# Only the recurrence is sequential in the tokens: a chunk of CH tokens first gets its conv, norms and gates
# all at once (into shared memory), then the recurrence steps through the chunk with no barrier between
# tokens, then the gated norms of the chunk's outputs run a warp a token. (Step by step, the ~4 barriers and
# dependent loads of each token made a 16-token window cost 92 us a layer on an H100; chunked, 46 us.)
# Rounding follows the ops path (GatedDeltaNet.mixer_ops): the conv and silu round to CT after every
# operation as MLX's elementwise ops do, the norms and the recurrence run in float32.

# What the fused mixer and a prefill's kernels (prep and gated_norm, below) compute alike, per channel and head.
INPUTS_HEADER = """
// Conv + silu of one channel at one token, rounded to CT after every operation as MLX's elementwise ops do:
// x points at the channel in the first of the K rows of the conv window (rows `stride` apart), w at its K taps.
template <int K, typename CT, typename T, typename WT>
__device__ inline float conv_silu(const T* x, size_t stride, const WT* w) {
    float acc = static_cast<float>(static_cast<CT>(static_cast<float>(x[0]) * static_cast<float>(w[0])));
    #pragma unroll
    for (int i = 1; i < K; ++i) {
        const float term = static_cast<float>(static_cast<CT>(static_cast<float>(x[i * stride]) * static_cast<float>(w[i])));
        acc = static_cast<float>(static_cast<CT>(acc + term));
    }
    const float sig = static_cast<float>(static_cast<CT>(1.f / (1.f + expf(-acc))));
    return static_cast<float>(static_cast<CT>(acc * sig));
}

// The gates of one (token, v-head) in float32: g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b).
__device__ inline void gdn_gates(float a, float b, float dt_bias, float A_log, float& g, float& beta) {
    const float av = a + dt_bias;
    const float softplus = fmaxf(av, 0.f) + log1pf(expf(-fabsf(av)));
    g = -expf(A_log) * softplus;
    beta = 1.f / (1.f + expf(-b));
}

// The gated RMS norm of one (token, v-head)'s Dv outputs o, by one warp: rmsnorm(o) * norm_w rounded to RT (as
// mx.fast.rms_norm returns it), times silu(z) in float32, rounded to the output's type.
template <int Dv, typename RT, typename OT, typename ZT, typename WT, typename DT>
__device__ inline void gated_norm(const OT* o, const ZT* z, const WT* norm_w, float eps, DT* dst, int lane) {
    float sq = 0.f;
    for (int i = lane; i < Dv; i += 32) { const float v = static_cast<float>(o[i]); sq += v * v; }
    #pragma unroll
    for (int m = 16; m > 0; m >>= 1) sq += __shfl_xor_sync(0xffffffff, sq, m);
    const float inv = rsqrtf(sq / Dv + eps);
    for (int i = lane; i < Dv; i += 32) {
        const float scaled = static_cast<float>(o[i]) * inv * static_cast<float>(norm_w[i]);
        const float normed = static_cast<float>(static_cast<RT>(scaled));
        const float zf = static_cast<float>(z[i]);
        dst[i] = static_cast<DT>(normed * (zf * (1.f / (1.f + expf(-zf)))));
    }
}
"""

MIXER_SOURCE = """
    constexpr int R = Dk / 4;
    constexpr int C = 2 * Hk * Dk + Hv * Dv;       // conv channels: q | k | v
    constexpr int W = 2 * Dk + Dv;                 // the channels one head reads
    constexpr int CH = 16;                         // tokens per chunk (33 KB of shared memory at Dk = Dv = 128)
    constexpr int KP = Dk + 4;                     // q, k rows padded: element i sits at i + i / R, so the
                                                   // four lanes of a column read four banks
    const int tid = threadIdx.x, part = tid & 3, j = tid >> 2;   // j: value column (blockDim.x == 4 * Dv)
    const int lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const int bh = blockIdx.x, b = bh / Hv, h = bh % Hv, kh = h / (Hv / Hk);
    const int S = proj_shape[1], P = proj_shape[2], L = conv_in_shape[1];
    const int i0 = part * R;
    const float qscale = static_cast<float>(1.0 / sqrt(static_cast<double>(Dk)));  // as Python's Dk**-0.5
    __shared__ float qs[CH * KP], ks[CH * KP], vs[CH * Dv], os[CH * Dv], gs[CH], betas[CH];

    float s[R];
    #pragma unroll
    for (int r = 0; r < R; ++r) s[r] = state_in[((size_t)bh * Dk + i0 + r) * Dv + j];

    for (int t0 = 0; t0 < S; t0 += CH) {
        const int n = min(CH, S - t0);
        // conv + silu of this head's channels for the chunk's tokens, rounded like MLX's elementwise ops in CT
        for (int u = tid; u < n * W; u += blockDim.x) {
            const int tt = u / W, c = u % W;
            const int ch = c < Dk ? kh * Dk + c : c < 2 * Dk ? Hk * Dk + kh * Dk + (c - Dk) : 2 * Hk * Dk + h * Dv + (c - 2 * Dk);
            const float y = conv_silu<K, CT>(conv_in + ((size_t)b * L + t0 + tt) * C + ch, C, conv_w + ch * K);
            if (c < Dk) qs[tt * KP + c + c / R] = y;
            else if (c < 2 * Dk) ks[tt * KP + (c - Dk) + (c - Dk) / R] = y;
            else vs[tt * Dv + c - 2 * Dk] = y;
        }
        if (tid < n) {  // the gates
            const size_t prow = ((size_t)b * S + t0 + tid) * P;
            gdn_gates(static_cast<float>(proj[prow + AO + h]), static_cast<float>(proj[prow + BO + h]),
                      static_cast<float>(dt_bias[h]), static_cast<float>(A_log[h]), gs[tid], betas[tid]);
        }
        __syncthreads();
        for (int u = warp; u < 2 * n; u += warps) {  // l2 norms, a warp a row: q (scaled) and k of each token
            float* row = (u & 1 ? ks : qs) + (u >> 1) * KP;
            float ss = 0.f;
            for (int i = lane; i < Dk; i += 32) ss += row[i + i / R] * row[i + i / R];
            #pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
            const float inv = rsqrtf(ss + 1e-6f);
            for (int i = lane; i < Dk; i += 32) row[i + i / R] = u & 1 ? row[i + i / R] * inv : row[i + i / R] * inv * qscale;
        }
        __syncthreads();
        if (TAPE) {  // the recurrence inputs, for a commit by replay (k is written by every v-head of its k-head)
            for (int u = tid; u < n * Dk; u += blockDim.x) {
                const int tt = u / Dk, i = u % Dk;
                tape_k[(((size_t)b * S + t0 + tt) * Hk + kh) * Dk + i] = ks[tt * KP + i + i / R];
            }
            for (int u = tid; u < n * Dv; u += blockDim.x) {
                const int tt = u / Dv, i = u % Dv;
                tape_v[(((size_t)b * S + t0 + tt) * Hv + h) * Dv + i] = static_cast<CT>(vs[u]);
            }
            if (tid < n) {
                const size_t row = ((size_t)b * S + t0 + tid) * Hv + h;
                tape_g[row] = gs[tid];
                tape_beta[row] = betas[tid];
            }
        }
        // the recurrence for column j, rows i0 .. i0+R-1, through the chunk
        for (int tt = 0; tt < n; ++tt) {
            const float* kt = ks + tt * KP + i0 + part;
            const float* qt = qs + tt * KP + i0 + part;
            const float decay = expf(gs[tt]);
            float recalled = 0.f;
            #pragma unroll
            for (int r = 0; r < R; ++r) { s[r] *= decay; recalled += kt[r] * s[r]; }
            recalled += __shfl_xor_sync(0xffffffff, recalled, 1);
            recalled += __shfl_xor_sync(0xffffffff, recalled, 2);
            const float delta = betas[tt] * (vs[tt * Dv + j] - recalled);
            float o = 0.f;
            #pragma unroll
            for (int r = 0; r < R; ++r) { s[r] += kt[r] * delta; o += qt[r] * s[r]; }
            o += __shfl_xor_sync(0xffffffff, o, 1);
            o += __shfl_xor_sync(0xffffffff, o, 2);
            if (KEEP) {
                #pragma unroll
                for (int r = 0; r < R; ++r) states[((((size_t)b * S + t0 + tt) * Hv + h) * Dk + i0 + r) * Dv + j] = s[r];
            }
            if (part == 0) os[tt * Dv + j] = static_cast<float>(static_cast<CT>(o));  // o rounds to CT first
        }
        __syncthreads();
        for (int tt = warp; tt < n; tt += warps)  // the gated RMS norm of each token's Dv outputs, a warp a token
            gated_norm<Dv, RT>(os + tt * Dv, proj + ((size_t)b * S + t0 + tt) * P + ZO + h * Dv, norm_w, eps[0],
                               out + ((size_t)b * S + t0 + tt) * (Hv * Dv) + h * Dv, lane);
        __syncthreads();  // the next chunk overwrites the shared arrays
    }
    #pragma unroll
    for (int r = 0; r < R; ++r) state_out[((size_t)bh * Dk + i0 + r) * Dv + j] = s[r];
"""

def _promote(a, b):
    """The dtype MLX gives a binary operation on a and b (builds nothing that is evaluated)."""
    return (mx.zeros((), a) + mx.zeros((), b)).dtype


def mixer_usable(layer) -> bool:
    """The fused mixer needs the four input projections in one Linear and a block of 4 * Dv threads made of whole
    warps. Heads up to 128 wide (every Qwen3.5 / Qwen3-Next): a lane keeps Dk / 4 floats of state, and at 256
    the block would need more registers than an SM has."""
    return len(layer.groups) == 1 and layer.Dk % 4 == 0 and layer.Dk <= 128 and layer.Dv % 8 == 0 and layer.Dv <= 128


def mixer(layer, conv_in, proj, state, keep_states, keep_tape=False):
    """The GDN mixer of `layer` (a models.model.GatedDeltaNet) on one window: conv_in [B, kernel-1+S, C] (the
    carried conv inputs, then this window's qkv), proj [B, S, P] (the input projection, parts in the order of
    layer.groups[0]), state [B, Hv, Dk, Dv] float32 -> (out [B, S, Hv * Dv] before out_proj, final state,
    per-step states or None, the recurrence inputs (k, v, g, beta) or None), as GatedDeltaNet.mixer_ops."""
    kernel = cuda_kernel("gdn_mixer", ["conv_in", "proj", "conv_w", "A_log", "dt_bias", "norm_w", "eps", "state_in"],
                         ["out", "state_out", "states", "tape_k", "tape_v", "tape_g", "tape_beta"], MIXER_SOURCE,
                         header=INPUTS_HEADER)
    B, S, _ = proj.shape
    offsets = layer.offsets
    out_dtype = _promote(conv_in.dtype, layer.conv1d.weight.dtype)  # v's dtype after the conv
    Hk, Hv, Dk, Dv = layer.Hk, layer.Hv, layer.Dk, layer.Dv
    out, state_out, states, *tape = kernel(
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


# ---------------------------------------------------------------------------------------------------------------
# A prefill's recurrence inputs in one launch: conv + silu, the l2 norms of q and k (q scaled by Dk^-0.5), and
# the gates g and beta, as GatedDeltaNet.recurrence_inputs computes them with ~30 MLX operations a layer (0.3 ms
# a layer for 1024 tokens of Qwen3.5-35B-A3B on an H100, most of it the conv's four strided multiplies).
# One block per token; warps take heads (q heads, k heads, v heads) in turn, a lane every 32nd channel. The
# rounding is the operations' (and the fused mixer's): the conv and silu in CT, step by step; norms and gates
# in float32.

PREP_SOURCE = """
    constexpr int C = 2 * Hk * Dk + Hv * Dv, UNITS = 2 * Hk + Hv, MAXR = (Dk > Dv ? Dk : Dv) / 32;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const int S = proj_shape[1], P = proj_shape[2], bt = blockIdx.x, bi = bt / S, t = bt % S;
    // token t's conv window: rows t .. t + K - 1 of [the K - 1 carried rows (null: zeros), this window's qkv]
    const T* rows[K];
    #pragma unroll
    for (int i = 0; i < K; ++i) {
        const int r = t + i;
        rows[i] = r >= K - 1 ? proj + ((size_t)bi * S + r - (K - 1)) * P + QO
                             : (has_carried[0] ? carried + ((size_t)bi * (K - 1) + r) * C : nullptr);
    }
    for (int u = warp; u < UNITS; u += warps) {
        const bool is_v = u >= 2 * Hk;
        const int D = is_v ? Dv : Dk, base = is_v ? 2 * Hk * Dk + (u - 2 * Hk) * Dv : u * Dk;
        float y[MAXR], ss = 0.f;
        #pragma unroll
        for (int r = 0; r < MAXR; ++r) {
            if (r * 32 >= D) break;
            const int ch = base + r * 32 + lane;
            T x[K];
            #pragma unroll
            for (int i = 0; i < K; ++i) x[i] = rows[i] ? rows[i][ch] : static_cast<T>(0.f);
            y[r] = conv_silu<K, CT>(x, 1, conv_w + ch * K);
            ss += y[r] * y[r];
        }
        if (is_v) {
            const size_t row = ((size_t)bt * Hv + (u - 2 * Hk)) * Dv;
            #pragma unroll
            for (int r = 0; r < MAXR; ++r) if (r * 32 < Dv) v_out[row + r * 32 + lane] = static_cast<CT>(y[r]);
            continue;
        }
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
        const float inv = rsqrtf(ss + 1e-6f);
        const bool is_q = u < Hk;
        const float qscale = static_cast<float>(1.0 / sqrt(static_cast<double>(Dk)));  // as Python's Dk**-0.5
        float* dst = (is_q ? q_out : k_out) + ((size_t)bt * Hk + (is_q ? u : u - Hk)) * Dk;
        #pragma unroll
        for (int r = 0; r < MAXR; ++r)
            if (r * 32 < Dk) dst[r * 32 + lane] = is_q ? y[r] * inv * qscale : y[r] * inv;
    }
    for (int h = tid; h < Hv; h += blockDim.x) {
        const size_t i = (size_t)bt * Hv + h, prow = (size_t)bt * P;
        gdn_gates(static_cast<float>(proj[prow + AO + h]), static_cast<float>(proj[prow + BO + h]),
                  static_cast<float>(dt_bias[h]), static_cast<float>(A_log[h]), g_out[i], beta_out[i]);
    }
"""


def prefill_usable(layer) -> bool:
    """prep and gated_norm read the input projection as one Linear's output (as the fused mixer does), heads of
    whole warps of channels."""
    return (len(layer.groups) == 1 and layer.Dk % 32 == 0 and layer.Dv % 32 == 0 and layer.Dk <= 256
            and layer.Dv <= 256)


def prep(layer, carried, proj):
    """GatedDeltaNet.recurrence_inputs of `layer` in one kernel, from the conv inputs carried from before
    (carried [B, kernel-1, C], or None for zeros) and proj [B, S, P], the input projection, whose qkv, b and a parts
    it reads (no [carried, qkv] copy) -> q, k [B, S, Hk, Dk] float32 (normalized, q scaled), v [B, S, Hv, Dv] in
    the conv's dtype, g and beta [B, S, Hv] float32."""
    kernel = cuda_kernel("gdn_prep", ["carried", "has_carried", "proj", "conv_w", "A_log", "dt_bias"],
                         ["q_out", "k_out", "v_out", "g_out", "beta_out"], PREP_SOURCE, header=INPUTS_HEADER)
    B, S, _ = proj.shape
    Hk, Hv, Dk, Dv = layer.Hk, layer.Hv, layer.Dk, layer.Dv
    ct = _promote(proj.dtype, layer.conv1d.weight.dtype)
    f32 = mx.float32
    return kernel(
        inputs=[proj if carried is None else carried, mx.array([carried is not None], mx.int32), proj,
                layer.conv1d.weight, layer.A_log, layer.dt_bias],
        template=[("Dk", Dk), ("Dv", Dv), ("Hk", Hk), ("Hv", Hv), ("K", layer.kernel), ("QO", layer.offsets["qkv"]),
                  ("BO", layer.offsets["b"]), ("AO", layer.offsets["a"]), ("T", proj.dtype), ("CT", ct)],
        grid=(256 * B * S, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(B, S, Hk, Dk), (B, S, Hk, Dk), (B, S, Hv, Dv), (B, S, Hv), (B, S, Hv)],
        output_dtypes=[f32, f32, ct, f32, f32],
    )


# A prefill's gated norm (GatedRMSNorm on the recurrence's outputs, z read from the input projection) in one
# launch, a warp a (token, v-head): as MLX operations it was six (the norm, casts, silu, products), 77 us a layer
# for 1024 tokens of Qwen3.5-35B-A3B on an H100.
NORM_SOURCE = """
    constexpr int WARPS = 8;
    const int lane = threadIdx.x & 31, row = blockIdx.x * WARPS + (threadIdx.x >> 5);  // row: (b, t, h)
    const int P = proj_shape[2];
    if (row >= o_shape[0] * o_shape[1] * Hv) return;  // a whole warp
    gated_norm<Dv, RT>(o + (size_t)row * Dv, proj + (size_t)(row / Hv) * P + ZO + (row % Hv) * Dv, norm_w, eps[0],
                       out + (size_t)row * Dv, lane);
"""


def gated_norm(layer, o, proj):
    """layer.norm(o, z) with z read from the input projection: o [B, S, Hv, Dv] (the recurrence's outputs),
    proj [B, S, P] -> [B, S, Hv * Dv] in o's dtype."""
    kernel = cuda_kernel("gdn_gated_norm", ["o", "proj", "norm_w", "eps"], ["out"], NORM_SOURCE,
                         header=INPUTS_HEADER)
    B, S, Hv, Dv = o.shape
    (out,) = kernel(
        inputs=[o, proj, layer.norm.weight, mx.array([layer.norm.eps], mx.float32)],
        template=[("Dv", Dv), ("Hv", Hv), ("ZO", layer.offsets["z"]),
                  ("RT", _promote(o.dtype, layer.norm.weight.dtype))],
        grid=(-(-B * S * Hv // 8) * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(B, S, Hv * Dv)], output_dtypes=[o.dtype],
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# The chunk-parallel GDN of a prefill (gdn.gdn_chunked's algorithm) in two launches.
#
# As MLX operations the chunked form is ~200 small kernels a layer (the UT transform's doubling steps, then a
# loop over chunks), and the recurrence kernel above, one token at a time, takes ~1.2 ms for 1024 tokens of
# Qwen3.5-35B-A3B's 32 heads. Here (0.23 ms of kernel time a layer for those 1024 tokens on an H100):
# - `gdn_chunk_prep`, one block per (chunk, head), all chunks at once: the cumulative decay G, the strictly
#   lower A = beta_r (k_r . k_j) exp(G_r - G_j), the causal attn = (q_r . k_j) exp(G_r - G_j), and
#   U = (I + A)^-1 beta V, W = (I + A)^-1 beta exp(G) K by forward substitution, one thread per column.
# - `gdn_chunk_scan`, one block per (head, 32 state columns), chunk after chunk with its state slice in
#   registers and shared memory, the products on tensor cores: d = U - W S, o = exp(G) q S + attn d,
#   S = exp(G_last) S + (exp(G_last - G) k)^T d.
# Everything is float32, as in the operations (the scan's tensor-core products too: each operand in two tf32
# parts); only the order of the sums differs.

CHUNK_PREP_SOURCE = """
    constexpr int NTH = 256, PER = C / 32, DKP = Dk + 4, XS = Dv + Dk, TS = C / 16, AS = C + 4;
    const int n = blockIdx.x, N = gridDim.x, bh = blockIdx.y, tid = threadIdx.x, lane = tid & 31;
    const int b = bh / Hv, h = bh % Hv, S = v_shape[1], Hk = k_shape[2], kh = h / (Hv / Hk), T0 = n * C;
    const size_t cn = (size_t)bh * N + n;
    extern __shared__ float smem[];
    float* Ks = smem;                  // [C][Dk + 4]: this chunk's k rows (zeros past S), 16-byte aligned
    float* Qs = Ks + C * DKP;          // [C][Dk + 4]: q rows
    float* Am = Qs + C * DKP;          // [C][C + 4]: A (rows 16-byte aligned: the solve reads four at a time)
    float* X = Am + C * AS;            // [C][Dv + Dk]: the right-hand sides beta v | beta exp(G) k
    float* Gs = X + C * XS;            // [C]: G
    float* Bs = Gs + C;                // [C]: beta
    if (tid < 32) {  // G: inclusive scan of g, PER tokens a lane; padded tokens have g = beta = 0 (no-op steps)
        float gl[PER], run = 0.f;
        #pragma unroll
        for (int p = 0; p < PER; ++p) {
            const int t = T0 + lane * PER + p;
            run += t < S ? static_cast<float>(g[((size_t)b * S + t) * Hv + h]) : 0.f;
            gl[p] = run;
        }
        float incl = run;
        #pragma unroll
        for (int o = 1; o < 32; o <<= 1) { const float y = __shfl_up_sync(0xffffffff, incl, o); if (lane >= o) incl += y; }
        float before = __shfl_up_sync(0xffffffff, incl, 1);
        if (lane == 0) before = 0.f;
        #pragma unroll
        for (int p = 0; p < PER; ++p) {
            const int r = lane * PER + p, t = T0 + r;
            Gs[r] = gl[p] + before;
            G_out[cn * C + r] = gl[p] + before;
            Bs[r] = t < S ? static_cast<float>(beta[((size_t)b * S + t) * Hv + h]) : 0.f;
        }
    }
    for (int idx = tid; idx < C * Dk; idx += NTH) {
        const int r = idx / Dk, i = idx % Dk, t = T0 + r;
        const size_t src = (((size_t)b * S + t) * Hk + kh) * Dk + i;
        Ks[r * DKP + i] = t < S ? static_cast<float>(k[src]) : 0.f;
        Qs[r * DKP + i] = t < S ? static_cast<float>(q[src]) : 0.f;
    }
    __syncthreads();
    for (int idx = tid; idx < C * XS; idx += NTH) {  // right-hand sides, all loads in flight at once
        const int r = idx / XS, c = idx % XS, t = T0 + r;
        X[idx] = c < Dv ? (t < S ? Bs[r] * static_cast<float>(v[(((size_t)b * S + t) * Hv + h) * Dv + c]) : 0.f)
                        : Bs[r] * expf(Gs[r]) * Ks[r * DKP + c - Dv];
    }
    // A and attn in TS x TS tiles, 16 x 16 of them, one a thread: the 136 on and below the diagonal go to the first
    // threads (whole warps of them; the rest only write the zeros above), each row read four k values at a time
    for (int tile = tid; tile < 16 * 16; tile += NTH) {
        constexpr int LOWER = 16 * 17 / 2;
        const bool lower = tile < LOWER;
        const int t = lower ? tile : tile - LOWER;  // the t-th tile of the triangle with (lower) or without diagonal
        auto first = [&](int R) { return lower ? R * (R + 1) / 2 : R * (R - 1) / 2; };  // its row R's first tile
        int R = lower ? 0 : 1;
        while (R < 15 && first(R + 1) <= t) ++R;
        const int J = t - first(R);                 // J <= R (lower), J < R (above: the tile (J, R))
        const int r0 = (lower ? R : J) * TS, j0 = (lower ? J : R) * TS;
        float kk[TS][TS] = {}, qk[TS][TS] = {};
        if (lower) {
            #pragma unroll 2
            for (int i = 0; i < Dk; i += 4) {
                float4 kr[TS], qr[TS], kj[TS];
                #pragma unroll
                for (int a = 0; a < TS; ++a) {
                    kr[a] = *reinterpret_cast<const float4*>(Ks + (r0 + a) * DKP + i);
                    qr[a] = *reinterpret_cast<const float4*>(Qs + (r0 + a) * DKP + i);
                    kj[a] = *reinterpret_cast<const float4*>(Ks + (j0 + a) * DKP + i);
                }
                #pragma unroll
                for (int a = 0; a < TS; ++a)
                    #pragma unroll
                    for (int e = 0; e < TS; ++e) {
                        kk[a][e] += kr[a].x * kj[e].x; kk[a][e] += kr[a].y * kj[e].y;
                        kk[a][e] += kr[a].z * kj[e].z; kk[a][e] += kr[a].w * kj[e].w;
                        qk[a][e] += qr[a].x * kj[e].x; qk[a][e] += qr[a].y * kj[e].y;
                        qk[a][e] += qr[a].z * kj[e].z; qk[a][e] += qr[a].w * kj[e].w;
                    }
            }
        }
        #pragma unroll
        for (int a = 0; a < TS; ++a)
            #pragma unroll
            for (int e = 0; e < TS; ++e) {
                const int r = r0 + a, j = j0 + e;
                const float decay = j <= r ? expf(Gs[r] - Gs[j]) : 0.f;
                Am[r * AS + j] = j < r ? Bs[r] * kk[a][e] * decay : 0.f;
                attn[(cn * C + r) * C + j] = j <= r ? qk[a][e] * decay : 0.f;
            }
    }
    __syncthreads();
    for (int c = tid; c < XS; c += NTH) {  // (I + A) X = rhs, row by row; each thread its own column, in registers
        float x[C];
        #pragma unroll
        for (int r = 0; r < C; ++r) {
            float acc[4] = {X[r * XS + c], 0.f, 0.f, 0.f};
            #pragma unroll
            for (int j = 0; j < r / 4 * 4; j += 4) {
                const float4 a = *reinterpret_cast<const float4*>(Am + r * AS + j);
                acc[0] -= a.x * x[j]; acc[1] -= a.y * x[j + 1]; acc[2] -= a.z * x[j + 2]; acc[3] -= a.w * x[j + 3];
            }
            #pragma unroll
            for (int j = r / 4 * 4; j < r; ++j) acc[0] -= Am[r * AS + j] * x[j];
            x[r] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
            if (c < Dv) U[(cn * C + r) * Dv + c] = x[r]; else W[(cn * C + r) * Dk + c - Dv] = x[r];
        }
    }
"""

# One block per (head, SL state columns), 8 warps, chunk after chunk, the products on tensor cores
# (mma.sync m16n8k8, tf32 in, float32 accumulate); SPLIT: each float32 operand goes in as tf32 high and low
# parts (three products, float32 accuracy), else as one rounded tf32 value. The next chunk's q, k, W, attn, U
# and G are loaded into registers while this one computes. A chunk:
#   [W; q] S (64 x Dk x SL): warp w a 16-row tile, two 8-column tiles; d = U - W S, and exp(G) q S kept;
#   o = exp(G) q S + attn d (warps 4-7, their tiles); S = exp(G_last) S + k^T (exp(G_last - G) d), each warp
#   16 rows of the slice in its accumulators, written out (transposed) for the next chunk's products.
# Within a k-step of 8 a lane's A and B values are physically k = 4 tig .. 4 tig + 3 of a 16-wide pair of steps
# (the same permutation for both), so [W; q] and S are read four at a time.
SCAN_HEADER = """
__device__ __forceinline__ uint32_t tf32_of(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ void mma_tf32(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a b for float32 fragments: the small cross terms first when split
template <bool SPLIT>
__device__ __forceinline__ void mma_f32(float d[4], const float a[4], const float b[2]) {
    uint32_t ah[4], bh[2];
    #pragma unroll
    for (int i = 0; i < 4; ++i) ah[i] = tf32_of(a[i]);
    bh[0] = tf32_of(b[0]); bh[1] = tf32_of(b[1]);
    if (SPLIT) {
        uint32_t al[4], bl[2];
        #pragma unroll
        for (int i = 0; i < 4; ++i) al[i] = tf32_of(a[i] - __uint_as_float(ah[i]));
        bl[0] = tf32_of(b[0] - __uint_as_float(bh[0])); bl[1] = tf32_of(b[1] - __uint_as_float(bh[1]));
        mma_tf32(d, al, bh);
        mma_tf32(d, ah, bl);
    }
    mma_tf32(d, ah, bh);
}
"""

CHUNK_SCAN_SOURCE = """
    // row strides: 16 mod 32 words where four-wide reads must spread over the banks, 8 (or 4) for single ones
    constexpr int WP = Dk + 16, SP = Dk + 16, KP = Dk + 8, AP = C + 4, DP = SL + 8;
    constexpr int LQ = C * Dk / 4 / NTH, LA = C * C / 4 / NTH;   // float4 loads a thread, per matrix
    static_assert(C == 32 && SL == 32 && NTH == 256 && Dk == 128 && LQ * 4 * NTH == C * Dk && LA * 4 * NTH == C * C,
                  "layout");
    const int bh = blockIdx.y, c0 = blockIdx.x * SL, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int b = bh / Hv, h = bh % Hv, S = q_shape[1], Hk = q_shape[2], kh = h / (Hv / Hk), N = G_shape[1];
    extern __shared__ float4 smem4[];
    float* St = reinterpret_cast<float*>(smem4);  // [SL][SP]: the state slice, transposed (a column's Dk values)
    float* Ws = St + SL * SP;          // [C][WP]: W
    float* Qs = Ws + C * WP;           // [C][WP]: q
    float* Ks = Qs + C * WP;           // [C][KP]: k
    float* At = Ks + C * KP;           // [C][AP]: attn
    float* Dm = At + C * AP;           // [C][DP]: d
    float* De = Dm + C * DP;           // [C][DP]: exp(G_last - G_j) d_j
    float* Gs = De + C * DP;           // [C]: G
    // [W; q] S: warp w takes rows 16 (w / 2) .. of [W; q] (d for w < 4, o for the rest) and column tiles nb, nb + 1
    const bool is_d = warp < 4;
    const int nb = (warp & 1) * 2, r0 = ((warp >> 1) & 1) * 16 + gid;  // this lane's rows r0 and r0 + 8
    const float* Arows = (is_d ? Ws : Qs) + (r0 - gid) * WP;
    const float4 zero = make_float4(0.f, 0.f, 0.f, 0.f);
    float4 pq[LQ], pk[LQ], pw[LQ], pa[LA];
    float2 pu[2][2];                   // U at rows r0 / r0 + 8, this lane's two columns of each tile (d warps)
    float pg = 0.f;                    // G of token tid (tid < C)
    auto load = [&](int n) {
        const size_t cn = (size_t)bh * N + n;
        #pragma unroll
        for (int l = 0; l < LQ; ++l) {
            const int f = tid + l * NTH, r = f / (Dk / 4), i = (f % (Dk / 4)) * 4, t = n * C + r;
            const size_t src = (((size_t)b * S + t) * Hk + kh) * Dk + i;
            pq[l] = t < S ? *reinterpret_cast<const float4*>(q + src) : zero;
            pk[l] = t < S ? *reinterpret_cast<const float4*>(k + src) : zero;
            pw[l] = *reinterpret_cast<const float4*>(W + cn * C * Dk + 4 * f);
        }
        #pragma unroll
        for (int l = 0; l < LA; ++l) pa[l] = *reinterpret_cast<const float4*>(attn + cn * C * C + 4 * (tid + l * NTH));
        if (tid < C) pg = G[cn * C + tid];
        if (is_d) {
            #pragma unroll
            for (int j = 0; j < 2; ++j)
                #pragma unroll
                for (int hf = 0; hf < 2; ++hf)
                    pu[j][hf] = *reinterpret_cast<const float2*>(U + (cn * C + r0 + 8 * hf) * Dv + c0 + 8 * (nb + j) + 2 * tig);
        }
    };
    // the state: warp w's rows 16 w + gid (+ 8) of the slice, column tiles 0..3, in mma accumulator order
    const int i0 = warp * 16;
    float s[SL / 8][4];
    #pragma unroll
    for (int nt = 0; nt < SL / 8; ++nt)
        #pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int i = i0 + gid + 8 * (c / 2), col = 8 * nt + 2 * tig + c % 2;
            s[nt][c] = has_state[0] ? state_in[((size_t)bh * Dk + i) * Dv + c0 + col] : 0.f;
            St[col * SP + i] = s[nt][c];
        }
    load(0);
    for (int n = 0; n < N; ++n) {
        __syncthreads();  // the previous chunk is done with the shared rows
        #pragma unroll
        for (int l = 0; l < LQ; ++l) {
            const int f = tid + l * NTH, r = f / (Dk / 4), i = (f % (Dk / 4)) * 4;
            *reinterpret_cast<float4*>(Qs + r * WP + i) = pq[l];
            *reinterpret_cast<float4*>(Ws + r * WP + i) = pw[l];
            *reinterpret_cast<float4*>(Ks + r * KP + i) = pk[l];
        }
        #pragma unroll
        for (int l = 0; l < LA; ++l) {
            const int f = tid + l * NTH, r = f / (C / 4), j = (f % (C / 4)) * 4;
            *reinterpret_cast<float4*>(At + r * AP + j) = pa[l];
        }
        float2 u[2][2];
        #pragma unroll
        for (int j = 0; j < 2; ++j) { u[j][0] = pu[j][0]; u[j][1] = pu[j][1]; }
        if (tid < C) Gs[tid] = pg;
        __syncthreads();
        if (n + 1 < N) load(n + 1);
        const float Glast = Gs[C - 1];
        // [W; q] S, two accumulators a tile (even and odd pairs of k-steps) for two independent chains
        float acc[2][2][4] = {};
        #pragma unroll
        for (int k0 = 0; k0 < Dk; k0 += 16) {
            const float4 alo = *reinterpret_cast<const float4*>(Arows + gid * WP + k0 + 4 * tig);
            const float4 ahi = *reinterpret_cast<const float4*>(Arows + (gid + 8) * WP + k0 + 4 * tig);
            const float a0[4] = {alo.x, ahi.x, alo.y, ahi.y}, a1[4] = {alo.z, ahi.z, alo.w, ahi.w};
            const int par = (k0 / 16) & 1;
            #pragma unroll
            for (int j = 0; j < 2; ++j) {
                const float4 bv = *reinterpret_cast<const float4*>(St + (8 * (nb + j) + gid) * SP + k0 + 4 * tig);
                const float b0[2] = {bv.x, bv.y}, b1[2] = {bv.z, bv.w};
                mma_f32<SPLIT>(acc[par][j], a0, b0);
                mma_f32<SPLIT>(acc[par][j], a1, b1);
            }
        }
        float o[2][4];
        {
            const float e0 = expf(is_d ? Glast - Gs[r0] : Gs[r0]), e1 = expf(is_d ? Glast - Gs[r0 + 8] : Gs[r0 + 8]);
            #pragma unroll
            for (int j = 0; j < 2; ++j) {
                float c[4];
                #pragma unroll
                for (int i = 0; i < 4; ++i) c[i] = acc[0][j][i] + acc[1][j][i];
                const int col = 8 * (nb + j) + 2 * tig;
                if (is_d) {  // d = U - W S, and exp(G_last - G) d for the state
                    const float d[4] = {u[j][0].x - c[0], u[j][0].y - c[1], u[j][1].x - c[2], u[j][1].y - c[3]};
                    *reinterpret_cast<float2*>(Dm + r0 * DP + col) = make_float2(d[0], d[1]);
                    *reinterpret_cast<float2*>(Dm + (r0 + 8) * DP + col) = make_float2(d[2], d[3]);
                    *reinterpret_cast<float2*>(De + r0 * DP + col) = make_float2(e0 * d[0], e0 * d[1]);
                    *reinterpret_cast<float2*>(De + (r0 + 8) * DP + col) = make_float2(e1 * d[2], e1 * d[3]);
                } else {
                    o[j][0] = e0 * c[0]; o[j][1] = e0 * c[1]; o[j][2] = e1 * c[2]; o[j][3] = e1 * c[3];
                }
            }
        }
        __syncthreads();
        if (!is_d) {  // o += attn d (attn is zero above the diagonal: k-steps past this tile's rows are skipped)
            #pragma unroll
            for (int k0 = 0; k0 < C; k0 += 8) {
                if (k0 > r0 - gid + 15) break;
                const float a[4] = {At[r0 * AP + k0 + tig], At[(r0 + 8) * AP + k0 + tig],
                                    At[r0 * AP + k0 + tig + 4], At[(r0 + 8) * AP + k0 + tig + 4]};
                #pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int col = 8 * (nb + j) + gid;
                    const float bb[2] = {Dm[(k0 + tig) * DP + col], Dm[(k0 + tig + 4) * DP + col]};
                    mma_f32<SPLIT>(o[j], a, bb);
                }
            }
            #pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
                const int t = n * C + r0 + 8 * hf;
                if (t >= S) continue;
                OutT* dst = out + (((size_t)b * S + t) * Hv + h) * Dv + c0 + 2 * tig;
                #pragma unroll
                for (int j = 0; j < 2; ++j) {
                    dst[8 * (nb + j)] = static_cast<OutT>(o[j][2 * hf]);
                    dst[8 * (nb + j) + 1] = static_cast<OutT>(o[j][2 * hf + 1]);
                }
            }
        }
        // S = exp(G_last) S + k^T (exp(G_last - G) d): A = k^T (rows i, k-index the token j), B = De
        const float chunk_decay = expf(Glast);
        #pragma unroll
        for (int nt = 0; nt < SL / 8; ++nt)
            #pragma unroll
            for (int c = 0; c < 4; ++c) s[nt][c] *= chunk_decay;
        #pragma unroll
        for (int k0 = 0; k0 < C; k0 += 8) {
            const float a[4] = {Ks[(k0 + tig) * KP + i0 + gid], Ks[(k0 + tig) * KP + i0 + gid + 8],
                                Ks[(k0 + tig + 4) * KP + i0 + gid], Ks[(k0 + tig + 4) * KP + i0 + gid + 8]};
            #pragma unroll
            for (int nt = 0; nt < SL / 8; ++nt) {
                const float bb[2] = {De[(k0 + tig) * DP + 8 * nt + gid], De[(k0 + tig + 4) * DP + 8 * nt + gid]};
                mma_f32<SPLIT>(s[nt], a, bb);
            }
        }
        #pragma unroll
        for (int nt = 0; nt < SL / 8; ++nt)
            #pragma unroll
            for (int c = 0; c < 4; ++c) St[(8 * nt + 2 * tig + c % 2) * SP + i0 + gid + 8 * (c / 2)] = s[nt][c];
    }
    #pragma unroll
    for (int nt = 0; nt < SL / 8; ++nt)
        #pragma unroll
        for (int hf = 0; hf < 2; ++hf)
            *reinterpret_cast<float2*>(state_out + ((size_t)bh * Dk + i0 + gid + 8 * hf) * Dv + c0 + 8 * nt + 2 * tig) =
                make_float2(s[nt][2 * hf], s[nt][2 * hf + 1]);
"""

# Measured on an H100 at 1024 tokens (Qwen3.5-35B-A3B's 32 heads), with the first versions of both kernels:
# chunks of 32 took 0.46-0.52 ms for both, chunks of 64 0.63-0.69 ms (the prep then needs 149 KB of shared
# memory, one block an SM). The scan on CUDA cores (float32 FMAs, each thread a row of d and o and four columns)
# took 220 us a layer, bound by the latency of its shared-memory reads; on tensor cores 148 us with SPLIT (state
# error 2e-6 of the largest entry against the operations). One tf32 product each saved another ~0.13 ms of the
# two chunk kernels' 0.44 at 1024 tokens, at a state error of 5e-4: MLX-CUDA's own float32 matmuls are not tf32
# (3e-7 against float64), so neither is this.
CHUNK = 32  # tokens per chunk
SLICE = 32  # state columns per scan block: 4 blocks a 128-column head, one wave of blocks on an H100
SCAN_THREADS = 256
SCAN_SPLIT = True  # float32 accuracy in the scan's products (three tf32 products each)


def chunked_usable(Dk: int, Dv: int) -> bool:
    """The kernels' thread layouts assume 128-dim keys (both Qwen families) and whole 32-column state slices."""
    return Dk == 128 and Dv % SLICE == 0 and Dv <= 256


def chunked_cuda(q, k, v, g, beta, state):
    """gdn.gdn_chunked on MLX-CUDA (see `chunked_usable`): state float32, or None for zeros. -> (out in v.dtype,
    final state float32)."""
    B, S, Hv, Dv = v.shape
    Dk = k.shape[-1]
    C, N = CHUNK, -(-S // CHUNK)
    f32 = mx.float32
    q, k = q.astype(f32), k.astype(f32)  # the scan reads them as float4 (the layer gives float32 already)
    prep_bytes = 4 * (2 * C * (Dk + 4) + C * (C + 4) + C * (Dv + Dk) + 2 * C)
    U, W, attn, G = cuda_kernel("gdn_chunk_prep", ["q", "k", "v", "g", "beta"], ["U", "W", "attn", "G_out"],
                                 CHUNK_PREP_SOURCE, shared_memory=prep_bytes)(
        inputs=[q, k, v, g, beta],
        template=[("C", C), ("Dk", Dk), ("Dv", Dv), ("Hv", Hv)],
        grid=(N * 256, B * Hv, 1), threadgroup=(256, 1, 1),
        output_shapes=[(B * Hv, N, C, Dv), (B * Hv, N, C, Dk), (B * Hv, N, C, C), (B * Hv, N, C)],
        output_dtypes=[f32, f32, f32, f32],
    )
    scan_bytes = 4 * (SLICE * (Dk + 16) + 2 * C * (Dk + 16) + C * (Dk + 8) + C * (C + 4) + 2 * C * (SLICE + 8) + C)
    # A missing state reads as zeros through a flag, not a template argument: one build serves a prompt's first
    # chunk and the ones that continue it (NVRTC takes ~2 s a build).
    out, final = cuda_kernel("gdn_chunk_scan", ["q", "k", "U", "W", "attn", "G", "state_in", "has_state"],
                              ["out", "state_out"], CHUNK_SCAN_SOURCE, header=SCAN_HEADER, shared_memory=scan_bytes)(
        inputs=[q, k, U, W, attn, G, G if state is None else state, mx.array([state is not None], mx.int32)],
        template=[("C", C), ("Dk", Dk), ("Dv", Dv), ("Hv", Hv), ("SL", SLICE), ("NTH", SCAN_THREADS),
                  ("OutT", v.dtype), ("SPLIT", SCAN_SPLIT)],
        grid=(Dv // SLICE * SCAN_THREADS, B * Hv, 1), threadgroup=(SCAN_THREADS, 1, 1),
        output_shapes=[(B, S, Hv, Dv), (B, Hv, Dk, Dv)],
        output_dtypes=[v.dtype, f32],
    )
    return out, final


def chunked_self_check(reference) -> bool:
    """The chunk kernels against gdn.gdn_chunked's operations on a small random case: three chunks, the last
    one partial, two v-heads per k-head, bfloat16 v; from a state and from none."""
    q, k, v, g, beta, state = random_inputs(1, 150, 2, 4, 128, 32, seed=1)
    for initial in (state, None):
        got, want = chunked_cuda(q, k, v, g, beta, initial), reference(q, k, v, g, beta, initial)
        if not (close(got[0], want[0], 1e-2) and close(got[1], want[1], 1e-3)):
            return False
    return True
