"""GPU check: the CUDA kernels against the MLX ops path on random inputs of real size (Qwen3.5-35B-A3B:
32 v-heads, 16 k-heads, 128 x 128 state; 256 experts, top-8, 4-bit): the GDN recurrence for decode, verify
windows and replay, the chunked GDN prefill, a prefill's attention, the fused GDN mixer (conv, norms, gates,
recurrence, gated norm), the MoE kernels of random-weight layers (a prefill's block too), the tensor-core
matmuls, and the products MLX-CUDA gets wrong (K one tile); prints errors and timings, then whole compiled
steps with kernels on and off.

    python scripts/check_kernels.py [--no-steps]   # on a machine with MLX's CUDA backend
"""

import sys
import time

import mlx.core as mx
import numpy as np

from specdec.bench import arch_config, build_target, prefill, step_ms
from specdec.models import attention_cuda, gdn, gdn_cuda, kernels, moe_cuda, qmm_cuda


def timed(fn, repeats=50):
    mx.eval(fn())
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(fn())
    return (time.perf_counter() - start) / repeats * 1e3


def main():
    if not mx.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    B, Hk, Hv, Dk, Dv = 1, 16, 32, 128, 128
    worst = worst_out = 0.0
    print(f"{'case':<28}{'state err':>12}{'out err':>12}{'kernel ms':>11}{'ops ms':>9}")
    for S in (1, 2, 5, 9, 16, 17):
        q, k, v, g, beta, state = gdn_cuda.random_inputs(B, S, Hk, Hv, Dk, Dv, seed=S)
        for keep in (False, True):
            mine = gdn_cuda.recurrence_cuda(q, k, v, g, beta, state, keep)
            ref = gdn._recurrence_ops(q, k, v, g, beta, state, keep)
            # the fp32 states must agree to rounding; the output is bfloat16, so its error is checked apart
            err = max(rel_err(a, b) for a, b in zip(mine[1:], ref[1:]) if a is not None)
            out_err = rel_err(mine[0], ref[0])
            worst, worst_out = max(worst, err), max(worst_out, out_err)
            t_k = timed(lambda: gdn_cuda.recurrence_cuda(q, k, v, g, beta, state, keep)[1])
            t_o = timed(lambda: gdn._recurrence_ops(q, k, v, g, beta, state, keep)[1])
            print(f"{f'S={S} keep_states={keep}':<28}{err:>12.2e}{out_err:>12.2e}{t_k:>11.3f}{t_o:>9.3f}")
        err = rel_err(gdn_cuda.recurrence_cuda(None, k, v, g, beta, state, False)[1],
                      gdn._recurrence_ops(None, k, v, g, beta, state, False)[1])
        worst = max(worst, err)
        print(f"{f'S={S} replay':<28}{err:>12.2e}")
    ok = worst <= 1e-4 and worst_out <= 1e-2
    print(f"worst relative error {worst:.2e} (states), {worst_out:.2e} (bfloat16 output): {'OK' if ok else 'MISMATCH'}")
    ok = check_chunked() and ok
    ok = check_mixer() and ok
    ok = check_prefill() and ok
    ok = check_attention() and ok
    ok = check_moe() and ok
    ok = check_qmm() and ok
    ok = check_one_tile_products() and ok
    if "--no-steps" not in sys.argv:
        compare_steps()
    return 0 if ok else 1


