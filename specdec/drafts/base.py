"""The proposer interface the engine drives.

The engine keeps one invariant: every token before `last` has been committed to the target's cache;
`last` itself has not been processed yet. A proposer follows the same rule for its own state.
Each round:
    drafts, draft_logprobs = proposer.propose(last, k, params)   # k tokens (may return fewer)
    ... target verifies [last, *drafts], accepts n of them and picks `next_token` ...
    proposer.commit(n, next_token, hidden)                       # now last = next_token
"""

import mlx.core as mx

from ..sampling import SamplingParams, draw, log_probs, split_key


class Proposer:
    # The proposer needs the target's last hidden states at commit (MTP does).
    needs_hidden = False

    def prefill(self, tokens: list[int]) -> None:
        """Prime with the prompt; the first `last` proposed from is the target's first token."""

    def propose(self, last: int, k: int, params: SamplingParams) -> tuple[mx.array, mx.array | None]:
        """-> (draft tokens [<=k] int32, log-probs [<=k, V] they were drawn from; None when greedy)."""
        raise NotImplementedError

    def commit(self, num_accepted: int, next_token: int, hidden: mx.array | None = None) -> None:
        """The target kept `num_accepted` of the last drafts, then emitted `next_token`."""

    @property
    def vocab_size(self) -> int | None:
        return None

    def pick(self, logits: mx.array, params: SamplingParams, logprobs: mx.array | None = None):
        """One draft token from a model's logits: argmax when greedy, else a draw (with `self.key`) from the
        processed distribution q, returned too since acceptance needs it. -> (token int32, q or None)."""
        if params.greedy:
            return mx.argmax(logits, axis=-1).astype(mx.int32), None
        if logprobs is None:
            logprobs = log_probs(logits, params)
        self.key, sub = split_key(self.key)
        return draw(logprobs, sub), logprobs
