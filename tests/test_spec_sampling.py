"""Speculative sampling is lossless: the emitted tokens are distributed exactly as the target's own sampling.

Setup: a vocabulary-6 hybrid MoE target and a vocabulary-6 dense draft (independent random weights, so
drafts are often rejected), a 3-token prompt, K = 3. The checked quantity is the joint distribution of the
first L = 3 generated tokens (6^3 = 216 outcomes), which spans one or two rounds: a first window, its commit
at any accepted length, and the next window. With K = L a rule that keeps drafts blindly emits all three
from the draft, which makes it easy to catch. Its exact value comes from the target alone: the probability of
x1 x2 x3 is prod_i p(x_i | prompt, x_<i), with p the processed (temperature, top-k, top-p) distribution
computed here in numpy from the target's logits for every enumerated prefix.

Why two kinds of draws. One engine draw (prefill, draft, verify, commit, second round) costs ~15 ms on a
2-core CPU, so 10^5 of them would take ~25 minutes. So:
  - the real engine (`speculate` + `DraftModelProposer`) is sampled a few thousand times per setting: this
    checks the wiring (which rows are verified, the draft's log-probs, keys, commits between rounds) and
    catches any rule that is visibly off;
  - the acceptance rule the engine uses (`specdec.sampling.rejection_sample`, vectorised over chains) runs
    the same two-round process for 2 x 10^5 chains at once, fed with the real models' processed log-probs for
    every enumerated prefix: this has the power to see small biases.
Both use the same chi-square check, and both are shown to FAIL when the acceptance rule keeps drafts
without the p/q ratio test. Cells of probability 0 (filtered by top-k / top-p) must never be drawn.
"""

import math

import mlx.core as mx
import numpy as np
import pytest

from specdec import engine
from specdec.drafts import DraftModelProposer, NgramProposer
from specdec.engine import Stats, speculate
from specdec.sampling import SamplingParams, draw, log_probs, rejection_sample, split_key

V = 6
PROMPT = [1, 2, 3]
L = 3  # generated positions checked (jointly)
K = 3
DEPTH = L - 1 + K  # the deepest prefix a round can verify: L - 1 tokens out, then K drafts
SETTINGS = {
    "T=1": SamplingParams(temperature=1.0),
    "T=0.8 top_k=4 top_p=0.9": SamplingParams(temperature=0.8, top_k=4, top_p=0.9),
}
ENGINE_DRAWS = 2000
NGRAM_DRAWS = 1500
WRONG_RULE_DRAWS = 400
CHAINS = 200_000
Z_1E4 = 3.719016  # standard normal upper 1e-4 quantile


# ------------------------------------------------------------------------------------------------ statistics


def chi2_critical(df: int) -> float:
    """Upper 1e-4 quantile of chi-square(df) by Wilson-Hilferty: a little above the exact value (+1.1% at
    df = 10, under +0.2% from df = 50 on; the checks here have df ~ 100-200), so slightly conservative."""
    c = 2 / (9 * df)
    return df * (1 - c + Z_1E4 * math.sqrt(c)) ** 3


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(Pearson statistic, its 1e-4 critical value). Cells expected below 5 are pooled, in order of their
    probability, into bins expected at 5 or more; an observation in a cell of probability 0 is an outright
    failure (infinite statistic)."""
    if counts[probs == 0].any():  # a token the target can never sample was emitted
        return math.inf, chi2_critical(max(int((probs > 0).sum()) - 1, 1))
    expected = counts.sum() * probs
    obs, exp = [], []
    for i in np.argsort(expected):
        if expected[i] == 0:
            continue
        if exp and exp[-1] < 5:  # the current bin is still too small: pool this cell into it
            obs[-1] += counts[i]
            exp[-1] += expected[i]
        else:
            obs.append(counts[i])
            exp.append(expected[i])
    if len(exp) > 1 and exp[-1] < 5:
        obs[-2] += obs.pop()
        exp[-2] += exp.pop()
    obs, exp = np.array(obs, float), np.array(exp)
    assert len(obs) > 3, "too few draws for a chi-square test"
    return float(((obs - exp) ** 2 / exp).sum()), chi2_critical(len(obs) - 1)


# ------------------------------------------------------------------------------------------------ exact law


def processed_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Reference processing, float64, row by row: temperature, top-k, top-p (smallest set reaching top_p)."""
    out = []
    for row in logits.astype(np.float64):
        z = row / params.temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        if 0 < params.top_k < V:
            p = np.where(p >= np.sort(p)[-params.top_k], p, 0.0)
            p /= p.sum()
        if params.top_p < 1:
            order = np.argsort(-p)
            before = np.cumsum(p[order]) - p[order]
            keep = np.zeros(V, bool)
            keep[order[before < params.top_p]] = True
            p = np.where(keep, p, 0.0)
            p /= p.sum()
        out.append(p)
    return np.array(out)