def check_chunked():
    """The chunked prefill kernels (gdn_cuda.chunked_cuda) against gdn.gdn_chunked's operations and the token
    loop, at real size (Qwen3.5-35B-A3B's 16 k-heads, 32 v-heads, 128 x 128 state)."""
    B, Hk, Hv, D = 1, 16, 32, 128
    print(f"{'chunked prefill':<28}{'state err':>12}{'out err':>12}{'vs loop':>9}{'kernel ms':>11}{'ops ms':>9}{'loop ms':>9}")
    worst = worst_out = 0.0
    for S in (33, 100, 1024, 4096):
        q, k, v, g, beta, state = gdn_cuda.random_inputs(B, S, Hk, Hv, D, D, seed=400 + S, max_decay=1.0,
                                                         state_scale=0.1)
        got = gdn_cuda.chunked_cuda(q, k, v, g, beta, state)
        want = gdn.gdn_chunked(q, k, v, g, beta, state)
        loop = gdn_cuda.recurrence_cuda(q, k, v, g, beta, state, False)
        err, out_err = rel_err(got[1], want[1]), rel_err(got[0], want[0])
        worst, worst_out = max(worst, err), max(worst_out, out_err)
        t_k = timed(lambda: gdn_cuda.chunked_cuda(q, k, v, g, beta, state), 10)
        t_o = timed(lambda: gdn.gdn_chunked(q, k, v, g, beta, state), 10)
        t_l = timed(lambda: gdn_cuda.recurrence_cuda(q, k, v, g, beta, state, False)[:2], 10)
        print(f"{f'S={S}':<28}{err:>12.2e}{out_err:>12.2e}{rel_err(got[1], loop[1]):>9.1e}{t_k:>11.3f}{t_o:>9.3f}{t_l:>9.3f}")
    ok = worst <= 1e-3 and worst_out <= 1e-2
    print(f"chunked prefill: worst relative error {worst:.2e} (states), {worst_out:.2e} (bfloat16 output): "
          f"{'OK' if ok else 'MISMATCH'}")
    return ok


def check_mixer():
    """The fused GDN mixer (gdn_cuda.mixer) against GatedDeltaNet.mixer_ops on a real-size bfloat16 layer."""
    cfg = arch_config("qwen3.5-35b-a3b", 1)
    layer = build_target(cfg, 16).model.layers[0].linear_attn  # random weights as the bench makes them, bf16
    print(f"{'fused mixer':<28}{'state err':>12}{'out/tape err':>13}{'fused ms':>10}{'ops ms':>9}")
    worst = worst_out = 0.0
    for S in (1, 2, 5, 9, 16, 20, 32):  # 20 and 32 span chunks of the window
        ks = mx.random.split(mx.random.key(100 + S), 3)
        x = mx.random.normal((1, S, cfg.hidden_size), key=ks[0]).astype(mx.bfloat16)
        carried = mx.random.normal((1, layer.kernel - 1, layer.conv_dim), key=ks[1]).astype(mx.bfloat16)
        state = 0.1 * mx.random.normal((1, layer.Hv, layer.Dk, layer.Dv), key=ks[2])
        proj = layer.in_proj[0](x)
        qkv, z, b, a = layer.project(x)
        conv_in = mx.concatenate([carried, qkv], axis=1)
        mx.eval(proj, conv_in, z, b, a)
        got = gdn_cuda.mixer(layer, conv_in, proj, state, True, True)
        want = layer.mixer_ops(conv_in, z, b, a, state, True)
        names = ("out", "final", "states", "k", "v", "g", "beta")
        errs = [rel_err(got[0], want[0]), rel_err(got[1], want[1]), rel_err(got[2], want[3])]
        errs += [rel_err(u, w) for u, w in zip(got[3], want[2])]
        if max(errs) > 1e-2:
            print("  per output:", ", ".join(f"{n} {e:.1e}" for n, e in zip(names, errs)))
        err = max(rel_err(got[1], want[1]), rel_err(got[2], want[3]))  # fp32 states
        # the output, and the tape (whose v is bfloat16 like the output)
        out_err = max(rel_err(got[0], want[0]), *(rel_err(u, w) for u, w in zip(got[3], want[2])))
        worst, worst_out = max(worst, err), max(worst_out, out_err)
        t_f = timed(lambda: gdn_cuda.mixer(layer, conv_in, proj, state, False)[0])
        t_o = timed(lambda: layer.mixer_ops(conv_in, z, b, a, state, False)[0])
        print(f"{f'S={S}':<28}{err:>12.2e}{out_err:>13.2e}{t_f:>10.3f}{t_o:>9.3f}")
    ok = worst <= 1e-2 and worst_out <= 5e-2
    print(f"fused mixer: worst relative error {worst:.2e} (states), {worst_out:.2e} (bfloat16 output): "
          f"{'OK' if ok else 'MISMATCH'}")
    return ok


