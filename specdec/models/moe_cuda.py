"""The sparse MoE block of a decode or verify window as two CUDA launches (MLX's CUDA backend), and the routing
of many tokens for the grouped product (`route`, further down).

As MLX operations the block is ~14 graph nodes a layer (top-k, gathers, softmax, two gather matmuls, the
SwiGLU, the weighted sum, the shared expert's three matmuls, its gate, the residual add), and at a few tokens
each node costs its ~10 us of launch and bookkeeping while the arithmetic takes a few. Here:

- `moe_gate_up`: one block per (token, slot, tile of intermediate units); a slot is one of the k routed
  experts or the shared expert. Every block finds the token's top-k experts from the router logits (one warp,
  k rounds of argmax; ties go to the lower index), then its warps compute gate and up rows of its slot's
  expert and write silu(gate) * up.
- `moe_down`: one block per (token, tile of hidden rows): the k expert down rows weighted by the renormalised
  router scores, the shared expert's down row times sigmoid(its gate), plus the residual.

The router matmul stays an MLX quantized matmul (one launch: all E logits are needed before the top-k).
Weights are MLX affine-quantized (4 or 8 bits packed little-endian in uint32, w = scale * q + bias per group).
A lane reads 16 bytes of a row at a time, consecutive lanes consecutive bytes, so a warp reads a row as one
coalesced stretch; the input vector sits where each lane reads it without bank conflicts (in registers for
gate/up, transposed in shared memory for down). Dot products run in float32; where the ops path
(SparseMoE.ops) rounds to the model dtype, so does the kernel: gate and up outputs, silu and its product,
each expert's down output, the scores, the weighted sum, the shared expert's output and its gate, the
residual add. What differs is the summation order inside each dot product. `scripts/check_kernels.py`
compares the two at real size on the GPU; a self-check runs once on a small case before the kernels are used.
"""

import mlx.core as mx

from .kernels import close, cuda_kernel, quantized_format
from .qmm_cuda import SortedRows, expert_tiles

HEADER = """
// 16 bytes of a packed row (128 / BITS values) against those values of x, read at x[i * STRIDE]: sum(q * x).
template <int BITS, int STRIDE>
__device__ inline float chunk_dot(uint4 w, const float* x) {
    constexpr int PER = 32 / BITS;
    constexpr uint32_t MASK = (1u << BITS) - 1u;
    const uint32_t ws[4] = {w.x, w.y, w.z, w.w};
    float acc = 0.f;
    #pragma unroll
    for (int u = 0; u < 4; ++u) {
        #pragma unroll
        for (int p = 0; p < PER; ++p) acc += static_cast<float>((ws[u] >> (BITS * p)) & MASK) * x[(u * PER + p) * STRIDE];
    }
    return acc;
}

__device__ inline float warp_sum(float v) {
    #pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
    return v;
}

template <typename T>
__device__ inline float rnd(float v) { return static_cast<float>(static_cast<T>(v)); }

__device__ inline float sigmoid(float v) { return 1.f / (1.f + expf(-v)); }

// The end of the block for one output, each step rounded as the operations round it: the routed sum, plus the
// shared expert's output times its gate (sigmoid of its logit, rounded), plus the residual.
template <typename T, bool HAS_SHARED, bool HAS_RESIDUAL>
__device__ inline T block_output(float routed, float gate, float shared_out, float residual) {
    float y = rnd<T>(routed);
    if (HAS_SHARED) y = rnd<T>(y + rnd<T>(gate * rnd<T>(shared_out)));
    return static_cast<T>(HAS_RESIDUAL ? residual + y : y);
}

template <typename T> struct __align__(16) vec8 { T v[8]; };

// The k largest of one token's NE router logits, by one warp: k rounds of argmax over the lanes' strided slices,
// ties to the lower index. chosen / chosen_logit (lane 0 writes them) hold the experts from the largest down.
template <int NE, int TOPK, typename LT>
__device__ inline void top_k(const LT* logits, int lane, int* chosen, float* chosen_logit) {
    constexpr int PER_LANE = (NE + 31) / 32;
    float v[PER_LANE];
    #pragma unroll
    for (int m = 0; m < PER_LANE; ++m) {
        const int e = lane + 32 * m;
        v[m] = e < NE ? static_cast<float>(logits[e]) : -INFINITY;
    }
    unsigned taken = 0;  // bit m: this lane's element m was chosen
    for (int r = 0; r < TOPK; ++r) {
        float bv = -INFINITY; int bi = 0x7fffffff;
        #pragma unroll
        for (int m = 0; m < PER_LANE; ++m) {
            const int e = lane + 32 * m;
            if (e < NE && !(taken >> m & 1u) && (v[m] > bv || bi == 0x7fffffff)) { bv = v[m]; bi = e; }
        }
        #pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffff, bv, o);
            const int oi = __shfl_xor_sync(0xffffffff, bi, o);
            if (ov > bv || (ov == bv && oi < bi)) { bv = ov; bi = oi; }
        }
        if ((bi & 31) == lane) taken |= 1u << (bi >> 5);
        if (lane == 0) { chosen[r] = bi; chosen_logit[r] = bv; }
    }
    __syncwarp();
}

// One token's routing from its top_k, by one thread: the experts, and their scores in float32 rounded once to T:
// the softmax of the k logits (NORM_TOPK; softmax(precise=True)), else exp(logit - logsumexp(all NE logits)).
template <int NE, int TOPK, bool NORM_TOPK, typename T, typename LT>
__device__ inline void write_routing(const int* chosen, const float* chosen_logit, const LT* logits, int* expert,
                                     float* score) {
    const float top = chosen_logit[0];
    float denom = 0.f;
    if (NORM_TOPK) {
        for (int r = 0; r < TOPK; ++r) denom += expf(chosen_logit[r] - top);
    } else {
        for (int e = 0; e < NE; ++e) denom += expf(static_cast<float>(logits[e]) - top);
    }
    for (int r = 0; r < TOPK; ++r) {
        expert[r] = chosen[r];
        const float p = NORM_TOPK ? expf(chosen_logit[r] - top) / denom : expf(chosen_logit[r] - top - logf(denom));
        score[r] = rnd<T>(p);
    }
}
"""

