"""Tests for specdec.sampling: processing against numpy and transformers, greedy and
sampled acceptance, and a chi-square check that speculative sampling is lossless."""

import math

import mlx.core as mx
import numpy as np
import pytest

from specdec.errors import DraftError, SamplingError
from specdec.sampling import (
    SamplingParams,
    accept_greedy,
    accept_sampled,
    draw,
    log_probs,
    make_key,
    rejection_sample,
    sample,
    split_key,
)

# Upper 1e-4 quantiles of the chi-square distribution by degrees of freedom
# (standard statistical tables): a correct sampler exceeds them with probability 1e-4.
CHI2_CRITICAL_1E4 = {1: 15.137, 2: 18.421, 3: 21.108, 4: 23.513, 5: 25.745,
                     6: 27.856, 7: 29.878, 8: 31.828, 9: 33.720, 10: 35.564}


# ---------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("name, value", [
    ("temperature", -0.5), ("temperature", float("nan")), ("temperature", float("inf")),
    ("temperature", "1.0"), ("temperature", True),
    ("top_k", -1), ("top_k", 2.5), ("top_k", True),
    ("top_p", 0.0), ("top_p", -0.1), ("top_p", 1.5), ("top_p", float("nan")),
    ("min_p", 1.0), ("min_p", -0.1), ("min_p", float("nan")),
    ("seed", -1), ("seed", 1.5), ("seed", "7"), ("seed", 2**64),
])
def test_params_reject_bad_values(name, value):
    with pytest.raises(SamplingError) as err:
        SamplingParams(**{name: value})
    assert name in str(err.value) and repr(value) in str(err.value)


def test_params_accept_good_values():
    assert SamplingParams().greedy
    params = SamplingParams(temperature=1, top_k=np.int64(5), top_p=0.5, min_p=0.0, seed=2**64 - 1)
    assert not params.greedy
    with pytest.raises(SamplingError, match="seed"):
        make_key(-3)


# ---------------------------------------------------------------- log_probs


def ref_log_probs(logits, temperature, top_k=0, top_p=1.0, min_p=0.0):
    """Straight from the definitions, float64, one row at a time."""
    def softmax(r):
        e = np.exp(r - r.max())
        return e / e.sum()

    x = np.asarray(logits, np.float64)
    out = np.empty_like(x)
    for idx in np.ndindex(x.shape[:-1]):
        r = x[idx].copy()
        if temperature == 0:
            out[idx] = np.where(np.arange(r.size) == np.argmax(r), 0.0, -np.inf)
            continue
        r = r / temperature
        if 0 < top_k < r.size:
            r = np.where(r >= np.sort(r)[::-1][top_k - 1], r, -np.inf)
        if top_p < 1:
            p = softmax(r)
            ranked = np.sort(p)[::-1]
            last = np.argmax(np.cumsum(ranked) >= top_p - 1e-9)  # smallest set with mass >= top_p
            r = np.where(p >= ranked[last], r, -np.inf)
        if min_p:
            p = softmax(r)
            r = np.where(p >= min_p * p.max(), r, -np.inf)
        out[idx] = r - r.max() - np.log(np.exp(r - r.max()).sum())
    return out


def assert_same_log_probs(got, want):
    got = np.asarray(got)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
    finite = np.isfinite(want)
    np.testing.assert_allclose(got[finite], want[finite], atol=2e-5)
    np.testing.assert_allclose(np.exp(got).sum(-1), 1.0, atol=1e-5)


def kept(logits, **kw):
    return set(np.flatnonzero(np.isfinite(np.asarray(log_probs(mx.array(logits), SamplingParams(**kw))))))


