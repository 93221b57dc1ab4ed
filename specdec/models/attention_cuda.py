"""Causal attention of a prefill as one CUDA kernel (MLX's CUDA backend): flash attention on tensor cores.

MLX-CUDA has no fused attention for head_dim 256 (both Qwen families): its fallback scales q, builds the
causal mask, materializes the [H, S, L] scores, selects, softmaxes and multiplies, with copies between, ~0.2 ms a
layer for 1024 tokens of Qwen3.5-35B-A3B on an H100, and scores of H x S x L values (2 GB for a 2048-token chunk
after 32k tokens). Here a block takes 64 queries of one head and walks the keys 32 at a time, up to its last
query's position: scores in float32 from `mma.sync.m16n8k16` (bfloat16 in), an online softmax per row in
registers, the probabilities rounded to bfloat16 for the product with V, each row normalized once at the end.
Four warps own 16 query rows each, with all head_dim columns of their output in registers. The next K/V tile
loads (cp.async) while this one is multiplied. The output is written as [B, S, H, D], as the output projection
reads it (no transpose).
"""

import mlx.core as mx

from .kernels import MMA_BF16, close, cuda_kernel

SOURCE = """
    constexpr int BQ = 64, BK = 32, RS = D + 8;       // query / key rows a tile; smem row stride (bank spread)
    constexpr int CH = D / 8;                          // 16-byte chunks a row
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const int q0 = blockIdx.x * BQ, h = blockIdx.y, b = blockIdx.z;
    const int Hq = gridDim.y, S = q_shape[2], Hkv = k_shape[1], L = k_shape[2], kvh = h / (Hq / Hkv);
    const int offset = L - S;                          // query i sits at position offset + i
    const float scale_log2 = scale[0] * 1.4426950408889634f;  // softmax in base 2
    extern __shared__ __align__(16) T smem[];
    T* Qs = smem;                                      // [BQ][RS]
    T* Kb = Qs + BQ * RS;                              // 2 x [BK][RS]: K tiles, double-buffered
    T* Vb = Kb + 2 * BK * RS;                          // 2 x [BK][RS]: V tiles
    const T* qg = q + (((size_t)b * Hq + h) * S) * D;
    const T* kg = k + (((size_t)b * Hkv + kvh) * L) * D;
    const T* vg = v + (((size_t)b * Hkv + kvh) * L) * D;
    auto copy16 = [&](T* dst, const T* src, bool valid) {  // rows past the end read as zeros (V: 0 * NaN is NaN)
        const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" :: "r"(d), "l"(src), "r"(valid ? 16 : 0));
    };
    for (int c = threadIdx.x; c < BQ * CH; c += blockDim.x) {
        const int r = c / CH, part = c % CH;
        copy16(Qs + r * RS + part * 8, qg + (size_t)min(q0 + r, S - 1) * D + part * 8, q0 + r < S);
    }
    const int kend = min(L, offset + q0 + BQ);         // keys this block's rows can see
    const int tiles = (kend + BK - 1) / BK;
    auto load_kv = [&](int t) {
        T* ks = Kb + (t % 2) * BK * RS;
        T* vs = Vb + (t % 2) * BK * RS;
        for (int c = threadIdx.x; c < BK * CH; c += blockDim.x) {
            const int r = c / CH, part = c % CH, key = t * BK + r;
            const size_t at = (size_t)min(key, L - 1) * D + part * 8;
            copy16(ks + r * RS + part * 8, kg + at, key < L);
            copy16(vs + r * RS + part * 8, vg + at, key < L);
        }
    };
    load_kv(0);
    asm volatile("cp.async.commit_group;");

    float o[D / 8][4];                                 // this warp's 16 rows x D: n-tile j, rows gid / gid + 8
    #pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows gid, gid + 8: running max, this lane's sum
    const int row0 = q0 + warp * 16 + gid;             // this lane's first row (the second is row0 + 8)
    const T* qa = Qs + (warp * 16 + gid) * RS + 2 * tig;
    for (int t = 0; t < tiles; ++t) {
        if (t + 1 < tiles) load_kv(t + 1);
        asm volatile("cp.async.commit_group;");
        asm volatile("cp.async.wait_group 1;");        // tile t (and Q) in; tile t + 1 may still be in flight
        __syncthreads();
        const T* ks = Kb + (t % 2) * BK * RS;
        const T* vs = Vb + (t % 2) * BK * RS;
        float s[BK / 8][4];
        #pragma unroll
        for (int n = 0; n < BK / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
        #pragma unroll 4
        for (int kk = 0; kk < D / 16; ++kk) {          // S = Q K^T
            const uint32_t a[4] = {word(qa + kk * 16), word(qa + 8 * RS + kk * 16), word(qa + kk * 16 + 8),
                                   word(qa + 8 * RS + kk * 16 + 8)};
            #pragma unroll
            for (int n = 0; n < BK / 8; ++n) {
                const T* kb = ks + (n * 8 + gid) * RS + kk * 16 + 2 * tig;
                const uint32_t bb[2] = {word(kb), word(kb + 8)};
                mma_bf16(s[n], a, bb);
            }
        }
        // scale, causal mask, online softmax: s[n][0..1] are row0's keys t*BK + 8n + 2 tig + {0, 1}, [2..3] row0 + 8's
        float mx_new[2] = {m[0], m[1]};
        #pragma unroll
        for (int n = 0; n < BK / 8; ++n)
            #pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int key = t * BK + n * 8 + 2 * tig + (c & 1), row = row0 + (c >> 1) * 8;
                s[n][c] = key <= offset + row && key < L ? s[n][c] * scale_log2 : -INFINITY;
                mx_new[c >> 1] = fmaxf(mx_new[c >> 1], s[n][c]);
            }
        #pragma unroll
        for (int i = 0; i < 2; ++i) {
            mx_new[i] = fmaxf(mx_new[i], __shfl_xor_sync(0xffffffff, mx_new[i], 1));
            mx_new[i] = fmaxf(mx_new[i], __shfl_xor_sync(0xffffffff, mx_new[i], 2));
        }
        float alpha[2];
        #pragma unroll
        for (int i = 0; i < 2; ++i) {  // key 0 is every row's to see, so after tile 0 the max is finite
            alpha[i] = exp2f(m[i] - mx_new[i]);
            m[i] = mx_new[i];
            l[i] *= alpha[i];
        }
        uint32_t p[BK / 8][2];                         // bfloat16 pairs: row0's, row0 + 8's
        #pragma unroll
        for (int n = 0; n < BK / 8; ++n) {
            float e[4];
            #pragma unroll
            for (int c = 0; c < 4; ++c) { e[c] = exp2f(s[n][c] - m[c >> 1]); l[c >> 1] += e[c]; }
            p[n][0] = pack_bf16(e[0], e[1]);
            p[n][1] = pack_bf16(e[2], e[3]);
        }
        #pragma unroll
        for (int j = 0; j < D / 8; ++j) {
            o[j][0] *= alpha[0]; o[j][1] *= alpha[0]; o[j][2] *= alpha[1]; o[j][3] *= alpha[1];
        }
        #pragma unroll
        for (int kk = 0; kk < BK / 16; ++kk) {         // O += P V, 16 keys a step: P's C tiles are its A fragments
            const uint32_t a[4] = {p[2 * kk][0], p[2 * kk][1], p[2 * kk + 1][0], p[2 * kk + 1][1]};
            const unsigned vrow = static_cast<unsigned>(__cvta_generic_to_shared(vs + (kk * 16 + (lane & 15)) * RS));
            #pragma unroll
            for (int j = 0; j < D / 8; ++j) {
                uint32_t bb[2];
                asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                             : "=r"(bb[0]), "=r"(bb[1]) : "r"(vrow + j * 16));
                mma_bf16(o[j], a, bb);
            }
        }
        __syncthreads();                               // all warps done with this buffer before it is refilled
    }
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 1);
        l[i] += __shfl_xor_sync(0xffffffff, l[i], 2);
    }
    #pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int row = row0 + i * 8;
        if (row >= S) continue;
        T* dst = out + (((size_t)b * S + row) * Hq + h) * D + 2 * tig;
        const float inv = 1.f / l[i];
        #pragma unroll
        for (int j = 0; j < D / 8; ++j)
            *reinterpret_cast<uint32_t*>(dst + j * 8) = pack_bf16(o[j][2 * i] * inv, o[j][2 * i + 1] * inv);
    }
"""