GATE_UP_SOURCE = """
    // grid: x = tiles * blockDim.x, y = N * SLOTS (slot TOPK is the shared expert)
    constexpr int SLOTS = TOPK + (HAS_SHARED ? 1 : 0);
    constexpr int VALS = 128 / BITS;          // values in 16 bytes of packed weights
    constexpr int CPL = HID / VALS / 32;      // 16-byte chunks of a row per lane: chunk c = lane + 32 i
    constexpr int WPR = HID * BITS / 32;      // uint32 words in a row
    constexpr int GROUPS = HID / GS;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int t = blockIdx.y / SLOTS, slot = blockIdx.y % SLOTS;
    __shared__ int chosen[TOPK];
    __shared__ float chosen_logit[TOPK];

    float xr[CPL * VALS], xsum[CPL];  // this lane's chunks of x, kept in registers for every row
    #pragma unroll
    for (int i = 0; i < CPL; ++i) {
        const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)t * HID + (lane + 32 * i) * VALS);
        float s = 0.f;
        #pragma unroll
        for (int u = 0; u < VALS / 8; ++u) {  // 8 values of x (16 bytes) per load
            const uint4 raw = src[u];
            const T* e = reinterpret_cast<const T*>(&raw);
            #pragma unroll
            for (int v = 0; v < 8; ++v) { xr[i * VALS + u * 8 + v] = static_cast<float>(e[v]); s += xr[i * VALS + u * 8 + v]; }
        }
        xsum[i] = s;
    }
    if (warp == 0) {
        top_k<NE, TOPK>(logits + (size_t)t * NE, lane, chosen, chosen_logit);
        if (lane == 0 && slot == 0 && blockIdx.x == 0)  // one block per token writes the routing
            write_routing<NE, TOPK, NORM_TOPK, T>(chosen, chosen_logit, logits + (size_t)t * NE,
                                                  expert + (size_t)t * TOPK, score + (size_t)t * TOPK);
    }
    __syncthreads();

    // gate rows and up rows of this slot's matrices: an expert's [2 INTER, HID] slice of gate_up, or the shared expert
    const size_t base = slot < TOPK ? (size_t)chosen[slot] * 2 * INTER : 0;
    const uint32_t* wg = reinterpret_cast<const uint32_t*>(slot < TOPK ? gu_w : sg_w) + base * WPR;
    const uint32_t* wu = reinterpret_cast<const uint32_t*>(slot < TOPK ? gu_w : su_w) + (slot < TOPK ? base + INTER : 0) * WPR;
    const auto* sg = (slot < TOPK ? gu_s : sg_s) + base * GROUPS;
    const auto* bg = (slot < TOPK ? gu_b : sg_b) + base * GROUPS;
    const auto* su = (slot < TOPK ? gu_s : su_s) + (slot < TOPK ? base + INTER : 0) * GROUPS;
    const auto* bu = (slot < TOPK ? gu_b : su_b) + (slot < TOPK ? base + INTER : 0) * GROUPS;
    const int j0 = (blockIdx.x * warps + warp) * UNITS;
    float g[UNITS], up[UNITS];
    #pragma unroll
    for (int n = 0; n < UNITS; ++n) {
        const int j = min(j0 + n, INTER - 1);  // past the end: computed, not written
        g[n] = up[n] = 0.f;
        #pragma unroll
        for (int i = 0; i < CPL; ++i) {
            const int c = lane + 32 * i, gi = j * GROUPS + c * VALS / GS;
            const uint4 qg = reinterpret_cast<const uint4*>(wg + (size_t)j * WPR)[c];
            const uint4 qu = reinterpret_cast<const uint4*>(wu + (size_t)j * WPR)[c];
            g[n] += static_cast<float>(sg[gi]) * chunk_dot<BITS, 1>(qg, xr + i * VALS) + static_cast<float>(bg[gi]) * xsum[i];
            up[n] += static_cast<float>(su[gi]) * chunk_dot<BITS, 1>(qu, xr + i * VALS) + static_cast<float>(bu[gi]) * xsum[i];
        }
    }
    #pragma unroll
    for (int n = 0; n < UNITS; ++n) {
        const float gs = warp_sum(g[n]), us = warp_sum(up[n]);
        if (lane == 0 && j0 + n < INTER) {
            const float gr = rnd<T>(gs), silu = rnd<T>(gr * rnd<T>(sigmoid(gr)));
            act[((size_t)t * SLOTS + slot) * INTER + j0 + n] = static_cast<T>(silu * rnd<T>(us));
        }
    }
    if (HAS_SHARED && slot == TOPK && blockIdx.x == 0 && warp == 0) {  // the shared expert's gate logit
        constexpr int VG = 128 / BG;
        const uint4* wr = reinterpret_cast<const uint4*>(gate_w);
        float acc = 0.f;
        for (int c = lane; c < HID / VG; c += 32) {
            float xv[VG], s = 0.f;
            #pragma unroll
            for (int v = 0; v < VG; ++v) { xv[v] = static_cast<float>(x[(size_t)t * HID + c * VG + v]); s += xv[v]; }
            const int gi = c * VG / GG;
            acc += static_cast<float>(gate_s[gi]) * chunk_dot<BG, 1>(wr[c], xv) + static_cast<float>(gate_b[gi]) * s;
        }
        acc = warp_sum(acc);
        if (lane == 0) shared_gate[t] = rnd<T>(acc);
    }
"""