def test_boundaries_and_ties():
    # Probabilities 1/2, 1/4, 1/8, 1/16, 1/16 at T=1.
    halves = np.log([0.5, 0.25, 0.125, 0.0625, 0.0625])
    assert kept(halves, temperature=1.0, top_p=0.5) == {0}
    assert kept(halves, temperature=1.0, top_p=0.75) == {0, 1}  # lands exactly on 1/2 + 1/4
    assert kept(halves, temperature=1.0, top_p=0.76) == {0, 1, 2}
    assert kept(halves, temperature=1.0, top_p=0.875) == {0, 1, 2}
    assert kept(halves, temperature=1.0, top_p=0.9) == {0, 1, 2, 3, 4}  # tie at the boundary: both kept
    assert kept(halves, temperature=1.0, min_p=0.4) == {0, 1}
    assert kept(halves, temperature=1.0, top_k=4) == {0, 1, 2, 3, 4}  # tie at the k-th value
    assert kept(halves, temperature=1.0, top_k=3) == {0, 1, 2}
    assert kept([3.0, 2.0, 2.0, 1.0, 0.0], temperature=1.0, top_k=2) == {0, 1, 2}
    assert kept(np.zeros(6), temperature=0.5, top_k=1, top_p=0.1) == set(range(6))
    assert kept([0.0, 5.0, 5.0, 1.0], temperature=0.0) == {1}  # greedy: first argmax

    cases = [
        (halves, dict(temperature=1.0, top_p=0.75)),
        (halves, dict(temperature=1.0, top_p=0.9, top_k=4)),
        ([3.0, 2.0, 2.0, 1.0, 0.0, -1.0], dict(temperature=0.7, top_k=2)),
        ([1.0, 1.0, 0.5, 0.5, 0.5, -2.0], dict(temperature=2.0, top_p=0.5)),
        ([1.0, 1.0, 0.5, 0.5, 0.5, -2.0], dict(temperature=1.0, top_k=3, top_p=0.6, min_p=0.2)),
    ]
    for logits, kw in cases:
        got = log_probs(mx.array(logits, dtype=mx.float32), SamplingParams(**kw))
        assert_same_log_probs(got, ref_log_probs(np.array(logits, np.float32), **kw))


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0),
    dict(temperature=0.6),
    dict(temperature=1.0, top_k=7),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.05),
    dict(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02),
    dict(temperature=1.5, top_k=60, top_p=0.95),  # top_k above V: off
    dict(temperature=0.0, top_k=3),
])
def test_log_probs_matches_numpy_reference(kw):
    rng = np.random.default_rng(0)
    logits = (rng.normal(size=(2, 3, 50)) * 2).astype(np.float32)
    got = log_probs(mx.array(logits), SamplingParams(**kw))
    assert got.dtype == mx.float32 and got.shape == (2, 3, 50)
    assert_same_log_probs(got, ref_log_probs(logits, **kw))
    # bf16 logits: same processing of the rounded values.
    rounded = mx.array(logits).astype(mx.bfloat16)
    assert_same_log_probs(log_probs(rounded, SamplingParams(**kw)),
                          ref_log_probs(np.array(rounded.astype(mx.float32)), **kw))


def test_log_probs_matches_transformers_warpers():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=(8, 64)) * 2).astype(np.float32)
    for t, k, p, m in [(0.7, 0, 1.0, 0.0), (1.0, 10, 1.0, 0.0), (1.2, 0, 0.85, 0.0),
                       (1.0, 0, 1.0, 0.1), (0.9, 25, 0.9, 0.05)]:
        scores = torch.tensor(logits)
        warpers = [lp.TemperatureLogitsWarper(t)]
        warpers += [lp.TopKLogitsWarper(k)] if k else []
        warpers += [lp.TopPLogitsWarper(p)] if p < 1 else []
        warpers += [lp.MinPLogitsWarper(m)] if m else []
        for warp in warpers:
            scores = warp(None, scores)
        want = torch.log_softmax(scores, dim=-1).numpy().astype(np.float64)
        got = log_probs(mx.array(logits), SamplingParams(temperature=t, top_k=k, top_p=p, min_p=m))
        assert_same_log_probs(got, want)


def test_log_probs_shapes():
    with pytest.raises(SamplingError, match="vocabulary"):
        log_probs(mx.array(1.0), SamplingParams(temperature=1.0))
    # No rows (a round with K = 0 drafts) is not an error.
    for params in (SamplingParams(), SamplingParams(temperature=1.0, top_k=2, top_p=0.5, min_p=0.1)):
        assert log_probs(mx.zeros((0, 5)), params).shape == (0, 5)
        assert sample(mx.zeros((0, 5)), params).shape == (0,)


# ---------------------------------------------------------------- sample


def test_greedy_sample_is_argmax():
    logits = mx.array(np.random.default_rng(2).normal(size=(5, 3, 40)).astype(np.float32))
    for x in (logits, logits.astype(mx.bfloat16)):
        got = sample(x, SamplingParams(temperature=0.0), make_key(0))
        assert got.dtype == mx.int32
        np.testing.assert_array_equal(np.array(got), np.argmax(np.array(x.astype(mx.float32)), -1))
    # The greedy point mass draws the argmax too.
    np.testing.assert_array_equal(np.array(draw(log_probs(logits, SamplingParams()), make_key(1))),
                                  np.argmax(np.array(logits), -1))


