"""A quantized matmul for a few tokens on tensor cores (MLX's CUDA backend): y = x @ dequant(W).T, x [M, K].

MLX-CUDA multiplies 2 to 7 tokens with its per-row quantized matrix-vector kernel, which reads the weights
once per token: a verify window of 5 tokens reads the whole model five times, and its cost grows by ~0.6 ms
per token on an 8-layer Qwen3.5-35B-A3B. Here every weight is read once for up to 16 tokens.

Each warp owns 16 output rows and multiplies them with 8-token tiles through `mma.sync.m16n8k16` (bfloat16
in, float32 accumulate). The A fragments are the weights' integer codes, exact in bfloat16 (4-bit codes via
the 0x4300 exponent trick: one AND/OR per pair of codes); each quantization group is one accumulation, then
scaled: y += scale * (q . x) + bias * sum(x), as MLX defines the affine format, in float32. The k order
inside a group is permuted so that a lane reads whole words of its rows and whole 16-byte runs of x; the
permutation is the same for A and B, so the products pair up as in the plain order. Blocks of 8 warps split
K between warps (KSPLIT) when a matrix has too few rows to fill the GPU, and add the parts in shared memory.

The grouped product (rows sorted by expert, a prefill's thousands) multiplies many more tokens per weight, so
there the A fragments are the dequantized weights themselves (scale * code + bias, one bfloat16 rounding, as
MLX's dequantize) and one accumulator runs over all of K: each weight is dequantized once per tile of tokens,
not once per 8 tokens, and no sum of x is needed. A block's weights and tile of x pass through shared memory,
loaded with cp.async a quantization group ahead of the tensor cores. A prefill's x comes interleaved in the
order the codes pair up (`interleave`), so that its B registers are whole words of x, and the SwiGLU product
writes its output interleaved the same way for the down product.

A prefill's dense products multiply dequantized matrices (layers.QuantizedLinear); `dequantize` makes them here,
a word of codes a thread.
"""

from typing import NamedTuple

import mlx.core as mx

from .kernels import MMA_BF16, cuda_kernel, quantized_format

# The m16n8k16 fragments both kernels build. Lane (gid, tig) holds, per quantization group, GS / 4 codes of its
# rows (WPT words) and GS / 4 values of x (as 16-byte runs); step s of the group's GS / 16 mma steps takes:
#   4 bits: word s/2 holds 8 codes; pairs (c, c+4) and (c+1, c+5), c = 2 (s % 2);
#   8 bits: word s holds 4 codes; pairs (0, 2) and (1, 3);
# and the x values at the same places, so that A and B pair up as in the plain k order.
HEADER = r"""
template <int BITS>
__device__ __forceinline__ void code_pairs(const uint32_t* q, int step, __nv_bfloat162& lo, __nv_bfloat162& hi) {
    if (BITS == 4) {  // nibbles c and c+4 become (128 + code) through the 0x4300 exponent, then 128 comes off
        const uint32_t word = q[step / 2];
        const int c = (step % 2) * 2;
        constexpr uint32_t bias128_bits = 0x43004300u;  // bfloat16 128 twice, a constant (no conversion a step)
        const __nv_bfloat162 bias128 = *reinterpret_cast<const __nv_bfloat162*>(&bias128_bits);
        uint32_t t0 = ((word >> (4 * c)) & 0x000F000Fu) | 0x43004300u;
        uint32_t t1 = ((word >> (4 * c + 4)) & 0x000F000Fu) | 0x43004300u;
        lo = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&t0), bias128);
        hi = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&t1), bias128);
    } else {
        const uint32_t word = q[step];
        lo = __floats2bfloat162_rn(static_cast<float>(word & 0xFFu), static_cast<float>((word >> 16) & 0xFFu));
        hi = __floats2bfloat162_rn(static_cast<float>((word >> 8) & 0xFFu), static_cast<float>(word >> 24));
    }
}

template <int BITS>
__device__ __forceinline__ void x_pairs(const uint4* xv, int step, uint32_t b[2]) {
    const uint4 v = xv[step / 2];
    const bool first = step % 2 == 0;
    const uint32_t lo = BITS == 4 ? (first ? v.x : v.y) : (first ? v.x : v.z);
    const uint32_t hi = BITS == 4 ? (first ? v.z : v.w) : (first ? v.y : v.w);
    b[0] = __byte_perm(lo, hi, 0x5410);
    b[1] = __byte_perm(lo, hi, 0x7632);
}

// x interleaved as code_pairs pairs the codes (see `interleave`): each 16-byte run of x is then the B registers
// of two steps as they are, with no byte shuffles.
__device__ __forceinline__ void x_words(const uint4* xv, int step, uint32_t b[2]) {
    const uint4 v = xv[step / 2];
    b[0] = step % 2 == 0 ? v.x : v.z;
    b[1] = step % 2 == 0 ? v.y : v.w;
}

// Where column k of a row goes when interleaved for BITS-bit codes: runs of 8 (4 bits) or 4 (8 bits) values
// are laid out as (0, R/2, 1, R/2 + 1, ...).
template <int BITS>
__device__ __forceinline__ int interleaved_column(int k) {
    constexpr int H = BITS == 4 ? 4 : 2;
    return k - k % (2 * H) + (k % H) * 2 + (k % (2 * H)) / H;
}

__device__ __forceinline__ uint32_t bits_of(__nv_bfloat162 h) { return *reinterpret_cast<uint32_t*>(&h); }
""" + MMA_BF16