DOWN_SOURCE = """
    // grid: x = tiles * blockDim.x, y = N
    constexpr int SLOTS = TOPK + (HAS_SHARED ? 1 : 0);
    constexpr int VALS = 128 / BITS, RC = INTER / VALS;   // 16-byte chunks in a down row
    constexpr int LPS = RC < 32 ? RC : 32;                // lanes per slot (a power of two)
    constexpr int CPL = RC / LPS, SPP = 32 / LPS;         // chunks per lane, slots per pass
    constexpr int PASSES = (SLOTS + SPP - 1) / SPP;
    constexpr int SSTRIDE = INTER + (SPP > 1 ? LPS : 0);  // the teams of one pass read distinct banks
    constexpr int WPR = INTER * BITS / 32, GROUPS = INTER / GS;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, warps = blockDim.x >> 5;
    const int team = lane / LPS, tl = lane % LPS;
    const int t = blockIdx.y;
    __shared__ float acts[SLOTS * SSTRIDE];  // value v of chunk c of slot s at s * SSTRIDE + v * RC + c
    __shared__ float sums[SLOTS * RC];       // per chunk: the sum of its values
    __shared__ int ex[TOPK];
    __shared__ float sc[TOPK];
    __shared__ float sgate;
    for (int i = tid; i < SLOTS * INTER; i += blockDim.x) {
        const int s = i / INTER, e = i % INTER;
        acts[s * SSTRIDE + (e % VALS) * RC + e / VALS] = static_cast<float>(act[(size_t)t * SLOTS * INTER + i]);
    }
    if (tid < TOPK) { ex[tid] = expert[(size_t)t * TOPK + tid]; sc[tid] = score[(size_t)t * TOPK + tid]; }
    if (HAS_SHARED && tid == 0) sgate = rnd<T>(sigmoid(shared_gate[t]));
    __syncthreads();
    for (int i = tid; i < SLOTS * RC; i += blockDim.x) {
        const float* a = acts + (i / RC) * SSTRIDE + i % RC;
        float s = 0.f;
        for (int v = 0; v < VALS; ++v) s += a[v * RC];
        sums[i] = s;
    }
    __syncthreads();

    const int r0 = (blockIdx.x * warps + warp) * UNITS;
    float d[UNITS][PASSES];
    #pragma unroll
    for (int n = 0; n < UNITS; ++n) {
        const int r = min(r0 + n, HID - 1);  // past the end: computed, not written
        #pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            const int s = p * SPP + team;
            d[n][p] = 0.f;
            if (s < SLOTS) {
                const bool routed = s < TOPK;
                const size_t row = routed ? (size_t)ex[s] * HID + r : (size_t)r;
                const uint4* wr = reinterpret_cast<const uint4*>(reinterpret_cast<const uint32_t*>(routed ? dn_w : sd_w) + row * WPR);
                const auto* scl = (routed ? dn_s : sd_s) + row * GROUPS;
                const auto* bia = (routed ? dn_b : sd_b) + row * GROUPS;
                #pragma unroll
                for (int i = 0; i < CPL; ++i) {
                    const int c = tl + LPS * i, gi = c * VALS / GS;
                    d[n][p] += static_cast<float>(scl[gi]) * chunk_dot<BITS, RC>(wr[c], acts + s * SSTRIDE + c)
                             + static_cast<float>(bia[gi]) * sums[s * RC + c];
                }
            }
        }
    }
    #pragma unroll
    for (int n = 0; n < UNITS; ++n) {
        float weighted = 0.f, shared_out = 0.f;  // sum of score * (expert output rounded to T), in float32
        #pragma unroll
        for (int p = 0; p < PASSES; ++p) {
            float v = d[n][p];
            #pragma unroll
            for (int o = LPS / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
            const int s = p * SPP + team;
            if (tl == 0 && s < TOPK) weighted += sc[s] * rnd<T>(v);
            if (HAS_SHARED && tl == 0 && s == TOPK) shared_out = v;
        }
        #pragma unroll
        for (int o = LPS; o < 32; o <<= 1) {
            weighted += __shfl_xor_sync(0xffffffff, weighted, o);
            shared_out += __shfl_xor_sync(0xffffffff, shared_out, o);
        }
        if (lane == 0 && r0 + n < HID) {
            const size_t o = (size_t)t * HID + r0 + n;
            out[o] = block_output<T, HAS_SHARED, RESIDUAL>(weighted, sgate, shared_out,
                                                           RESIDUAL ? static_cast<float>(residual[o]) : 0.f);
        }
    }
"""

