"""Adaptive draft length ("auto K"): choose K each round to maximise expected tokens per second.

Asked for K drafts, a proposer makes k <= K of them (an n-gram lookup may find nothing, a draft model may
stop early), and the target keeps the first n. Per draft position j the policy estimates
    f_j: the chance draft j is made, given draft j-1 was        (1 for a plain draft model)
    a_j: the chance draft j is kept, given it was made and draft j-1 was kept
and from them, for every K in [0, max_k],
    E[tokens | K] = 1 + sum_{i<=K} prod_{j<=i} f_j a_j
    E[time | K]   = sum_k P(k drafts | K) * (t(k+1) + k * c)
with t(S) the time to verify + commit a window of S tokens and c the draft time per drafted token.
It picks the K with the largest E[tokens] / E[time]; K = 0 is plain decoding. With f = 1 this is the
textbook (1 + sum prod a_j) / (t(K+1) + K c).

Everything is learned from the rounds the engine runs, so no forward is spent on measuring alone:
- t(S): a low quantile of the latest timings of S-token windows (other work on the machine only ever adds
  time, so the low end is the cost itself). The first timing of each S is dropped (a new shape can pay
  one-off compilation). Unmeasured sizes are interpolated between measured ones; past the largest, the
  estimate is optimistic (the largest one's cost), so a longer window that might pay gets tried and
  measured. Extrapolating measured slopes instead kept the policy from ever trying the longer windows that
  paid on a GPU, whose cost curve bends and even dips (at 0.8 acceptance it settled on K = 2 where K = 8
  was 1.7x faster).
- c: a low quantile of the latest per-token draft times.
- f_j, a_j: decayed counts, each shrunk toward the position before it (f_1, a_1 toward a prior), so a
  position never tried is assumed to behave like the previous one.

A slow round (the host busy elsewhere: on a GPU the step is bound by host work, and a shared host has
hiccups) makes its window size look expensive, and through the interpolation every size below it too;
a size that looks expensive is never chosen, so never timed again. So a size timed once is timed a
second time, and the window one longer than the chosen one is tried, each at most `second_looks` times,
before either is ruled out. Simulated on an H100's cost curve at 0.8 acceptance, 100 rounds, with 15% of
rounds 1.3-2.5x slower, the worst of 40 runs went from 0.46 to 0.68 of the best K's undisturbed rate
(median 0.84 both, the slow rounds' own cost included); with 30% slow rounds from 0.41 to 0.60. On a CPU,
where the extra looks are honest timings of windows that do not pay, they cost ~0-3% (bench_auto_k cases).

Start-up runs a few plain and K=1 rounds (real rounds: they emit tokens) to measure t(1) and t(2). When
the model says K = 0, the policy still probes K > 0 now and then, within `explore_budget` (a fraction of
all time seen), so a draft that starts to pay is noticed; and it stops probing when even perfect drafts
could not beat plain decoding by `min_gain` (CPU with quantized weights, where drafting never pays).
"""

from collections import Counter, deque

from .errors import DraftError


