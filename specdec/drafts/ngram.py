"""Prompt lookup: draft by copying what followed the latest earlier occurrence of the current suffix.

No model. The proposer keeps the token history (prompt + every committed token) and an index from each
n-gram (min_ngram <= n <= max_ngram) to the position right after its most recent occurrence. To propose,
it tries the longest suffix n-gram first; the first one found in the index wins, and the tokens that
followed it are copied. When the copy runs into the present it continues from its own drafts, so a
repeating pattern yields a full K drafts.

The index is updated as tokens are committed (a few dict writes per token), so a round costs O(n + K)
no matter how long the history is.

Drafts are deterministic: their distribution q is a point mass, so sampled acceptance keeps a draft
with probability p(draft) and stays lossless at any temperature.
"""

import math

import mlx.core as mx

from ..errors import DraftError
from ..sampling import SamplingParams
from .base import Proposer


class NgramProposer(Proposer):
    def __init__(self, vocab_size: int, max_ngram: int = 3, min_ngram: int = 1):
        if not (isinstance(vocab_size, int) and vocab_size > 0):
            raise DraftError(f"vocab_size must be a positive integer, got {vocab_size!r}")
        if not (isinstance(min_ngram, int) and isinstance(max_ngram, int) and 1 <= min_ngram <= max_ngram):
            raise DraftError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram}..{max_ngram}")
        self._vocab_size = vocab_size
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.reset()

    @property
    def vocab_size(self):
        return self._vocab_size

    def reset(self):
        self.history: list[int] = []
        self.index: dict[tuple, int] = {}  # n-gram -> position of the token that followed its latest occurrence
        self._drafts: list[int] = []

    def extend(self, tokens):
        """Append committed tokens, indexing every n-gram that now has a follower."""
        h = self.history
        for t in tokens:
            end = len(h)  # the n-grams ending just before `t` are followed by it
            for n in range(self.min_ngram, min(self.max_ngram, end) + 1):
                self.index[tuple(h[end - n : end])] = end
            h.append(int(t))

    def lookup(self, k: int) -> list[int]:
        """Up to k tokens that followed the longest suffix n-gram seen before (most recent occurrence)."""
        h = self.history
        for n in range(min(self.max_ngram, len(h)), self.min_ngram - 1, -1):
            start = self.index.get(tuple(h[len(h) - n :]))
            if start is not None:
                out = []
                for i in range(start, start + k):  # past the end, keep copying the copy (periodic text)
                    out.append(h[i] if i < len(h) else out[i - len(h)])
                return out
        return []

    def prefill(self, tokens):
        self.reset()
        self.extend(tokens)

    def propose(self, last, k, params: SamplingParams):
        self.extend([last])
        self._drafts = self.lookup(k) if k > 0 else []
        drafts = mx.array(self._drafts, mx.int32)
        if params.greedy or not self._drafts:
            return drafts, None
        # q: log 1 at each draft, log 0 elsewhere. A fill and a scatter: cheap even for a 250k vocabulary.
        k = len(self._drafts)
        point_mass = mx.full((k, self._vocab_size), -math.inf)
        return drafts, mx.put_along_axis(point_mass, drafts[:, None], mx.zeros((k, 1)), axis=-1)

    def commit(self, num_accepted, next_token, hidden=None):
        # `next_token` is not history yet: it arrives as `last` in the next propose.
        self.extend(self._drafts[:num_accepted])
        self._drafts = []
