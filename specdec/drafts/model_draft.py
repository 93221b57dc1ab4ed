"""A draft *model* proposer: any model we load (dense or hybrid) drafts autoregressively.

A hybrid draft rolls back its own GDN state with the same window commit as the target, so neither model
is ever re-run. When all K drafts are accepted the draft has not yet seen the K-th one: it is fed at the
start of the next round together with `last` (one forward, no extra launch).
"""

import mlx.core as mx

from ..cache import make_cache
from ..sampling import SamplingParams, draw, log_probs, split_key, make_key
from .base import Proposer


class DraftModelProposer(Proposer):
    def __init__(self, model, commit_method: str = "replay", seed: int | None = None):
        self.model = model
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
        self._fed = len(self.pending) + k  # pending, last, d1..d_{k-1}
        tokens, logprobs = [], []
        for i in range(k):
            logits = self.model(inputs, self.cache)[0, -1]
            if params.greedy:
                token = mx.argmax(logits, axis=-1)
            else:
                self.key, sub = split_key(self.key)
                lp = log_probs(logits, params)
                token = draw(lp, sub)
                logprobs.append(lp)
            tokens.append(token)
            inputs = token.reshape(1, 1).astype(mx.int32)  # the last draft is not fed: the target decides
        self._drafts = mx.stack(tokens).astype(mx.int32)
        return self._drafts, (mx.stack(logprobs) if logprobs else None)

    def commit(self, num_accepted, next_token, hidden=None):
        if self._drafts is None:
            return
        keep = self._fed - (len(self._drafts) - 1) + num_accepted  # pending + last + accepted drafts
        self.pending = []
        if keep > self._fed:  # all drafts accepted: the last one was never fed, feed it next round
            self.pending = [int(self._drafts[-1])]
            keep = self._fed
        self.cache.commit(keep)
