"""Logits processing, sampling, and the acceptance rules of speculative decoding.

The one sampler of the project. Everything here is a pure function of MLX arrays.

Processing order, used for both the target and the draft:
    temperature -> top-k -> top-p -> min-p -> renormalise
Filtered tokens get log-probability -inf. Tokens tied with the last kept token of
top-k or top-p are kept too, so the result never depends on how a sort breaks ties.

Randomness: `make_key(seed)` gives a key; the caller splits it once per use with
`split_key` and never reuses a key, so a seeded run is reproducible.

Lossless acceptance (Leviathan et al. 2023, "Fast Inference from Transformers via
Speculative Decoding"): draft token d_i ~ q_i is kept with probability
min(1, p_i(d_i) / q_i(d_i)); at the first rejection the replacement comes from
norm(max(0, p_i - q_i)); if every draft is kept a bonus token comes from p_K.
The emitted tokens are then distributed exactly as sampling from p alone.
"""

from __future__ import annotations

import math
import numbers
import secrets
from dataclasses import dataclass

import mlx.core as mx

from specdec.errors import DraftError, SamplingError

# top-p compares float32 running sums with top_p; a mass that lands on top_p up to
# rounding counts as reaching it, so a boundary case keeps the smaller set.
_TOP_P_RTOL = 1e-6


