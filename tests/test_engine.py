"""The speculative engine at temperature 0: lossless output, exact caches after every commit, bounded memory.

The reference is plain greedy decoding through the same loop with no proposer (K = 0), which never opens a
window or commits: every token is one S=1 forward. Speculative runs must reproduce it token for token.
"""

import math
import random

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from hf_models import logits as hf_logits
from specdec import engine
from specdec.cache import GDNCache, KVCache, make_cache
from specdec.drafts import DraftModelProposer, NgramProposer, Proposer
from specdec.engine import Stats, speculate
from specdec.errors import PromptError
from specdec.loading import load_model
from specdec.models import compiled
from specdec.sampling import SamplingParams

GREEDY = SamplingParams()
VOCAB = 97
METHODS = ("replay", "states")
REF_TOKENS = 210  # reference length: the longest case (200) plus the deepest window (8)
# Where the target's top two logits are closer than this, a window and a single-token forward may round to
# different argmaxes on some backends; such a divergence is a tie, not a bug (none occurs on CPU).
TIE = 1e-4


# ------------------------------------------------------------------------------------------------ helpers


def noisy_copy(path, scale: float, seed: int):
    """The model at `path` with every tensor perturbed by `scale` x its mean |value|: a draft that agrees
    with the target most of the time, so windows end at every possible position."""
    model = load_model(path)[0]
    key = mx.random.key(seed)
    noisy = []
    for name, p in tree_flatten(model.parameters()):
        key, sub = mx.random.split(key)
        noisy.append((name, p + scale * mx.abs(p).mean() * mx.random.normal(p.shape, key=sub)))
    model.update(tree_unflatten(noisy))
    mx.eval(model.parameters())
    return model


class ScriptedProposer(Proposer):
    """Drafts from the target's known greedy continuation.

    rng None: every draft is wrong (zero acceptance). Otherwise one draft per round, at a random position or
    none, is wrong, so every accepted length 0..K occurs without running a draft model.
    """

    def __init__(self, continuation: list[int], rng: random.Random | None = None):
        self.continuation = continuation
        self.rng = rng
        self.emitted = 0

    def prefill(self, tokens):
        self.emitted = 1  # the first token comes with the target's prefill

    def propose(self, last, k, params):
        right = self.continuation[self.emitted : self.emitted + k]
        wrong_at = range(k) if self.rng is None else [self.rng.randint(0, k)]  # k: all right this round
        return mx.array([(t + 1) % VOCAB if i in wrong_at else t for i, t in enumerate(right)], mx.int32), None

    def commit(self, num_accepted, next_token, hidden=None):
        self.emitted += num_accepted + 1


def k_schedule(ks):
    """A callable K for the engine: the next value of ks each round."""
    it = iter(ks)
    return lambda: next(it)


def run(target, prompt, n_new, proposer=None, k=0, method="replay", stats=None):
    """Tokens of whole rounds until at least n_new are out (the last round may overshoot)."""
    out = []
    for tokens in speculate(target, prompt, GREEDY, proposer, k, method, stats):
        out += tokens
        if len(out) >= n_new:
            return out


def assert_matches_greedy(target, prompt, got, reference, what):
    assert len(got) <= len(reference), what
    if got == reference[: len(got)]:
        return
    i = next(i for i, (a, b) in enumerate(zip(got, reference)) if a != b)
    logits = np.array(target(mx.array([prompt + reference[:i]]))[0, -1])
    top2 = np.sort(logits)[-2:]
    assert top2[1] - top2[0] < TIE, (
        f"{what}: token {i} is {got[i]}, plain greedy gives {reference[i]} (logit margin {top2[1] - top2[0]:.2e})"
    )


