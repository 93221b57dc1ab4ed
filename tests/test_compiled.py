"""Compiled steps (specdec/models/compiled.py) against the eager forward they replace: the same logits and
hidden states, the same caches after every commit, and speculative output equal to plain greedy decoding.
They run by default on GPUs only, so CI turns them on here (SPECDEC_COMPILE=1) on the CPU."""

import random

import mlx.core as mx
import numpy as np
import pytest

from specdec.cache import KVCache, make_cache
from specdec.drafts import DraftModelProposer
from specdec.models import compiled
from test_engine import METHODS, assert_matches_greedy, noisy_copy, random_prompt, run


@pytest.fixture
def compiled_steps(monkeypatch):
    monkeypatch.setenv("SPECDEC_COMPILE", "1")
    assert compiled.enabled()


def cache_arrays(cache):
    """What each layer holds, KV buffers cut to their offset."""
    out = []
    for c in cache:
        out += list(c.state) if isinstance(c, KVCache) else [c.conv_state, c.state]
    return out


@pytest.mark.parametrize("target", ["moe", "next"])
@pytest.mark.parametrize("method", METHODS)
def test_compiled_step_equals_eager(tiny, target, method, compiled_steps):
    """Windows of 1..12 tokens with random commits, past a KV buffer growth (offset 250 -> ~400): every
    step's logits and hidden states, and every cache after its commit (prepared ahead or not), equal the eager
    path's."""
    model = tiny.model(target)
    rng = random.Random(3)
    prompt = random_prompt(250, seed=5)
    eager, fast = make_cache(model, method), make_cache(model, method)
    for cache in (eager, fast):
        model.forward(mx.array([prompt]), cache)
    for step in range(24):
        S = rng.randint(1, 12)
        tokens = mx.array([random_prompt(S, seed=step)])
        keep = rng.randint(0, S) if step % 3 else S  # every third window is kept whole
        eager.begin_window(), fast.begin_window()
        want = model.forward(tokens, eager, return_hidden=True)
        got = model(tokens, fast, return_hidden=True)
        for a, b in zip(want, got):
            assert mx.allclose(a, b, rtol=1e-5, atol=1e-5).item(), f"step {step}, S={S}"
        if step % 2:
            fast.prepare_commit()  # as the engine does: the commit becomes a pick made ahead
        eager.commit(keep), fast.commit(keep)
        assert eager.offset == fast.offset
        for a, b in zip(cache_arrays(eager), cache_arrays(fast)):
            assert a.shape == b.shape and mx.allclose(a, b, rtol=1e-5, atol=1e-5).item(), f"after step {step}"
    assert model._steps._fns, "the compiled path did not run"
    assert max(c.capacity for c in fast if isinstance(c, KVCache)) >= 512  # the buffer grew on the way


@pytest.mark.parametrize("draft", ["hybrid", "noisy"])
def test_compiled_speculation_is_lossless(tiny, draft, monkeypatch):
    """Speculative decoding through compiled steps (target and draft) gives the tokens of eager plain greedy
    decoding."""
    target = tiny.model("moe")
    rng = random.Random(11)
    for case in range(4):
        prompt = random_prompt(rng.randint(1, 120), seed=case)
        n_new, k, method = rng.randint(20, 90), rng.randint(1, 8), rng.choice(METHODS)
        monkeypatch.setenv("SPECDEC_COMPILE", "0")
        reference = [int(t) for t in run(target, prompt, n_new + 8)]
        monkeypatch.setenv("SPECDEC_COMPILE", "1")
        model = noisy_copy(tiny.path("moe"), 0.01, seed=case) if draft == "noisy" else tiny.model(draft)
        got = run(target, prompt, n_new, DraftModelProposer(model, method, min_confidence=0), k, method)
        assert_matches_greedy(target, prompt, got[: n_new + 8], reference, f"case {case}, K={k}, {method}")


def ops_in_place_of_the_kernel(layer, conv_in, proj, state, keep_states, keep_tape=False):
    """gdn_cuda.mixer's contract, computed by the operations it fuses (the kernel itself needs CUDA)."""
    parts = {p: proj[..., at : at + layer.part_sizes[p]] for p, at in layer.offsets.items()}
    out, final, tape, states = layer.mixer_ops(conv_in, parts["z"], parts["b"], parts["a"], state, keep_states)
    return out, final, states, (tape if keep_tape else None)


def test_kernel_paths_keep_speculation_lossless(tiny, monkeypatch):
    """The branches taken on CUDA (the fused GDN mixer, the MoE kernels with the residual folded in), with the
    kernels' contracts stood in by operations: decode and verify windows go through them with either commit
    method, and speculative output still equals plain greedy decoding."""
    from specdec.models import gdn_cuda, kernels, moe_cuda

    target = tiny.model("moe")
    prompt = random_prompt(40, seed=2)
    monkeypatch.setenv("SPECDEC_COMPILE", "0")
    reference = [int(t) for t in run(target, prompt, 60)]
    calls, moe_tokens = [], []

    def mixer(layer, conv_in, proj, state, keep_states, keep_tape=False):
        calls.append((keep_states, keep_tape))
        return ops_in_place_of_the_kernel(layer, conv_in, proj, state, keep_states, keep_tape)

    def moe(layer, x, residual=None):  # moe_cuda.moe's contract
        moe_tokens.append(x.shape[0])
        y = layer.ops(x)
        return y if residual is None else residual + y

    monkeypatch.setattr(kernels, "ready", lambda name: name in ("gdn_mixer", "moe"))
    monkeypatch.setattr(gdn_cuda, "mixer_usable", lambda layer: True)  # the real kernel needs whole warps of columns
    monkeypatch.setattr(gdn_cuda, "mixer", mixer)
    monkeypatch.setattr(moe_cuda, "usable", lambda layer, x: True)  # the real kernels need quantized bf16 weights
    monkeypatch.setattr(moe_cuda, "moe", moe)
    for compile_steps in ("0", "1"):
        monkeypatch.setenv("SPECDEC_COMPILE", compile_steps)
        for method in METHODS:
            calls.clear(), moe_tokens.clear()
            proposer = DraftModelProposer(noisy_copy(tiny.path("moe"), 0.01, seed=1), method, min_confidence=0)
            got = run(target, prompt, 52, proposer, 4, method)
            assert_matches_greedy(target, prompt, got[:60], reference, f"{method}, compiled {compile_steps}")
            # verify windows ran fused, keeping what their commit method needs
            assert (True, False) in calls if method == "states" else (False, True) in calls
            assert 1 in moe_tokens and 5 in moe_tokens and max(moe_tokens) <= moe_cuda.MAX_TOKENS


def test_new_weights_drop_compiled_steps(tiny, compiled_steps):
    """A trace holds the weights it was made with: loading new ones through the model must not leave a stale
    trace in use."""
    from mlx.utils import tree_map

    from specdec.loading import load_model

    model = load_model(tiny.path("moe"))[0]
    prompt, window = mx.array([random_prompt(20, seed=1)]), mx.array([random_prompt(3, seed=2)])

    def step(forward):
        cache = make_cache(model)
        model.forward(prompt, cache)
        return forward(window, cache)

    before = step(model)
    assert model._steps._fns
    model.update(tree_map(lambda p: p * 1.5, model.parameters()))
    after, eager = step(model), step(model.forward)
    assert mx.allclose(after, eager, rtol=1e-5, atol=1e-5).item()
    assert not mx.allclose(after, before, rtol=1e-3, atol=1e-3).item()
