"""specdec: lossless speculative decoding on MLX for hybrid Gated-DeltaNet / MoE models."""

import os

# MLX-CUDA multiplies float32 matrices in TF32 (a 10-bit mantissa) unless told otherwise. A verify window's float32
# logits then differ from a 1-token step's by far more than float32 rounding, and greedy speculation on a float32
# model stops being token-identical to plain decoding (seen on an H100). Exact float32 unless the user chose.
os.environ.setdefault("MLX_ENABLE_TF32", "0")

from .engine import Stats
from .errors import SpecdecError
from .generate import GenerationChunk, GenerationResult, generate, load, stream_generate
from .sampling import SamplingParams

__all__ = ["load", "generate", "stream_generate", "GenerationResult", "GenerationChunk", "Stats",
           "SamplingParams", "SpecdecError"]
__version__ = "0.1.0"
