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
"""

import mlx.core as mx

from .kernels import cuda_kernel, quantized_format

SOURCE = """
    constexpr int WARPS = 8, TILES = WARPS / KSPLIT;    // 16-row tiles per block
    constexpr int GROUPS = K / GS, GPS = GROUPS / KSPLIT; // groups per K slice
    constexpr int WPT = GS * BITS / 128;                // words of a row per lane per group (4 lanes a group)
    constexpr int WPR = K * BITS / 32;                  // words in a row
    constexpr int XPT = GS / 4;                         // x values per lane per group
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int tile = warp % TILES, ks = warp / TILES;
    PROLOGUE  // -> N (rows of the matrix), e (which matrix), t0 .. t1 (the rows of x this block multiplies)
    const int f0 = (blockIdx.x * TILES + tile) * 16;
    const size_t r0 = (size_t)e * N + min(f0 + gid, N - 1), r1 = (size_t)e * N + min(f0 + gid + 8, N - 1);  // rows past N: read, not written
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
            const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)XROW(min(n, t1 - 1)) * K + g * GS + tig * XPT);
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
            float d[4] = {0.f, 0.f, 0.f, 0.f};
            #pragma unroll
            for (int step = 0; step < GS / 16; ++step) {
                uint32_t a[4], b[2];
                if (BITS == 4) {  // word step/2 holds 8 codes; this step takes pairs (s, s+4) and (s+1, s+5)
                    const int word = step / 2, s = (step % 2) * 2;
                    const __nv_bfloat162 bias128 = __floats2bfloat162_rn(128.f, 128.f);
                    auto pair = [&](uint32_t q, int shift) {
                        uint32_t t = ((q >> (4 * shift)) & 0x000F000Fu) | 0x43004300u;  // (128 + c_lo, 128 + c_hi)
                        __nv_bfloat162 h = __hsub2(*reinterpret_cast<__nv_bfloat162*>(&t), bias128);
                        return *reinterpret_cast<uint32_t*>(&h);
                    };
                    a[0] = pair(q0[word], s); a[1] = pair(q1[word], s); a[2] = pair(q0[word], s + 1); a[3] = pair(q1[word], s + 1);
                    const uint4 v = xv[word];  // x at the word's 8 positions, values (0..7)
                    const uint32_t lo = s == 0 ? v.x : v.y, hi = s == 0 ? v.z : v.w;
                    b[0] = __byte_perm(lo, hi, 0x5410);  // (x_s, x_{s+4})
                    b[1] = __byte_perm(lo, hi, 0x7632);  // (x_{s+1}, x_{s+5})
                } else {          // 8 bits: word `step` holds 4 codes; pairs (0, 2) and (1, 3)
                    auto pair = [&](uint32_t q, int first) {
                        __nv_bfloat162 h = __floats2bfloat162_rn(static_cast<float>((q >> (8 * first)) & 0xFFu),
                                                                 static_cast<float>((q >> (8 * first + 16)) & 0xFFu));
                        return *reinterpret_cast<uint32_t*>(&h);
                    };
                    a[0] = pair(q0[step], 0); a[1] = pair(q1[step], 0); a[2] = pair(q0[step], 1); a[3] = pair(q1[step], 1);
                    const uint4 v = xv[step / 2];
                    const uint32_t lo = step % 2 == 0 ? v.x : v.z, hi = step % 2 == 0 ? v.y : v.w;
                    b[0] = __byte_perm(lo, hi, 0x5410);  // (x_0, x_2)
                    b[1] = __byte_perm(lo, hi, 0x7632);  // (x_1, x_3)
                }
                asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                             "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                             : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                             : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
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
            if (n < t1 && r < N) out[(size_t)OROW(n) * N + r] = static_cast<T>(acc[nt][c]);
        }
    }
"""

MAX_TOKENS = 8  # the kernel takes up to 16 (two 8-token tiles); past 8 MLX is as fast or faster
# Where the kernel beats MLX's own (measured on an H100 by scripts/check_kernels.py, per product): MLX reads a
# matrix once per token for 2 to 7 tokens, so there any matrix past a few MB is faster here (12 MB: 1.6x at 2
# tokens, 3.1x at 5); at 1 and 8+ tokens MLX reads it once too, and only the output head (250 MB) is faster
# here (1.7x at 1 token, 1.25x at 8, 0.8x at 16). Small matrices are launch-bound, and MLX launches faster.
# A prefill's dense products (1024 tokens) stay with MLX's tiled kernel: 0.6x of its speed here.
LARGE_BYTES = 32 * 2**20
MEDIUM_BYTES = 6 * 2**20
TARGET_BLOCKS = 264  # two blocks per SM of an H100: split K until a matrix has this many

# Which rows of x a block multiplies, and with which matrix: all of x (up to 16 tokens) with the one matrix, or
# (grouped) one tile of up to 16 rows of x sorted by expert, with that expert's matrix of a stacked [E, N, K].
# XROW(i) / OROW(i): where row i of the product reads x and writes out (grouped: optionally through index arrays,
# so that x needs no gather into expert order and the output no gather back).
TOKENS_PROLOGUE = """
    const int N = w_shape[0], e = 0, t0 = blockIdx.y * 8 * NT, t1 = min(t0 + 8 * NT, x_shape[0]);
    #define XROW(i) (i)
    #define OROW(i) (i)