def check_prefill():
    """A prefill's recurrence inputs (gdn_cuda.prep) and gated norm (gdn_cuda.gated_norm), each one kernel, against
    GatedDeltaNet.recurrence_inputs and GatedRMSNorm on a real-size bfloat16 layer of each architecture."""
    print(f"{'prefill kernels':<36}{'err':>9}{'kernel ms':>11}{'ops ms':>9}")
    worst = 0.0
    for arch in ("qwen3.5-35b-a3b", "qwen3-next-80b-a3b"):
        cfg = arch_config(arch, 1)
        layer = build_target(cfg, 16).model.layers[0].linear_attn
        for S in (33, 1024, 4096):
            ks = mx.random.split(mx.random.key(200 + S), 3)
            x = mx.random.normal((1, S, cfg.hidden_size), key=ks[0]).astype(mx.bfloat16)
            carried = mx.random.normal((1, layer.kernel - 1, layer.conv_dim), key=ks[1]).astype(mx.bfloat16)
            o = mx.random.normal((1, S, layer.Hv, layer.Dv), key=ks[2]).astype(mx.bfloat16)
            proj = layer.in_proj[0](x)
            qkv, z, b, a = layer.project(x)
            conv_in = mx.concatenate([carried, qkv], axis=1)
            z = z.reshape(o.shape)
            mx.eval(proj, conv_in, z, b, a, o)
            cases = {"inputs": (lambda: gdn_cuda.prep(layer, carried, proj),
                                lambda: layer.recurrence_inputs(conv_in, b, a)),
                     "gated norm": (lambda: [gdn_cuda.gated_norm(layer, o, proj)],
                                    lambda: [layer.norm(o, z).reshape(1, S, -1)])}
            for name, (kernel, ops) in cases.items():
                err = max(rel_err(u, w) for u, w in zip(kernel(), ops()))
                worst = max(worst, err)
                t_k, t_o = timed(lambda: kernel()[0], 10), timed(lambda: ops()[0], 10)
                print(f"{f'{arch} S={S} {name}':<36}{err:>9.1e}{t_k:>11.3f}{t_o:>9.3f}")
    ok = worst <= 1e-2
    print(f"prefill kernels: worst relative error {worst:.2e}: {'OK' if ok else 'MISMATCH'}")
    return ok


def check_attention():
    """A prefill's attention kernel against MLX's (causal mask) at Qwen3.5-35B-A3B's shapes (16 q-heads, 2 kv-heads,
    head_dim 256): 1024 and 100 tokens from empty, and a 2048-token chunk after 2048 positions."""
    print(f"{'prefill attention':<36}{'err':>9}{'kernel ms':>11}{'mlx ms':>9}")
    ok = True
    for S, before in ((1024, 0), (2048, 2048), (100, 0)):
        ks = mx.random.split(mx.random.key(S + before), 3)
        q = mx.random.normal((1, 16, S, 256), key=ks[0]).astype(mx.bfloat16)
        k, v = (mx.random.normal((1, 2, before + S, 256), key=key).astype(mx.bfloat16) for key in ks[1:])
        mx.eval(q, k, v)
        mlx = lambda: mx.fast.scaled_dot_product_attention(q, k, v, scale=256**-0.5, mask="causal").transpose(
            0, 2, 1, 3).reshape(1, S, -1)
        mine = lambda: attention_cuda.attention(q, k, v, 256**-0.5)
        err = rel_err(mine(), mlx())
        ok = ok and err <= 2e-2
        print(f"{f'S={S} after {before}':<36}{err:>9.1e}{timed(mine, 10):>11.3f}{timed(mlx, 10):>9.3f}")
    print(f"prefill attention: {'OK' if ok else 'MISMATCH'}")
    return ok