SOURCE = """
    constexpr int WARPS = 8, TILES = WARPS / KSPLIT;    // 16-row tiles per block
    constexpr int GROUPS = K / GS, GPS = GROUPS / KSPLIT; // groups per K slice
    constexpr int WPT = GS * BITS / 128;                // words of a row per lane per group (4 lanes a group)
    constexpr int WPR = K * BITS / 32;                  // words in a row
    constexpr int XPT = GS / 4;                         // x values per lane per group
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int tile = warp % TILES, ks = warp / TILES;
    const int N = w_shape[0], t0 = blockIdx.y * 8 * NT, t1 = min(t0 + 8 * NT, x_shape[0]);  // this block's rows of x
    const int f0 = (blockIdx.x * TILES + tile) * 16;
    const size_t r0 = min(f0 + gid, N - 1), r1 = min(f0 + gid + 8, N - 1);  // rows past N: read, not written
    const uint32_t* w0 = reinterpret_cast<const uint32_t*>(w) + r0 * WPR + tig * WPT;
    const uint32_t* w1 = reinterpret_cast<const uint32_t*>(w) + r1 * WPR + tig * WPT;

    float acc[NT][4];
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

    #pragma unroll 4
    for (int g = ks * GPS; g < (ks + 1) * GPS; ++g) {
        uint32_t q0[WPT], q1[WPT];
        #pragma unroll
        for (int i = 0; i < WPT; ++i) { q0[i] = w0[g * 4 * WPT + i]; q1[i] = w1[g * 4 * WPT + i]; }
        const float s0 = static_cast<float>(scales[r0 * GROUPS + g]), s1 = static_cast<float>(scales[r1 * GROUPS + g]);
        const float c0 = static_cast<float>(biases[r0 * GROUPS + g]), c1 = static_cast<float>(biases[r1 * GROUPS + g]);
        #pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
            // this lane's XPT values of x for token nt * 8 + gid (zeros past M), as 16-byte runs
            const int n = t0 + nt * 8 + gid;
            uint4 xv[XPT / 8];
            const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)min(n, t1 - 1) * K + g * GS + tig * XPT);
            float xs = 0.f;
            #pragma unroll
            for (int i = 0; i < XPT / 8; ++i) {
                xv[i] = n < t1 ? src[i] : make_uint4(0, 0, 0, 0);
                const __nv_bfloat16* xe = reinterpret_cast<const __nv_bfloat16*>(&xv[i]);
                #pragma unroll
                for (int v = 0; v < 8; ++v) xs += __bfloat162float(xe[v]);
            }
            xs += __shfl_xor_sync(0xffffffff, xs, 1);
            xs += __shfl_xor_sync(0xffffffff, xs, 2);   // sum(x) over the group, token n
            float d[4] = {0.f, 0.f, 0.f, 0.f};          // codes . x over the group: scaled below
            #pragma unroll
            for (int step = 0; step < GS / 16; ++step) {
                __nv_bfloat162 lo0, hi0, lo1, hi1;
                code_pairs<BITS>(q0, step, lo0, hi0);
                code_pairs<BITS>(q1, step, lo1, hi1);
                const uint32_t a[4] = {bits_of(lo0), bits_of(lo1), bits_of(hi0), bits_of(hi1)};
                uint32_t b[2];
                x_pairs<BITS>(xv, step, b);
                mma_bf16(d, a, b);
            }
            // d[0], d[1]: row r0, tokens nt*8 + 2 tig + {0, 1}; d[2], d[3]: row r1, same tokens
            const float x0 = __shfl_sync(0xffffffff, xs, (2 * tig) * 4), x1 = __shfl_sync(0xffffffff, xs, (2 * tig + 1) * 4);
            acc[nt][0] += s0 * d[0] + c0 * x0;
            acc[nt][1] += s0 * d[1] + c0 * x1;
            acc[nt][2] += s1 * d[2] + c1 * x0;
            acc[nt][3] += s1 * d[3] + c1 * x1;
        }
    }
    if (KSPLIT > 1) {  // the K slices of a tile add up in warp ks == 0
        __shared__ float part[(KSPLIT > 1 ? KSPLIT - 1 : 1) * TILES * NT * 4 * 32];
        if (ks > 0) {
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                #pragma unroll
                for (int c = 0; c < 4; ++c) part[((((ks - 1) * TILES + tile) * NT + nt) * 4 + c) * 32 + lane] = acc[nt][c];
        }
        __syncthreads();
        if (ks > 0) return;
        for (int k2 = 0; k2 < KSPLIT - 1; ++k2)
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt)
                #pragma unroll
                for (int c = 0; c < 4; ++c) acc[nt][c] += part[(((k2 * TILES + tile) * NT + nt) * 4 + c) * 32 + lane];
    }
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        #pragma unroll
        for (int c = 0; c < 4; ++c) {
            const int n = t0 + nt * 8 + 2 * tig + (c & 1), r = f0 + gid + (c >> 1) * 8;
            if (n < t1 && r < N) out[(size_t)n * N + r] = static_cast<T>(acc[nt][c]);
        }
    }
"""

