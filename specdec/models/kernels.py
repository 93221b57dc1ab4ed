"""Which custom CUDA kernels run: one switch and one self-check record for all of them.

A kernel runs only on MLX's CUDA backend, only if SPECDEC_KERNELS allows it, and only after its self-check
against the MLX operations it replaces has passed (once per process). Elsewhere (CPU, Metal) the operations
serve: no untested kernels. SPECDEC_KERNELS is `all` (the default), `none`, or a comma-separated list of the
kernels to use: `gdn` (the GDN recurrence, the fused GDN mixer, a prefill's recurrence inputs, gated norm and
chunked recurrence), `moe` (the sparse MoE block, many tokens' routing and sums), `qmm` (the tensor-core
quantized matmuls and a prefill's dequantization) and `attn` (a prefill's attention).
"""

import os
import warnings

import mlx.core as mx

_checks = {}  # kernel name -> its self-check, () -> bool
_passed = {}  # kernel name -> did its self-check pass


def register(name: str, self_check):
    """Each kernel module registers its kernels' self-checks against the operations they replace."""
    _checks[name] = self_check


def allowed(name: str) -> bool:
    wanted = os.environ.get("SPECDEC_KERNELS", "all").replace(" ", "")
    if wanted in ("all", "1", ""):
        return True
    return any(name == w or name.startswith(w + "_") for w in wanted.split(","))


def on_cuda() -> bool:
    return mx.cuda.is_available() and mx.default_device() == mx.gpu


def ready(name: str) -> bool:
    """May kernel `name` run here? Its self-check runs on the first call (see `prepare`)."""
    if not (allowed(name) and on_cuda()):
        return False
    if name not in _passed:
        try:
            _passed[name] = bool(_checks[name]())
        except Exception as e:  # a kernel that does not build or run leaves the operations in place
            warnings.warn(f"{name} kernel: {type(e).__name__}: {e}")
            _passed[name] = False
        if not _passed[name]:
            warnings.warn(f"the {name} CUDA kernel failed its self-check; using MLX operations")
    return _passed[name]


def prepare():
    """Run the self-checks now: they evaluate arrays, which must not happen inside a compiled trace."""
    for name in _checks:
        ready(name)


_built = {}  # (name, shared memory bytes) -> the kernel


def cuda_kernel(name, inputs, outputs, source, header="", shared_memory=0):
    """mx.fast.cuda_kernel, built once per name (and dynamic shared memory size) on first use."""
    key = (name, shared_memory)
    if key not in _built:
        _built[key] = mx.fast.cuda_kernel(name=name, input_names=inputs, output_names=outputs, source=source,
                                          header=header, shared_memory=shared_memory)
    return _built[key]


def quantized_format(linear):
    """(bits, group size, scales dtype) of a linear map quantized as the kernels read it (MLX affine, 4 or 8
    bits packed in uint32, biases, group 32/64/128), else None."""
    bits, gs = getattr(linear, "bits", None), getattr(linear, "group_size", None)
    if getattr(linear, "mode", None) != "affine" or "biases" not in linear or bits not in (4, 8):
        return None
    return (bits, gs, linear.scales.dtype) if gs in (32, 64, 128) else None


def close(got, want, tolerance) -> bool:
    """Agreement relative to the largest entry: a wrong index or formula is off by O(1), rounding differences
    (a bfloat16 ulp carried along) by well under a percent."""
    got, want = got.astype(mx.float32), want.astype(mx.float32)
    return (mx.abs(got - want).max() <= tolerance * mx.abs(want).max()).item()
