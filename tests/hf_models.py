"""Tiny random checkpoints saved by `transformers` itself, for parity tests (the reference is PyTorch CPU)."""

import torch

BASE = dict(vocab_size=97, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=96, rms_norm_eps=1e-6, max_position_embeddings=512)
HYBRID = dict(linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=12,
              linear_conv_kernel_dim=4)
MOE = dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=40)


def build(model_type: str, seed: int = 0, **overrides):
    """-> a transformers model (float32, eval) with random weights, non-trivial norms and gates."""
    import transformers as tf

    torch.manual_seed(seed)
    kw = dict(BASE)
    if model_type in ("qwen3_5_moe_text", "qwen3_5_moe", "qwen3_next"):
        kw.update(HYBRID, **MOE)
    elif model_type in ("qwen3_5_text", "qwen3_5"):
        kw.update(HYBRID)
    kw.update(overrides)
    if model_type == "qwen3_5_moe_text":
        model = tf.Qwen3_5MoeForCausalLM(tf.Qwen3_5MoeTextConfig(**kw))
    elif model_type == "qwen3_5_moe":
        text = tf.Qwen3_5MoeTextConfig(**kw)
        vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=kw["hidden_size"])
        # transformers ties lm_head by the wrapper's own key, so set it there too
        cfg = tf.Qwen3_5MoeConfig(text_config=text.to_dict(), vision_config=vision,
                                  tie_word_embeddings=kw.get("tie_word_embeddings", False))
        model = tf.Qwen3_5MoeForConditionalGeneration(cfg)
    elif model_type == "qwen3_5_text":
        model = tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**kw))
    elif model_type == "qwen3_next":
        model = tf.Qwen3NextForCausalLM(tf.Qwen3NextConfig(**kw))
    elif model_type == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**kw))
    elif model_type == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**kw))
    else:
        raise ValueError(model_type)
    randomize(model)
    return model.float().eval()


@torch.no_grad()
def randomize(model):
    """Random init leaves norms at 0/1 and A_log tame; perturb everything so parity tests can see bugs."""
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.uniform_(-1.0, 1.0)
        elif name.endswith("dt_bias"):
            p.uniform_(-0.5, 0.5)
        elif p.ndim == 1:  # norm weights (zero-centred or not): visibly non-trivial
            p.copy_(p + torch.randn_like(p) * 0.3)
        else:
            p.normal_(0.0, 0.08)


@torch.no_grad()
def logits(model, ids):
    out = model(torch.tensor([ids]))
    return out.logits[0].float().numpy()


def fuse_experts_on_disk(src, dst):
    """Copy a checkpoint folder, rewriting per-expert MoE weights into HF's fused layout:
    `mlp.experts.gate_up_proj` [E, 2I, H] (gate rows first) and `mlp.experts.down_proj` [E, H, I]."""
    import re
    import shutil
    from pathlib import Path

    import numpy as np
    from safetensors.numpy import load_file, save_file

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    experts, out = {}, {}
    for key, value in tensors.items():
        m = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$", key)
        if m:
            experts.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = value
        else:
            out[key] = value
    for prefix, parts in experts.items():
        stack = {name: np.stack([parts[name][e] for e in sorted(parts[name])]) for name in parts}
        out[f"{prefix}.gate_up_proj"] = np.concatenate([stack["gate"], stack["up"]], axis=1)
        out[f"{prefix}.down_proj"] = stack["down"]
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def save_tokenizer(folder, vocab_size: int):
    """A word-level tokenizer 't0 t1 ...' so tools that insist on a tokenizer (mlx_lm.convert) can run."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", eos_token="t1").save_pretrained(folder)