# The grouped product: block (x, z) multiplies tile z of up to 8 * NT sorted rows (all of one expert) with 128 A
# rows of that expert's matrix (8 warps of 16). Row i reads x[x_rows[i]] (GATHER) and writes out[out_rows[i]]
# (SCATTER), times row_scale[out_rows[i]] (SCALED: the router's score). SWIGLU: the matrix is [gate; up] (2I rows)
# and the output is silu(x . gate) * (x . up) [P, I]: a warp's A rows are 8 gate rows and the 8 up rows of the
# same columns, so both halves of a product land in the same lane. The block's weights and x tile go through
# shared memory one quantization group at a time, STAGES groups in flight (cp.async): loads from one warp would
# wait on memory between every group.
GROUPED_SOURCE = """
    constexpr int WARPS = 8, ROWS = 16 * WARPS, GROUPS = K / GS, TOK = 8 * NT;
    constexpr int WPT = GS * BITS / 128, WPG = 4 * WPT, XPT = GS / 4;  // as in the token kernel; WPG: words a row a group
    constexpr int CH = WPG / 4, XS = GS + 8;            // 16-byte chunks of a row's group; x row stride (padded)
    constexpr int STAGE_WORDS = ROWS * WPG + TOK * XS / 2;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int N = w_shape[1], OUT = SWIGLU ? N / 2 : N, E = tile_end_shape[0], z = blockIdx.y;
    const int c0 = blockIdx.x * (SWIGLU ? ROWS / 2 : ROWS);   // the block's first output column
    if (c0 >= OUT) return;
    // the expert whose tiles include z: the number of experts whose tiles end at or before it, counted by each
    // warp in two reads (the last of 32 segments, then within one), where a binary search waits for eight in a row
    const int seg = (E + 31) / 32;                      // up to 1024 experts
    const int ends_before = __popc(__ballot_sync(0xffffffffu, tile_end[min((lane + 1) * seg, E) - 1] <= z));
    const int e = ends_before * seg + __popc(__ballot_sync(0xffffffffu,
        lane < seg && ends_before * seg + lane < E && tile_end[min(ends_before * seg + lane, E - 1)] <= z));
    if (e >= E) return;                                 // past the last tile (the grid is an upper bound)
    const int first = e == 0 ? 0 : tile_end[e - 1];
    const int t0 = start[e] + (z - first) * TOK, t1 = min(t0 + TOK, start[e] + count[e]);

    extern __shared__ __align__(16) uint32_t smem[];  // STAGES x [weights ROWS x WPG | x TOK x XS], scales, biases
    __nv_bfloat16* sc = reinterpret_cast<__nv_bfloat16*>(smem + STAGES * STAGE_WORDS);
    __nv_bfloat16* bs = sc + ROWS * GROUPS;
    // smem row j <- the expert's matrix row: SWIGLU: gate rows c0.. then up rows; past the end: read, not written
    auto row_of = [&](int j) -> int {
        return SWIGLU ? (j < ROWS / 2 ? min(c0 + j, OUT - 1) : OUT + min(c0 + j - ROWS / 2, OUT - 1)) : min(c0 + j, N - 1);
    };
    __shared__ int out_row[TOK];                        // where the tile's rows go, and their scales
    __shared__ float scale_of[TOK];
    // A thread's 16-byte chunks of each stage are the same for every group: where they come from (at group 0,
    // in words of the expert's matrix / values of x) and where they go in a stage (words), worked out once.
    constexpr int THREADS = 32 * WARPS, W_CHUNKS = ROWS * CH, X_CHUNKS = TOK * (GS / 8);
    constexpr int W_PER = (W_CHUNKS + THREADS - 1) / THREADS, X_PER = (X_CHUNKS + THREADS - 1) / THREADS;
    const uint32_t* wq = reinterpret_cast<const uint32_t*>(w) + (size_t)e * N * (K * BITS / 32);
    unsigned w_from[W_PER], w_to[W_PER], x_from[X_PER], x_to[X_PER], x_bytes[X_PER];
    #pragma unroll
    for (int i = 0; i < W_PER; ++i) {
        const int c = min(tid + i * THREADS, W_CHUNKS - 1);
        w_from[i] = row_of(c / CH) * (K * BITS / 32) + (c % CH) * 4;
        w_to[i] = (c / CH) * WPG + (c % CH) * 4;
    }
    #pragma unroll
    for (int i = 0; i < X_PER; ++i) {
        const int c = min(tid + i * THREADS, X_CHUNKS - 1), n = c / (GS / 8), part = c % (GS / 8);
        const int row = min(t0 + n, t1 - 1);
        x_from[i] = (GATHER ? x_rows[row] : row) * K + part * 8;
        x_to[i] = ROWS * WPG + (n * XS + part * 8) / 2;
        x_bytes[i] = t0 + n < t1 ? 16 : 0;              // rows past the tile read as zeros
    }
    auto load_stage = [&](int g) {
        const unsigned st = static_cast<unsigned>(__cvta_generic_to_shared(smem + (g % STAGES) * STAGE_WORDS));
        #pragma unroll
        for (int i = 0; i < W_PER; ++i)
            if (W_CHUNKS % THREADS == 0 || tid + i * THREADS < W_CHUNKS)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(st + 4 * w_to[i]), "l"(wq + w_from[i] + g * WPG));
        #pragma unroll
        for (int i = 0; i < X_PER; ++i)
            if (X_CHUNKS % THREADS == 0 || tid + i * THREADS < X_CHUNKS)
                asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                             :: "r"(st + 4 * x_to[i]), "l"(x + x_from[i] + g * GS), "r"(x_bytes[i]));
    };
    // the scales and biases of the block's rows (all groups) go with the first stage, copied as they are
    constexpr int SB = GROUPS * 2 < 16 ? GROUPS * 2 : 16, S_CHUNKS = ROWS * GROUPS * 2 / SB;
    static_assert(SB >= 4, "cp.async copies 4 bytes or more");
    for (int c = tid; c < 2 * S_CHUNKS; c += THREADS) {
        const int part = c % S_CHUNKS, i = part * (SB / 2), row = i / GROUPS;
        const __nv_bfloat16* src = (c < S_CHUNKS ? scales : biases) + ((size_t)e * N + row_of(row)) * GROUPS + i % GROUPS;
        const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared((c < S_CHUNKS ? sc : bs) + i));
        if (SB == 16) asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(dst), "l"(src));
        else asm volatile("cp.async.ca.shared.global [%0], [%1], %2;" :: "r"(dst), "l"(src), "n"(SB));
    }
    #pragma unroll
    for (int g = 0; g < STAGES - 1; ++g) {
        if (g < GROUPS) load_stage(g);
        asm volatile("cp.async.commit_group;");
    }
    if (SCATTER || SCALED) {  // read now, while the stages load, not one by one at the end
        for (int i = tid; i < TOK; i += THREADS) {
            const int row = SCATTER ? out_rows[min(t0 + i, t1 - 1)] : min(t0 + i, t1 - 1);
            out_row[i] = row;
            if (SCALED) scale_of[i] = row_scale[row];
        }
    }

    // this warp's A rows in the block: SWIGLU gate row / up row, else rows 16 w + gid and + 8
    const int a0 = SWIGLU ? warp * 8 + gid : warp * 16 + gid, a1 = SWIGLU ? ROWS / 2 + a0 : a0 + 8;
    float acc[NT][4];
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.f;

    for (int g = 0; g < GROUPS; ++g) {
        asm volatile("cp.async.wait_group %0;" :: "n"(STAGES - 2));
        __syncthreads();                                // group g is in; every warp is done with group g - 1
        if (g + STAGES - 1 < GROUPS) load_stage(g + STAGES - 1);
        asm volatile("cp.async.commit_group;");
        const uint32_t* st = smem + (g % STAGES) * STAGE_WORDS;
        uint32_t q0[WPT], q1[WPT];
        #pragma unroll
        for (int i = 0; i < WPT; ++i) { q0[i] = st[a0 * WPG + tig * WPT + i]; q1[i] = st[a1 * WPG + tig * WPT + i]; }
        const __nv_bfloat162 s0 = __bfloat162bfloat162(sc[a0 * GROUPS + g]), s1 = __bfloat162bfloat162(sc[a1 * GROUPS + g]);
        const __nv_bfloat162 b0 = __bfloat162bfloat162(bs[a0 * GROUPS + g]), b1 = __bfloat162bfloat162(bs[a1 * GROUPS + g]);
        const T* xs = reinterpret_cast<const T*>(st + ROWS * WPG);
        #pragma unroll
        for (int step = 0; step < GS / 16; ++step) {
            __nv_bfloat162 lo0, hi0, lo1, hi1;
            code_pairs<BITS>(q0, step, lo0, hi0);
            code_pairs<BITS>(q1, step, lo1, hi1);
            // the weights themselves, scale * code + bias, rounded once to bfloat16
            const uint32_t a[4] = {bits_of(__hfma2(lo0, s0, b0)), bits_of(__hfma2(lo1, s1, b1)),
                                   bits_of(__hfma2(hi0, s0, b0)), bits_of(__hfma2(hi1, s1, b1))};
            #pragma unroll
            for (int nt = 0; nt < NT; ++nt) {  // each weight serves every 8-token tile
                uint32_t b[2];
                const uint4* xv = reinterpret_cast<const uint4*>(xs + (nt * 8 + gid) * XS + tig * XPT);
                if (X_INTERLEAVED) x_words(xv, step, b); else x_pairs<BITS>(xv, step, b);
                mma_bf16(acc[nt], a, b);
            }
        }
    }
    // acc[nt][0..1]: A row a0, tokens nt*8 + 2 tig + {0, 1}; acc[nt][2..3]: A row a1, same tokens
    const int f = c0 + a0;  // output column of acc[nt][0..1] (and, without SWIGLU, + 8: [2..3])
    const int fo = OUT_BITS ? interleaved_column<OUT_BITS>(f) : f;  // where it is written (SWIGLU)
    #pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
        #pragma unroll
        for (int c = 0; c < 2; ++c) {
            const int n = t0 + nt * 8 + 2 * tig + c;
            if (n >= t1) continue;
            const size_t row = SCATTER ? static_cast<size_t>(out_row[n - t0]) : static_cast<size_t>(n);
            if (SWIGLU) {  // gate and up rounded as the unfused products would be
                const float gate = static_cast<float>(static_cast<T>(acc[nt][c]));
                const float up = static_cast<float>(static_cast<T>(acc[nt][2 + c]));
                if (f < OUT) out[row * OUT + fo] = static_cast<T>(gate / (1.f + __expf(-gate)) * up);
            } else if (SCALED) {  // each output, rounded as the unweighted product would be, times its row's score
                const float s = scale_of[n - t0];
                auto scaled = [&](float v) { return static_cast<T>(s * static_cast<float>(static_cast<T>(v))); };
                if (f < N) out[row * N + f] = scaled(acc[nt][c]);
                if (f + 8 < N) out[row * N + f + 8] = scaled(acc[nt][2 + c]);
            } else {
                if (f < N) out[row * N + f] = static_cast<T>(acc[nt][c]);
                if (f + 8 < N) out[row * N + f + 8] = static_cast<T>(acc[nt][2 + c]);
            }
        }
    }
"""

