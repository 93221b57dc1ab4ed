"""Speculative sampling stays lossless with the MTP proposer and with an adaptive draft length (auto K).

The same check as tests/test_spec_sampling.py, whose machinery is reused: the real engine is sampled a few
thousand times, and the joint distribution of the first L = 3 emitted tokens is compared by chi-square
(p = 1e-4) with the exact one computed from the target's own logits.

- MTP: the vocabulary-6 hybrid MoE target with a random MTP head added to its checkpoint (tests/test_mtp.py's
  helpers). With six tokens its logits already spread (top probability ~0.2-0.3 per step), so the head drafts
  tokens that are kept about half the time: both branches of the acceptance rule run. At T = 1 and with
  temperature + top-k + top-p; and a rule that keeps drafts without the p/q ratio test must fail the check.
- auto K: the same target with the vocabulary-6 dense draft and a fresh `AdaptiveK` per draw. On this CPU the
  policy would measure that drafting does not pay and stay at K = 0, so it starts from timings of a device
  where verification is cheap; then the K it asks for follows the acceptances it sees within the draw.
"""

import json
from collections import Counter

import numpy as np
import pytest

from specdec import engine
from specdec.adaptive import AdaptiveK
from specdec.drafts import DraftModelProposer, MTPProposer
from specdec.drafts.mtp import load_mtp
from specdec.engine import Stats, speculate
from specdec.loading import load_model
from specdec.sampling import SamplingParams
from test_mtp import random_mtp, with_mtp
from test_spec_sampling import (L, PROMPT, SETTINGS, V, WRONG_RULE_DRAWS, accept_without_ratio, chi_square,
                                engine_counts, exact_joint, outcome, prefix_logits)

DRAWS = 2000
MAX_K = 4


@pytest.fixture(scope="module")
def mtp_target(tiny, tmp_path_factory):
    src = tiny.path("v6_target")
    config = json.loads((src / "config.json").read_text())
    folder = tmp_path_factory.mktemp("v6_mtp") / "target"
    with_mtp(src, folder, random_mtp(config, seed=13))
    target = load_model(folder)[0]
    return target, load_mtp(target), prefix_logits(target)


def mtp_proposer(target, head):
    return lambda i: MTPProposer(target, mtp=head, seed=10**6 + i)


@pytest.mark.parametrize("setting", SETTINGS)
def test_mtp_sampling_matches_the_target(mtp_target, setting):
    target, head, target_logits = mtp_target
    params = SETTINGS[setting]
    stats = Stats()
    counts = engine_counts(target, mtp_proposer(target, head), params, DRAWS, stats)
    assert stats.drafted >= DRAWS  # the head drafts (every round but a prompt's first has a hidden state)
    assert 0.1 < stats.acceptance_rate < 0.9, stats.acceptance_rate  # drafts are both kept and rejected
    stat, critical = chi_square(counts, exact_joint(target_logits, params))
    assert stat < critical, f"MTP, {setting}: chi-square {stat:.1f} >= {critical:.1f}"


def test_mtp_check_catches_a_wrong_acceptance_rule(mtp_target, monkeypatch):
    target, head, target_logits = mtp_target
    params = SETTINGS["T=1"]
    monkeypatch.setattr(engine, "accept_sampled", accept_without_ratio)
    counts = engine_counts(target, mtp_proposer(target, head), params, WRONG_RULE_DRAWS, Stats())
    stat, critical = chi_square(counts, exact_joint(target_logits, params))
    assert stat > critical, f"a wrong rule passed with MTP drafts (chi-square {stat:.1f} < {critical:.1f})"


# ------------------------------------------------------------------------------------------------ auto K


def policy_on_a_cheap_verifier() -> AdaptiveK:
    """An AdaptiveK that has timed windows of 1..MAX_K+1 tokens on a device where a window of S tokens costs
    1 + 0.05 (S - 1) decode steps and a draft token 0.02 of one (a GPU-like curve). Three timings per size
    stay in its lower-quartile estimate through the few real rounds of a draw, so its K choices depend only
    on the acceptances it sees."""
    policy = AdaptiveK(max_k=MAX_K)
    step = 1e-4  # seconds: below any real step here, so real timings never become the low quartile
    for s in range(1, MAX_K + 2):
        for _ in range(4):  # the first timing of each size is dropped as a possible compile
            policy.observe(s - 1, 0, (s - 1) * 0.02 * step, step * (1 + 0.05 * (s - 1)))
    return policy


def auto_k_counts(target, draft, params: SamplingParams, draws: int, stats: Stats, asked: Counter):
    """test_spec_sampling.engine_counts with a fresh adaptive K per draw; `asked` counts the K of each round."""
    counts = np.zeros(V**L, np.int64)
    for i in range(draws):
        run_params = SamplingParams(params.temperature, params.top_k, params.top_p, params.min_p, seed=i)
        policy = policy_on_a_cheap_verifier()
        proposer = DraftModelProposer(draft, seed=10**6 + i, min_confidence=0)
        out = []
        for tokens in speculate(target, PROMPT, run_params, proposer, policy, "replay", stats):
            asked[policy.asked] += 1
            out += tokens
            if len(out) >= L:
                break
        counts[outcome(out)] += 1
    return counts


def test_auto_k_sampling_matches_the_target(tiny):
    target, draft = tiny.model("v6_target"), tiny.model("v6_draft")
    params = SETTINGS["T=1"]
    stats, asked = Stats(), Counter()
    counts = auto_k_counts(target, draft, params, DRAWS, stats, asked)
    assert len([k for k in asked if k > 0]) >= 2, asked  # K follows the acceptances: several sizes are used
    assert 0.2 < stats.acceptance_rate < 0.95, stats.acceptance_rate
    stat, critical = chi_square(counts, exact_joint(prefix_logits(target), params))
    assert stat < critical, f"auto K: chi-square {stat:.1f} >= {critical:.1f}"
