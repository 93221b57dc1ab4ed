"""Shared fixtures: tiny random checkpoints, built once per session by transformers and saved like real ones.

`tiny.path(name)` builds and saves a checkpoint the first time it is asked for (config, safetensors, and a
character-level tokenizer whose vocabulary matches the model's); `tiny.model(name)` loads it once.
"""

import json
import string
from pathlib import Path

import pytest
import torch

from hf_models import build

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
             intermediate_size=64)
GDN_THEN_ATTENTION = ["linear_attention", "full_attention"]

# name: (model_type, seed, overrides of tests/hf_models.py's BASE). Vocabulary 97 unless said otherwise.
TINY = {
    "moe": ("qwen3_5_moe_text", 0, {}),  # target: 3 GDN + 1 gated-attention layers, 6 experts top-2, hidden 64
    "next": ("qwen3_next", 1, {}),  # target: the same layout as Qwen3-Next
    "qwen3": ("qwen3", 2, SMALL),  # dense drafts, hidden 32, 2 layers
    "llama": ("llama", 3, SMALL),
    "hybrid": ("qwen3_5_text", 4, {**SMALL, "layer_types": GDN_THEN_ATTENTION}),  # hybrid drafts
    "moe_small": ("qwen3_5_moe_text", 5, {**SMALL, "layer_types": GDN_THEN_ATTENTION}),
    "v6_target": ("qwen3_5_moe_text", 6, {**SMALL, "vocab_size": 6, "layer_types": GDN_THEN_ATTENTION}),
    "v6_draft": ("qwen3", 7, {**SMALL, "vocab_size": 6}),
    # Random weights give near-uniform next-token distributions (top probability ~1/20), under the draft's
    # default early-stop threshold; this target's lm_head is scaled up so it is confident (median top ~0.7).
    "confident": ("qwen3_5_moe_text", 8, {"lm_head_scale": 8.0}),
}

EOS = "<eos>"  # token 0 of every tiny tokenizer
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]  # 96 characters, space and newline included


def write_char_tokenizer(folder: Path, vocab_size: int):
    """tokenizer.json (one token per character, no merges) + tokenizer_config.json with an EOS token."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    if vocab_size - 1 > len(CHARS):
        raise ValueError(f"a character tokenizer has at most {len(CHARS) + 1} tokens, asked for {vocab_size}")
    vocab = {EOS: 0, **{c: i + 1 for i, c in enumerate(CHARS[: vocab_size - 1])}}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.add_special_tokens([AddedToken(EOS, special=True)])
    tokenizer.decoder = decoders.Fuse()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"eos_token": EOS, "add_bos_token": False, "add_eos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


class TinyCheckpoints:
    def __init__(self, root: Path):
        self.root = root
        self._models = {}

    def path(self, name: str) -> Path:
        folder = self.root / name
        if not folder.exists():
            self.torch_model(name).save_pretrained(folder)
            write_char_tokenizer(folder, TINY[name][2].get("vocab_size", 97))
        return folder

    def torch_model(self, name: str):
        """The transformers model the checkpoint is saved from (rebuilt: same seed, same weights)."""
        model_type, seed, overrides = TINY[name]
        overrides = dict(overrides)
        lm_head_scale = overrides.pop("lm_head_scale", None)
        model = build(model_type, seed, **overrides)
        if lm_head_scale is not None:
            with torch.no_grad():
                model.lm_head.weight.mul_(lm_head_scale)
        return model

    def model(self, name: str):
        """The loaded MLX model, shared by every test of the session: do not mutate it (monkeypatch instead)."""
        if name not in self._models:
            from specdec.loading import load_model

            self._models[name] = load_model(self.path(name))[0]
        return self._models[name]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    import transformers

    transformers.utils.logging.disable_progress_bar()  # keep save_pretrained off captured stderr
    return TinyCheckpoints(tmp_path_factory.mktemp("tiny"))