HEADER = r"""
__device__ __forceinline__ uint32_t word(const __nv_bfloat16* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}
""" + MMA_BF16

MIN_TOKENS = 64  # fewer queries (decode and verify windows) keep MLX's attention: one tile would be mostly idle
BLOCK_QUERIES, BLOCK_KEYS = 64, 32


def usable(q, k) -> bool:
    """q [B, Hq, S, D], k [B, Hkv, L, D] bfloat16, S >= MIN_TOKENS queries at the last S of L positions, D a
    multiple of 16 up to 256, whole groups of q-heads a kv-head."""
    B, Hq, S, D = q.shape
    return (q.dtype == k.dtype == mx.bfloat16 and S >= MIN_TOKENS and k.shape[2] >= S and D % 16 == 0
            and D <= 256 and Hq % k.shape[1] == 0)


def attention(q, k, v, scale: float):
    """softmax(q k^T * scale, causal) v for q [B, Hq, S, D], the queries at positions L - S .. L - 1 of the
    keys k, v [B, Hkv, L, D] (q-head h reads kv-head h // (Hq / Hkv)) -> [B, S, Hq * D]."""
    B, Hq, S, D = q.shape
    smem = 2 * (BLOCK_QUERIES + 4 * BLOCK_KEYS) * (D + 8)
    (out,) = cuda_kernel("flash_attention", ["q", "k", "v", "scale"], ["out"], SOURCE, header=HEADER,
                         shared_memory=smem)(
        inputs=[q, k, v, mx.array([scale], mx.float32)],
        template=[("D", D), ("T", q.dtype)],
        grid=(-(-S // BLOCK_QUERIES) * 128, Hq, B), threadgroup=(128, 1, 1),
        output_shapes=[(B, S, Hq * D)], output_dtypes=[q.dtype],
    )
    return out


def self_check() -> bool:
    """The kernel against MLX's attention with the causal mask, two q-heads a kv-head: a prefill from empty (a
    partial last tile), chunks after 70 and 33 positions (keys not aligned to a tile), head_dim 256 and 128."""
    for D, S, before in ((256, 100, 0), (128, 80, 70), (256, 64, 33)):
        keys = mx.random.split(mx.random.key(D + S), 3)
        q = mx.random.normal((1, 4, S, D), key=keys[0]).astype(mx.bfloat16)
        k, v = (mx.random.normal((1, 2, before + S, D), key=key).astype(mx.bfloat16) for key in keys[1:])
        mask = mx.arange(before + S)[None, :] <= (before + mx.arange(S))[:, None]
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)
        if not close(attention(q, k, v, D**-0.5), want.transpose(0, 2, 1, 3).reshape(1, S, -1), 2e-2):
            return False
    return True
