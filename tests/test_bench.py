"""`specdec bench` on the tiny arch: the report's structure, the oracle draft, the unfused MoE reference, and
the copy of our model into mlx-lm (checked against mlx-lm's own forward)."""

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from specdec import bench
from specdec.cli import main
from specdec.errors import BenchError

# A window vs one-by-one forwards differ by rounding only: under 0.05 on the CPU, 0.056-0.061 with the bfloat16
# kernels of an H100. A wrong product gave 0.9.
ROUNDING = 0.1


def tiny_model(model_type="qwen3_5_moe", layers=4, dtype=mx.float32, bits=16):
    cfg = replace(bench.arch_config("tiny", layers), model_type=model_type)
    return bench.build_target(cfg, bits, seed=0, dtype=dtype)


TIMED = ("ms", "seconds", "per_s", "gbs", "speedup", "tau", "over_mlx_lm", "bytes", "total")


def timed_numbers(tree, key=""):
    """(key, value) of every leaf whose name says it is a time, rate, ratio or size."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from timed_numbers(v, k)
    elif isinstance(tree, list):
        for v in tree:
            yield from timed_numbers(v, key)
    elif key.endswith(TIMED):
        yield key, tree


def test_cli_report(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--arch", "tiny", "--layers", "4", "--context", "24", "--prefill", "24", "--repeats", "2",
                 "--gen-tokens", "8", "--quick", "--output", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    assert report["meta"]["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]

    assert [r["tokens"] for r in report["prefill"]] == [24]
    assert [r["S"] for r in report["step"]] == [1, 2, 4, 8, 16]
    assert set(report["commit"]) == {"replay", "states"}
    for row in report["commit"].values():
        assert row["commit_alone_ms"] > 0 and row["commit_in_round_ms"] >= 0
        assert row["window_bytes"]["total"] == sum(v for k, v in row["window_bytes"].items() if k != "total")
    assert report["commit"]["replay"]["window_bytes"]["states"] == 0
    assert report["commit"]["states"]["window_bytes"]["tape"] == 0
    # "states" holds one fp32 state per window token and GDN layer: 4 v-heads x 32 x 32 x 4 bytes x 5 x 3 layers
    assert report["commit"]["states"]["window_bytes"]["states"] == 4 * 32 * 32 * 4 * 5 * 3
    assert [r["S"] for r in report["moe"]] == [1, 5, 16]
    assert [r["S"] for r in report["components"]] == [1, 16]
    assert set(report["components"][0]) == {"S", "lm_head_ms", "gdn_layer_ms", "attention_layer_ms", "moe_layer_ms"}
    assert report["consistency"]["same_argmax"] == 1.0 and report["consistency"]["hidden_max_rel_diff"] < ROUNDING
    bw = report["bandwidth"]
    assert bw["bytes"]["total"] == sum(v for k, v in bw["bytes"].items() if k != "total")

    spec = report["speculative"]
    assert [(r["alpha"], r["K"]) for r in spec["runs"]] == [(0.8, 1), (0.8, 4), (0.8, "auto")]
    for r in spec["runs"]:
        max_k = 4 if r["K"] == "auto" else r["K"]
        assert r["tokens"] >= 8 and 1 <= r["tau"] <= max_k + 1
        if r["K"] != "auto":  # the same run with its draft cost added (auto K runs twice: no such order)
            assert r["tokens_per_s_with_draft_cost"] < r["tokens_per_s"]
    assert 0 <= spec["runs"][-1]["mean_K"] <= 4

    lm = report["mlx_lm"]
    if "skipped" not in lm:
        assert "error" not in lm, lm
        check = lm["logits_check"]  # bf16 rounding differs between the two; the fp32 test below is exact
        assert 0 <= check["max_abs_diff"] < 0.5 * check["max_abs_logit"]
        assert [r["S"] for r in lm["step"]] == [1, 2, 4, 8, 16] and [r["tokens"] for r in lm["prefill"]] == [24]

    numbers = [(k, v) for k, v in timed_numbers({k: v for k, v in report.items() if k != "meta"})
               # unknown off GPUs; one method holds no tape/states; a difference of two timings, may be 0
               if k not in ("nominal_gbs", "states", "tape", "commit_in_round_ms")]
    assert len(numbers) > 40 and all(isinstance(v, (int, float)) and v > 0 for _, v in numbers), numbers
    table = capsys.readouterr().out
    assert "step" in table and "alpha" in table and "bandwidth" in table


def test_bad_options():
    for bad in (dict(arch="gpt5"), dict(bits=5), dict(alphas=(1.5,)), dict(layers=0), dict(prefill=()),
                dict(draft_cost_ms=-1.0), dict(step_sizes=(0,))):
        with pytest.raises(BenchError):
            bench.BenchOptions(**bad).check()
    assert main(["bench", "--arch", "gpt5"]) == 2


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_oracle_sets_acceptance_and_output_stays_greedy(alpha):
    model = tiny_model(layers=2)
    rng = np.random.default_rng(1)
    prompt = bench.random_tokens(rng, model.config.vocab_size, 20)
    K, n = 3, 16
    reference = bench.greedy_continuation(model, prompt, n + K + 1)
    oracle = bench.OracleProposer(model, prompt, reference, alpha)
    out, seconds, stats = bench.run_decode(model, prompt, n, oracle, K)
    assert out == reference[: len(out)]  # lossless: speculation never changes greedy output
    assert oracle.resyncs == 0 and seconds > 0
    if alpha == 1.0:
        assert stats.acceptance_rate == 1.0 and stats.tau == K + 1
    else:
        assert stats.accepted == 0 and stats.tau == 1.0


def test_oracle_coins_belong_to_positions_not_to_k():
    """With one seed, the draft offered for an output position is right or wrong alike whatever K asks for it,
    so runs of different K are compared on the same luck."""
    model = tiny_model(layers=2)
    prompt = bench.random_tokens(np.random.default_rng(1), model.config.vocab_size, 20)
    reference = bench.greedy_continuation(model, prompt, 40)
    short, long = (bench.OracleProposer(model, prompt, reference, 0.5, seed=7) for _ in range(2))
    for oracle in (short, long):
        oracle.prefill(prompt)
    two = short.propose(reference[0], 2, None)[0].tolist()
    eight = long.propose(reference[0], 8, None)[0].tolist()
    assert two == eight[:2] and eight != reference[1:9]  # some wrong at alpha 0.5
    short.commit(0, reference[1])  # rejected at once: the next round drafts from the following position
    long.commit(0, reference[1])
    assert short.propose(reference[1], 3, None)[0].tolist() == long.propose(reference[1], 5, None)[0].tolist()[:3]


def test_greedy_head_gives_a_stable_successor_chain():
    cfg = bench.arch_config("tiny", 4)
    successor = np.array(bench.greedy_head(cfg, seed=0)[2])
    assert sorted(successor.tolist()) == list(range(cfg.vocab_size))  # a permutation
    model = bench.build_target(cfg, 4, seed=0)  # bfloat16, 4-bit: the margin survives both
    prompt = bench.random_tokens(np.random.default_rng(3), cfg.vocab_size, 12)
    chain = bench.greedy_continuation(model, prompt, 10)
    assert chain == [int(successor[t]) for t in [prompt[-1]] + chain[:-1]]
    cache, _ = bench.prefill(model, prompt)
    check = bench.window_consistency(model, cache, 5, np.random.default_rng(4))
    assert check["same_argmax"] == 1.0 and check["hidden_max_rel_diff"] < ROUNDING


def test_expected_tau():
    assert bench.expected_tau(1.0, 4) == 5.0
    assert bench.expected_tau(0.0, 4) == 1.0
    assert bench.expected_tau(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)


@pytest.mark.parametrize("bits", [16, 4])
def test_unfused_moe_matches_fused(bits):
    model = tiny_model(layers=1, bits=bits)
    moe = model.model.layers[0].mlp
    ref = bench.unfused_copy(moe, model.config)
    for S in (1, 40):  # below and above the sort-by-expert threshold
        x = mx.random.normal((1, S, model.config.hidden_size), key=mx.random.key(S))
        assert np.allclose(np.array(moe(x)), np.array(ref(x)), atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen3_5_moe", "qwen3_next"])
def test_mlx_lm_copy_computes_our_logits(model_type):
    pytest.importorskip("mlx_lm")
    model = tiny_model(model_type)
    rng = np.random.default_rng(2)
    prompt = bench.random_tokens(rng, model.config.vocab_size, 21)
    lm = bench.build_mlx_lm(model, 16)
    # a whole prompt, no cache: mlx-lm's own forward is the reference
    ours, theirs = model(mx.array([prompt])), lm(mx.array([prompt]))
    assert np.abs(np.array(ours - theirs)).max() < 1e-4 * np.abs(np.array(theirs)).max()
    # one step on mlx-lm's cache converted from ours
    cache, _ = bench.prefill(model, prompt[:-1])
    lm_cache = bench.mlx_lm_cache_from(lm, cache)
    token = mx.array([[prompt[-1]]])
    ours, theirs = model(token, cache)[0, -1], lm(token, cache=lm_cache)[0, -1]
    assert np.abs(np.array(ours - theirs)).max() < 1e-4 * np.abs(np.array(theirs)).max()


def test_step_bytes_counts_active_experts_only():
    model = tiny_model(layers=4, dtype=mx.bfloat16, bits=4)
    cfg = model.config
    cache, _ = bench.prefill(model, list(range(10)))
    read = bench.step_bytes(model, cache)
    layer = model.model.layers[0]
    experts = sum(p.nbytes for p in (layer.mlp.experts.gate_up.weight, layer.mlp.experts.gate_up.scales,
                                     layer.mlp.experts.gate_up.biases, layer.mlp.experts.down.weight,
                                     layer.mlp.experts.down.scales, layer.mlp.experts.down.biases))
    assert read["active_experts"] == round(4 * experts * cfg.num_experts_per_tok / cfg.num_experts)
    kv = 2 * cfg.num_key_value_heads * 10 * cfg.head_dim * 2  # one attention layer, bf16 keys and values
    gdn = 3 * (cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim * 4
               + 3 * (2 * cfg.linear_num_key_heads * cfg.linear_key_head_dim
                      + cfg.linear_num_value_heads * cfg.linear_value_head_dim) * 2)
    assert read["cache"] == kv + gdn
