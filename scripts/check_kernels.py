"""GPU check: the GDN CUDA kernels against the MLX ops path on random inputs of real size (Qwen3.5-35B-A3B:
32 v-heads, 16 k-heads, 128 x 128 state): the recurrence for decode, verify windows and replay, and the fused
mixer (conv, norms, gates, recurrence, gated norm) of a random-weight layer; prints errors and timings.

    python scripts/check_kernels.py          # on a machine with MLX's CUDA backend
"""

import sys
import time

import mlx.core as mx

from specdec.bench import arch_config, build_target
from specdec.models import gdn, gdn_cuda


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
        ks = mx.random.split(mx.random.key(S), 6)
        unit = lambda x: x / mx.linalg.norm(x, axis=-1, keepdims=True)
        q = unit(mx.random.normal((B, S, Hk, Dk), key=ks[0])) * Dk**-0.5
        k = unit(mx.random.normal((B, S, Hk, Dk), key=ks[1]))
        v = mx.random.normal((B, S, Hv, Dv), key=ks[2]).astype(mx.bfloat16)  # as the layer gives it
        g = -mx.random.uniform(0.0, 2.0, (B, S, Hv), key=ks[3])
        beta = mx.random.uniform(shape=(B, S, Hv), key=ks[4])
        state = mx.random.normal((B, Hv, Dk, Dv), key=ks[5])
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
    return 0 if ok and check_mixer() else 1


def check_mixer():
    """The fused GDN mixer (gdn_cuda.mixer) against GatedDeltaNet.mixer_ops on a real-size bfloat16 layer."""
    cfg = arch_config("qwen3.5-35b-a3b", 1)
    layer = build_target(cfg, 16).model.layers[0].linear_attn  # random weights as the bench makes them, bf16
    print(f"{'fused mixer':<28}{'state err':>12}{'out/tape err':>13}{'fused ms':>10}{'ops ms':>9}")
    worst = worst_out = 0.0
    for S in (1, 2, 5, 9, 16):
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


def rel_err(a, b):
    a, b = a.astype(mx.float32), b.astype(mx.float32)
    return (mx.abs(a - b).max() / mx.abs(b).max()).item()


if __name__ == "__main__":
    sys.exit(main())