# Which products run here (measured on an H100, 8-layer Qwen3.5-35B-A3B bench, whole compiled steps):
# - 2 to MAX_TOKENS tokens, every matrix. MLX reads a matrix once per token for 2 to 7 tokens, and from 8 on it
#   switches to tiled kernels (qmm_sm80, qmm_naive) that are slow at so few rows. Verify steps of 12 / 16 tokens
#   took 3.6 / 3.9 ms against 4.8 / 4.9 with only the large matrices here (as before: >= 6 MB at 2-7 tokens,
#   the head at 1-8).
# - 1 token, only the output head (1.7x faster here): MLX's qmv reads the others once as well, and a whole decode
#   step was no faster with them here (2.19 against 2.15 ms, within the noise).
# A prefill's dense products (hundreds of tokens) multiply the dequantized matrix instead (QuantizedLinear).
MAX_TOKENS = 16  # the kernel's limit: two 8-token tiles
LARGE_BYTES = 32 * 2**20
TARGET_BLOCKS = 264  # two blocks per SM of an H100: split K until a matrix has this many

def _get_kernel(grouped=False, shared_memory=0):
    if grouped:
        return cuda_kernel("qmm_grouped", ["x", "w", "scales", "biases", "tile_end", "start", "count", "x_rows",
                                           "out_rows", "row_scale"], ["out"], GROUPED_SOURCE, header=HEADER,
                           shared_memory=shared_memory)
    return cuda_kernel("qmm_tokens", ["x", "w", "scales", "biases"], ["out"], SOURCE, header=HEADER)


