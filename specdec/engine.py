"""The speculative loop: prefill, then propose -> verify -> accept -> commit, one round at a time.

The prefill takes the whole prompt and gives the first token (the target's own, from the logits of the
prompt's last token), so it is out as soon as the prompt is in. Then the rounds.
Invariant: every token before `last` is in the target's cache; `last` is not. A round verifies
[last, d1..dK] in ONE target forward, keeps the longest acceptable prefix d1..dn plus one token from the
target (the correction, or the bonus when all K pass), and commits the cache to last, d1..dn.
K = 0 is plain decoding through the same loop.
"""

import time
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import DEFAULT_COMMIT_METHOD, make_cache
from .errors import PromptError
from .sampling import SamplingParams, accept_greedy, accept_sampled, log_probs, make_key, sample, split_key

PREFILL_STEP = 2048  # prompt tokens per forward: bounds the attention scores and GDN chunk buffers


@dataclass
class Stats:
    """Counters of a speculative run (definitions in the README)."""

    rounds: int = 0  # verify forwards of the target
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens kept
    emitted: int = 0  # tokens produced by the rounds (accepted drafts + one target token per round)
    drafted_at: list = field(default_factory=list)  # per draft position: times proposed
    accepted_at: list = field(default_factory=list)  # per draft position: times kept
    prefill_time: float = 0.0
    draft_time: float = 0.0
    verify_time: float = 0.0
    commit_time: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tau(self) -> float:
        """Mean tokens per verify round, the bonus/correction token included (plain decoding: 1)."""
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def acceptance_by_position(self) -> list:
        return [a / d if d else 0.0 for a, d in zip(self.accepted_at, self.drafted_at)]

    def record(self, k: int, n: int):
        self.rounds += 1
        self.drafted += k
        self.accepted += n
        self.emitted += n + 1
        while len(self.drafted_at) < k:
            self.drafted_at.append(0)
            self.accepted_at.append(0)
        for i in range(k):
            self.drafted_at[i] += 1
            self.accepted_at[i] += i < n

    def as_dict(self) -> dict:
        return {
            "rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted, "emitted": self.emitted,
            "acceptance_rate": self.acceptance_rate, "tau": self.tau,
            "acceptance_by_position": self.acceptance_by_position,
            "prefill_time": self.prefill_time, "draft_time": self.draft_time,
            "verify_time": self.verify_time, "commit_time": self.commit_time,
        }


def prefill(model, cache, tokens: list[int], want_hidden=False):
    """`tokens` into the cache -> (the logits after the last one [V], the hidden states of all of them
    [1, n, H] when wanted, else None). No other position's logits are computed."""
    hidden = []
    for i in range(0, len(tokens), PREFILL_STEP):
        out = model(mx.array([tokens[i : i + PREFILL_STEP]]), cache, return_hidden=want_hidden, last_only=True)
        logits = out[0] if want_hidden else out
        if want_hidden:
            hidden.append(out[1])
        cache.eval()
    return logits[0, -1], (mx.concatenate(hidden, axis=1) if hidden else None)


def speculate(target, prompt: list[int], params: SamplingParams, proposer=None, num_draft_tokens=4,
              commit_method=DEFAULT_COMMIT_METHOD, stats: Stats | None = None):
    """Yield the tokens each round emits (a non-empty list), forever; the caller decides when to stop."""
    stats = stats if stats is not None else Stats()
    cache = make_cache(target, commit_method)
    key = make_key(params.seed)
    want_hidden = proposer is not None and proposer.needs_hidden
    choose_k = num_draft_tokens if callable(num_draft_tokens) else (lambda: num_draft_tokens)
    observe = getattr(num_draft_tokens, "observe", None)  # an adaptive K policy learns from every round

    if not prompt:
        raise PromptError("the prompt is empty: the first token comes from the logits of its last one")
    t0 = time.perf_counter()
    logits, hidden = prefill(target, cache, prompt, want_hidden)
    if proposer is not None:
        proposer.prefill(prompt) if not want_hidden else proposer.prefill(prompt, hidden)
    key, sub = split_key(key)
    last = sample(logits, params, sub).item()
    stats.prefill_time += time.perf_counter() - t0
    yield [last]

    while True:
        t0 = time.perf_counter()
        if proposer is not None:  # asked even for k = 0, so it can keep track of `last`
            drafts, draft_logprobs = proposer.propose(last, choose_k(), params)
        else:
            drafts, draft_logprobs = mx.array([], mx.int32), None
        mx.eval(drafts) if draft_logprobs is None else mx.eval(drafts, draft_logprobs)
        k = drafts.shape[0]
        t1 = time.perf_counter()

        if k:
            cache.begin_window()
        window = mx.concatenate([mx.array([last], mx.int32), drafts])[None]
        out = target(window, cache, return_hidden=want_hidden)
        logits, hidden = out if want_hidden else (out, None)
        if k:  # the commit's picks are laid out while the device verifies
            mx.async_eval(logits)
            cache.prepare_commit()
        if params.greedy:
            n, next_token = accept_greedy(logits[0], drafts)
        else:
            key, sub = split_key(key)
            q = draft_logprobs if draft_logprobs is not None else mx.zeros((0, logits.shape[-1]))
            n, next_token = accept_sampled(log_probs(logits[0], params), q, drafts, sub)
        t2 = time.perf_counter()

        if k:
            cache.commit(n + 1)
        if proposer is not None:
            proposer.commit(n, next_token, hidden[:, : n + 1] if want_hidden else None)
        mx.async_eval(cache.arrays())  # the commit runs on the device while the next round is drafted
        t3 = time.perf_counter()

        emitted = drafts[:n].tolist() + [next_token]
        stats.record(k, n)
        stats.draft_time += t1 - t0
        stats.verify_time += t2 - t1
        stats.commit_time += t3 - t2
        if observe is not None:
            observe(k, n, t1 - t0, t3 - t1)
        yield emitted
        last = next_token
