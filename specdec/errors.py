"""Errors a user can get. Each names the problem; the CLI prints them as one line."""


class SpecdecError(Exception):
    """Base class: anything a user can fix (bad input, bad checkpoint, bad parameters)."""


class ConfigError(SpecdecError):
    """config.json is missing, malformed, or describes an unsupported model."""


class CheckpointError(SpecdecError):
    """Weights are missing, extra, or of the wrong shape."""


class TokenizerError(SpecdecError):
    """tokenizer files are missing or malformed, or a chat template failed."""


class SamplingError(SpecdecError):
    """Sampling parameters out of range (temperature, top_p, ...)."""


class PromptError(SpecdecError):
    """Empty prompt, or a prompt longer than the model's context."""


class DraftError(SpecdecError):
    """The draft does not fit the target (vocabulary mismatch, bad K, ...)."""


class ShapeError(SpecdecError):
    """Arrays handed to a model function have shapes that do not fit together."""


class BenchError(SpecdecError):
    """Benchmark options out of range (unknown arch, bits, sizes)."""