THREADS = 256  # 8 warps a block
# Rows per warp (intermediate units in moe_gate_up, hidden rows in moe_down): more keep more loads in flight
# per warp and repeat each block's set-up (top-k, loading x or the activations) over fewer blocks. 2 and 4
# were the fastest of 1..8 on an H100 at 1 to 8 tokens (by 5-15%).
GATE_UP_UNITS = 2
DOWN_UNITS = 4
# Windows up to this many tokens use the kernels; longer ones sort tokens by expert (ops path; on CUDA the grouped
# product), which reads each chosen expert once. Measured on an H100 (8-layer Qwen3.5-35B-A3B, 4-bit, whole
# compiled steps, against MLX's sorted gather_qmm): the kernels save 0.8 ms at 1 token and 0.6 ms at 5, break
# even at 8, and cost 1.4 ms more at 16.
MAX_TOKENS = 8
SHARED_BYTES = 48 * 1024  # static shared memory a block may use
MAX_REGISTER_FLOATS = 128  # x values a lane keeps in registers in moe_gate_up: hidden / 32
MAX_EXPERTS = 32 * 32  # top_k marks a lane's chosen logits in the bits of one 32-bit word

def _matrices(moe):
    """The expert and shared-expert matrices the kernels read as one format."""
    ex = moe.experts
    found = [getattr(ex, "gate_up", None), getattr(ex, "down", None)]
    if moe.shared:
        se = moe.shared_expert
        found += [se.gate_proj, se.up_proj, se.down_proj]
    return found


