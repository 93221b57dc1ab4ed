"""Quantizing a float checkpoint on load (`load_model(..., quantize=bits)`, `--quantize BITS`).

The reference is mlx-lm: `mlx_lm.convert` quantizes the same Hugging Face checkpoint with its own recipe for
these models (4-bit, group 64, router gates 8-bit), and that folder, loaded by us, must give the logits that
quantizing on load gives. Then the quantized model generates, and speculative greedy equals plain greedy.
"""

import contextlib
import io

import mlx.core as mx
import mlx.nn
import numpy as np
import pytest

from specdec.cli import main
from specdec.drafts import DraftModelProposer
from specdec.engine import Stats, speculate
from specdec.errors import ConfigError
from specdec.generate import generate, load
from specdec.loading import load_model
from specdec.models.layers import QuantizedEmbedding
from specdec.sampling import SamplingParams
from test_quantized import PROMPT, rel_err, write_hf_checkpoint

mlx_lm = pytest.importorskip("mlx_lm")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(float HF checkpoint, its mlx-lm 4-bit conversion)."""
    folder = tmp_path_factory.mktemp("quantize_on_load")
    src = write_hf_checkpoint("qwen3_next", {}, folder)
    with contextlib.redirect_stdout(io.StringIO()):
        mlx_lm.convert(str(src), str(folder / "mlx"), quantize=True, q_bits=4, q_group_size=64, dtype="float32")
    return src, folder / "mlx"


def test_quantize_on_load_matches_mlx_lm_conversion(checkpoints):
    src, converted = checkpoints
    ours = load_model(src, quantize=4)[0]
    reference = load_model(converted)[0]
    layer = ours.model.layers[0].mlp
    assert layer.gate.bits == 8 and layer.shared_expert_gate.bits == 8
    assert layer.experts.gate_up.bits == 4 and ours.lm_head.bits == 4 and ours.model.embed_tokens.bits == 4
    assert ours.quantization["bits"] == 4 and ours.quantization["_overrides"]
    tokens = mx.array([PROMPT])
    assert rel_err(np.array(ours(tokens)), np.array(reference(tokens))) < 1e-5
    assert rel_err(np.array(ours(tokens)), np.array(load_model(src)[0](tokens))) > 1e-3  # really quantized


def test_quantized_embedding_takes_rows_as_mlx_does(checkpoints):
    """Both ways to a quantized model give our embedding lookup (rows taken through the flattened tokens), with
    MLX's QuantizedEmbedding's values."""
    src, converted = checkpoints
    tokens = mx.array([PROMPT, PROMPT[::-1]])
    for model in (load_model(src, quantize=4)[0], load_model(converted)[0]):
        embed = model.model.embed_tokens
        assert isinstance(embed, QuantizedEmbedding)
        assert mx.array_equal(embed(tokens), mlx.nn.QuantizedEmbedding.__call__(embed, tokens))


def first_tokens(target, prompt, proposer, k, n, stats):
    out = []
    for tokens in speculate(target, prompt, SamplingParams(), proposer, k, stats=stats):
        out += tokens
        if len(out) >= n:
            return out[:n]


def test_quantized_speculation_is_lossless(checkpoints):
    src, _ = checkpoints
    target = load_model(src, quantize=4)[0]
    draft = load_model(src, quantize=8)[0]  # a close draft: drafts are kept and rejected
    stats = Stats()
    plain = first_tokens(target, PROMPT[:10], None, 0, 30, Stats())
    assert first_tokens(target, PROMPT[:10], DraftModelProposer(draft, min_confidence=0), 3, 30, stats) == plain
    assert 0 < stats.accepted < stats.drafted


def test_quantize_errors(checkpoints):
    src, converted = checkpoints
    with pytest.raises(ConfigError, match="already quantized"):
        load_model(converted, quantize=4)
    with pytest.raises(ConfigError, match="quantize must be one of"):
        load_model(src, quantize=7)


def test_generate_and_cli_with_quantize(tiny, capsys):
    path = str(tiny.path("moe"))
    model, tokenizer = load(path, quantize=4)
    result = generate(model, tokenizer, "abc", max_tokens=8, draft="ngram", num_draft_tokens=2)
    assert result.generation_tokens == 8
    capsys.readouterr()
    assert main(["generate", "--model", path, "--quantize", "4", "--draft", "none", "--max-tokens", "8",
                 "--json", "abc"]) == 0
    assert '"generation_tokens": 8' in capsys.readouterr().out
    assert main(["generate", "--model", path, "--quantize", "7", "abc"]) == 2
    assert "quantize must be one of" in capsys.readouterr().err