def check_moe():
    """The MoE kernels (moe_cuda) against the block's float32 arithmetic on real-size 4-bit layers of both
    architectures; MLX's bfloat16 operations against the same reference for scale."""
    ok = True
    for arch in ("qwen3.5-35b-a3b", "qwen3-next-80b-a3b"):
        cfg = arch_config(arch, 1)
        block = build_target(cfg, 4).model.layers[0].mlp
        print(f"{'MoE kernels, ' + arch:<32}{'error':>8}{'ops err':>9}{'top-k':>7}{'residual':>10}{'kernel ms':>11}{'ops ms':>9}")
        for N in (1, 2, 5, 8, 16):
            x, residual = mx.random.normal((2, N, cfg.hidden_size), key=mx.random.key(200 + N)).astype(mx.bfloat16)
            found = moe_cuda.compare(block, x)
            exact = mx.array_equal(moe_cuda.moe(block, x, residual), residual + moe_cuda.moe(block, x)).item()
            t_k = timed(lambda: moe_cuda.moe(block, x, residual))
            t_o = timed(lambda: residual + block.ops(x))
            ok = ok and found["top_k"] and found["error"] <= 2e-2 and exact
            print(f"{f'N={N}':<32}{found['error']:>8.1e}{found['ops_error']:>9.1e}{str(found['top_k']):>7}"
                  f"{str(exact):>10}{t_k:>11.3f}{t_o:>9.3f}")
        # many tokens' block: the routing kernels and the grouped product, against the reference on their experts
        for N in (16, 1024):
            x = mx.random.normal((N, cfg.hidden_size), key=mx.random.key(299 + N)).astype(mx.bfloat16)
            experts = moe_cuda.route(block.gate(x), block.top_k, block.norm_topk_prob, 16)[0]
            err = rel_err(block.grouped(x), moe_cuda.reference(block, x, experts))
            ok = ok and err <= 2e-2
            t_k, t_o = timed(lambda: block.grouped(x), 10), timed(lambda: block.ops(x), 10)
            print(f"{f'N={N} (routing + grouped)':<32}{err:>8.1e}{'':>26}{t_k:>11.3f}{t_o:>9.3f}")
    print(f"MoE kernels: {'OK' if ok else 'MISMATCH'} (error relative to the largest entry of the float32 reference)")
    # Float (unquantized) experts run as MLX operations everywhere; their sorted path (5+ tokens) must hold too.
    block = build_target(arch_config("qwen3.5-35b-a3b", 1), 16).model.layers[0].mlp
    for N in (1, 5, 64):
        x = mx.random.normal((N, block.hidden), key=mx.random.key(300 + N)).astype(mx.bfloat16)
        logits = block.gate(x)
        experts = mx.argpartition(logits, kth=-block.top_k, axis=-1)[:, -block.top_k:]
        err = rel_err(block.ops(x), moe_cuda.reference(block, x, experts))
        ok = ok and err <= 2e-2
        print(f"bfloat16 MoE block (operations), N={N}: error {err:.1e}")
    return ok