"""
GROUPED_PROLOGUE = """
    const int N = w_shape[1], E = tile_end_shape[0], z = blockIdx.y;
    if (z >= tile_end[E - 1]) return;                   // past the last tile (the grid is an upper bound)
    #define XROW(i) (GATHER ? static_cast<size_t>(x_rows[i]) : static_cast<size_t>(i))
    #define OROW(i) (SCATTER ? static_cast<size_t>(out_rows[i]) : static_cast<size_t>(i))
    int lo = 0, hi = E - 1;                             // the expert whose tiles include z
    while (lo < hi) { const int mid = (lo + hi) / 2; if (tile_end[mid] > z) hi = mid; else lo = mid + 1; }
    const int e = lo, first = e == 0 ? 0 : tile_end[e - 1];
    const int t0 = start[e] + (z - first) * 8 * NT, t1 = min(t0 + 8 * NT, start[e] + count[e]);
"""
def _get_kernel(grouped=False):
    extra = ["tile_end", "start", "count", "x_rows", "out_rows"] if grouped else []
    return cuda_kernel("qmm_grouped" if grouped else "qmm_tokens", ["x", "w", "scales", "biases"] + extra, ["out"],
                       SOURCE.replace("PROLOGUE", GROUPED_PROLOGUE if grouped else TOKENS_PROLOGUE))


def usable(linear, x) -> bool:
    """`formats_ok`, and a product the kernel does faster than MLX (see LARGE_BYTES)."""
    if not formats_ok(linear, x):
        return False
    tokens, size = x.size // x.shape[-1], linear.weight.size * 4
    if size >= LARGE_BYTES:
        return tokens <= MAX_TOKENS
    return size >= MEDIUM_BYTES and 2 <= tokens <= min(7, MAX_TOKENS)


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


def formats_ok(layer, x) -> bool:
    """Weights as `kernels.quantized_format` reads them with bfloat16 scales, bfloat16 activations, K a multiple
    of the group."""
    found = quantized_format(layer)
    return found is not None and found[2] == mx.bfloat16 and x.dtype == mx.bfloat16 and x.shape[-1] % found[1] == 0


def expert_tiles(indices, num_experts: int, tile: int = None):
    """For rows sorted by expert (`indices` [P], non-decreasing): (tile_end, start, count) [E] int32, the running
    count of `tile`-row tiles, each expert's first row, and its number of rows."""
    tile = tile or GROUP_TILE
    count = mx.zeros((num_experts,), mx.int32).at[indices].add(1)
    end = mx.cumsum(count)
    return mx.cumsum((count + tile - 1) // tile), end - count, count


GROUP_TILE = 16  # rows of x per block in the grouped product (two 8-token mma tiles)
# Below this many rows MLX's sorted gather_qmm is as fast (it took 0.12 ms for 40 rows against 0.2 here); at
# a prefill's 8192 rows (1024 tokens, top-8) it takes 7.1 ms for the experts' gate/up and 3.8 ms for down,
# against 0.78 and 0.49 ms here (H100, Qwen3.5-35B-A3B shapes).
GROUPED_MIN_ROWS = 256


def grouped_matmul(layer, x, indices, tiles=None, nt=None, x_rows=None, out_rows=None):
    """Rows sorted by expert times their expert's dequantized [N, K] matrix of a QuantizedExpertLinear's
    [E, N, K], each expert's weights read once per 16 rows. indices [P]: the expert of each row, non-decreasing.
    Row i reads x[x_rows[i]] (x [P, K] in that order without x_rows) and goes to out[out_rows[i]] (to out[i]
    without), out [P, N]: so a caller needs no gather into expert order or back. MLX-CUDA's gather_qmm takes
    ~7 ms for a 1024-token prefill's 8192 rows (Qwen3.5-35B-A3B)."""
    P, K = indices.shape[0], x.shape[-1]
    E, N = layer.weight.shape[:2]
    nt = nt or GROUP_TILE // 8
    tile_end, start, count = tiles if tiles is not None else expert_tiles(indices, E, 8 * nt)
    unused = tile_end  # an input the kernel does not read
    (out,) = _get_kernel(grouped=True)(
        inputs=[x, layer.weight, layer.scales, layer.biases, tile_end, start, count,
                unused if x_rows is None else x_rows, unused if out_rows is None else out_rows],
        template=[("K", K), ("BITS", layer.bits), ("GS", layer.group_size), ("NT", nt),
                  ("KSPLIT", 1), ("T", x.dtype), ("GATHER", x_rows is not None), ("SCATTER", out_rows is not None)],
        grid=(-(-N // 128) * 256, -(-P // (8 * nt)) + E, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(P, N)],
        output_dtypes=[x.dtype],
    )
    return out