def low(times) -> float:
    """The lower quartile of recent timings (their minimum while there are fewer than 4)."""
    return sorted(times)[len(times) // 4]


class PositionRates:
    """Decayed hit / try counts per draft position; each estimate leans on the position before it."""

    def __init__(self, size: int, prior: float, weight: float, memory: float):
        self.hits, self.tries = [0.0] * size, [0.0] * size
        self.prior, self.weight, self.memory = prior, weight, memory

    def add(self, tried: int, hit: int):
        """Positions 1..tried were tried, the first `hit` of them succeeded."""
        self.hits = [h * self.memory for h in self.hits]
        self.tries = [t * self.memory for t in self.tries]
        for j in range(tried):
            self.tries[j] += 1
            self.hits[j] += j < hit

    def estimate(self) -> list[float]:
        out, before = [], self.prior
        for hits, tries in zip(self.hits, self.tries):
            before = (hits + self.weight * before) / (tries + self.weight)
            out.append(before)
        return out


class AdaptiveK:
    """A draft-length policy: the engine calls it for K before each round and `observe`s the result."""

    def __init__(self, max_k: int = 8, explore_budget: float = 0.02, min_gain: float = 0.1,
                 prior_accept: float = 0.5, prior_fill: float = 0.9, prior_weight: float = 2.0,
                 memory: float = 0.98, window: int = 9, warmup_rounds: int = 2, second_looks: int = 3):
        if not (isinstance(max_k, int) and 0 <= max_k <= 64):
            raise DraftError(f"max_k must be an integer in [0, 64], got {max_k!r}")
        if not 0 <= explore_budget < 1:
            raise DraftError(f"explore_budget must be in [0, 1), got {explore_budget!r}")
        if not (0 < prior_accept < 1 and 0 < prior_fill <= 1 and prior_weight > 0 and 0 < memory <= 1):
            raise DraftError("need 0 < prior_accept < 1, 0 < prior_fill <= 1, prior_weight > 0, 0 < memory <= 1")
        if not (isinstance(window, int) and window >= 1 and isinstance(warmup_rounds, int) and warmup_rounds >= 1):
            raise DraftError("window and warmup_rounds must be positive integers")
        if not (isinstance(second_looks, int) and second_looks >= 0):
            raise DraftError(f"second_looks must be a non-negative integer, got {second_looks!r}")
        self.max_k = max_k
        self.explore_budget, self.min_gain = explore_budget, min_gain
        self.warmup_rounds = warmup_rounds  # timed rounds wanted at S = 1 and S = 2 before trusting the model
        self.second_looks = second_looks
        self.looks = Counter()  # window size -> rounds asked for a second look at it
        self.window = window
        self.times = {}  # S -> latest target times of S-token windows
        self.draft_times = deque(maxlen=window)  # per drafted token
        self.fill = PositionRates(max_k, prior_fill, prior_weight, memory)
        self.accept = PositionRates(max_k, prior_accept, prior_weight, memory)
        self.elapsed = 0.0  # all round time seen
        self.explore_spent = 0.0  # what probes cost beyond plain decoding (negative when they paid)
        self.asked = 0
        self.probing = False
        self._timed_sizes, self._timed_draft = set(), False

    # ------------------------------------------------------------------ the model

    def target_time(self, s: int) -> float:
        """Estimated seconds to verify + commit a window of s tokens (needs t(1) measured)."""
        if s in self.times:
            return low(self.times[s])
        known = sorted(self.times)
        lo = max(k for k in known if k < s)
        hi = min((k for k in known if k > s), default=None)
        t_lo = low(self.times[lo])
        if hi is not None:
            return t_lo + (low(self.times[hi]) - t_lo) * (s - lo) / (hi - lo)
        if lo == 1:  # nothing but t(1): assume the worst, cost linear in S
            return t_lo * s
        # Past the largest measured size, optimism: the least a longer window can cost is what the longest
        # measured one did. If that makes a longer window look best, the policy tries it, and two timings
        # later it knows (a CPU, where cost is linear in S, is found out after one such probe). Any
        # extrapolation from measured slopes is pessimistic where the cost bends or dips (GPU kernels change
        # with S), and a pessimistic estimate is never corrected: the policy never tries the size again.
        return t_lo

    @property
    def draft_cost(self) -> float:
        return low(self.draft_times) if self.draft_times else 0.0

    def expected(self, k: int, fill: list[float], accept: list[float]) -> tuple[float, float]:
        """(E[tokens], E[seconds]) of a round asked for k drafts."""
        tokens, seconds, made, kept = 1.0, 0.0, 1.0, 1.0  # made: P(>= i drafts), kept: P(first i kept)
        for i in range(k + 1):
            exactly_i = made * (1 - fill[i]) if i < k else made
            seconds += exactly_i * (self.target_time(i + 1) + i * self.draft_cost)
            if i < k:
                made *= fill[i]
                kept *= fill[i] * accept[i]
                tokens += kept
        return tokens, seconds

    def rate(self, k: int, fill: list[float] | None = None, accept: list[float] | None = None) -> float:
        """Expected tokens per second when asking for k drafts."""
        tokens, seconds = self.expected(k, fill or self.fill.estimate(), accept or self.accept.estimate())
        return tokens / seconds

    def best_k(self, smallest: int = 0) -> int:
        fill, accept = self.fill.estimate(), self.accept.estimate()
        return max(range(smallest, self.max_k + 1), key=lambda k: self.rate(k, fill, accept))

    def never_pays(self) -> bool:
        """Even if every draft were made and kept, drafting would not beat plain decoding by min_gain, at any
        window size measured so far (unmeasured sizes are estimated optimistically: no proof either way)."""
        perfect = [1.0] * self.max_k
        measured = [k for k in range(1, self.max_k + 1) if k + 1 in self.times]
        best = max((self.rate(k, perfect, perfect) for k in measured), default=0.0)
        return best < (1 + self.min_gain) * self.rate(0, perfect, perfect)

    # ------------------------------------------------------------------ the engine's calls

    def __call__(self) -> int:
        """K for the next round."""
        self.probing = False
        if self.max_k == 0 or len(self.times.get(1, ())) < self.warmup_rounds:
            k = 0
        elif len(self.times.get(2, ())) < self.warmup_rounds:
            k, self.probing = 1, True
        else:
            k = self.best_k()
            if k == 0 and not self.never_pays():
                probe = self.best_k(smallest=1)
                worst = self.target_time(probe + 1) + probe * self.draft_cost - self.target_time(1)
                if self.explore_spent + worst <= self.explore_budget * self.elapsed:
                    k, self.probing = probe, True
            elif k > 0:
                k = self.second_look(k)
        self.asked = k
        return k

    def second_look(self, k: int) -> int:
        """The K to ask for instead of the chosen k: that of a window size timed only once, or that of the window
        one token longer than k's (k + 2 tokens) while it is timed less than twice (see the module notes); else
        k. Each size is asked for `second_looks` times at most: a proposer that drafts fewer than asked may
        never time it."""
        doubtful = [s for s in range(2, self.max_k + 2) if len(self.times.get(s, ())) == 1]
        if k + 2 <= self.max_k + 1 and len(self.times.get(k + 2, ())) < 2:
            doubtful.append(k + 2)
        for s in doubtful:
            if self.looks[s] < self.second_looks:
                self.looks[s] += 1
                return s - 1
        return k

    def observe(self, drafted: int, accepted: int, draft_time: float, target_time: float) -> None:
        """The last round: drafts made and kept, seconds drafting, seconds verifying + committing."""
        s = drafted + 1
        if s in self._timed_sizes:
            self.times.setdefault(s, deque(maxlen=self.window)).append(target_time)
        self._timed_sizes.add(s)
        if drafted:
            if self._timed_draft:
                self.draft_times.append(draft_time / drafted)
            self._timed_draft = True
        if self.asked:
            self.fill.add(min(drafted + 1, self.asked), drafted)
            if drafted:
                self.accept.add(min(accepted + 1, drafted, self.max_k), accepted)
        spent = draft_time + target_time
        self.elapsed += spent
        if self.probing and 1 in self.times:
            self.explore_spent += spent - (accepted + 1) * self.target_time(1)
