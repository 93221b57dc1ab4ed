"""Self-speculation with the target's own MTP head: no second model; drafts come from the target's hidden states.

The head's KV cache holds one entry per target position t, made from the pair (h_t, x_{t+1}) where h_t is
the target's last hidden state (after its final norm, see `specdec.models.mtp`). A pair is complete only
once x_{t+1} is known, so the proposer keeps `pending`: the target hidden states whose pairs are not in its
cache yet, and the tokens that follow all but the last of them (the last one's token is the engine's next
`last`). A round:
    propose(last, k): open a window; run the pending pairs (real, they stay) -> d1; then chain k-1 steps on
                      the head's own output, (out_i, d_i) -> d_{i+1} (guesses, they go).
    commit(n, next, hidden): keep only the real entries. The target's hidden states of [last, d1..dn] become
                      pending, with tokens d1..dn (the last one's is `next`, which comes back as `last`).
A round with k = 0 runs nothing: its hidden state waits in `pending` for the next drafting round. So the
head never sees a guess it does not later replace, and is never re-run to roll back.
"""

import re

import mlx.core as mx
import mlx.nn as nn

from ..cache import KVCache
from ..errors import CheckpointError, DraftError
from ..loading import check_and_load, quant_params
from ..models.mtp import MTP
from ..sampling import SamplingParams, make_key
from .base import Proposer

PREFILL_STEP = 2048  # prompt pairs per forward of the head


def load_mtp(target) -> MTP:
    """The MTP head of a loaded target, from the `mtp.*` tensors the loader kept (`target.mtp_weights`),
    quantized the way the checkpoint's quantization block says, in the target's float dtype."""
    weights = getattr(target, "mtp_weights", None) or {}
    if not weights:
        raise DraftError(
            "this checkpoint has no MTP head (no mtp.* tensors): MTP drafting needs a Qwen3-Next / Qwen3.5 "
            "checkpoint that ships one (conversions often drop it); use a draft model or 'ngram' instead"
        )
    layers = sorted({int(m.group(1)) for k in weights if (m := re.match(r"mtp\.layers\.(\d+)\.", k))})
    if layers != [0]:
        raise DraftError(f"the MTP head has layers {layers}; exactly one (mtp.layers.0) is supported")
    mtp = MTP(target.config)
    quant = getattr(target, "quantization", None)
    if quant:
        def predicate(path, _):
            p = quant_params(f"mtp.{path}", weights, quant)
            return False if p is None else {"group_size": p[0], "bits": p[1], "mode": p[2]}

        nn.quantize(mtp, class_predicate=predicate)
    # Matrices (and quantization scales) follow the dtype the target was loaded in; 1-D norm weights keep the
    # precision the loader gave them, as the target's do.
    embed = target.model.embed_tokens
    dtype = (embed.scales if "scales" in embed else embed.weight).dtype
    params = {
        k[len("mtp."):]: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) and v.ndim > 1 else v
        for k, v in weights.items()
    }
    try:
        check_and_load(mtp, params, None)
    except CheckpointError as e:
        raise CheckpointError(f"MTP head (mtp.*): {e}") from e
    mx.eval(mtp.parameters())
    return mtp


class MTPProposer(Proposer):
    needs_hidden = True

    def __init__(self, target, mtp: MTP | None = None, seed: int | None = None):
        self.target = target
        self.mtp = mtp if mtp is not None else load_mtp(target)
        self.key = make_key(seed)
        self.cache = KVCache()
        self.pending_hidden: list[mx.array] = []  # [1, m_i, H] pieces, after the target's final norm
        self.pending_tokens: list[int] = []  # the token after each pending position but the last
        self._real = 0  # pairs run in the open window (kept at commit); 0 when no window is open
        self._drafts = None

    @property
    def vocab_size(self):
        return self.target.config.vocab_size

    def _run(self, tokens: mx.array, hidden: mx.array) -> mx.array:
        """Pairs (tokens [1, S] = the tokens t+1, hidden [1, S, H] at t) through the head -> its last output row.
        Long runs (a prompt, many k = 0 rounds) go in pieces to bound the attention scores."""
        for i in range(0, tokens.shape[1], PREFILL_STEP):
            out = self.mtp(self.target.model.embed_tokens(tokens[:, i : i + PREFILL_STEP]),
                           hidden[:, i : i + PREFILL_STEP], self.cache)
            if i + PREFILL_STEP < tokens.shape[1]:
                mx.eval(self.cache.keys, self.cache.values)
        return out[:, -1:]

    def prefill(self, tokens, hidden=None):
        self.cache = KVCache()
        self.pending_hidden, self.pending_tokens, self._real, self._drafts = [], [], 0, None
        if not tokens:
            return
        if hidden is None or hidden.shape[1] != len(tokens):
            raise DraftError(f"the MTP proposer needs the target's hidden state of each of the {len(tokens)} "
                             "prompt tokens")
        hidden = self.target.model.norm(hidden)
        if len(tokens) > 1:  # position t pairs with token t+1; the last position waits for `last`
            self._run(mx.array([tokens[1:]]), hidden[:, :-1])
            mx.eval(self.cache.keys, self.cache.values)
        self.pending_hidden = [hidden[:, -1:]]

    def propose(self, last, k, params: SamplingParams):
        self._real, self._drafts = 0, None
        none = mx.array([], mx.int32), None
        if not self.pending_hidden:  # a one-token prompt: no hidden state to draft from yet
            return none
        self.pending_tokens.append(last)
        if k == 0:
            return none
        hidden = mx.concatenate(self.pending_hidden, axis=1)
        tokens = mx.array([self.pending_tokens])
        self.cache.begin_window()
        self._real = tokens.shape[1]
        self.pending_hidden, self.pending_tokens = [], []

        out = self._run(tokens, hidden)
        drafts, logprobs = [], []
        for i in range(k):
            if i:  # chain: the head's own output stands in for the target's hidden state
                out = self._run(drafts[-1].reshape(1, 1), out)
            logits = self.target.logits(out)[0, -1]
            token, lp = self.pick(logits, params)
            if lp is not None:
                logprobs.append(lp)
            drafts.append(token)
        self._drafts = mx.stack(drafts)
        return self._drafts, (mx.stack(logprobs) if logprobs else None)

    def commit(self, num_accepted, next_token, hidden=None):
        if hidden is None or hidden.shape[1] != num_accepted + 1:
            raise DraftError("the MTP proposer needs the target's hidden states of [last, accepted drafts] at commit")
        if self._real:
            self.cache.commit(self._real)  # drop the chained guesses
            self.pending_tokens = self._drafts[:num_accepted].tolist()
        self.pending_hidden.append(self.target.model.norm(hidden))
        self._real, self._drafts = 0, None