def check_qmm():
    """The tensor-core matmul (qmm_cuda) against float32 arithmetic on dequantized weights, and its time
    against MLX's quantized_matmul, for the bench model's matrices (10 products per evaluation)."""
    from specdec.models.layers import Linear

    shapes = {"lm_head": (2048, 248320, 4), "gdn in_proj": (2048, 12352, 4), "gdn out_proj": (4096, 2048, 4),
              "attn q_proj": (2048, 8192, 4), "attn k_proj": (2048, 512, 4), "router": (2048, 256, 8)}
    print(f"{'qmm (ours vs MLX)':<28}{'M':>3}{'error':>9}{'MLX err':>9}{'ours ms':>9}{'MLX ms':>8}{'ratio':>7}")
    ok = True
    for name, (K, N, bits) in shapes.items():
        linear = Linear(K, N, bias=False)
        linear.weight = mx.random.uniform(-K**-0.5, K**-0.5, (N, K)).astype(mx.bfloat16)
        linear = linear.to_quantized(64, bits)
        w = mx.dequantize(linear.weight, linear.scales, linear.biases, 64, bits)
        mx.eval(linear.parameters(), w)
        for M, nt in ((1, None), (2, None), (3, None), (5, None), (8, None), (16, None), (1024, 2), (1024, 4), (1024, 8)):
            if M > 16 and name in ("lm_head", "router"):
                continue  # prefill takes the head of the last token only
            x = mx.random.normal((M, K), key=mx.random.key(M)).astype(mx.bfloat16)
            want = x.astype(mx.float32) @ w.T
            mlx = lambda: mx.quantized_matmul(x, linear.weight, linear.scales, linear.biases, True, 64, bits)
            got = qmm_cuda.matmul(linear, x, nt=nt)
            err, mlx_err = rel_err(got, want), rel_err(mlx(), want)
            ok = ok and err <= 1e-2
            t_q = timed(lambda: [qmm_cuda.matmul(linear, x, nt=nt) for _ in range(10)], 10) / 10
            t_m = timed(lambda: [mlx() for _ in range(10)], 10) / 10
            label = f"{name} (tiles of {8 * nt})" if nt else name
            print(f"{label:<28}{M:>5}{err:>9.1e}{mlx_err:>9.1e}{t_q:>9.4f}{t_m:>8.4f}{t_m / t_q:>7.2f}")
        del w
    ok = check_grouped() and ok
    print(f"qmm: {'OK' if ok else 'MISMATCH'}")
    return ok