def assert_stats_invariants(stats: Stats, fixed_k: int | None = None):
    assert stats.emitted == stats.accepted + stats.rounds
    assert stats.tau == (pytest.approx(stats.emitted / stats.rounds) if stats.rounds else 0.0)  # 1 token: no round
    assert sum(stats.drafted_at) == stats.drafted and sum(stats.accepted_at) == stats.accepted
    # Acceptance is a prefix: a draft is kept only if every draft before it was.
    assert all(a <= d for a, d in zip(stats.accepted_at, stats.drafted_at))
    assert all(x >= y for x, y in zip(stats.accepted_at, stats.accepted_at[1:]))
    assert stats.acceptance_by_position == pytest.approx(
        [a / d if d else 0.0 for a, d in zip(stats.accepted_at, stats.drafted_at)])
    if stats.drafted:
        assert stats.acceptance_rate == pytest.approx(stats.accepted / stats.drafted)
    if fixed_k is not None and stats.rounds:
        assert stats.drafted_at == [stats.rounds] * fixed_k and stats.drafted == fixed_k * stats.rounds


# ------------------------------------------------------------------------------------------------ cases

# Draft kinds: a tiny model by name; "self" (the target drafts for itself: everything accepted); "noisy" (the
# target with perturbed weights: acceptance stops anywhere); "early-stop" (noisy, drafting fewer than K when
# unsure); "wrong" (never right); "scripted" (right but for one planted error per round); "ngram".
DRAFT_KINDS = {
    "moe": ["qwen3", "llama", "hybrid", "moe_small", "self", "wrong", "noisy", "early-stop", "scripted", "ngram"],
    "next": ["qwen3", "hybrid", "self", "wrong", "noisy", "scripted"],
}
CASES_PER_KIND = {"moe": 20, "next": 6}  # 10 x 20 + 6 x 6 = 236 cases
FILLS_K = ("qwen3", "llama", "hybrid", "moe_small", "self", "noisy", "wrong", "scripted")  # always K drafts
# Early stopping at the draft's top probability; tiny random models sit near 1/vocab, so the default
# threshold would stop every draft at once: off for fixed K, and near the median for "early-stop".
EARLY_STOP = 0.04


def make_prompts(rng, count):
    """Lengths 1..300 with the edges in: 1 (nothing to prefill), 65/66 (prefill crosses the GDN chunk switch)."""
    lengths = [1, 2, 65, 66, 300] + [rng.randint(3, 299) for _ in range(count - 5)]
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in lengths]


def make_cases():
    rng = random.Random(1126)
    prompts = {"moe": make_prompts(rng, 10), "next": make_prompts(rng, 6)}
    cases = []
    for target, kinds in DRAFT_KINDS.items():
        for kind in kinds:
            for _ in range(CASES_PER_KIND[target]):
                # Log-uniform lengths: mostly short runs, some up to 200 tokens, all under CI's time budget.
                n_new = min(200, int(math.exp(rng.uniform(0, math.log(201)))))
                schedule = None
                if kind not in ("wrong", "scripted", "ngram") and rng.random() < 0.15:
                    schedule = [rng.randint(0, 8) for _ in range(n_new + 1)]  # K per round, 0 included
                cases.append(dict(
                    target=target, kind=kind, k=rng.randint(1, 8), method=rng.choice(METHODS), n_new=n_new,
                    prompt=rng.randrange(len(prompts[target])), schedule=schedule, seed=rng.randrange(2**31),
                ))
    return prompts, cases


PROMPTS, CASES = make_cases()


@pytest.fixture(scope="module")
def references(tiny):
    """Plain greedy continuation of every prompt of each target, computed once."""
    return {
        target: [run(tiny.model(target), prompt, REF_TOKENS)[:REF_TOKENS] for prompt in PROMPTS[target]]
        for target in PROMPTS
    }


@pytest.fixture(scope="module")
def noisy(tiny):
    return {target: noisy_copy(tiny.path(target), 0.01, seed=7) for target in PROMPTS}