def test_seeded_sampling_is_reproducible():
    logits = mx.zeros((2000, 10))
    params = SamplingParams(temperature=1.0, seed=3)
    a = sample(logits, params, make_key(params.seed))
    b = sample(logits, params, make_key(params.seed))
    c = sample(logits, params, make_key(4))
    assert np.array_equal(np.array(a), np.array(b)) and not np.array_equal(np.array(a), np.array(c))
    key, sub = split_key(make_key(3))
    key2, sub2 = split_key(make_key(3))
    assert np.array_equal(np.array(sub), np.array(sub2)) and not np.array_equal(np.array(key), np.array(sub))
    assert not np.array_equal(np.array(make_key()), np.array(make_key()))


# ---------------------------------------------------------------- accept_greedy


def one_hot_logits(best, vocab=8):
    x = np.zeros((len(best), vocab), np.float32)
    x[np.arange(len(best)), best] = 5.0
    return mx.array(x)


def test_accept_greedy():
    target = one_hot_logits([3, 1, 4, 6])  # argmax after last, d1, d2, d3
    assert accept_greedy(target, mx.array([3, 1, 4])) == (3, 6)  # all accepted: bonus from the last row
    assert accept_greedy(target, mx.array([2, 1, 4])) == (0, 3)  # first rejected
    assert accept_greedy(target, mx.array([3, 1, 5])) == (2, 4)
    assert accept_greedy(target, mx.array([3, 0, 4])) == (1, 1)  # a later match does not count
    assert accept_greedy(one_hot_logits([5]), mx.array([], dtype=mx.int32)) == (0, 5)  # K = 0
    n, nxt = accept_greedy(target.astype(mx.bfloat16), mx.array([3, 1, 4]))
    assert type(n) is int and type(nxt) is int
    with pytest.raises(DraftError):
        accept_greedy(target, mx.array([3, 1]))


# ---------------------------------------------------------------- accept_sampled


def test_accept_sampled_basics():
    rng = np.random.default_rng(3)
    p = log_probs(mx.array(rng.normal(size=(4, 8)).astype(np.float32)), SamplingParams(temperature=1.0, top_k=3))
    q = log_probs(mx.array(rng.normal(size=(3, 8)).astype(np.float32)), SamplingParams(temperature=1.0))
    drafts = mx.array([1, 2, 3])
    first = accept_sampled(p, q, drafts, make_key(9))
    assert first == accept_sampled(p, q, drafts, make_key(9))
    for seed in range(20):
        n, nxt = accept_sampled(p, q, drafts, make_key(seed))
        assert 0 <= n <= 3 and np.isfinite(np.array(p)[n, nxt])  # next token lies in p_n's support
        # K = 0: a plain draw from p_0.
        n, nxt = accept_sampled(p[:1], q[:0], mx.array([], dtype=mx.int32), make_key(seed))
        assert n == 0 and np.isfinite(np.array(p)[0, nxt])
        # p == q: every draft (here one inside p's support) passes the ratio test.
        assert accept_sampled(p, p[:3], mx.argmax(p[:3], axis=-1), make_key(seed))[0] == 3
    with pytest.raises(DraftError, match="vocabulary"):
        accept_sampled(p, q[:, :7], drafts, make_key(0))
    with pytest.raises(DraftError):
        accept_sampled(p, q, drafts[:2], make_key(0))


def test_empty_residual_falls_back_to_target():
    # p = q/2 is below q everywhere: a rejection finds max(0, p - q) == 0 and must draw from p.
    q = mx.log(mx.array([[0.0, 0.0, 0.5, 0.5, 0.0]] * 2))
    p = q - math.log(2)
    drafts = mx.full((4000, 1), 2, dtype=mx.int32)
    n, nxt = rejection_sample(mx.broadcast_to(p, (4000, 2, 5)), mx.broadcast_to(q[:1], (4000, 1, 5)), drafts, make_key(5))
    n, nxt = np.array(n), np.array(nxt)
    assert 0 < (n == 0).sum() < 4000
    assert set(nxt.tolist()) <= {2, 3}


# ---------------------------------------------------------------- losslessness

VOCAB, K, DRAWS = 6, 3, 200_000


def chi_square(tokens, probs):
    """(statistic, degrees of freedom) of token counts against probs; inf off the support."""
    counts = np.bincount(tokens, minlength=probs.size)
    support = probs > 0
    if counts[~support].any():
        return math.inf, int(support.sum()) - 1
    expected = tokens.size * probs[support] / probs[support].sum()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


