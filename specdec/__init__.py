"""specdec: lossless speculative decoding on MLX for hybrid Gated-DeltaNet / MoE models."""

from .engine import Stats
from .errors import SpecdecError
from .generate import GenerationChunk, GenerationResult, generate, load, stream_generate
from .sampling import SamplingParams

__all__ = ["load", "generate", "stream_generate", "GenerationResult", "GenerationChunk", "Stats",
           "SamplingParams", "SpecdecError"]
__version__ = "0.1.0"