def check_grouped():
    """The grouped product (rows sorted by expert) against float32 arithmetic and MLX's sorted gather_qmm, on the
    bench model's experts: 5 and 16 tokens x top-8 (verify windows) and a 1024-token prefill chunk, in several
    (tile, stages) shapes; gate_up also with the SwiGLU folded in (its MLX time then includes MLX's SwiGLU)."""
    block = build_target(arch_config("qwen3.5-35b-a3b", 1), 4).model.layers[0].mlp
    ok = True
    for layer, name in ((block.experts.gate_up, "gate_up"), (block.experts.down, "down")):
        w = mx.dequantize(layer.weight, layer.scales, layer.biases, 64, 4)
        for tokens in (5, 16, 1024):
            K = w.shape[-1]
            x = mx.random.normal((tokens, K), key=mx.random.key(tokens)).astype(mx.bfloat16)
            idx = mx.sort(mx.argpartition(mx.random.normal((tokens, w.shape[0])), kth=-8, axis=-1)[:, -8:].flatten())
            h = x[mx.random.randint(0, tokens, (idx.size,))]
            mlx = lambda: mx.gather_qmm(h[:, None, :], layer.weight, layer.scales, layer.biases, rhs_indices=idx,
                                        transpose=True, group_size=64, bits=4, sorted_indices=True).squeeze(1)
            rows = mx.arange(0, idx.size, max(1, idx.size // 64))
            want = (h[rows].astype(mx.float32)[:, None, :] @ w[idx[rows]].astype(mx.float32).swapaxes(-1, -2)).squeeze(1)
            mlx_err = rel_err(mlx()[rows], want)
            t_m = timed(mlx, 10)
            shapes = ((8, 4), (16, 4), (32, 2), (40, 2), (64, 2))  # (tile, stages)
            variants = [(False, sh) for sh in shapes] + ([(True, sh) for sh in shapes] if name == "gate_up" else [])
            for swiglu, shape in variants:
                expected, mlx_ms = want, t_m
                if swiglu:
                    gate, up = mx.split(want, 2, axis=-1)
                    expected = gate * mx.sigmoid(gate) * up
                    mlx_ms = timed(lambda: (lambda g, u: g * mx.sigmoid(g) * u)(*mx.split(mlx(), 2, axis=-1)), 10)
                tiles = qmm_cuda.expert_tiles(idx, w.shape[0], shape[0])
                run = lambda: qmm_cuda.grouped_matmul(layer, h, tiles, swiglu=swiglu, shape=shape)
                err = rel_err(run()[rows], expected)
                ok = ok and err <= 1e-2
                t_g = timed(run, 10)
                label = f"grouped {name}{' SwiGLU' if swiglu else ''} {shape}"
                print(f"{label:<28}{idx.size:>6}{err:>9.1e}{mlx_err:>9.1e}{t_g:>9.3f}{mlx_ms:>8.3f}{mlx_ms / t_g:>7.2f}")
        del w
    return ok


def check_one_tile_products():
    """QuantizedLinear where MLX-CUDA 0.32.4's quantized_matmul is wrong (K one tile, 8+ tokens): ours against
    float32 arithmetic, MLX's for scale."""
    from specdec.models.layers import Linear
    ok = True
    for K, tokens in ((64, 1), (64, 5), (64, 8), (64, 24), (64, 300), (128, 24)):
        layer = Linear(K, 256, bias=False)
        layer.weight = (0.1 * mx.random.normal(layer.weight.shape, key=mx.random.key(K))).astype(mx.bfloat16)
        layer = layer.to_quantized(64, 4)
        x = mx.random.normal((tokens, K), key=mx.random.key(tokens)).astype(mx.bfloat16)
        want = x.astype(mx.float32) @ mx.dequantize(layer.weight, layer.scales, layer.biases, 64, 4).T
        err = rel_err(layer(x), want)
        mlx_err = rel_err(mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, group_size=64, bits=4), want)
        ok = ok and err <= 2e-2
        print(f"QuantizedLinear K={K}, {tokens} tokens: error {err:.1e} (MLX's quantized_matmul {mlx_err:.1e})")
    return ok


def compare_steps():
    """Whole compiled steps of the 8-layer bench model with each kernel family on and off (same process,
    alternating): all kernels, without the MoE kernels, without the tensor-core matmul, without both."""
    cfg = arch_config("qwen3.5-35b-a3b", 8)
    model = build_target(cfg, 4)
    rng = np.random.default_rng(0)
    cache, _ = prefill(model, rng.integers(0, cfg.vocab_size, 1024).tolist())
    limits = moe_cuda.MAX_TOKENS, qmm_cuda.MAX_TOKENS  # 0 turns a kernel family off
    print(f"self-checks passed: moe {kernels.ready('moe')}, qmm {kernels.ready('qmm')}")
    setups = {"all": limits, "no moe": (0, limits[1]), "no qmm": (limits[0], 0), "neither": (0, 0)}
    print(f"{'step ms (8 layers, 4-bit)':<28}" + "".join(f"{k:>10}" for k in setups))
    for S in (1, 2, 3, 4, 5, 8, 16):
        times = {k: [] for k in setups}
        for _ in range(2):
            for k, (moe_max, qmm_max) in setups.items():
                moe_cuda.MAX_TOKENS, qmm_cuda.MAX_TOKENS = moe_max, qmm_max
                model.reset_compiled_steps()
                times[k].append(step_ms(model, cache, S, 20, rng))
        print(f"{f'S={S}':<28}" + "".join(f"{min(t):>10.3f}" for t in times.values()))
    moe_cuda.MAX_TOKENS, qmm_cuda.MAX_TOKENS = limits
    model.reset_compiled_steps()


def rel_err(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


if __name__ == "__main__":
    sys.exit(main())