def speculate(step, p, q, key, draws=DRAWS):
    """Run one speculative step `draws` times at once with drafts drawn from q."""
    k = q.shape[0]
    draft_key, step_key = split_key(key)
    drafts = draw(mx.broadcast_to(q, (draws, k, VOCAB)), draft_key)
    n, nxt = step(mx.broadcast_to(p, (draws, k + 1, VOCAB)), mx.broadcast_to(q, (draws, k, VOCAB)), drafts, step_key)
    return np.array(drafts), np.array(n), np.array(nxt)


def statistics(drafts, n, nxt, p, q):
    """Chi-square of every emitted position and of the accepted length.

    p_j does not depend on earlier tokens, so the token emitted at position j, among
    the rounds that reach j (n >= j), must be distributed as p_j.
    """
    p, q = np.exp(np.array(p, np.float64)), np.exp(np.array(q, np.float64))
    k = q.shape[0]
    stats = []
    for j in range(k + 1):
        reach = n >= j
        token = nxt[reach] if j == k else np.where(n[reach] > j, drafts[reach, j], nxt[reach])
        stats.append(chi_square(token, p[j]))
    # P(n >= j) = prod_{i<j} sum_x min(p_i, q_i)
    reach = np.cumprod(np.concatenate([[1.0], np.minimum(p[:k], q).sum(-1)]))
    stats.append(chi_square(n, reach - np.append(reach[1:], 0.0)))
    return stats


def is_consistent(stat_df):
    stat, df = stat_df
    return df == 0 and stat == 0 or stat < CHI2_CRITICAL_1E4[df]


def make_pair(seed, params, draft_params=None, k=K):
    rng = np.random.default_rng(seed)
    p = log_probs(mx.array(rng.normal(size=(k + 1, VOCAB)).astype(np.float32)), params)
    q = log_probs(mx.array(rng.normal(size=(k, VOCAB)).astype(np.float32)), draft_params or params)
    return p, q


@pytest.mark.parametrize("params, draft_params, k", [
    (SamplingParams(temperature=1.0), None, K),
    (SamplingParams(temperature=0.7, top_k=4, top_p=0.9), None, K),
    (SamplingParams(temperature=1.3, min_p=0.1), None, K),
    (SamplingParams(temperature=1.0), SamplingParams(temperature=0.0), K),  # deterministic proposer
    (SamplingParams(temperature=1.0, top_p=0.8), None, 0),
])
def test_speculative_sampling_is_lossless(params, draft_params, k):
    p, q = make_pair(11, params, draft_params, k)
    stats = statistics(*speculate(rejection_sample, p, q, make_key(12)), p, q)
    assert all(is_consistent(s) for s in stats), stats


def accept_without_ratio_test(p, q, drafts, key):
    """Wrong on purpose: keeps every draft, bonus from p_K."""
    n = mx.full(drafts.shape[:-1], drafts.shape[-1], dtype=mx.int32)
    return n, draw(p[..., -1, :], key)


def residual_from_target(p, q, drafts, key):
    """Wrong on purpose: correct ratio test, but the replacement comes from p_n, not max(0, p_n - q_n)."""
    accept_key, draw_key = split_key(key)
    p_d = mx.take_along_axis(p[..., :-1, :], drafts[..., None], axis=-1)[..., 0]
    q_d = mx.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
    accepted = mx.random.uniform(shape=drafts.shape, key=accept_key) < mx.exp(p_d - q_d)
    n = mx.cumprod(accepted.astype(mx.int32), axis=-1).sum(-1)
    return n, draw(mx.take_along_axis(p, n[..., None, None], axis=-2)[..., 0, :], draw_key)


@pytest.mark.parametrize("wrong", [accept_without_ratio_test, residual_from_target])
def test_chi_square_catches_a_wrong_sampler(wrong):
    p, q = make_pair(11, SamplingParams(temperature=1.0))
    stats = statistics(*speculate(wrong, p, q, make_key(12)), p, q)
    assert not is_consistent(stats[0]), stats  # the first emitted token is already off


def test_sample_matches_its_distribution():
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.95)
    logits = mx.array(np.random.default_rng(13).normal(size=(VOCAB,)).astype(np.float32))
    # in batches of 50k rows: MLX-CUDA 0.32.4 fails to launch its sort on more than 65535 rows
    keys = split_key(make_key(14))
    tokens = np.concatenate([np.array(sample(mx.broadcast_to(logits, (DRAWS // 4, VOCAB)), params, key))
                             for key in keys])
    assert is_consistent(chi_square(tokens, np.exp(np.array(log_probs(logits, params), np.float64))))
