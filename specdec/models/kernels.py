"""Which custom CUDA kernels run: one switch and one self-check record for all of them.

A kernel runs only on MLX's CUDA backend, only if SPECDEC_KERNELS allows it, and only after its self-check
against the MLX operations it replaces has passed. Elsewhere (CPU, Metal) the operations serve: no untested
kernels. SPECDEC_KERNELS is `all` (the default), `none`, or a comma-separated list of the
kernels to use: `gdn` (the GDN recurrence, the fused GDN mixer, a prefill's recurrence inputs, gated norm and
chunked recurrence), `moe` (the sparse MoE block, many tokens' routing and sums), `qmm` (the tensor-core
quantized matmuls and a prefill's dequantization) and `attn` (a prefill's attention).

A self-check runs once per process, and gives the same answer for the same kernel code on the same device and
MLX build: passed checks are recorded (`record_path`) under a key of all three, and a later process takes them
from the record, skipping their kernel builds (NVRTC, ~2 s each, most of a minute in all, and mostly not the
builds a model runs). SPECDEC_KERNEL_CHECKS=always runs every check again.
"""

import functools
import hashlib
import json
import os
import warnings
from pathlib import Path

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
    """May kernel `name` run here? Its self-check runs on the first call (see `prepare`), unless recorded."""
    if not (allowed(name) and on_cuda()):
        return False
    if name not in _passed:
        _passed[name] = name in _recorded_passes() or _self_check(name)
    return _passed[name]


def _self_check(name: str) -> bool:
    try:
        passed = bool(_checks[name]())
    except Exception as e:  # a kernel that does not build or run leaves the operations in place
        warnings.warn(f"{name} kernel: {type(e).__name__}: {e}")
        passed = False
    if passed:
        _record_pass(name)
    else:
        warnings.warn(f"the {name} CUDA kernel failed its self-check; using MLX operations")
    return passed


def record_path() -> Path:
    """Where passed self-checks are recorded: SPECDEC_CACHE_DIR, else the user's cache folder."""
    root = os.environ.get("SPECDEC_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "specdec"
    return Path(root).expanduser() / "kernel-checks.json"


@functools.cache
def record_key() -> str:
    """The code of the kernels and of the operations they are checked against (this folder), the MLX build and
    the device: a record made under another key says nothing here."""
    digest = hashlib.sha256(mx.__version__.encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    try:
        device = mx.device_info()
    except Exception:  # no device information on this backend
        device = {}
    digest.update(json.dumps(device, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _read_record() -> set:
    try:
        record = json.loads(record_path().read_text())
        return set(record["passed"]) if record.get("key") == record_key() else set()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # none yet, or unreadable: check again
        return set()


def _recorded_passes() -> set:
    if os.environ.get("SPECDEC_KERNEL_CHECKS", "recorded") == "always":
        return set()
    return _read_record()


def _record_pass(name: str):
    """Add a passed check to the record (written whole, then renamed into place). A record that cannot be
    written costs only the checks next time."""
    path = record_path()
    record = {"key": record_key(), "passed": sorted(_read_record() | {name})}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        partial.write_text(json.dumps(record, indent=1))
        os.replace(partial, path)
    except OSError as e:
        warnings.warn(f"could not record passed kernel self-checks in {path}: {e}")


def prepare():
    """Run the self-checks now: they evaluate arrays, which must not happen inside a compiled trace."""
    for name in _checks:
        ready(name)


# d += a b on tensor cores for one warp: a 16 x 16 bfloat16 A fragment, a 16 x 8 B fragment, float32 accumulators
# (the bfloat16 products of qmm_cuda and attention_cuda)
MMA_BF16 = """
__device__ __forceinline__ void mma_bf16(float d[4], const uint32_t a[4], const uint32_t b[2]) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
"""

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