def _is_real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 => greedy
    top_k: int = 0  # 0 => off
    top_p: float = 1.0  # 1 => off
    min_p: float = 0.0  # 0 => off
    seed: int | None = None

    def __post_init__(self):
        t, k, p, m, s = self.temperature, self.top_k, self.top_p, self.min_p, self.seed
        if not (_is_real(t) and math.isfinite(t) and t >= 0):
            raise SamplingError(f"temperature must be a finite number >= 0, got {t!r}")
        if not (_is_int(k) and k >= 0):
            raise SamplingError(f"top_k must be an integer >= 0 (0 turns it off), got {k!r}")
        if not (_is_real(p) and 0 < p <= 1):
            raise SamplingError(f"top_p must be a number in (0, 1] (1 turns it off), got {p!r}")
        if not (_is_real(m) and 0 <= m < 1):
            raise SamplingError(f"min_p must be a number in [0, 1) (0 turns it off), got {m!r}")
        if s is not None and not (_is_int(s) and 0 <= s < 2**64):
            raise SamplingError(f"seed must be None or an integer in [0, 2**64), got {s!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---------------------------------------------------------------- randomness


def make_key(seed: int | None = None) -> mx.array:
    """A PRNG key. seed=None draws a fresh seed from the OS, so unseeded runs differ."""
    if seed is None:
        seed = secrets.randbits(63)
    if not (_is_int(seed) and 0 <= seed < 2**64):
        raise SamplingError(f"seed must be None or an integer in [0, 2**64), got {seed!r}")
    return mx.random.key(int(seed))


def split_key(key: mx.array, num: int = 2) -> list[mx.array]:
    """`key, sub = split_key(key)`: carry the first key on, use the others once."""
    return list(mx.random.split(key, num))


# ---------------------------------------------------------------- processing


def _check_logits(logits: mx.array) -> None:
    if logits.ndim == 0 or logits.shape[-1] == 0:
        raise SamplingError(f"logits must have a non-empty vocabulary axis, got shape {tuple(logits.shape)}")


def _top_p_mask(x: mx.array, top_p: float, top_k: int) -> mx.array:
    """True for tokens of the smallest set with mass >= top_p (plus ties)."""
    probs = mx.softmax(x, axis=-1)
    # After top-k only the k largest can matter: sort k values, not the vocabulary.
    candidates = mx.topk(probs, top_k, axis=-1) if 0 < top_k < x.shape[-1] else probs
    ranked = -mx.sort(-candidates, axis=-1)
    mass_before = mx.cumsum(ranked, axis=-1, inclusive=False)
    n_keep = (mass_before < top_p * (1 - _TOP_P_RTOL)).sum(axis=-1, keepdims=True)
    smallest_kept = mx.take_along_axis(ranked, mx.maximum(n_keep, 1) - 1, axis=-1)
    return probs >= smallest_kept


def log_probs(logits: mx.array, params: SamplingParams) -> mx.array:
    """[..., V] logits (any float dtype) -> float32 log-probs of the processed distribution.

    Order: temperature -> top-k -> top-p -> min-p, then renormalise; filtered
    entries are -inf. Greedy params give 0 at the argmax and -inf elsewhere, a
    point mass, so the acceptance rule works unchanged for greedy drafts.
    """
    _check_logits(logits)
    x = logits.astype(mx.float32)
    if x.size == 0:  # no rows (K = 0 drafts): nothing to process
        return x
    neg_inf = mx.array(-math.inf, dtype=mx.float32)
    if params.greedy:
        vocab = mx.arange(x.shape[-1])
        return mx.where(vocab == mx.argmax(x, axis=-1, keepdims=True), 0.0, neg_inf)

    # Shift before dividing so a tiny temperature cannot overflow to inf - inf.
    x = (x - x.max(axis=-1, keepdims=True)) / params.temperature
    if 0 < params.top_k < x.shape[-1]:
        kth_largest = mx.topk(x, params.top_k, axis=-1).min(axis=-1, keepdims=True)
        x = mx.where(x >= kth_largest, x, neg_inf)
    if params.top_p < 1:
        x = mx.where(_top_p_mask(x, params.top_p, params.top_k), x, neg_inf)
    if params.min_p > 0:
        # p / p_max is unchanged by renormalising, so compare in log space directly.
        x = mx.where(x - x.max(axis=-1, keepdims=True) >= math.log(params.min_p), x, neg_inf)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------- sampling


def draw(logprobs: mx.array, key: mx.array | None = None) -> mx.array:
    """One token per row from already processed log-probs [..., V] -> int32 [...]."""
    if logprobs.size == 0:  # no rows (K = 0 drafts)
        return mx.zeros(logprobs.shape[:-1], dtype=mx.int32)
    return mx.random.categorical(logprobs, axis=-1, key=key).astype(mx.int32)


def sample(logits: mx.array, params: SamplingParams, key: mx.array | None = None) -> mx.array:
    """[..., V] logits -> int32 token ids [...]. Greedy: argmax; else a draw from log_probs."""
    _check_logits(logits)
    if params.greedy and logits.size:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    return draw(log_probs(logits, params), key)


# ---------------------------------------------------------------- acceptance


def _check_window(target: mx.array, draft_tokens: mx.array, draft: mx.array | None = None) -> None:
    if draft_tokens.ndim != 1 or target.ndim != 2 or target.shape[0] != draft_tokens.shape[0] + 1:
        raise DraftError(
            f"verify window mismatch: target rows {tuple(target.shape)} must be [K+1, V] "
            f"for draft tokens {tuple(draft_tokens.shape)} of shape [K]"
        )
    if draft is not None and tuple(draft.shape) != (draft_tokens.shape[0], target.shape[1]):
        raise DraftError(
            f"draft log-probs {tuple(draft.shape)} must be [K, V] = "
            f"{(draft_tokens.shape[0], target.shape[1])} to match the target's vocabulary"
        )


def accept_greedy(target_logits: mx.array, draft_tokens: mx.array) -> tuple[int, int]:
    """Greedy verify: (n accepted drafts, the target's next token) as Python ints.

    target_logits [K+1, V] come from one forward over [last, d1..dK]; row i
    predicts the token after position i. n is the longest prefix with
    d_i == argmax(row i-1); the next token is argmax(row n). One host sync.
    """
    _check_window(target_logits, draft_tokens)
    best = mx.argmax(target_logits, axis=-1).astype(mx.int32)
    k = draft_tokens.shape[0]
    matches = (best[:k] == draft_tokens).astype(mx.int32)
    n = mx.cumprod(matches).sum() if k else mx.array(0, dtype=mx.int32)
    n, next_token = mx.stack([n.astype(mx.int32), best[n]]).tolist()
    return n, next_token


def rejection_sample(
    target_logprobs: mx.array, draft_logprobs: mx.array, draft_tokens: mx.array, key: mx.array
) -> tuple[mx.array, mx.array]:
    """The lossless acceptance rule on arrays, batched over any leading axes.

    target_logprobs [..., K+1, V], draft_logprobs [..., K, V], draft_tokens [..., K]
    -> (n [...], next_token [...]) int32, still on the device (no sync).
    """
    k = draft_tokens.shape[-1]
    accept_key, residual_key = split_key(key)

    if k:
        picked = draft_tokens[..., None].astype(mx.int32)
        p_d = mx.take_along_axis(target_logprobs[..., :k, :], picked, axis=-1)[..., 0]
        q_d = mx.take_along_axis(draft_logprobs, picked, axis=-1)[..., 0]
        # u < p/q accepts with probability min(1, p/q); all K uniforms at once.
        u = mx.random.uniform(shape=draft_tokens.shape, key=accept_key)
        accepted = (u < mx.exp(p_d - q_d)).astype(mx.int32)
        n = mx.cumprod(accepted, axis=-1).sum(axis=-1)  # length of the accepted prefix
    else:
        n = mx.zeros(draft_tokens.shape[:-1], dtype=mx.int32)

    # Row n of the target, and of the draft where one exists. After K accepted
    # drafts q is taken as 0, so the "residual" is p_K itself: the bonus token.
    row = n[..., None, None]
    p = mx.exp(mx.take_along_axis(target_logprobs, row, axis=-2)[..., 0, :])
    if k:
        q = mx.exp(mx.take_along_axis(draft_logprobs, mx.minimum(row, k - 1), axis=-2)[..., 0, :])
        q = mx.where((n < k)[..., None], q, 0.0)
    else:
        q = mx.zeros_like(p)
    residual = mx.maximum(p - q, 0.0)
    # Where p <= q everywhere (p == q up to rounding) no residual mass is left: use p.
    empty = residual.sum(axis=-1, keepdims=True) <= 0
    next_token = draw(mx.log(mx.where(empty, p, residual)), residual_key)
    return n.astype(mx.int32), next_token


def accept_sampled(
    target_logprobs: mx.array, draft_logprobs: mx.array, draft_tokens: mx.array, key: mx.array
) -> tuple[int, int]:
    """Sampled verify: (n accepted drafts, next token) as Python ints; one host sync.

    target_logprobs [K+1, V] are the processed target distributions p_0..p_K,
    draft_logprobs [K, V] the processed draft distributions q the drafts were drawn
    from (a point mass for a deterministic proposer), draft_tokens [K]. K may be 0.
    """
    _check_window(target_logprobs, draft_tokens, draft_logprobs)
    n, next_token = rejection_sample(target_logprobs, draft_logprobs, draft_tokens, key)
    n, next_token = mx.stack([n, next_token]).tolist()
    return n, next_token
