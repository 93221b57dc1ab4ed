"""GPU check: the GDN CUDA kernel against the MLX ops path on random inputs of real size (Qwen3.5-35B-A3B:
32 v-heads, 16 k-heads, 128 x 128 state), for decode, verify windows and replay; prints errors and timings.

    python scripts/check_kernels.py          # on a machine with MLX's CUDA backend
"""

import sys
import time

import mlx.core as mx

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
    worst = 0.0
    print(f"{'case':<28}{'max rel err':>12}{'kernel ms':>11}{'ops ms':>9}")
    for S in (1, 2, 5, 9, 16, 17):
        ks = mx.random.split(mx.random.key(S), 6)
        unit = lambda x: x / mx.linalg.norm(x, axis=-1, keepdims=True)
        q = unit(mx.random.normal((B, S, Hk, Dk), key=ks[0])) * Dk**-0.5
        k = unit(mx.random.normal((B, S, Hk, Dk), key=ks[1]))
        v = mx.random.normal((B, S, Hv, Dv), key=ks[2])
        g = -mx.random.uniform(0.0, 2.0, (B, S, Hv), key=ks[3])
        beta = mx.random.uniform(shape=(B, S, Hv), key=ks[4])
        state = mx.random.normal((B, Hv, Dk, Dv), key=ks[5])
        qv, kv = gdn._per_value_head(q, Hv), gdn._per_value_head(k, Hv)
        for keep in (False, True):
            mine = gdn_cuda.recurrence_cuda(qv, kv, v, g, beta, state, keep)
            ref = gdn._recurrence_ops(qv, kv, v, g, beta, state, keep)
            err = max((mx.abs(a - b).max() / mx.abs(b).max()).item() for a, b in zip(mine, ref) if a is not None)
            worst = max(worst, err)
            t_k = timed(lambda: gdn_cuda.recurrence_cuda(qv, kv, v, g, beta, state, keep)[1])
            t_o = timed(lambda: gdn._recurrence_ops(qv, kv, v, g, beta, state, keep)[1])
            print(f"{f'S={S} keep_states={keep}':<28}{err:>12.2e}{t_k:>11.3f}{t_o:>9.3f}")
        mine = gdn_cuda.recurrence_cuda(None, kv, v, g, beta, state, False)[1]
        ref = gdn._recurrence_ops(None, kv, v, g, beta, state, False)[1]
        err = (mx.abs(mine - ref).max() / mx.abs(ref).max()).item()
        worst = max(worst, err)
        print(f"{f'S={S} replay':<28}{err:>12.2e}")
    ok = worst <= 1e-4
    print(f"worst relative error {worst:.2e}: {'OK' if ok else 'MISMATCH'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
