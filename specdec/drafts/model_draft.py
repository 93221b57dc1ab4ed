"""A draft *model* proposer: any model we load (dense or hybrid) drafts autoregressively.

A hybrid draft rolls back its own GDN state with the same window commit as the target, so neither model
is ever re-run. When all K drafts are accepted the draft has not yet seen the K-th one: it is fed at the
start of the next round together with `last` (one forward, no extra launch).
"""

import mlx.core as mx

from ..cache import DEFAULT_COMMIT_METHOD, make_cache
from ..errors import DraftError
from ..sampling import SamplingParams, log_probs, make_key
from .base import Proposer


class DraftModelProposer(Proposer):
    def __init__(self, model, commit_method: str = DEFAULT_COMMIT_METHOD, seed: int | None = None,
                 min_confidence: float = 0.3):
        if not 0 <= min_confidence < 1:
            raise DraftError(f"min_confidence must be in [0, 1) (0 turns early stopping off), got {min_confidence!r}")
        self.model = model
        # Stop drafting once the draft's top probability falls below this: such drafts are rarely kept.
        # It looks at the distribution only, never at the token drawn from it, so acceptance stays lossless.
        self.min_confidence = min_confidence
        self.commit_method = commit_method
        self.key = make_key(seed)
        self.cache = None
        self.pending: list[int] = []  # tokens accepted by the target but not yet processed by the draft
        self._window_tokens = 0

    @property
    def vocab_size(self):
        return self.model.config.vocab_size

    def prefill(self, tokens, step: int = 2048):
        self.cache = make_cache(self.model, self.commit_method)
        self.pending = []
        for i in range(0, len(tokens), step):
            self.model(mx.array([tokens[i : i + step]]), self.cache)
            self.cache.eval()

    def propose(self, last, k, params: SamplingParams):
        if k == 0:  # plain round: just remember `last` for the next forward
            self.pending.append(last)
            self._drafts = None
            return mx.array([], mx.int32), None
        self.cache.begin_window()
        inputs = mx.array([self.pending + [last]])
        self._base = len(self.pending) + 1  # pending, last: fed before any draft
        tokens, logprobs = [], []
        for i in range(k):
            logits = self.model(inputs, self.cache)[0, -1]
            lp = None if params.greedy else log_probs(logits, params)
            if self.min_confidence:  # one host sync per draft; top probability at temperature 1 when greedy
                top = mx.softmax(logits.astype(mx.float32)).max() if lp is None else mx.exp(lp.max())
                if top.item() < self.min_confidence:
                    break
            token, lp = self.pick(logits, params, lp)
            if lp is not None:
                logprobs.append(lp)
            tokens.append(token)
            inputs = token.reshape(1, 1).astype(mx.int32)  # the last draft is not fed: the target decides
        self._fed_drafts = len(tokens) - 1 if len(tokens) == k else len(tokens)  # an early stop fed them all
        self._drafts = mx.stack(tokens).astype(mx.int32) if tokens else mx.array([], mx.int32)
        return self._drafts, (mx.stack(logprobs) if logprobs else None)

    def commit(self, num_accepted, next_token, hidden=None):
        if self._drafts is None:
            return
        self.pending = []
        if num_accepted > self._fed_drafts:  # all drafts accepted: the last one was never fed, feed it next round
            self.pending = [int(self._drafts[-1])]
        self.cache.commit(self._base + min(num_accepted, self._fed_drafts))  # pending + last + accepted drafts