def usable(moe, x) -> bool:
    """For bfloat16 x [N, H], as self-checked. The kernels read MLX affine-quantized weights with bfloat16 scales,
    4 or 8 bits, group 32/64/128, one format for all expert and shared-expert matrices (the router and the
    shared expert's gate may differ, as mlx-community's 8-bit ones do), hidden a multiple of 32 x 16 bytes of
    packed values (up to 4096), the shared expert as wide as the routed ones. Anything else (float weights,
    3-bit, mxfp4, mixed bits) runs as operations."""
    formats = {quantized_format(m) for m in _matrices(moe)}
    if x.dtype != mx.bfloat16 or len(formats) != 1 or None in formats or next(iter(formats))[2] != mx.bfloat16:
        return False
    bits = formats.pop()[0]
    vals = 128 // bits
    H, I, slots = moe.hidden, moe.intermediate, moe.top_k + moe.shared
    row_chunks = I // vals
    lanes_ok = I % vals == 0 and (row_chunks % 32 == 0 or (row_chunks < 32 and 32 % row_chunks == 0))
    shared_ok = not moe.shared or (moe.shared_intermediate == I
                                   and quantized_format(moe.shared_expert_gate) is not None)
    down_bytes = 4 * slots * (I + 32) + 4 * slots * row_chunks + 8 * moe.top_k
    return (lanes_ok and shared_ok and H % (32 * vals) == 0 and H // 32 <= MAX_REGISTER_FLOATS
            and moe.num_experts <= MAX_EXPERTS and moe.top_k <= moe.num_experts and down_bytes <= SHARED_BYTES)


def moe(layer, x, residual=None):
    """layer: a SparseMoE that `usable` accepts; x [N, H] -> moe(x) [N, H], plus residual [N, H] if given:
    what SparseMoE.ops computes, in two launches after the router's matmul."""
    return down(layer, *gate_up(layer, x), residual)


def _quantized(linear):
    return [linear.weight, linear.scales, linear.biases]


def _template(layer, dtype, units):
    bits, gs, _ = quantized_format(layer.experts.gate_up)
    return [("HID", layer.hidden), ("NE", layer.num_experts), ("TOPK", layer.top_k), ("INTER", layer.intermediate),
            ("HAS_SHARED", layer.shared), ("BITS", bits), ("GS", gs), ("UNITS", units), ("T", dtype)]


