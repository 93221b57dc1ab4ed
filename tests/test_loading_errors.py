"""Every malformed input to `load_model` raises a specific specdec error whose message names the problem;
a healthy checkpoint loads from a Hub-style cache with the Hub switched off."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import hf_models
from specdec.errors import CheckpointError, ConfigError, SpecdecError
from specdec.loading import load_model

REPO_ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """A tiny Qwen3.5-MoE checkpoint saved by transformers: 3 GDN layers + 1 attention, 6 experts."""
    folder = tmp_path_factory.mktemp("healthy")
    hf_models.build("qwen3_5_moe_text", seed=0).save_pretrained(folder)
    return folder


@pytest.fixture
def ckpt(healthy, tmp_path):
    """A fresh copy of the healthy checkpoint for one test to damage."""
    folder = tmp_path / "ckpt"
    shutil.copytree(healthy, folder)
    return folder


def edit_config(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def edit_tensors(folder, change):
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS))


def raises(folder, error, *fragments, **kwargs):
    with pytest.raises(error) as info:
        load_model(folder, **kwargs)
    assert isinstance(info.value, SpecdecError)
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"
    return str(info.value)


def test_healthy_checkpoint_loads(ckpt):
    model, folder, mtp = load_model(ckpt)
    assert folder == ckpt and mtp == {} and model.config.num_experts == 6


# ------------------------------------------------------------------------------------------- config.json


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    raises(ckpt, ConfigError, "config.json", "missing")


def test_config_not_json(ckpt):
    (ckpt / "config.json").write_text('{"model_type": "qwen3_5_moe_text",')
    raises(ckpt, ConfigError, "config.json", "not valid JSON")


def test_config_not_an_object(ckpt):
    (ckpt / "config.json").write_text("[1, 2]")
    raises(ckpt, ConfigError, "JSON object")


def test_unknown_model_type(ckpt):
    edit_config(ckpt, lambda c: c.update(model_type="gpt_neox"))
    msg = raises(ckpt, ConfigError, "unsupported model_type", "'gpt_neox'")
    assert "qwen3_next" in msg  # and it lists what is supported


def test_missing_required_key(ckpt):
    edit_config(ckpt, lambda c: c.pop("hidden_size"))
    raises(ckpt, ConfigError, "missing required key", "'hidden_size'")


def test_bad_value_type(ckpt):
    edit_config(ckpt, lambda c: c.update(num_hidden_layers="4"))
    raises(ckpt, ConfigError, "'num_hidden_layers'", "positive integer", "'4'")


def test_heads_not_a_multiple_of_kv_heads(ckpt):
    edit_config(ckpt, lambda c: c.update(num_attention_heads=4, num_key_value_heads=3))
    raises(ckpt, ConfigError, "num_attention_heads (4)", "multiple of num_key_value_heads (3)")


@pytest.mark.parametrize(
    "layer_types",
    [["linear_attention"] * 3, ["linear_attention", "linear_attention", "sliding_attention", "full_attention"]],
    ids=["wrong-length", "unknown-value"],
)
def test_bad_layer_types(ckpt, layer_types):
    edit_config(ckpt, lambda c: c.update(layer_types=layer_types))
    raises(ckpt, ConfigError, "layer_types", "4 entries", repr(layer_types))


def test_more_experts_per_token_than_experts(ckpt):
    edit_config(ckpt, lambda c: c.update(num_experts_per_tok=7))
    raises(ckpt, ConfigError, "num_experts_per_tok (7)", "num_experts (6)")


def test_unsupported_rope_type(ckpt):
    edit_config(ckpt, lambda c: c["rope_parameters"].update(rope_type="yarn"))
    raises(ckpt, ConfigError, "RoPE type", "'yarn'")


def test_unknown_dtype(ckpt):
    raises(ckpt, ConfigError, "unknown dtype", "'fp8'", "bfloat16", dtype="fp8")


def test_quantization_block_without_bits(ckpt):
    edit_config(ckpt, lambda c: c.update(quantization={"group_size": 32}))
    raises(ckpt, ConfigError, "'quantization'", "'bits'")


# ------------------------------------------------------------------------------------------------ weights


def test_no_safetensors(ckpt):
    (ckpt / WEIGHTS).unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"pickle")
    raises(ckpt, CheckpointError, "no *.safetensors", str(ckpt))


@pytest.mark.parametrize(
    "key",
    [
        "model.layers.0.linear_attn.out_proj.weight",
        "model.layers.3.self_attn.k_norm.weight",
        "model.layers.1.linear_attn.in_proj_z.weight",  # a part of a projection we fuse
        "model.layers.2.mlp.experts.5.up_proj.weight",  # an expert we stack
        "lm_head.weight",
    ],
)
def test_missing_tensor_is_named(ckpt, key):
    edit_tensors(ckpt, lambda t: t.pop(key))
    raises(ckpt, CheckpointError, "missing tensor", key)


def test_unexpected_tensor_is_named(ckpt):
    edit_tensors(ckpt, lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": np.zeros((4, 4), np.float32)}))
    raises(ckpt, CheckpointError, "unexpected tensor", "'model.layers.0.mlp.extra_proj.weight'")


def test_expert_beyond_num_experts_is_unexpected(ckpt):
    key = "model.layers.0.mlp.experts.6.down_proj.weight"
    edit_tensors(ckpt, lambda t: t.update({key: t["model.layers.0.mlp.experts.5.down_proj.weight"]}))
    raises(ckpt, CheckpointError, "unexpected tensor", key)


@pytest.mark.parametrize(
    "key, bad_shape, shown",
    [
        ("model.layers.0.linear_attn.out_proj.weight", (64, 40), ["(64, 40)", "(64, 48)"]),
        ("model.embed_tokens.weight", (96, 64), ["(96, 64)", "(97, 64)"]),
        # gated attention: q_proj emits query and gate, 2 * 4 heads * 16
        ("model.layers.3.self_attn.q_proj.weight", (64, 64), ["(64, 64)", "(128, 64)"]),
        ("model.layers.1.mlp.experts.2.gate_proj.weight", (31, 64), ["(31, 64)", "(32, 64)"]),
    ],
    ids=["out_proj", "embed", "q_proj", "expert"],
)
def test_wrong_shape_shows_key_expected_and_found(ckpt, key, bad_shape, shown):
    edit_tensors(ckpt, lambda t: t.update({key: np.zeros(bad_shape, np.float32)}))
    msg = raises(ckpt, CheckpointError, key, *shown)
    assert "expected" in msg


def test_shard_listed_in_index_but_absent(tmp_path):
    hf = hf_models.build("qwen3_5_moe_text", seed=0)
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    load_model(tmp_path)  # complete: loads
    (tmp_path / shards[1]).unlink()
    raises(tmp_path, CheckpointError, "missing", shards[1], "model.safetensors.index.json")


def test_index_without_weight_map(ckpt):
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}}))
    raises(ckpt, CheckpointError, "weight_map")


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b"\x00" * 64, lambda b: b[:8] + b"{not json" + b[17:]],
    ids=["truncated", "zeros", "bad-header"],
)
def test_damaged_safetensors(ckpt, damage):
    path = ckpt / WEIGHTS
    path.write_bytes(damage(path.read_bytes()))
    raises(ckpt, CheckpointError, "cannot read", WEIGHTS)


@pytest.mark.parametrize(
    "module", ["model.layers.0.mlp.gate", "model.layers.0.linear_attn.in_proj_a", "model.layers.3.self_attn.o_proj"]
)
def test_quantized_tensors_without_quantization_block(ckpt, module):
    def quantize_one(tensors):
        import mlx.core as mx

        w, scales, biases = mx.quantize(mx.array(tensors[f"{module}.weight"]), group_size=32, bits=4)
        tensors.update({f"{module}.{n}": np.array(v) for n, v in zip(("weight", "scales", "biases"), (w, scales, biases))})

    edit_tensors(ckpt, quantize_one)
    raises(ckpt, CheckpointError, module, "quantized", "no 'quantization' block")


# --------------------------------------------------------------------------------------------- Hub cache


def load_offline(repo_id: str, hf_home: Path) -> subprocess.CompletedProcess:
    """load_model(repo_id) in a fresh interpreter with the Hub switched off and a private HF cache, so the
    environment is read the way a user sets it (huggingface_hub reads it at import)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(hf_home), HF_HUB_CACHE=str(hf_home / "hub"),
               HF_HUB_DISABLE_TELEMETRY="1")
    script = (
        "import sys\n"
        "from specdec.errors import SpecdecError\n"
        "from specdec.loading import load_model\n"
        "try:\n"
        f"    model, folder, _ = load_model({repo_id!r})\n"
        "except SpecdecError as e:\n"
        "    print(type(e).__name__, e); sys.exit(3)\n"
        "print('loaded', model.config.model_type, model.config.num_experts, folder)\n"
    )
    return subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_hub_id_not_cached_while_offline(tmp_path):
    result = load_offline("specdec-tests/not-downloaded", tmp_path / "hf")
    assert result.returncode == 3, result.stderr
    assert result.stdout.startswith("CheckpointError")
    assert "'specdec-tests/not-downloaded' is not in the local Hugging Face cache" in result.stdout
    assert "HF_HUB_OFFLINE" in result.stdout


def test_not_a_folder_nor_a_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        load_model(tmp_path / "does-not-exist")


def test_healthy_checkpoint_loads_from_hub_cache_offline(healthy, tmp_path):
    # huggingface_hub's cache layout: hub/models--{org}--{name}/snapshots/{revision}/..., refs/main -> revision
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "models--specdec-tests--tiny-moe"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(healthy, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)

    result = load_offline("specdec-tests/tiny-moe", tmp_path / "hf")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["loaded", "qwen3_5_moe", "6", str(snapshot)]
