"""The public API (generate / stream_generate) and the `specdec generate` command on a tiny checkpoint.

The checkpoint has a character-level tokenizer (one token per character, "<eos>" = 0), so text positions
are token positions. The draft is the target itself (full acceptance, K = 3), so rounds are windows of up to
four tokens, and EOS, stop strings and max_tokens can be placed in the middle of one. Expected outputs come
from plain greedy decoding of the target (the engine with no proposer, which ignores EOS).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from specdec.cli import main
from specdec.engine import speculate
from specdec.errors import DraftError, PromptError, SamplingError
from specdec.generate import generate, load, stream_generate
from specdec.sampling import SamplingParams

PROMPT = "def f(x):"
K = 3
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def api(tiny):
    model, tokenizer = load(tiny.path("confident"))
    ids = tokenizer.encode(PROMPT)
    reference = []
    for tokens in speculate(model, ids, SamplingParams(), None, 0):
        reference += tokens
        if len(reference) >= 60:
            break
    assert 0 not in reference[:60], "the prompt must not reach <eos> early: pick another PROMPT"
    # The rounds a self-drafting run takes (EOS-free prefix): which positions are mid-window.
    rounds = [c.tokens for c in stream_generate(model, tokenizer, PROMPT, draft=model, num_draft_tokens=K,
                                               max_tokens=40)]
    assert sum(rounds, []) == reference[:40]
    return model, tokenizer, reference, rounds


def mid_window_positions(rounds):
    """Positions j (0-based, in the generated tokens) with tokens of the same round after them."""
    positions, start = [], 0
    for r in rounds:
        positions += range(start, start + len(r) - 1)
        start += len(r)
    return positions


def round_ends(rounds):
    ends, start = [], 0
    for r in rounds:
        start += len(r)
        ends.append(start - 1)
    return ends


# ------------------------------------------------------------------------------------------------ API


@pytest.mark.parametrize("draft", ["model", "path", None])
def test_generate_returns_the_greedy_continuation(tiny, api, draft):
    model, tokenizer, reference, _ = api
    draft_arg = {"model": model, "path": str(tiny.path("confident")), None: None}[draft]
    r = generate(model, tokenizer, PROMPT, draft=draft_arg, num_draft_tokens=K, max_tokens=25)
    assert r.tokens == reference[:25]
    assert r.text == tokenizer.decode(reference[:25])
    assert r.finish_reason == "length"
    assert r.prompt_tokens == len(tokenizer.encode(PROMPT)) and r.generation_tokens == 25
    assert r.prompt_tps > 0 and r.generation_tps > 0
    s = r.stats
    assert s.emitted + 1 >= 25 and s.emitted == s.accepted + s.rounds  # + the prefill's first token
    if draft is None:
        assert s.drafted == 0 and s.rounds == 24 and s.tau == 1  # the first of the 25 tokens came with the prefill
    else:
        assert s.accepted > 0 and s.tau > 1 and s.acceptance_rate > 0.5


def test_adaptive_k_is_lossless(api):
    model, tokenizer, reference, _ = api
    r = generate(model, tokenizer, PROMPT, draft=model, num_draft_tokens="auto", max_tokens=40)
    assert r.tokens == reference[:40] and r.finish_reason == "length"
    assert r.stats.emitted == r.stats.accepted + r.stats.rounds


def test_max_tokens_is_exact_inside_a_window(api):
    model, tokenizer, reference, rounds = api
    inside = set(mid_window_positions(rounds))
    for n in range(1, 13):
        chunks = list(stream_generate(model, tokenizer, PROMPT, draft=model, num_draft_tokens=K, max_tokens=n))
        tokens = sum((c.tokens for c in chunks), [])
        assert tokens == reference[:n] and chunks[-1].finish_reason == "length", n
        assert "".join(c.text for c in chunks) == tokenizer.decode(reference[:n])
    assert inside & set(range(12)), "no max_tokens fell inside a window"


def test_eos_inside_a_window_ends_the_output_there(api, monkeypatch):
    model, tokenizer, reference, rounds = api
    # A token first seen in the middle of a window becomes the EOS: what the window drafted after it is dropped.
    j = next(j for j in mid_window_positions(rounds) if j > 2 and reference[j] not in reference[:j])
    monkeypatch.setattr(model.config, "eos_token_id", [reference[j]])
    r = generate(model, tokenizer, PROMPT, draft=model, num_draft_tokens=K, max_tokens=40)
    assert r.finish_reason == "stop"
    assert r.tokens == reference[:j] and r.text == tokenizer.decode(reference[:j])
    chunks = list(stream_generate(model, tokenizer, PROMPT, draft=model, num_draft_tokens=K, max_tokens=40))
    assert sum((c.tokens for c in chunks), []) == reference[:j]
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]


def test_eos_from_the_tokenizer_stops_generation(api):
    model, tokenizer, _, _ = api
    assert tokenizer.eos_token_ids == {0}
    out = []
    for tokens in speculate(model, tokenizer.encode("Hello world"), SamplingParams(), None, 0):
        out += tokens
        if 0 in out or len(out) > 60:
            break
    assert 0 in out, "with this checkpoint, plain decoding of 'Hello world' reaches <eos> within a few tokens"
    r = generate(model, tokenizer, "Hello world", draft=model, num_draft_tokens=K, max_tokens=60)
    assert r.finish_reason == "stop" and r.tokens == out[: out.index(0)]
    assert r.text == tokenizer.decode(out[: out.index(0)]) and "<eos>" not in r.text


@pytest.mark.parametrize("where", ["mid-window", "across-rounds"])
def test_stop_string_truncates_the_text(api, where):
    model, tokenizer, reference, rounds = api
    full = tokenizer.decode(reference[:40])
    assert len(full) == 40  # one character per token
    if where == "mid-window":  # the stop string starts and ends inside one window
        starts = [j for j in mid_window_positions(rounds) if j + 1 in mid_window_positions(rounds)]
        length = 2
    else:  # it starts on the last token of one round and ends in the next
        starts, length = round_ends(rounds)[1:-2], 3
    j = next(j for j in starts if full.find(full[j : j + length]) == j)
    stop = full[j : j + length]
    chunks = list(stream_generate(model, tokenizer, PROMPT, draft=model, num_draft_tokens=K, max_tokens=40,
                                  stop=["never appears \x00", stop]))
    assert all(stop not in c.text for c in chunks)
    assert "".join(c.text for c in chunks) == full[:j]
    assert chunks[-1].finish_reason == "stop"
    r = generate(model, tokenizer, PROMPT, draft=model, num_draft_tokens=K, max_tokens=40, stop=[stop])
    assert r.text == full[:j] and r.finish_reason == "stop"


def test_streamed_pieces_concatenate_to_the_final_text(api):
    model, tokenizer, reference, _ = api
    for stop in (None, ["\x00\x00\x00"]):  # a stop string that never comes holds back a tail, then releases it
        kwargs = dict(draft=model, num_draft_tokens=K, max_tokens=30, stop=stop)
        chunks = list(stream_generate(model, tokenizer, PROMPT, **kwargs))
        result = generate(model, tokenizer, PROMPT, **kwargs)
        assert "".join(c.text for c in chunks) == result.text == tokenizer.decode(reference[:30])
        assert sum((c.tokens for c in chunks), []) == result.tokens
        assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
        assert len(chunks) > 2


ERRORS = {
    "empty prompt": (dict(prompt=""), PromptError, "empty"),
    "blank prompt": (dict(prompt="   "), PromptError, "empty"),
    "prompt longer than the context": (dict(prompt="a" * 600), PromptError, "context"),
    "temperature -1": (dict(temperature=-1), SamplingError, "temperature"),
    "top_p 0": (dict(top_p=0), SamplingError, "top_p"),
    "top_k -3": (dict(top_k=-3), SamplingError, "top_k"),
    "num_draft_tokens -1": (dict(num_draft_tokens=-1), DraftError, "num_draft_tokens"),
    "max_tokens 0": (dict(max_tokens=0), SamplingError, "max_tokens"),
    "draft vocabulary mismatch": (dict(draft="v6_draft"), DraftError, "vocabulary"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_bad_inputs_raise_specific_errors(tiny, api, case):
    model, tokenizer, _, _ = api
    changes, error, word = ERRORS[case]
    kwargs = dict(prompt=PROMPT, draft=model, num_draft_tokens=K, max_tokens=5)
    kwargs.update(changes)
    if kwargs["draft"] == "v6_draft":
        kwargs["draft"] = tiny.model("v6_draft")
    prompt = kwargs.pop("prompt")
    with pytest.raises(error, match=word):
        generate(model, tokenizer, prompt, **kwargs)
    with pytest.raises(error, match=word):
        next(stream_generate(model, tokenizer, prompt, **kwargs))
    if case == "draft vocabulary mismatch":  # as a path too
        kwargs["draft"] = str(tiny.path("v6_draft"))
        with pytest.raises(DraftError, match=word):
            generate(model, tokenizer, prompt, **kwargs)


# ------------------------------------------------------------------------------------------------ CLI


def cli_args(tiny, *extra, prompt=PROMPT):
    path = str(tiny.path("confident"))
    return ["generate", "--model", path, "--draft", path, "-K", str(K), "--max-tokens", "20", *extra, prompt]


def test_cli_prints_text_and_stats(tiny, api, capsys):
    model, tokenizer, reference, _ = api
    capsys.readouterr()
    assert main(cli_args(tiny)) == 0
    out, err = capsys.readouterr()
    assert out == tokenizer.decode(reference[:20]) + "\n"
    assert "20 tokens" in err and "finish: length" in err
    assert "tau" in err and "acceptance" in err and "rounds" in err


def test_cli_json(tiny, api, capsys):
    model, tokenizer, reference, _ = api
    capsys.readouterr()
    assert main(cli_args(tiny, "--json")) == 0
    out, _ = capsys.readouterr()
    report = json.loads(out)
    assert report["text"] == tokenizer.decode(reference[:20])
    assert report["finish_reason"] == "length" and report["generation_tokens"] == 20
    assert report["emitted"] == report["accepted"] + report["rounds"]
    assert report["tau"] == pytest.approx(report["emitted"] / report["rounds"]) and report["tau"] > 1
    assert 0 < report["acceptance_rate"] <= 1 and len(report["acceptance_by_position"]) == K


CLI_ERRORS = {
    "empty prompt": dict(prompt=""),
    "prompt longer than the context": dict(prompt="a" * 600),
    "temperature -1": dict(extra=["--temp", "-1"]),
    "top_p 0": dict(extra=["--top-p", "0"]),
    "top_k -3": dict(extra=["--top-k", "-3"]),
    "num_draft_tokens -1": dict(extra=["-K", "-1"]),
    "max_tokens 0": dict(extra=["--max-tokens", "0"]),
    "draft vocabulary mismatch": dict(extra=["--draft", "v6_draft"]),
    "missing model folder": dict(extra=["--model", "MISSING"]),
}


@pytest.mark.parametrize("case", CLI_ERRORS)
def test_cli_errors_are_one_line_and_exit_2(tiny, capsys, tmp_path, case):
    spec = CLI_ERRORS[case]
    extra = [{"v6_draft": str(tiny.path("v6_draft")), "MISSING": str(tmp_path / "missing")}.get(a, a)
             for a in spec.get("extra", [])]
    args = cli_args(tiny, *extra, prompt=spec.get("prompt", PROMPT))
    capsys.readouterr()
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("specdec: error: "), err


def test_console_script_exit_codes(tiny, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    ok = subprocess.run([sys.executable, "-m", "specdec.cli", *cli_args(tiny)], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(ok.stdout) == 21  # 20 one-character tokens and a newline
    bad = subprocess.run([sys.executable, "-m", "specdec.cli", *cli_args(tiny, "--temp", "-1")], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("specdec: error: ") and bad.stdout == ""
