"""The multi-token-prediction (MTP) head that Qwen3-Next and Qwen3.5 checkpoints ship as `mtp.*`.

It guesses token t+2 from the target's hidden state at t and the embedding of token t+1:

    x = fc([pre_fc_norm_embedding(embed(x_{t+1})) ; pre_fc_norm_hidden(h_t)])   # embedding first
    x = layers[0](x)                  # one full-attention decoder layer (gated attention, MoE), own KV cache
    out = norm(x)                     # logits = target lm_head(out)

The embedding and lm_head are the target's; the proposer (`specdec.drafts.mtp`) supplies them.
Conventions, as vLLM runs these heads (vllm/model_executor/models/qwen3_next_mtp.py and qwen3_5_mtp.py,
`*MultiTokenPredictor.forward`; vllm/v1/spec_decode/eagle.py, `EagleProposer.propose`):
  - h_t is the target's last hidden state AFTER its final norm (vLLM's Qwen3NextModel.forward returns
    `self.norm(hidden_states, residual)` and that is what the drafter is given);
  - the attention layer rotates the pair (h_t, x_{t+1}) at position t, the position of h_t, so the
    MTP cache holds one entry per target position and its offset is the RoPE position;
  - to chain (K > 1) the next step takes `out` (after `mtp.norm`) as its h, at position t+1.
"""

from dataclasses import replace

import mlx.core as mx
import mlx.nn as nn

from ..errors import ShapeError
from .config import ModelConfig
from .layers import Linear, RMSNorm
from .model import DecoderLayer


class MTP(nn.Module):
    """One MTP layer, as every Qwen3-Next / Qwen3.5 checkpoint ships; every chained step reuses it."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        # A target layer of index 0 forced to full attention: its MLP follows the target's rule (sparse MoE
        # for Qwen3.5-MoE and Qwen3-Next, dense for dense Qwen3.5), as vLLM builds it.
        layer_cfg = replace(cfg, num_hidden_layers=1, layer_types=["full_attention"])
        self.pre_fc_norm_embedding = RMSNorm(H, eps)
        self.pre_fc_norm_hidden = RMSNorm(H, eps)
        self.fc = Linear(2 * H, H, bias=False)
        self.layers = [DecoderLayer(layer_cfg, 0)]
        self.norm = RMSNorm(H, eps)

    def __call__(self, embeds: mx.array, hidden: mx.array, cache=None) -> mx.array:
        """embeds [B, S, H] of tokens t+1, hidden [B, S, H] of positions t (after the target's final norm)
        -> [B, S, H] after `mtp.norm`: feed to the target's lm_head, or back in as `hidden` to chain.
        `cache` is the layer's KVCache; its offset is the position of the first row."""
        if embeds.shape != hidden.shape:
            raise ShapeError(f"MTP embeddings {tuple(embeds.shape)} and hidden states {tuple(hidden.shape)} differ")
        x = mx.concatenate([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], axis=-1)
        x = self.layers[0](self.fc(x), cache)
        return self.norm(x)
