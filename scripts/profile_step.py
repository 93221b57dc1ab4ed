"""Where the GPU time of one step goes: every kernel of one compiled decode/verify step (or of a 1024-token
prefill) of the 8-layer Qwen3.5-35B-A3B bench model, timed by Nsight Compute, then summed by kernel.

    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv --print-units base \\
        python scripts/profile_step.py 5 > step5.csv          # S = 5; or `prefill`
    python scripts/profile_step.py summarize step5.csv

Nsight Compute times each kernel alone, with caches flushed and clocks locked to base: the sum runs above
the real step, but it shows which kernels dominate and how many there are.
"""

import collections
import csv
import ctypes
import io
import re
import sys

import mlx.core as mx
import numpy as np

from specdec.bench import arch_config, build_target, prefill, step_ms


def summarize(path, top=30):
    text = open(path).read()
    rows = list(csv.DictReader(io.StringIO(text[text.index('"ID"'):])))
    by_kernel = collections.defaultdict(lambda: [0, 0.0])
    for r in rows:
        if r.get("Metric Name") == "gpu__time_duration.sum":
            name = re.sub(r"\(.*", "", r["Kernel Name"])[:70]
            by_kernel[name][0] += 1
            by_kernel[name][1] += float(r["Metric Value"].replace(",", "")) / 1e3
    count, total = sum(c for c, _ in by_kernel.values()), sum(t for _, t in by_kernel.values())
    print(f"{count} kernels, {total:.1f} us")
    for name, (c, t) in sorted(by_kernel.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{c:5d} {t:10.1f} us  {name}")


def profile(what):
    cfg = arch_config("qwen3.5-35b-a3b", 8)
    model = build_target(cfg, 4)
    rng = np.random.default_rng(0)
    context = rng.integers(0, cfg.vocab_size, 1024).tolist()
    cache, _ = prefill(model, context)  # also compiles MLX's kernels, outside the profiled range
    driver = ctypes.CDLL("libcuda.so.1")
    if what == "prefill":
        run = lambda: prefill(model, context)
    else:
        S = int(what)
        for _ in range(3):  # trace and warm the compiled step
            step_ms(model, cache, S, 5, rng)
        tokens = mx.array([rng.integers(0, cfg.vocab_size, S).tolist()], mx.int32)
        cache.begin_window()
        run = lambda: mx.eval(model(tokens, cache))
    mx.synchronize()
    driver.cuProfilerStart()
    run()
    mx.synchronize()
    driver.cuProfilerStop()


if __name__ == "__main__":
    if sys.argv[1] == "summarize":
        summarize(sys.argv[2], *map(int, sys.argv[3:]))
    else:
        profile(sys.argv[1])