def usable(linear, x) -> bool:
    """`formats_ok`, 2 to MAX_TOKENS tokens, or 1 and a matrix of LARGE_BYTES or more (see MAX_TOKENS)."""
    tokens = x.size // x.shape[-1]
    return formats_ok(linear, x) and tokens <= MAX_TOKENS and (tokens > 1 or linear.weight.size * 4 >= LARGE_BYTES)


def _k_split(rows: int, groups: int) -> int:
    split = 1
    while split < 8 and -(-rows // (16 * 8 // split)) < TARGET_BLOCKS and groups % (split * 2) == 0:
        split *= 2
    return split


def matmul(linear, x, split=None, nt=None):
    """x [..., K] @ the QuantizedLinear's dequantized weight.T (+ its bias) (see `usable`). Blocks take 8 * nt
    rows of x (all of them, up to 16, by default); `split`: warps sharing a row tile's K (a power of two up
    to 8), chosen from the shape by default."""
    K = x.shape[-1]
    x2 = x.reshape(-1, K)
    M, N = x2.shape[0], linear.weight.shape[0]
    nt = nt or -(-M // 8)
    split = split or _k_split(N * -(-M // (8 * nt)), K // linear.group_size)
    rows_per_block = 16 * 8 // split
    (out,) = _get_kernel(grouped=False)(
        inputs=[x2, linear.weight, linear.scales, linear.biases],
        template=[("K", K), ("BITS", linear.bits), ("GS", linear.group_size), ("NT", nt),
                  ("KSPLIT", split), ("T", x.dtype)],
        grid=(-(-N // rows_per_block) * 256, -(-M // (8 * nt)), 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(M, N)],
        output_dtypes=[x.dtype],
    )
    if "bias" in linear:
        out = out + linear.bias
    return out.reshape(*x.shape[:-1], N)


def _bf16_quantized(layer) -> bool:
    found = quantized_format(layer)
    return found is not None and found[2] == mx.bfloat16


def formats_ok(layer, x) -> bool:
    """Weights as `kernels.quantized_format` reads them with bfloat16 scales, bfloat16 activations, K a multiple
    of the group."""
    return _bf16_quantized(layer) and x.dtype == mx.bfloat16 and x.shape[-1] % layer.group_size == 0


def expert_tiles(indices, num_experts: int, tile: int = None):
    """For rows sorted by expert (`indices` [P], non-decreasing): (tile_end, start, count) [E] int32, the running
    count of `tile`-row tiles (by default the grouped product's for P rows), each expert's first row, and its
    number of rows."""
    tile = tile or group_shape(indices.shape[0])[0]
    count = mx.zeros((num_experts,), mx.int32).at[indices].add(1)
    end = mx.cumsum(count)
    return mx.cumsum((count + tile - 1) // tile), end - count, count


# The grouped product's tile (rows of x per block) and quantization groups in flight (cp.async stages), by the
# rows it multiplies. A prefill's thousands keep the tensor cores busy: on an H100, Qwen3.5-35B-A3B shapes, a
# 1024-token prefill's 8192 rows (top-8): gate/up with the SwiGLU 0.51-0.61 ms in 32-row tiles against 0.57-0.78
# in 16-row and 0.56-0.65 in 64-row ones; down 0.32-0.42 ms against 0.38-0.53 and 0.36-0.46; 2, 3 or 4 stages
# alike. MLX's sorted gather_qmm takes 7.0 and 3.8 ms for them. The product is bound by instruction issue, not
# memory (Nsight Compute: 62% of issue slots busy, the ALU pipe the busiest, ~16 instructions per mma): loads
# worked out once per block and x interleaved (no byte shuffles per mma) took gate/up + down from 0.60 to 0.55
# ms at 8192 rows and from 1.70 to 1.37 ms at 32768 (64-row tiles: 0.54 and 1.46, at 72 registers a thread
# against 64, so three blocks an SM instead of four). Nsight's stall sampling then put a quarter of a prefill's
# product in each block's start: scales and biases copied two bytes at a time through registers, an eight-step
# binary search for the tile's expert, and (down) the rows' indices and scores read one by one at the end. Copied
# with cp.async, searched in two warp-wide reads and read ahead: gate/up 291 -> 257 us a layer, down 173 -> 154
# (3 stages: the same prefill time; skipping a tile's empty 8-row parts: gate/up 257 -> 299 us). An expert gets
# ~32 of the 8192 rows (top-8 of 256), so 32-row tiles make ~1.5 tiles an expert, each dequantizing all of its
# weights; 40-row ones ~1.1 at 75 registers a thread (three blocks an SM): whole prefills, same process, taking
# turns: 8.62 ms median in 32-row tiles, 8.20 in 40, 8.70 in 48, 9.04 in 64. A verify window's
# rows (9-16 tokens: 72-128) spread over as many experts, a row or two each: the product only streams weights, so
# smaller tiles waste less of each mma and more stages hide the memory latency.
GROUP_TILE, GROUP_STAGES = 40, 2
SMALL_TILE, SMALL_STAGES, SMALL_ROWS = 16, 4, 1024


def group_shape(rows: int) -> tuple:
    """(tile, stages) of the grouped product for `rows` rows."""
    return (SMALL_TILE, SMALL_STAGES) if rows < SMALL_ROWS else (GROUP_TILE, GROUP_STAGES)


def interleave(x, bits: int):
    """x [..., K] with each run of 8 (4 bits) or 4 (8 bits) values laid out as (0, R/2, 1, R/2 + 1, ...): the order
    in which the kernels pair a quantized word's codes, so the grouped product reads its B registers as words."""
    run = 8 if bits == 4 else 4
    return x.reshape(*x.shape[:-1], -1, 2, run // 2).swapaxes(-1, -2).reshape(x.shape)


def grouped_matmul(layer, x, tiles, x_rows=None, out_rows=None, swiglu=False, shape=None, x_interleaved=False,
                   out_bits=0, row_scale=None):
    """P rows sorted by expert times their expert's dequantized [N, K] matrix of a QuantizedExpertLinear's
    [E, N, K], each expert's weights read once per tile of rows. `tiles`: expert_tiles of the rows' experts, in
    `shape`'s tiles ((tile, stages), group_shape(P) by default). Row i reads x[x_rows[i]] (x [P, K] in row order
    without x_rows) and goes to out[out_rows[i]] (to out[i] without), out [P, N]: so a caller needs no gather into
    expert order or back. With `swiglu` the matrix is [gate; up] and out [P, N/2] is silu(x . gate) * (x . up).
    `x_interleaved`: x comes `interleave`d for the layer's bits; `out_bits` (with `swiglu`): the output goes out
    interleaved for a matrix of those bits. `row_scale` [P] float32 (not with `swiglu`): out[j] is scaled by
    row_scale[j]. MLX-CUDA's gather_qmm takes ~7 ms for a 1024-token prefill's 8192 rows (Qwen3.5-35B-A3B)."""
    P, K = (x_rows if x_rows is not None else x).shape[0], x.shape[-1]
    E, N = layer.weight.shape[:2]
    out_cols = N // 2 if swiglu else N
    tile, stages = shape or group_shape(P)
    tile_end, start, count = tiles
    unused = tile_end  # an input the kernel does not read
    cols_per_block = 8 * (8 if swiglu else 16)
    gs, groups = layer.group_size, K // layer.group_size
    # shared memory: per stage one group of the 128 weight rows and of the tile's x rows; all scales and biases
    smem = stages * (128 * gs * layer.bits // 8 + tile * (gs + 8) * 2) + 2 * 128 * groups * 2
    optional = lambda a: unused if a is None else a
    (out,) = _get_kernel(grouped=True, shared_memory=smem)(
        inputs=[x, layer.weight, layer.scales, layer.biases, tile_end, start, count, optional(x_rows),
                optional(out_rows), optional(row_scale)],
        template=[("K", K), ("BITS", layer.bits), ("GS", layer.group_size), ("NT", tile // 8), ("T", x.dtype),
                  ("GATHER", x_rows is not None), ("SCATTER", out_rows is not None), ("SWIGLU", swiglu),
                  ("SCALED", row_scale is not None), ("STAGES", stages), ("X_INTERLEAVED", x_interleaved),
                  ("OUT_BITS", out_bits)],
        grid=(-(-out_cols // cols_per_block) * 256, -(-P // tile) + E, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(P, out_cols)],
        output_dtypes=[x.dtype],
    )
    return out


# A prefill multiplies its dense matrices dequantized (layers.QuantizedLinear). MLX-CUDA's affine_dequantize
# takes a thread per byte and stores each value apart: ~0.65 ms of a 1024-token prefill of the 8-layer
# Qwen3.5-35B-A3B bench, ~40% of the memory bandwidth. Here a thread takes a word of codes and writes its 8
# (4 bits) or 4 (8 bits) values in one store: scale * code + bias, rounded once, as the grouped product.
DEQUANT_SOURCE = """
    constexpr int PER = 32 / BITS, WPG = GS / PER, MASK = (1 << BITS) - 1;  // values a word, words a group
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)w_shape[0] * w_shape[1]) return;
    const uint32_t word = w[i];
    const __nv_bfloat162 s = __bfloat162bfloat162(scales[i / WPG]), b = __bfloat162bfloat162(biases[i / WPG]);
    uint32_t v[PER / 2];
    #pragma unroll
    for (int p = 0; p < PER / 2; ++p) {
        const float c0 = (word >> (2 * p * BITS)) & MASK, c1 = (word >> ((2 * p + 1) * BITS)) & MASK;
        v[p] = bits_of(__hfma2(__floats2bfloat162_rn(c0, c1), s, b));
    }
    if (BITS == 4) *reinterpret_cast<uint4*>(out + i * PER) = make_uint4(v[0], v[1], v[2], v[3]);
    else *reinterpret_cast<uint2*>(out + i * PER) = make_uint2(v[0], v[1]);
"""


def dequantize_usable(layer) -> bool:
    """A 2-D matrix quantized as the kernels read it, with bfloat16 scales."""
    return _bf16_quantized(layer) and layer.weight.ndim == 2


def dequantize(layer):
    """The bfloat16 matrix of a quantized layer (`kernels.quantized_format` with bfloat16 scales): mx.dequantize's
    values, rounded once."""
    words = layer.weight.size
    (out,) = cuda_kernel("qmm_dequantize", ["w", "scales", "biases"], ["out"], DEQUANT_SOURCE, header=HEADER)(
        inputs=[layer.weight, layer.scales, layer.biases],
        template=[("BITS", layer.bits), ("GS", layer.group_size)],
        grid=(-(-words // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(*layer.weight.shape[:-1], layer.weight.shape[-1] * 32 // layer.bits)],
        output_dtypes=[mx.bfloat16],
    )
    return out


class SortedRows(NamedTuple):
    """The P = N * k (token, slot) rows of N tokens routed to k experts each, sorted by expert: sorted row i is
    token[i]'s slot[i] (a flat index t * k + s), and `tiles` their expert_tiles for group_shape(P)."""
    token: mx.array
    slot: mx.array
    tiles: tuple


# Interleaving x costs a copy of it, worth it where each of its values feeds several mma tiles' worth of weights
# (a prefill's thousands of rows); a verify window's few rows only stream weights.
INTERLEAVE_MIN_ROWS = SMALL_ROWS


def grouped_experts(gate_up, down, x, rows: SortedRows, scores=None):
    """SwiGLU experts of x [N, H] on its sorted rows -> out [N * k, H], row t * k + s the output of token t's
    slot s; with `scores` [N, k] float32 each times its score. Two grouped products, the SwiGLU folded into the
    first, the scores into the second."""
    P = rows.token.shape[0]
    interleaved = P >= INTERLEAVE_MIN_ROWS
    if interleaved:
        x = interleave(x, gate_up.bits)
    h = grouped_matmul(gate_up, x, rows.tiles, x_rows=rows.token, swiglu=True, x_interleaved=interleaved,
                       out_bits=down.bits if interleaved else 0)
    return grouped_matmul(down, h, rows.tiles, out_rows=rows.slot, x_interleaved=interleaved,
                          row_scale=None if scores is None else scores.reshape(-1))