def make_proposer(kind, target_name, method, tiny, noisy, continuation, seed=0):
    if kind == "wrong":
        return ScriptedProposer(continuation)
    if kind == "scripted":
        return ScriptedProposer(continuation, random.Random(seed))
    if kind == "ngram":
        return NgramProposer(VOCAB)
    if kind == "early-stop":
        return DraftModelProposer(noisy[target_name], method, min_confidence=EARLY_STOP)
    model = {"self": tiny.model(target_name), "noisy": noisy.get(target_name)}.get(kind) or tiny.model(kind)
    return DraftModelProposer(model, method, min_confidence=0)


def assert_argmax_follows(logits: np.ndarray, tokens: list[int], tie: float, what: str):
    """logits[i] predicts tokens[i]; up to the first near-tie, every argmax must be the token."""
    for i, (row, token) in enumerate(zip(logits, tokens)):
        if row.argmax() != token:
            top2 = np.sort(row)[-2:]
            assert top2[1] - top2[0] < tie, f"{what}: token {i} is {token}, argmax {row.argmax()}"
            return


def test_first_token_comes_with_the_prefill(tiny, references):
    """The prefill yields the first token alone, before any round; an empty prompt has no last token to start
    from and is refused by name."""
    target = tiny.model("moe")
    stats = Stats()
    rounds = speculate(target, PROMPTS["moe"][0], GREEDY, None, 0, stats=stats)
    assert next(rounds) == references["moe"][0][:1] and stats.rounds == 0 and stats.prefill_time > 0
    assert next(rounds) == references["moe"][0][1:2] and stats.rounds == 1
    with pytest.raises(PromptError, match="empty"):
        next(speculate(target, [], GREEDY))


def test_reference_is_plain_greedy(tiny, references):
    """The K = 0 loop against argmax over one forward of the whole sequence: our model without a cache, and
    the transformers model the checkpoint came from (float32 PyTorch)."""
    for target in PROMPTS:
        model, hf_model = tiny.model(target), tiny.torch_model(target)
        for prompt, ref in list(zip(PROMPTS[target], references[target]))[:3]:
            start = len(prompt) - 1
            logits = np.array(model(mx.array([prompt + ref[:40]]))[0, start:])
            assert_argmax_follows(logits, ref[:40], TIE, f"{target}: K = 0 loop vs full forward")
            logits = hf_logits(hf_model, prompt + ref[:40])[start:]
            assert_argmax_follows(logits, ref[:40], 1e-3, f"{target}: K = 0 loop vs transformers")


@pytest.mark.parametrize("target_name, kind", [(t, k) for t, kinds in DRAFT_KINDS.items() for k in kinds])
def test_greedy_speculation_is_lossless(tiny, references, noisy, target_name, kind):
    target = tiny.model(target_name)
    cases = [c for c in CASES if c["target"] == target_name and c["kind"] == kind]
    total_accepted = 0
    for case in cases:
        prompt = PROMPTS[target_name][case["prompt"]]
        reference = references[target_name][case["prompt"]]
        proposer = make_proposer(kind, target_name, case["method"], tiny, noisy, reference, case["seed"])
        k = case["k"]
        if case["schedule"] is not None:
            k = k_schedule(case["schedule"])
        stats = Stats()
        got = run(target, prompt, case["n_new"], proposer, k, case["method"], stats)
        what = f"{target_name} + {kind} draft, {case}"
        assert_matches_greedy(target, prompt, got, reference, what)
        assert stats.emitted + 1 == len(got), what  # the rounds', and the prefill's first token
        fixed_k = case["k"] if kind in FILLS_K and case["schedule"] is None else None
        assert_stats_invariants(stats, fixed_k)
        total_accepted += stats.accepted
    if kind in ("self", "noisy", "early-stop", "scripted"):
        assert total_accepted > 0  # these kinds must exercise accepted drafts, not only rejections
    if kind == "wrong":
        assert total_accepted == 0


# ------------------------------------------------------------------------------------------------ caches


# A window's forward and one-token forwards round float32 alike on the CPU; on a GPU their matmuls differ in the
# last bits (an H100 showed single elements 1e-5 to 2e-5 apart). A cache corrupted by a rejected token is off by O(1).
CACHE_ROUNDING = 1e-5 if mx.default_device() == mx.cpu else 1e-4


