"""Broken checkpoints and tokenizers through the command line: one line naming the problem, exit code 2,
and the same error type through the API."""

import json
import shutil

import pytest
from safetensors.numpy import load_file, save_file

from specdec.cli import main
from specdec.errors import CheckpointError, ConfigError, TokenizerError
from specdec.generate import load


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    for key in [k for k, v in changes.items() if v is None]:
        del cfg[key]
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_weights(folder, fn):
    (file,) = folder.glob("*.safetensors")
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def drop_first(tensors, suffix):
    del tensors[next(k for k in sorted(tensors) if k.endswith(suffix))]


def reshape_first(tensors, suffix):
    key = next(k for k in sorted(tensors) if k.endswith(suffix))
    tensors[key] = tensors[key][:-1]


BREAKS = {
    "config is not JSON": (lambda d: (d / "config.json").write_text("{oops"), ConfigError, "not valid JSON"),
    "unknown model type": (lambda d: edit_config(d, model_type="gpt2"), ConfigError, "'gpt2'"),
    "missing hidden_size": (lambda d: edit_config(d, hidden_size=None), ConfigError, "hidden_size"),
    "heads not a multiple of kv heads": (lambda d: edit_config(d, num_key_value_heads=3), ConfigError,
                                         "num_key_value_heads"),
    "missing tensor": (lambda d: edit_weights(d, lambda t: drop_first(t, "post_attention_layernorm.weight")),
                       CheckpointError, "post_attention_layernorm.weight"),
    "tensor of the wrong shape": (lambda d: edit_weights(d, lambda t: reshape_first(t, "mlp.gate.weight")),
                                  CheckpointError, "mlp.gate.weight"),
    "no weights": (lambda d: [p.unlink() for p in d.glob("*.safetensors")], CheckpointError, "safetensors"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), TokenizerError, "tokenizer.json"),
    "tokenizer not JSON": (lambda d: (d / "tokenizer.json").write_text("]"), TokenizerError, "tokenizer.json"),
}


@pytest.mark.parametrize("case", BREAKS)
def test_broken_checkpoint(tiny, tmp_path, capsys, case):
    breaker, error, words = BREAKS[case]
    folder = tmp_path / "model"
    shutil.copytree(tiny.path("moe"), folder)
    breaker(folder)

    with pytest.raises(error, match=None) as info:
        load(folder)
    assert words in str(info.value)

    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--draft", "none", "--max-tokens", "4", "def f"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("specdec: error: ") and words in err
