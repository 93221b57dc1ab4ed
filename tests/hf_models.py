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
        cfg = tf.Qwen3_5MoeConfig(text_config=text.to_dict(), vision_config=vision)
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