def assert_same_cache(got, want, what):
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert type(g) is type(w), what
        assert g.offset == w.offset, f"{what}: layer {i} offset {g.offset}, plain decoding {w.offset}"
        if isinstance(g, KVCache):
            pairs = {"keys": (g.state[0], w.state[0]), "values": (g.state[1], w.state[1])}
        else:
            assert isinstance(g, GDNCache)
            pairs = {"conv_state": (g.conv_state, w.conv_state), "state": (g.state, w.state)}
        for name, (a, b) in pairs.items():
            assert a.shape == b.shape, f"{what}: layer {i} {name} shape {a.shape} vs {b.shape}"
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=CACHE_ROUNDING, atol=CACHE_ROUNDING,
                                       err_msg=f"{what}: layer {i} {name}")


def random_prompt(length, seed):
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(length)]


def catch_engine_caches(monkeypatch) -> list:
    """The caches `speculate` makes for its target, caught as it makes them (the engine's own, not a copy)."""
    made = []

    def make_and_keep(model, method="replay"):
        made.append(make_cache(model, method))
        return made[-1]

    monkeypatch.setattr(engine, "make_cache", make_and_keep)
    return made


class PlainDecoder:
    """A cache advanced by plain decoding: the prompt minus its last token in one forward (as the engine
    prefills), then one token per forward."""

    def __init__(self, model, prompt):
        self.model, self.cache = model, make_cache(model)
        if len(prompt) > 1:
            model(mx.array([prompt[:-1]]), self.cache)
        self.seen = len(prompt) - 1

    def advance_to(self, tokens, n):
        for t in tokens[self.seen : n]:
            self.model(mx.array([[t]]), self.cache)
        self.seen = max(self.seen, n)
        self.cache.eval()