OFFSET = [(V**m - 1) // (V - 1) for m in range(DEPTH + 2)]  # first row of the prefixes of length m


def prefix_logits(model) -> np.ndarray:
    """Logits after every prefix of up to DEPTH generated tokens: row OFFSET[m] + (x_1..x_m in base V)."""
    seqs = np.array(np.meshgrid(*[np.arange(V)] * DEPTH, indexing="ij")).reshape(DEPTH, -1).T  # [V^D, D]
    tokens = np.concatenate([np.tile(PROMPT, (len(seqs), 1)), seqs], axis=1)
    logits = np.array(model(mx.array(tokens)).astype(mx.float32))  # no cache: one plain forward
    table = np.zeros((OFFSET[DEPTH + 1], V), np.float32)
    for m in range(DEPTH + 1):
        local = (seqs[:, :m] * V ** np.arange(m - 1, -1, -1)).sum(1) if m else np.zeros(len(seqs), int)
        table[OFFSET[m] + local] = logits[:, len(PROMPT) - 1 + m]
    return table


def exact_joint(target_logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """P(x1..xL) for all V^L outcomes, indexed by x1..xL in base V."""
    probs = processed_probs(target_logits[: OFFSET[L]], params)
    joint = np.ones(1)
    for m in range(L):
        rows = probs[OFFSET[m] : OFFSET[m + 1]]  # every prefix of length m, in base-V order
        joint = (joint[:, None] * rows).reshape(-1)
    return joint


def outcome(tokens) -> int:
    return int(sum(t * V ** (L - 1 - i) for i, t in enumerate(tokens[:L])))


@pytest.fixture(scope="module")
def models(tiny):
    target, draft = tiny.model("v6_target"), tiny.model("v6_draft")
    return target, draft, prefix_logits(target), prefix_logits(draft)


# ------------------------------------------------------------------------------------------------ engine draws


def engine_counts(target, make_proposer, params: SamplingParams, draws: int, stats: Stats) -> np.ndarray:
    """Histogram of the first L tokens over `draws` independent seeded speculative runs."""
    counts = np.zeros(V**L, np.int64)
    for i in range(draws):
        run_params = SamplingParams(params.temperature, params.top_k, params.top_p, params.min_p, seed=i)
        out = []
        for tokens in speculate(target, PROMPT, run_params, make_proposer(i), K, "replay", stats):
            out += tokens
            if len(out) >= L:
                break
        counts[outcome(out)] += 1
    return counts


def accept_without_ratio(target_logprobs, draft_logprobs, draft_tokens, key):
    """A wrong rule: keep every draft, then sample the bonus from the target. Drafts follow q, not p."""
    k = draft_tokens.shape[-1]
    return k, int(draw(target_logprobs[k], key))


def draft_model_proposer(draft, params):
    # At T = 1 always K drafts; otherwise the default early stop is on too (it must stay lossless).
    min_confidence = 0 if params.temperature == 1 else 0.3
    return lambda i: DraftModelProposer(draft, seed=10**6 + i, min_confidence=min_confidence)


@pytest.mark.parametrize("setting", SETTINGS)
def test_engine_sampling_matches_the_target(models, setting):
    target, draft, target_logits, _ = models
    params = SETTINGS[setting]
    stats = Stats()
    counts = engine_counts(target, draft_model_proposer(draft, params), params, ENGINE_DRAWS, stats)
    assert 0.2 < stats.acceptance_rate < 0.95  # drafts are both kept and rejected: the rule is exercised
    stat, critical = chi_square(counts, exact_joint(target_logits, params))
    assert stat < critical, f"{setting}: chi-square {stat:.1f} >= {critical:.1f}"


def test_engine_sampling_with_deterministic_drafts_matches_the_target(models):
    """Prompt lookup drafts a point mass: kept with probability p(draft), else resampled from p minus it."""
    target, _, target_logits, _ = models
    params = SETTINGS["T=1"]
    stats = Stats()
    counts = engine_counts(target, lambda i: NgramProposer(V), params, NGRAM_DRAWS, stats)
    assert stats.drafted > 0 and 0 < stats.accepted < stats.drafted
    stat, critical = chi_square(counts, exact_joint(target_logits, params))
    assert stat < critical, f"n-gram drafts: chi-square {stat:.1f} >= {critical:.1f}"


@pytest.mark.parametrize("setting", SETTINGS)
def test_engine_check_catches_a_wrong_acceptance_rule(models, setting, monkeypatch):
    target, draft, target_logits, _ = models
    params = SETTINGS[setting]
    monkeypatch.setattr(engine, "accept_sampled", accept_without_ratio)
    counts = engine_counts(target, draft_model_proposer(draft, params), params, WRONG_RULE_DRAWS, Stats())
    stat, critical = chi_square(counts, exact_joint(target_logits, params))
    assert stat > critical, f"{setting}: a wrong rule passed (chi-square {stat:.1f} < {critical:.1f})"


# ------------------------------------------------------------------------------------------------ batched draws


def accept_all_batched(target_logprobs, draft_logprobs, draft_tokens, key):
    k = draft_tokens.shape[-1]
    n = mx.full(draft_tokens.shape[:-1], k, mx.int32)
    return n, draw(target_logprobs[..., k, :], key)


def batched_counts(target_lp: mx.array, draft_lp: mx.array, rule, chains: int, seed: int) -> np.ndarray:
    """The engine's round, vectorised over chains: draft K tokens from q, verify with `rule`, append the
    accepted drafts and the rule's token; repeat until every chain has L tokens. Histogram of the first L."""
    key = mx.random.key(seed)
    out = np.zeros((chains, L + K), np.int64)
    length = np.zeros(chains, np.int64)
    local = np.zeros(chains, np.int64)  # the generated prefix in base V (index within its length)
    while (length < L).any():
        live = np.nonzero(length < L)[0]
        m, prefix = length[live], local[live]
        p_rows, q_rows, drafts = [OFFSET_NP[m] + prefix], [], []
        for j in range(K):
            key, sub = split_key(key)
            q_rows.append(OFFSET_NP[m + j] + prefix)
            d = np.array(mx.random.categorical(draft_lp[mx.array(q_rows[-1])], key=sub))
            drafts.append(d)
            prefix = prefix * V + d
            p_rows.append(OFFSET_NP[m + j + 1] + prefix)
        key, sub = split_key(key)
        drafts = np.stack(drafts, 1)
        n, nxt = rule(target_lp[mx.array(np.stack(p_rows, 1))], draft_lp[mx.array(np.stack(q_rows, 1))],
                      mx.array(drafts), sub)
        n, nxt = np.array(n), np.array(nxt)
        emitted = np.concatenate([drafts, np.zeros((len(live), 1), np.int64)], 1)
        emitted[np.arange(len(live)), n] = nxt  # accepted drafts, then the rule's token
        for j in range(K + 1):
            sel = j <= n
            rows = live[sel]
            out[rows, length[rows]] = emitted[sel, j]
            local[rows] = local[rows] * V + emitted[sel, j]
            length[rows] += 1
    return np.bincount((out[:, :L] * V ** np.arange(L - 1, -1, -1)).sum(1), minlength=V**L)


OFFSET_NP = np.array(OFFSET)


@pytest.mark.parametrize("setting", SETTINGS)
def test_batched_rejection_sampling_matches_the_target(models, setting):
    _, _, target_logits, draft_logits = models
    params = SETTINGS[setting]
    target_lp, draft_lp = log_probs(mx.array(target_logits), params), log_probs(mx.array(draft_logits), params)
    exact = exact_joint(target_logits, params)

    counts = batched_counts(target_lp, draft_lp, rejection_sample, CHAINS, seed=0)
    assert counts.sum() == CHAINS
    stat, critical = chi_square(counts, exact)
    assert stat < critical, f"{setting}: chi-square {stat:.1f} >= {critical:.1f}"

    counts = batched_counts(target_lp, draft_lp, accept_all_batched, CHAINS, seed=1)
    stat, critical = chi_square(counts, exact)
    assert stat > critical, f"{setting}: a wrong rule passed (chi-square {stat:.1f} < {critical:.1f})"


def test_critical_values_match_tables():
    # Upper 1e-4 points of chi-square (standard tables; df = 100 by integrating the gamma density).
    for df, exact, rel in [(10, 35.564, 0.015), (100, 161.32, 0.002)]:
        assert exact <= chi2_critical(df) <= exact * (1 + rel)