def gate_up(layer, x):
    """The first launch: routing and silu(gate) * up for every (token, slot) -> (act [N, slots, I],
    expert [N, k] int32, score [N, k] float32 rounded to x's dtype, shared-gate logit [N] float32)."""
    N = x.shape[0]
    K, I, slots = layer.top_k, layer.intermediate, layer.top_k + layer.shared
    ex = layer.experts
    if layer.shared:
        se = layer.shared_expert
        shared = _quantized(se.gate_proj) + _quantized(se.up_proj) + _quantized(layer.shared_expert_gate)
        BG, GG, _ = quantized_format(layer.shared_expert_gate)
    else:  # stand-ins: the code that reads them is compiled out
        shared, (BG, GG) = _quantized(ex.gate_up) * 3, quantized_format(ex.gate_up)[:2]
    kernel = cuda_kernel("moe_gate_up", ["x", "logits", "gu_w", "gu_s", "gu_b", "sg_w", "sg_s", "sg_b", "su_w",
                                         "su_s", "su_b", "gate_w", "gate_s", "gate_b"],
                         ["act", "expert", "score", "shared_gate"], GATE_UP_SOURCE, header=HEADER)
    return kernel(
        inputs=[x, layer.gate(x)] + _quantized(ex.gate_up) + shared,
        template=_template(layer, x.dtype, GATE_UP_UNITS)
        + [("BG", BG), ("GG", GG), ("NORM_TOPK", layer.norm_topk_prob)],
        grid=(-(-I // (THREADS // 32 * GATE_UP_UNITS)) * THREADS, N * slots, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(N, slots, I), (N, K), (N, K), (N,)],
        output_dtypes=[x.dtype, mx.int32, mx.float32, mx.float32],
    )


def down(layer, act, expert, score, shared_gate, residual=None):
    """The second launch: the weighted expert down rows, the gated shared expert, the residual -> [N, H]."""
    N, H = act.shape[0], layer.hidden
    ex = layer.experts
    shared = _quantized(layer.shared_expert.down_proj if layer.shared else ex.down)
    kernel = cuda_kernel("moe_down", ["act", "expert", "score", "shared_gate", "dn_w", "dn_s", "dn_b", "sd_w",
                                      "sd_s", "sd_b", "residual"], ["out"], DOWN_SOURCE, header=HEADER)
    (out,) = kernel(
        inputs=[act, expert, score, shared_gate] + _quantized(ex.down) + shared
        + [residual if residual is not None else act],
        template=_template(layer, act.dtype, DOWN_UNITS) + [("RESIDUAL", residual is not None)],
        grid=(-(-H // (THREADS // 32 * DOWN_UNITS)) * THREADS, N, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(N, H)],
        output_dtypes=[act.dtype],
    )
    return out


# ---------------------------------------------------------------------------------------------------------------
# The routing of many tokens (a prefill's, a long verify window's) for the grouped product (qmm_cuda), in two
# launches instead of ~17 MLX operations a layer (argpartition, take, softmax, argsort, and the tile counts):
# - `moe_route`: a warp a token: its top-k and scores, as moe_gate_up finds them;
# - `moe_sort`: one block: a counting sort of the (token, slot) rows by expert, and the tile counts.
# Rows of one expert land in the order their atomics come, which changes no result: each row of the grouped
# product is computed alone (an mma's columns do not mix) and written to its own place.

ROUTE_SOURCE = """
    constexpr int WARPS = 8;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, t = blockIdx.x * WARPS + warp;
    __shared__ int chosen[WARPS][TOPK];
    __shared__ float chosen_logit[WARPS][TOPK];
    if (t >= logits_shape[0]) return;  // a whole warp
    top_k<NE, TOPK>(logits + (size_t)t * NE, lane, chosen[warp], chosen_logit[warp]);
    if (lane == 0)
        write_routing<NE, TOPK, NORM_TOPK, T>(chosen[warp], chosen_logit[warp], logits + (size_t)t * NE,
                                              expert + (size_t)t * TOPK, score + (size_t)t * TOPK);
"""

SORT_SOURCE = """
    constexpr int R = (NE + 31) / 32;  // experts a lane of the scanning warp takes
    const int tid = threadIdx.x, P = expert_shape[0] * TOPK;
    __shared__ int rows[NE], cursor[NE];
    for (int e = tid; e < NE; e += blockDim.x) rows[e] = 0;
    __syncthreads();
    for (int i = tid; i < P; i += blockDim.x) atomicAdd(&rows[expert[i]], 1);
    __syncthreads();
    if (tid < 32) {  // exclusive scans of the rows and tiles, lane l over experts l R .. l R + R - 1
        int n = 0, tiles = 0;
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            const int e = tid * R + r;
            if (e < NE) { n += rows[e]; tiles += (rows[e] + TILE - 1) / TILE; }
        }
        int n_incl = n, tiles_incl = tiles;
        #pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const int a = __shfl_up_sync(0xffffffff, n_incl, o), b = __shfl_up_sync(0xffffffff, tiles_incl, o);
            if (tid >= o) { n_incl += a; tiles_incl += b; }
        }
        int at = n_incl - n, tl = tiles_incl - tiles;
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            const int e = tid * R + r;
            if (e < NE) {
                const int c = rows[e];
                start[e] = cursor[e] = at;
                count[e] = c;
                at += c;
                tl += (c + TILE - 1) / TILE;
                tile_end[e] = tl;
            }
        }
    }
    __syncthreads();
    for (int i = tid; i < P; i += blockDim.x) {
        const int at = atomicAdd(&cursor[expert[i]], 1);
        slot[at] = i;
        token[at] = i / TOPK;
    }
"""

SORT_THREADS = 1024


def route(logits, top_k: int, norm_topk: bool, tile: int):
    """Router logits [N, E] -> (expert [N, k] int32, score [N, k] float32 rounded to the logits' dtype,
    qmm_cuda.SortedRows in `tile`-row tiles): SparseMoE.ops' routing (ties to the lower index), sorted by expert."""
    N, E = logits.shape
    expert, score = cuda_kernel("moe_route", ["logits"], ["expert", "score"], ROUTE_SOURCE, header=HEADER)(
        inputs=[logits],
        template=[("NE", E), ("TOPK", top_k), ("NORM_TOPK", norm_topk), ("T", logits.dtype)],
        grid=(-(-N // 8) * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(N, top_k), (N, top_k)], output_dtypes=[mx.int32, mx.float32],
    )
    token, slot, tile_end, start, count = cuda_kernel(
        "moe_sort", ["expert"], ["token", "slot", "tile_end", "start", "count"], SORT_SOURCE)(
        inputs=[expert],
        template=[("NE", E), ("TOPK", top_k), ("TILE", tile)],
        grid=(SORT_THREADS, 1, 1), threadgroup=(SORT_THREADS, 1, 1),
        output_shapes=[(N * top_k,), (N * top_k,), (E,), (E,), (E,)], output_dtypes=[mx.int32] * 5,
    )
    return expert, score, SortedRows(token, slot, (tile_end, start, count))


# The end of a grouped block in one launch (`combine`): each token's k weighted expert rows summed, plus the shared
# expert gated by sigmoid(its logit), plus the residual, rounded after each step as the operations round them
# (a sum over k in float32, then the sigmoid, the product, and the two adds in the block's dtype). As operations
# that was five launches, ~40 us a layer at 1024 tokens of Qwen3.5-35B-A3B on an H100, ~half of it the sum.
COMBINE_SOURCE = """
    constexpr int V = 8;  // hidden units a thread: 16-byte loads and store
    const int H = rows_shape[1], N = rows_shape[0] / TOPK;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    const int t = i / (H / V), h = (i % (H / V)) * V;
    if (t >= N) return;
    auto values = [&](const T* src) {
        const uint4 v = *reinterpret_cast<const uint4*>(src);
        return *reinterpret_cast<const vec8<T>*>(&v);
    };
    float sum[V] = {};
    for (int s = 0; s < TOPK; ++s) {
        const vec8<T> r = values(rows + ((size_t)t * TOPK + s) * H + h);
        #pragma unroll
        for (int j = 0; j < V; ++j) sum[j] += static_cast<float>(r.v[j]);
    }
    const float gate = HAS_SHARED ? rnd<T>(sigmoid(static_cast<float>(shared_logit[t]))) : 0.f;
    const vec8<T> sh = HAS_SHARED ? values(shared + (size_t)t * H + h) : vec8<T>{};
    const vec8<T> res = HAS_RESIDUAL ? values(residual + (size_t)t * H + h) : vec8<T>{};
    vec8<T> y;
    #pragma unroll
    for (int j = 0; j < V; ++j)
        y.v[j] = block_output<T, HAS_SHARED, HAS_RESIDUAL>(sum[j], gate, static_cast<float>(sh.v[j]),
                                                           static_cast<float>(res.v[j]));
    *reinterpret_cast<vec8<T>*>(out + (size_t)t * H + h) = y;
"""

def combine(rows, top_k: int, shared=None, shared_logit=None, residual=None):
    """rows [N * k, H] (token t's slot s at t * k + s, weighted by its score) -> [N, H]: their sum per token,
    plus sigmoid(shared_logit [N, 1]) * shared [N, H] where given, plus residual [N, H] where given."""
    P, H = rows.shape
    N = P // top_k
    unused = rows  # an input the kernel does not read
    (out,) = cuda_kernel("moe_combine", ["rows", "shared", "shared_logit", "residual"], ["out"], COMBINE_SOURCE,
                         header=HEADER)(
        inputs=[rows, unused if shared is None else shared, unused if shared_logit is None else shared_logit,
                unused if residual is None else residual],
        template=[("TOPK", top_k), ("HAS_SHARED", shared is not None), ("HAS_RESIDUAL", residual is not None),
                  ("T", rows.dtype)],
        grid=(-(-N * H // 8 // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[(N, H)], output_dtypes=[rows.dtype],
    )
    return out


def combine_usable(rows) -> bool:
    return rows.dtype in (mx.bfloat16, mx.float16) and rows.shape[-1] % 8 == 0


def route_self_check() -> bool:
    """`route` against the operations on random logits with ties (bfloat16 on a coarse grid): the experts are a
    top-k (ties may go either way), the scores their softmax, the rows sorted by expert and each (token, slot)
    there once, the tiles those of qmm_cuda.expert_tiles."""
    N, E, k, tile = 77, 40, 6, 16
    logits = (mx.round(4 * mx.random.normal((N, E), key=mx.random.key(7))) / 4).astype(mx.bfloat16)
    expert, score, rows = route(logits, k, True, tile)
    f32 = logits.astype(mx.float32)
    chosen = mx.take_along_axis(f32, expert, axis=-1)
    kth = mx.sort(f32, axis=-1)[:, -k]
    distinct = (mx.sort(expert, axis=-1)[:, 1:] != mx.sort(expert, axis=-1)[:, :-1]).all()
    scores_ok = mx.allclose(score, mx.softmax(chosen, axis=-1).astype(mx.bfloat16).astype(mx.float32), atol=1e-2)
    sorted_experts = expert.flatten()[rows.slot]
    in_order = (sorted_experts[1:] >= sorted_experts[:-1]).all()
    each_once = mx.array_equal(mx.sort(rows.slot), mx.arange(N * k)) and mx.array_equal(rows.token, rows.slot // k)
    tiles_ok = all(mx.array_equal(a, b) for a, b in zip(rows.tiles, expert_tiles(sorted_experts, E, tile)))
    return all(bool(c) for c in ((chosen >= kth[:, None]).all().item(), distinct.item(), scores_ok, in_order.item(),
                                 each_once, tiles_ok))


def grouped_self_check() -> bool:
    """The grouped block's glue: `route` (route_self_check), and `combine` against the operations it replaces, with
    and without the shared expert and the residual."""
    N, k, H = 5, 3, 64
    rows, shared, logit, residual = (mx.random.normal(shape, key=key).astype(mx.bfloat16) for shape, key in
                                     zip(((N * k, H), (N, H), (N, 1), (N, H)), mx.random.split(mx.random.key(8), 4)))
    summed = rows.reshape(N, k, H).sum(axis=1)
    full = residual + (summed + mx.sigmoid(logit) * shared)
    return (route_self_check() and close(combine(rows, k), summed, 1e-2)
            and close(combine(rows, k, shared, logit, residual), full, 1e-2))


def reference(layer, x, expert):
    """The block in float32 from its (dequantized) weights, with no intermediate rounding, routed to `expert`
    [N, k]: what the kernels approximate to within bfloat16 rounding. (MLX's own bfloat16 path is further off:
    its quantized matmuls accumulate 4-bit products in bfloat16.) Runs on float blocks too."""
    f32 = lambda a: a.astype(mx.float32)
    deq = lambda lin: f32(mx.dequantize(lin.weight, lin.scales, lin.biases, lin.group_size, lin.bits)
                          if "scales" in lin else lin.weight)
    logits, x = f32(layer.gate(x)), f32(x)
    top = mx.take_along_axis(logits, expert, axis=-1)
    scores = mx.softmax(top, axis=-1) if layer.norm_topk_prob else mx.exp(top - mx.logsumexp(logits, -1, True))
    swiglu = lambda gate, up: gate * mx.sigmoid(gate) * up
    gu = mx.gather_mm(x[:, None, None, :], deq(layer.experts.gate_up).swapaxes(-1, -2), rhs_indices=expert)
    act = swiglu(*mx.split(gu, 2, axis=-1))
    y = mx.gather_mm(act, deq(layer.experts.down).swapaxes(-1, -2), rhs_indices=expert).squeeze(-2)
    y = (scores[:, None, :] @ y).squeeze(-2)
    if layer.shared:
        se = layer.shared_expert
        shared = swiglu(x @ deq(se.gate_proj).T, x @ deq(se.up_proj).T) @ deq(se.down_proj).T
        y = y + mx.sigmoid(x @ deq(layer.shared_expert_gate).T) * shared
    return y


def compare(layer, x) -> dict:
    """The kernels on tokens x [N, H] against `reference`, routed to the kernel's experts. Router logits often
    tie in bfloat16 (at real size about one token in five has equal k-th and k+1-th logits) and a tie may
    resolve either way, so the experts are checked to be a top-k rather than equal to argpartition's.
    -> {"top_k": bool, "error": max error relative to the reference's largest entry, "ops_error": the same
    for SparseMoE.ops on the tokens argpartition routes alike}."""
    k = layer.top_k
    act, expert, score, shared_gate = gate_up(layer, x)
    got, want = down(layer, act, expert, score, shared_gate), reference(layer, x, expert)
    logits = layer.gate(x).astype(mx.float32)
    kth = mx.sort(logits, axis=-1)[:, -k]
    top_k = (mx.take_along_axis(logits, expert, axis=-1) >= kth[:, None]).all().item()
    theirs = mx.sort(mx.argpartition(logits, kth=-k, axis=-1)[:, -k:], axis=-1)
    alike = (mx.sort(expert, axis=-1) == theirs).all(axis=-1, keepdims=True)
    scale = mx.abs(want).max()
    error = lambda out, where=True: (mx.where(where, mx.abs(out.astype(mx.float32) - want), 0).max() / scale).item()
    return {"top_k": top_k, "error": error(got), "ops_error": error(layer.ops(x), alike)}