# kind: (prompt length, K or a K schedule, rounds to run). "self" accepts everything, "wrong" nothing,
# "noisy" stops anywhere in the window; "noisy-schedule" mixes K = 0 rounds in (the draft's pending tokens);
# "early-stop" drafts fewer than K at times.
CACHE_SCENARIOS = {
    "noisy": (33, 4, 24),
    "early-stop": (9, 5, 16),
    "noisy-schedule": (20, [4, 0, 0, 3, 1, 0, 5, 2, 0, 4, 4, 1, 0, 3, 6, 0, 2, 4], 18),
    "self": (1, 3, 10),
    "wrong": (70, 4, 12),
    "hybrid": (12, 3, 12),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("target_name, kind", [("moe", k) for k in CACHE_SCENARIOS] +
                         [("next", "noisy"), ("next", "self")])
def test_caches_match_plain_decoding_after_every_commit(tiny, noisy, monkeypatch, target_name, kind, method):
    target = tiny.model(target_name)
    prompt_len, k, rounds = CACHE_SCENARIOS[kind]
    prompt = random_prompt(prompt_len, seed=prompt_len)
    continuation = run(target, prompt, 100) if kind == "wrong" else None
    proposer = make_proposer(kind.removesuffix("-schedule"), target_name, method, tiny, noisy, continuation)
    schedule = k if isinstance(k, list) else None
    num_draft_tokens = k_schedule(schedule) if schedule else k

    made = catch_engine_caches(monkeypatch)
    stats = Stats()
    target_ref = PlainDecoder(target, prompt)
    draft_ref = PlainDecoder(proposer.model, prompt) if isinstance(proposer, DraftModelProposer) else None
    accepted_lengths = []
    rounds_of = speculate(target, prompt, GREEDY, proposer, num_draft_tokens, method, stats)
    out = next(rounds_of)  # the prefill's first token
    assert len(out) == 1 and stats.rounds == 0
    for r, tokens in enumerate(rounds_of):
        k_r = stats.drafted - sum(k for _, k in accepted_lengths)  # drafts this round
        n = len(tokens) - 1
        assert 0 <= n <= k_r <= (schedule[r] if schedule else k)
        if kind != "early-stop":
            assert k_r == (schedule[r] if schedule else k)
        accepted_lengths.append((n, k_r))
        made_by_rounds = len(out) - 1 + len(tokens)
        assert (stats.rounds, stats.emitted, stats.accepted) == (r + 1, made_by_rounds, made_by_rounds - r - 1)
        out += tokens
        committed = prompt + out[:-1]  # everything before the new `last`
        what = f"{target_name}/{kind}/{method} round {r} (accepted {n} of {k_r})"

        target_ref.advance_to(committed, len(committed))
        assert made[0].offset == len(committed), what
        assert_same_cache(made[0], target_ref.cache, what + ", target")
        if draft_ref is not None:
            # The draft may hold the last accepted draft back, to feed it with the next round's `last`.
            pending = proposer.pending
            held = len(committed) - len(pending)
            assert committed[held:] == pending, what
            draft_ref.advance_to(committed, held)
            assert_same_cache(proposer.cache, draft_ref.cache, what + ", draft")
        if r + 1 == rounds:
            break

    assert_matches_greedy(target, prompt, out, run(target, prompt, len(out)), kind)
    assert_stats_invariants(stats, None if schedule or kind == "early-stop" else k)
    drafted = [(n, k_r) for n, k_r in accepted_lengths if k_r > 0]
    if kind == "self":
        assert all(n == k_r for n, k_r in drafted)
    elif kind == "wrong":
        assert all(n == 0 for n, _ in drafted)
    elif kind.startswith("noisy"):
        assert any(0 < n < k_r for n, k_r in drafted), accepted_lengths  # a commit in mid-window happened
    elif kind == "early-stop":
        assert len({k_r for _, k_r in accepted_lengths}) > 1, accepted_lengths  # short windows happened


# ------------------------------------------------------------------------------------------------ memory


def kv_bytes(cache, max_window: int) -> int:
    """Bytes of the KV buffers, checked against what they must hold: float32 keys + values for `offset`
    tokens, plus at most one growth step and a rolled-back window of slack (compiled steps double the
    buffer instead: at most twice that)."""
    total = 0
    for c in cache:
        if isinstance(c, KVCache) and c.keys is not None:
            B, H, length, D = c.keys.shape
            assert c.nbytes == 2 * B * H * length * D * 4
            most = c.offset + KVCache.step + max_window
            assert c.offset <= length <= (2 * most if compiled.enabled() else most), (c.offset, length)
            total += c.nbytes
    return total


def test_memory_is_bounded_over_4000_tokens(tiny, monkeypatch):
    """After warm-up, active memory grows only by the KV caches' own growth: no window record, tape or
    per-step state survives its commit. The target commits by per-step states, the draft by replay."""
    target = tiny.model("moe")
    proposer = DraftModelProposer(noisy_copy(tiny.path("moe"), 0.003, seed=3), "replay", min_confidence=0)
    made = catch_engine_caches(monkeypatch)
    prompt = random_prompt(16, seed=4)
    stats = Stats()
    count, samples, checkpoints = 0, [], [500, 1500, 2500, 4000]
    for tokens in speculate(target, prompt, GREEDY, proposer, 4, "states", stats):
        count += len(tokens)
        if count >= checkpoints[len(samples)]:
            samples.append((count, mx.get_active_memory(), kv_bytes(made[0], 5) + kv_bytes(proposer.cache, 5)))
            if len(samples) == len(checkpoints):
                break
    assert 0 < stats.accepted < stats.drafted  # partial acceptance: windows were committed in the middle
    (_, mem0, kv0) = samples[0]
    for count, mem, kv in samples[1:]:
        assert kv > kv0
        assert mem - mem0 <= (kv - kv0) + 2**20, (
            f"after {count} tokens active memory grew {(mem - mem0) / 2**20:.2f} MiB, "
            f"the KV caches only {(kv - kv0) / 2**20:.2f} MiB")
