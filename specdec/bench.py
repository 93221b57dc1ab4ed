"""`specdec bench`: how fast the target runs, and how fast speculative decoding can make it, on this device.

Everything runs in one process on a target with real layer shapes and random weights, no checkpoint needed:
  - prefill time, and the target's step time for S = 1..16 tokens at a given context (a verify window is
    S = K+1 tokens, so this curve decides which K can pay);
  - commit time and window memory of the two GDN commit methods ("replay", "states");
  - one MoE layer with gate and up fused (ours) against separate gate and up gather matmuls, and where a
    step's time goes (lm_head, one GDN layer, one attention layer, one MoE layer);
  - a check that one S-token window computes what S one-token forwards do (the verify is sound on this device);
  - the achieved memory bandwidth of the S=1 step;
  - end-to-end tokens/s of speculative decoding at controlled acceptance (`OracleProposer`), and plain decoding;
  - the same model in mlx-lm, side by side, when mlx-lm is installed.
Timings are time.perf_counter around mx.eval, after a warm-up, median of repeats.
"""

import itertools
import json
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from .adaptive import AdaptiveK
from .cache import COMMIT_METHODS, DEFAULT_COMMIT_METHOD, GDNCache, KVCache, make_cache
from .drafts import Proposer
from .engine import PREFILL_STEP, Stats, speculate
from .engine import prefill as engine_prefill
from .errors import BenchError
from .loading import quantize_model
from .models.config import ModelConfig
from .models.layers import ExpertLinear, QuantizedExpertLinear, SparseMoE, sort_threshold
from .models import compiled
from .models.model import Model
from .sampling import SamplingParams

# Layer shapes of the real checkpoints; `tiny` is for tests. The layer count is a bench option.
ARCHS = {
    "qwen3.5-35b-a3b": dict(
        model_type="qwen3_5_moe", vocab_size=248320, hidden_size=2048, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128, num_experts=256, num_experts_per_tok=8,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, rope_theta=1e7,
    ),
    "qwen3-next-80b-a3b": dict(
        model_type="qwen3_next", vocab_size=151936, hidden_size=2048, num_attention_heads=16,
        num_key_value_heads=2, head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
        linear_key_head_dim=128, linear_value_head_dim=128, num_experts=512, num_experts_per_tok=10,
        moe_intermediate_size=512, shared_expert_intermediate_size=512, rope_theta=1e7,
    ),
    "tiny": dict(
        model_type="qwen3_5_moe", vocab_size=1024, hidden_size=128, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=64, rope_theta=1e7,
    ),
}
FULL_ATTENTION_INTERVAL = 4  # 3 GDN layers, then one gated-attention layer
GROUP_SIZE = 64  # quantization as mlx-community converts these models: group 64, router gates 8-bit
BITS = (3, 4, 8, 16)  # 16 = unquantized bfloat16
NOMINAL_BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0}  # vendor figures, HBM3e / HBM3 (SXM)
COMMIT_WINDOW = 5  # tokens in the rejected window whose commit is timed
EMBED_RMS = 4.0  # embedding scale: ~40x the rms each random layer adds to the residual stream (see greedy_head)
RESYNC_LOOKAHEAD = 16  # tokens the oracle recomputes at a time after leaving its reference
ALTERNATIONS = 4  # ours and mlx-lm take turns this many times per measured step size


@dataclass(frozen=True)
class BenchOptions:
    arch: str = "qwen3.5-35b-a3b"
    layers: int = 8
    bits: int = 4
    context: int = 1024  # tokens in the cache when steps, commits and decoding are timed
    prefill: tuple = (1024, 4096)  # prompt lengths whose prefill is timed
    step_sizes: tuple = tuple(range(1, 17))
    repeats: int = 20
    prefill_repeats: int = 3
    alphas: tuple = (0.6, 0.8, 0.9)  # per-token acceptance of the oracle draft
    draft_lengths: tuple = (1, 2, 4, 8)  # K
    gen_tokens: int = 128  # tokens generated per end-to-end run
    draft_cost_ms: float | None = None  # per drafted token; None: a tenth of the target's S=1 step
    commit_method: str = DEFAULT_COMMIT_METHOD  # for the end-to-end runs
    mlx_lm: bool = True
    mlx_lm_max_prefill: int = 1024  # mlx-lm prefills token by token in Python on CUDA/CPU: longer ones are slow
    bandwidth_gbs: float | None = None  # nominal device bandwidth; None: known GPUs by name
    seed: int = 0

    def quick(self) -> "BenchOptions":
        """Fewer sizes and repeats: a smoke run."""
        return replace(
            self, prefill=self.prefill[:1], step_sizes=tuple(s for s in (1, 2, 4, 8, 16) if s in self.step_sizes),
            repeats=min(self.repeats, 5), prefill_repeats=1, alphas=self.alphas[-2:-1] or self.alphas,
            draft_lengths=tuple(k for k in self.draft_lengths if k in (1, 4)) or self.draft_lengths[:1],
            gen_tokens=min(self.gen_tokens, 32),
        )

    def check(self):
        def positive(name, values):
            for v in values if isinstance(values, tuple) else (values,):
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    raise BenchError(f"{name} must be positive integers, got {values!r}")

        if self.arch not in ARCHS:
            raise BenchError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.bits not in BITS:
            raise BenchError(f"bits must be one of {BITS} (16 = bfloat16, unquantized), got {self.bits!r}")
        for name in ("layers", "context", "repeats", "prefill_repeats", "gen_tokens", "prefill", "step_sizes",
                     "draft_lengths"):
            positive(name, getattr(self, name))
        if not self.prefill or not self.step_sizes:
            raise BenchError("prefill and step_sizes need at least one size each")
        if max(self.step_sizes) > 64:
            raise BenchError(f"step sizes above 64 are not verify windows, got {max(self.step_sizes)}")
        if any(not 0 <= a <= 1 for a in self.alphas):
            raise BenchError(f"alphas are acceptance probabilities in [0, 1], got {self.alphas!r}")
        if self.draft_cost_ms is not None and self.draft_cost_ms < 0:
            raise BenchError(f"draft_cost_ms must be >= 0, got {self.draft_cost_ms!r}")
        if self.commit_method not in COMMIT_METHODS:
            raise BenchError(f"commit_method must be one of {COMMIT_METHODS}, got {self.commit_method!r}")
        if self.bandwidth_gbs is not None and self.bandwidth_gbs <= 0:
            raise BenchError(f"bandwidth_gbs must be > 0, got {self.bandwidth_gbs!r}")


# ---------------------------------------------------------------------------------------------- the target

def arch_config(arch: str, layers: int) -> ModelConfig:
    if arch not in ARCHS:
        raise BenchError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    types = ["full_attention" if (i + 1) % FULL_ATTENTION_INTERVAL == 0 else "linear_attention" for i in range(layers)]
    return ModelConfig(num_hidden_layers=layers, layer_types=types, partial_rotary_factor=0.25,
                       linear_conv_kernel_dim=4, norm_topk_prob=True, max_position_embeddings=262144, **ARCHS[arch])


def quantize(model: nn.Module, bits: int):
    """In place, as mlx-community does (loading.quantize_model: group 64, router gates 8-bit);
    bits=16 leaves the model in bfloat16."""
    if bits != 16:
        quantize_model(model, bits, GROUP_SIZE)


def cast(model: nn.Module, dtype=mx.bfloat16):
    """Cast float parameters to dtype, except A_log (kept float32, as the checkpoints keep it)."""
    model.update(tree_map_with_path(
        lambda path, x: x if path.endswith("A_log") else x.astype(dtype), model.parameters()))


def greedy_head(cfg: ModelConfig, seed: int = 0):
    """Embeddings and an lm_head that give a random model a wide greedy margin -> (embed, lm_head, successor).

    Plain random weights give a flat next-token distribution whose argmax flips under the rounding differences
    between an S=1 forward and a verify window (MoE top-k near-ties amplify them): the oracle's reference would
    keep breaking. Here the embeddings are large enough to dominate the residual stream (the random layers add
    ~0.1 rms each), and lm_head row successor[t] is the direction of token t's embedding, so the greedy next
    token after t is successor[t], a fixed random permutation, by a margin of ~sqrt(hidden) logits.
    Shapes, dtypes and the work per token are unchanged; each token still routes to its own experts."""
    k_embed, k_perm = mx.random.split(mx.random.key(seed + 1))
    embed = EMBED_RMS * mx.random.normal((cfg.vocab_size, cfg.hidden_size), key=k_embed)
    successor = mx.random.permutation(cfg.vocab_size, key=k_perm)
    directions = embed * mx.rsqrt((embed * embed).sum(axis=-1, keepdims=True))
    return embed, directions[mx.argsort(successor)], successor


def build_target(cfg: ModelConfig, bits: int, seed: int = 0, dtype=mx.bfloat16) -> Model:
    """Our Model with random weights (and `greedy_head`), cast to dtype and quantized; evaluated one layer at
    a time so the float32 initial weights of only one layer are alive at once."""
    mx.random.seed(seed)
    model = Model(cfg)
    for layer in model.model.layers:
        if "linear_attn" in layer:  # the default init makes these constant; give them a realistic spread
            gdn = layer.linear_attn
            gdn.conv1d.weight = mx.random.uniform(-0.5, 0.5, gdn.conv1d.weight.shape)
            gdn.A_log = mx.log(mx.random.uniform(1.0, 16.0, gdn.A_log.shape))
    if not cfg.tie_word_embeddings:
        model.model.embed_tokens.weight, model.lm_head.weight, _ = greedy_head(cfg, seed)
    cast(model, dtype)
    quantize(model, bits)
    for layer in model.model.layers:
        mx.eval(layer.parameters())
    mx.eval(model.parameters())
    return model


def random_tokens(rng, vocab: int, n: int) -> list[int]:
    return rng.integers(0, vocab, n).tolist()


# ---------------------------------------------------------------------------------------------- timing

def median_ms(once, repeats: int, warmup: int = 1) -> float:
    """once() does one measurement and returns the seconds it timed (setup excluded); -> median, in ms."""
    for _ in range(warmup):
        once()
    return 1e3 * statistics.median(once() for _ in range(repeats))


def timed(fn) -> float:
    t0 = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - t0


def timed_prefill(run, rng, vocab: int, n: int, repeats: int) -> dict:
    """Prefill times of n random tokens: the first call at this length, which may compile kernels for the new
    shapes (MLX-CUDA builds fused kernels per shape), then the median of `repeats` more, each on new tokens."""
    first = timed(lambda: run(random_tokens(rng, vocab, n)))
    seconds = statistics.median(timed(lambda: run(random_tokens(rng, vocab, n))) for _ in range(repeats))
    return {"tokens": n, "seconds": seconds, "tokens_per_s": n / seconds, "first_call_seconds": first}


def prefill(model: Model, tokens: list[int], commit_method: str = DEFAULT_COMMIT_METHOD):
    """A fresh cache holding `tokens` and the logits after the last one [1, V], the way generation gets them:
    the engine's prefill, which computes no other position's logits."""
    cache = make_cache(model, commit_method)
    logits = engine_prefill(model, cache, tokens)[0][None]
    mx.eval(logits)
    return cache, logits


def clone_cache(model: Model, cache, commit_method: str):
    """A cache at the same position holding the same arrays (MLX arrays are immutable, so nothing is copied
    until one of the two writes), possibly with another commit method."""
    new = make_cache(model, commit_method)
    for src, dst in zip(cache, new):
        if isinstance(src, KVCache):
            dst.keys, dst.values = src.state
        else:
            dst.conv_state, dst.state = src.conv_state, src.state
        dst.offset = src.offset
    return new


def snapshot(cache) -> list:
    return [(c.offset, c.conv_state, c.state) if isinstance(c, GDNCache) else (c.offset,) for c in cache]


def restore(cache, saved: list):
    """Back to a snapshot: GDN arrays as they were, KV offsets moved back (later slots are overwritten)."""
    for c, s in zip(cache, saved):
        if isinstance(c, GDNCache):
            c.offset, c.conv_state, c.state = s
        else:
            c.offset = s[0]


def step_ms(model: Model, cache, S: int, repeats: int, rng, eager: bool = False) -> float:
    """One forward of S tokens inside a window at the cache's position, then commit(0) so the position stays.
    Only the forward and its mx.eval are timed. `eager` bypasses compiled steps."""
    tokens = mx.array([random_tokens(rng, model.config.vocab_size, S)], mx.int32)
    forward = model.forward if eager else model

    def once():
        cache.begin_window()
        dt = timed(lambda: forward(tokens, cache))
        cache.commit(0)
        cache.eval()
        return dt

    return median_ms(once, repeats)


def window_consistency(model: Model, cache, S: int, rng) -> dict:
    """One S-token forward against S one-token forwards from the same cache: the same function, so they must
    agree up to rounding. Compares the layers' contribution to the last hidden state (hidden minus embedding,
    relative to its largest entry) and the greedy tokens."""
    tokens = random_tokens(rng, model.config.vocab_size, S)
    logits, hidden = model(mx.array([tokens]), clone_cache(model, cache, "replay"), return_hidden=True)
    one_by_one = clone_cache(model, cache, "replay")
    steps = [model(mx.array([[t]]), one_by_one, return_hidden=True) for t in tokens]
    seq_logits, seq_hidden = (mx.concatenate(parts, axis=1) for parts in zip(*steps))
    layers_part = (hidden - model.model.embed_tokens(mx.array([tokens]))).astype(mx.float32)
    diff = (hidden.astype(mx.float32) - seq_hidden.astype(mx.float32)).abs().max()
    same = (logits.argmax(-1) == seq_logits.argmax(-1)).astype(mx.float32).mean()
    return {"S": S, "hidden_max_rel_diff": (diff / layers_part.abs().max()).item(), "same_argmax": same.item()}


def measure_components(model: Model, cache, sizes, repeats: int) -> list:
    """Time of the lm_head, one GDN mixer, one attention mixer (each on a fresh copy of its layer's cache at
    the context, made outside the timing) and one MoE layer, per S: where a step's time goes. The attention
    layer's copy grows its KV buffer once per call (a concatenation), which is included."""
    cfg, layers = model.config, model.model.layers
    gdn_at = next((i for i, t in enumerate(cfg.layer_types) if t == "linear_attention"), None)
    attn_at = next((i for i, t in enumerate(cfg.layer_types) if t == "full_attention"), None)
    moe = next((l.mlp for l in layers if isinstance(l.mlp, SparseMoE)), None)

    def with_cache(mixer, i, x):
        def once():
            layer_cache = clone_cache(model, cache, "replay")[i]
            return timed(lambda: mixer(x, layer_cache))
        return once

    rows = []
    for S in sizes:
        x = mx.random.normal((1, S, cfg.hidden_size)).astype(mx.bfloat16)
        mx.eval(x)
        row = {"S": S, "lm_head_ms": median_ms(lambda: timed(lambda: model.logits(x)), repeats)}
        if gdn_at is not None:
            row["gdn_layer_ms"] = median_ms(with_cache(layers[gdn_at].linear_attn, gdn_at, x), repeats)
        if attn_at is not None:
            row["attention_layer_ms"] = median_ms(with_cache(layers[attn_at].self_attn, attn_at, x), repeats)
        if moe is not None:
            row["moe_layer_ms"] = median_ms(lambda: timed(lambda: moe(x)), repeats)
        rows.append(row)
    return rows


def window_bytes(cache) -> dict:
    """What the GDN layers hold for an open window, beyond their current state, by kind (bytes)."""
    held = {"saved_state": 0, "inputs": 0, "tape": 0, "states": 0}
    for c in cache:
        w = getattr(c, "_window", None) if isinstance(c, GDNCache) else None
        if not w:
            continue
        held["saved_state"] += w["state"].nbytes if w["state"] is not None else 0
        held["inputs"] += sum(x.nbytes for x in w["conv_in"])  # conv inputs: carried, then the window's
        held["tape"] += sum(x.nbytes for step in w["tape"] for x in step)
        held["states"] += sum(x.nbytes for x in w["states"])
    return {**held, "total": sum(held.values())}


def measure_commit(model: Model, cache, method: str, repeats: int, rng, window: int = COMMIT_WINDOW) -> dict:
    """Forward a window of `window` tokens, then commit(keep) for keep = 1..window-1 (a rejection somewhere in
    the window). As in the engine, the commit's picks are prepared while the device runs the window's forward
    (that host time is reported, not counted). Two costs of the commit:
      - alone: commit + evaluating the cache, timed by itself (an upper bound: it pays a sync of its own);
      - in a round, as the engine runs it (the commit is evaluated with the next forward): the time of
        commit + the next 1-token step minus that of the same step after a window that needs no commit.
    The window's forward is timed too: "states" makes it emit every state."""
    cache = clone_cache(model, cache, method)
    vocab = model.config.vocab_size
    tokens = mx.array([random_tokens(rng, vocab, window)], mx.int32)
    nxt = mx.array([random_tokens(rng, vocab, 1)], mx.int32)
    start = snapshot(cache)
    forward, prepare, alone, with_step, step_only, held = [], [], [], [], [], {}

    def verify():  # the window's forward, the commit prepared while the device runs it -> host seconds of that
        out = model(tokens, cache)
        mx.async_eval(out)
        t0 = time.perf_counter()
        cache.prepare_commit()
        dt = time.perf_counter() - t0
        mx.eval(out)
        return dt

    for r in range(repeats + 1):  # round 0 is the warm-up
        for keep in range(1, window):
            cache.begin_window()
            dt_forward = timed(lambda: model(tokens, cache))
            held = window_bytes(cache)
            cache.prepare_commit()
            t0 = time.perf_counter()
            cache.commit(keep)
            cache.eval()
            dt_alone = time.perf_counter() - t0
            restore(cache, start)

            cache.begin_window()
            dt_prepare = verify()
            dt_with_step = timed(lambda: (cache.commit(keep), model(nxt, cache))[1])
            restore(cache, start)

            cache.begin_window()
            verify()
            cache.commit(window)  # everything accepted: nothing to undo
            dt_step_only = timed(lambda: model(nxt, cache))
            restore(cache, start)
            if r:
                forward.append(dt_forward)
                prepare.append(dt_prepare)
                alone.append(dt_alone)
                with_step.append(dt_with_step)
                step_only.append(dt_step_only)
    ms = lambda xs: 1e3 * statistics.median(xs)
    return {
        "window": window,
        "window_forward_ms": ms(forward),
        "commit_alone_ms": ms(alone),
        "prepare_host_ms": ms(prepare),  # during the window's forward, off the critical path
        "commit_in_round_ms": max(0.0, ms(with_step) - ms(step_only)),
        "next_step_ms": ms(step_only),
        "window_bytes": held,
    }


# ---------------------------------------------------------------------------------------------- MoE fusion

def expert_rows(layer, start: int, stop: int):
    """An expert stack holding output rows start:stop of `layer` (contiguous copies, quantized or not)."""
    E = layer.weight.shape[0]
    if isinstance(layer, QuantizedExpertLinear):
        in_dims = layer.scales.shape[-1] * layer.group_size
        part = QuantizedExpertLinear(E, in_dims, stop - start, layer.group_size, layer.bits, layer.mode)
    else:
        part = ExpertLinear(E, layer.weight.shape[-1], stop - start)
    part.update({name: mx.contiguous(x[:, start:stop]) for name, x in layer.parameters().items()})
    mx.eval(part.parameters())
    return part


class SeparateGateUpExperts(nn.Module):
    """The unfused reference: gate, up and down as three gather matmuls (what fusing at load replaces).
    Same routing and the same sort-by-expert rule as `Experts`, so only the fusion differs."""

    def __init__(self, fused):
        super().__init__()
        hidden = fused.gate_up.weight.shape[1] // 2
        self.gate = expert_rows(fused.gate_up, 0, hidden)
        self.up = expert_rows(fused.gate_up, hidden, 2 * hidden)
        self.down = fused.down

    def __call__(self, x, indices):
        N, k = indices.shape
        do_sort = indices.size >= sort_threshold()
        if do_sort:
            flat = indices.flatten()
            order = mx.argsort(flat)
            h, idx = x[order // k][:, None, :], flat[order]
        else:
            h, idx = x[:, None, None, :], indices
        y = self.down(nn.silu(self.gate(h, idx, do_sort)) * self.up(h, idx, do_sort), idx, do_sort).squeeze(-2)
        return y[mx.argsort(order)].reshape(N, k, -1) if do_sort else y


def unfused_copy(moe: SparseMoE, cfg: ModelConfig) -> SparseMoE:
    ref = SparseMoE(cfg)  # its own random weights are lazy and replaced below, so never computed
    ref.gate, ref.experts = moe.gate, SeparateGateUpExperts(moe.experts)
    if "shared_expert" in moe:
        ref.shared_expert, ref.shared_expert_gate = moe.shared_expert, moe.shared_expert_gate
    return ref


def measure_moe(model: Model, sizes, repeats: int) -> list:
    layer = next((l for l in model.model.layers if isinstance(l.mlp, SparseMoE)), None)
    if layer is None:
        return []
    fused, ref = layer.mlp, unfused_copy(layer.mlp, model.config)
    rows = []
    for S in sizes:
        x = mx.random.normal((1, S, model.config.hidden_size)).astype(mx.bfloat16)
        mx.eval(x)
        a = median_ms(lambda: timed(lambda: fused(x)), repeats)  # as it runs: the MoE kernels where they apply
        o = median_ms(lambda: timed(lambda: fused.ops(x[0])), repeats)
        b = median_ms(lambda: timed(lambda: ref(x)), repeats)
        rows.append({"S": S, "fused_ms": a, "ops_ms": o, "unfused_ms": b, "fused_speedup": b / a})
    return rows


# ---------------------------------------------------------------------------------------------- bandwidth

def device_name() -> str:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return str(info.get("device_name") or mx.default_device())


def nominal_bandwidth_gbs(name: str) -> float | None:
    return next((bw for chip, bw in NOMINAL_BANDWIDTH_GBS.items() if chip in name.upper()), None)


def step_bytes(model: Model, cache) -> dict:
    """Bytes one S=1 step must read: every non-expert weight (lm_head included), top_k of the E experts in
    each MoE layer, one embedding row, and the cache (KV up to the position, GDN conv window and state)."""
    cfg = model.config
    dense = experts = embedding = 0
    for name, p in tree_flatten(model.parameters()):
        if ".experts." in name:
            experts += p.nbytes
        elif name.startswith("model.embed_tokens."):
            embedding += p.nbytes
        else:
            dense += p.nbytes
    state = 0
    for c in cache:
        arrays = c.state if isinstance(c, KVCache) else (c.conv_state, c.state)
        state += sum(x.nbytes for x in arrays)
    parts = {
        "dense_weights": dense,
        "active_experts": round(experts * cfg.num_experts_per_tok / max(cfg.num_experts, 1)),
        "embedding_row": round(embedding / cfg.vocab_size),
        "cache": state,
    }
    return {**parts, "total": sum(parts.values())}


# ---------------------------------------------------------------------------------------------- speculative

def greedy_continuation(model: Model, prompt: list[int], n: int) -> list[int]:
    out = []
    for emitted in speculate(model, prompt, SamplingParams(), None, 0):
        out += emitted
        if len(out) >= n:
            return out[:n]


class OracleProposer(Proposer):
    """A draft that knows the target's greedy continuation and offers it, each token right with probability
    alpha, at no cost: acceptance becomes a dial.

    Each drafted token is an independent coin: right (the target's own greedy token) with probability alpha,
    else wrong (that token + 1). Drafting goes on past a wrong token, as a real draft would not know it erred,
    so every round verifies K+1 positions and the accepted run is the leading right tokens:
    E[tau] = (1 - alpha^(K+1)) / (1 - alpha). The coin belongs to the position in the output, drawn once per
    seed: runs of different K (or K chosen by the engine) with one seed see the same right and wrong drafts,
    so their rates differ by K alone, not by luck. (A position drafted again after a rejection before it gets
    its coin again, which no acceptance has looked at: the coins stay independent.)

    The continuation comes from plain decoding (S=1 forwards). A verify window (S > 1) reduces in another order
    and could break a near-tie the other way (`greedy_head` makes that rare); then the emitted text leaves the
    reference and the oracle recomputes it from there, RESYNC_LOOKAHEAD tokens at a time. That time is not the
    draft's: it is kept in `overhead` for the caller to subtract.
    """

    def __init__(self, model: Model, prompt: list[int], reference: list[int], alpha: float, seed: int = 0,
                 draft_cost_ms: float = 0.0):
        self.model, self.prompt, self.alpha = model, prompt, alpha
        self.draft_cost_ms = draft_cost_ms  # slept per drafted token: a draft's cost the engine itself sees
        self.reference = list(reference)
        self.rng = np.random.default_rng(seed)
        self.coins = np.zeros(0, bool)  # coins[i]: is the draft of output position i right
        self.vocab = model.config.vocab_size
        self.generated: list[int] = []  # emitted after the prompt
        self.resyncs, self.overhead = 0, 0.0

    def prefill(self, tokens):
        self.generated = None  # the first `last` is the target's first token

    def propose(self, last, k, params):
        if self.generated is None:
            self.generated = [last]
            if last != self.reference[0]:
                self._resync()
        at = len(self.generated)
        if len(self.reference) < at + k:  # after a resync, or past the end
            self._recompute(max(k, RESYNC_LOOKAHEAD))
        right = self.reference[at : at + k]
        if len(self.coins) < at + k:  # drawn in position order from one stream: the same coins for every K
            self.coins = np.concatenate([self.coins, self.rng.random(at + k - len(self.coins)) < self.alpha])
        self._drafts = [t if ok else (t + 1) % self.vocab for t, ok in zip(right, self.coins[at : at + k])]
        if self.draft_cost_ms and k:
            time.sleep(k * self.draft_cost_ms / 1e3)
        return mx.array(self._drafts, mx.int32), None

    def commit(self, num_accepted, next_token, hidden=None):
        at = len(self.generated)
        self.generated += self._drafts[:num_accepted] + [next_token]
        if self.generated[at:] != self.reference[at : len(self.generated)]:
            self._resync()

    def _resync(self):
        self.resyncs += 1
        self.reference = list(self.generated)  # the next propose recomputes what follows

    def _recompute(self, n: int):
        t0 = time.perf_counter()
        self.reference = self.generated + greedy_continuation(self.model, self.prompt + self.generated, n)
        self.overhead += time.perf_counter() - t0


def run_decode(model: Model, prompt: list[int], n: int, proposer=None, k: int = 0,
               commit_method=DEFAULT_COMMIT_METHOD):
    """Generate at least n tokens through the engine -> (tokens, seconds after the prefill, Stats). The first
    token comes with the prefill: the seconds are those of the rounds that made the rest (`decode_rate`)."""
    stats, out = Stats(), []
    t0 = time.perf_counter()
    for emitted in speculate(model, prompt, SamplingParams(), proposer, k, commit_method, stats):
        out += emitted
        if len(out) >= n:
            break
    seconds = time.perf_counter() - t0 - stats.prefill_time - (proposer.overhead if proposer else 0.0)
    return out, seconds, stats


def decode_rate(tokens: list[int], seconds: float) -> float:
    """Tokens per second of run_decode's rounds: all tokens but the prefill's."""
    return (len(tokens) - 1) / seconds


def expected_tau(alpha: float, k: int) -> float:
    return float(k + 1) if alpha == 1 else (1 - alpha ** (k + 1)) / (1 - alpha)


def measure_speculative(model: Model, prompt: list[int], opts: BenchOptions, draft_cost_ms: float, log) -> dict:
    """Plain decoding (K=0) first: its output is also the oracle's reference. Then every (alpha, K).
    The draft cost is modelled as time added per drafted token (a sequential draft: the target idles)."""
    auto_tokens = 2 * opts.gen_tokens  # the policy spends its first rounds measuring
    need = auto_tokens + max(opts.draft_lengths) + 1
    # Warm-up: kernels and compiled steps are built on first use, per window size; every K up to the largest,
    # with rejections, so that commits of every window size are built too.
    max_k = max(opts.draft_lengths)
    warm, _, _ = run_decode(model, prompt, 2 * max_k + 1)
    ks = itertools.cycle(range(max_k + 1))
    run_decode(model, prompt, 6 * (max_k + 1), OracleProposer(model, prompt, warm, 0.5), lambda: next(ks),
               opts.commit_method)
    reference, seconds, _ = run_decode(model, prompt, need)
    baseline = decode_rate(reference, seconds)
    log(f"  plain decoding: {baseline:.1f} tok/s")
    runs = []
    for alpha in opts.alphas:
        for k in opts.draft_lengths:
            oracle = OracleProposer(model, prompt, reference, alpha, seed=opts.seed)  # the same coins for all K
            out, seconds, stats = run_decode(model, prompt, opts.gen_tokens, oracle, k, opts.commit_method)
            with_cost = seconds + stats.drafted * draft_cost_ms / 1e3
            runs.append({
                "alpha": alpha, "K": k, "tokens": len(out), "rounds": stats.rounds,
                "acceptance": stats.acceptance_rate, "tau": stats.tau, "tau_expected": expected_tau(alpha, k),
                "resyncs": oracle.resyncs, "seconds": seconds,
                "tokens_per_s": decode_rate(out, seconds), "speedup": decode_rate(out, seconds) / baseline,
                "tokens_per_s_with_draft_cost": decode_rate(out, with_cost),
                "speedup_with_draft_cost": decode_rate(out, with_cost) / baseline,
            })
            log(f"  alpha {alpha} K {k}: tau {stats.tau:.2f}, {decode_rate(out, seconds):.1f} tok/s, "
                f"x{runs[-1]['speedup']:.2f} (x{runs[-1]['speedup_with_draft_cost']:.2f} with draft cost)")
        # K chosen by the engine (AdaptiveK), at zero draft cost and with the draft cost slept for real
        auto = {}
        for cost in (0.0, draft_cost_ms):
            oracle = OracleProposer(model, prompt, reference, alpha, opts.seed, draft_cost_ms=cost)
            policy = AdaptiveK(max_k=max(opts.draft_lengths))
            out, seconds, stats = run_decode(model, prompt, auto_tokens, oracle, policy, opts.commit_method)
            auto[cost] = (decode_rate(out, seconds), stats)
        (tps, stats), (tps_cost, _) = auto[0.0], auto[draft_cost_ms]
        runs.append({
            "alpha": alpha, "K": "auto", "mean_K": stats.drafted / stats.rounds, "tokens": auto_tokens,
            "rounds": stats.rounds, "acceptance": stats.acceptance_rate, "tau": stats.tau, "tau_expected": None,
            "resyncs": None, "tokens_per_s": tps, "speedup": tps / baseline,
            "tokens_per_s_with_draft_cost": tps_cost, "speedup_with_draft_cost": tps_cost / baseline,
        })
        log(f"  alpha {alpha} K auto (mean {runs[-1]['mean_K']:.1f}): tau {stats.tau:.2f}, {tps:.1f} tok/s, "
            f"x{tps / baseline:.2f} (x{tps_cost / baseline:.2f} with draft cost)")
    return {
        "baseline_tokens_per_s": baseline, "baseline_tokens": len(reference), "draft_cost_ms": draft_cost_ms,
        "draft_cost_model": "sequential: draft_cost_ms added per drafted token",
        "oracle": "each draft right with probability alpha, independently; drafting continues past a wrong one",
        "commit_method": opts.commit_method, "runs": runs,
    }


# ---------------------------------------------------------------------------------------------- mlx-lm

def mlx_lm_available() -> bool:
    try:
        import mlx_lm  # noqa: F401
    except ImportError:
        return False
    return True


def mlx_lm_config(cfg: ModelConfig) -> dict:
    text = dict(
        model_type=cfg.model_type, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
        intermediate_size=cfg.intermediate_size, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, rms_norm_eps=cfg.rms_norm_eps,
        vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_position_embeddings,
        linear_num_key_heads=cfg.linear_num_key_heads, linear_num_value_heads=cfg.linear_num_value_heads,
        linear_key_head_dim=cfg.linear_key_head_dim, linear_value_head_dim=cfg.linear_value_head_dim,
        linear_conv_kernel_dim=cfg.linear_conv_kernel_dim, full_attention_interval=FULL_ATTENTION_INTERVAL,
        num_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
        moe_intermediate_size=cfg.moe_intermediate_size, decoder_sparse_step=cfg.decoder_sparse_step,
        shared_expert_intermediate_size=cfg.shared_expert_intermediate_size, mlp_only_layers=cfg.mlp_only_layers,
        norm_topk_prob=cfg.norm_topk_prob, tie_word_embeddings=cfg.tie_word_embeddings,
        rope_theta=cfg.rope_theta, partial_rotary_factor=cfg.partial_rotary_factor,
        rope_parameters={"type": "default", "rope_theta": cfg.rope_theta,
                         "partial_rotary_factor": cfg.partial_rotary_factor},
    )
    return text if cfg.model_type == "qwen3_next" else {"model_type": cfg.model_type, "text_config": text}


def mlx_lm_weights(model: Model) -> dict:
    """Our parameters under mlx-lm's names and layouts: the fused GDN input projection split back into
    in_proj_qkv/z/b/a (Qwen3-Next: re-interleaved per k-head into in_proj_qkvz/ba), experts.gate_up split
    into switch_mlp.gate_proj/up_proj, conv1d weights [C, K] -> [C, K, 1]. Quantized rows split like weights."""
    cfg = model.config
    Hk, Dk, Dv = cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = cfg.linear_num_value_heads // max(Hk, 1)
    prefix = "" if cfg.model_type == "qwen3_next" else "language_model."
    out = {}
    for i, layer in enumerate(model.model.layers):
        if "linear_attn" not in layer:
            continue
        gdn = layer.linear_attn
        base = f"model.layers.{i}.linear_attn"
        parts = {}
        for group, proj in zip(gdn.groups, gdn.in_proj):
            cuts = np.cumsum([gdn.part_sizes[p] for p in group])[:-1].tolist()
            for name, x in proj.parameters().items():
                for part, rows in zip(group, mx.split(x, cuts, axis=0)):
                    parts.setdefault(part, {})[name] = rows
        for name in parts["qkv"]:
            qkv, z, b, a = (parts[p][name] for p in ("qkv", "z", "b", "a"))
            if cfg.model_type == "qwen3_next":
                per_head = lambda t: t.reshape(Hk, -1, t.shape[-1])
                q, k, v = mx.split(qkv, [Hk * Dk, 2 * Hk * Dk], axis=0)
                qkvz = mx.concatenate([per_head(q), per_head(k), per_head(v), per_head(z)], axis=1)
                out[f"{base}.in_proj_qkvz.{name}"] = qkvz.reshape(-1, qkv.shape[-1])
                ba = mx.concatenate([per_head(b), per_head(a)], axis=1)
                out[f"{base}.in_proj_ba.{name}"] = ba.reshape(-1, b.shape[-1])
            else:
                out.update({f"{base}.in_proj_{p}.{name}": t for p, t in zip(("qkv", "z", "b", "a"), (qkv, z, b, a))})
    for name, x in tree_flatten(model.parameters()):
        if ".linear_attn.in_proj." in name:
            continue
        if name.endswith("conv1d.weight"):
            x = x[..., None]
        elif ".experts.gate_up." in name:
            half = x.shape[1] // 2
            head, tail = name.split(".experts.gate_up.")
            out[f"{head}.switch_mlp.gate_proj.{tail}"] = x[:, :half]
            out[f"{head}.switch_mlp.up_proj.{tail}"] = x[:, half:]
            continue
        name = name.replace(".experts.down.", ".switch_mlp.down_proj.")
        out[name] = x
    return {prefix + k: mx.contiguous(v) for k, v in out.items()}


def build_mlx_lm(model: Model, bits: int):
    """The same model in mlx-lm (qwen3_5_moe / qwen3_next), quantized the same way, holding our weights."""
    import importlib

    cfg = model.config
    family = importlib.import_module(f"mlx_lm.models.{cfg.model_type}")
    lm = family.Model(family.ModelArgs.from_dict(mlx_lm_config(cfg)))
    cast(lm)  # lazy: every array is replaced below before anything is computed
    quantize(lm, bits)
    lm.load_weights(list(mlx_lm_weights(model).items()), strict=True)
    mx.eval(lm.parameters())
    return lm


def mlx_lm_cache_from(lm, cache) -> list:
    """mlx-lm's cache at the position of ours, holding the same keys, values and GDN states
    (mlx-lm keeps the recurrent state as [B, H, Dv, Dk], ours as [B, H, Dk, Dv])."""
    out = lm.make_cache()
    for src, dst in zip(cache, out):
        if isinstance(src, KVCache):
            dst.keys, dst.values = (mx.contiguous(x) for x in src.state)
            dst.offset = src.offset
        else:
            dst[0], dst[1] = src.conv_state, mx.contiguous(src.state.swapaxes(-1, -2))
    mx.eval([c.state for c in out])
    return out


def mlx_lm_step_ms(lm, cache, S: int, repeats: int, rng, vocab: int) -> float:
    """mlx-lm's GDN cache cannot be trimmed: after each timed forward its arrays are put back as they were
    (free: MLX arrays are immutable) and the KV caches' offsets moved back. Only forward + mx.eval is timed."""
    tokens = mx.array([random_tokens(rng, vocab, S)], mx.int32)

    def once():
        saved = [list(c.cache) if hasattr(c, "cache") else c.offset for c in cache]
        dt = timed(lambda: lm(tokens, cache=cache))
        for c, s in zip(cache, saved):
            if hasattr(c, "cache"):
                c.cache = list(s)
            else:
                c.offset = s
        return dt

    return median_ms(once, repeats)


def mlx_lm_prefill(lm, tokens: list[int]):
    """As `prefill`, the way mlx-lm's generate_step does it: all tokens but the last with no logits, then a
    one-token step for the logits after the last."""
    cache = lm.make_cache()
    for i in range(0, len(tokens) - 1, PREFILL_STEP):
        lm(mx.array([tokens[i : min(i + PREFILL_STEP, len(tokens) - 1)]]), cache=cache)
        mx.eval([c.state for c in cache])
    mx.eval(lm(mx.array([tokens[-1:]]), cache=cache)[:, -1])


def mlx_lm_decode_tps(lm, cache, last: int, n: int) -> float:
    """mlx-lm's own greedy decode loop (generate_step, which overlaps steps with async_eval) from our cache."""
    from mlx_lm.generate import generate_step

    t0 = time.perf_counter()
    count = sum(1 for _ in generate_step(mx.array([last]), lm, max_tokens=n, prompt_cache=cache))
    return count / (time.perf_counter() - t0)


def measure_mlx_lm(model: Model, cache, prompt: list[int], opts: BenchOptions, rng, log) -> dict:
    """mlx-lm on our weights and cache: a logits check, then step times and plain decoding alternating with ours,
    then prefill. `prompt` is the context followed by the token to decode."""
    last_token = prompt[-1]
    import mlx_lm

    cfg = model.config
    lm = build_mlx_lm(model, opts.bits)
    lm_cache = mlx_lm_cache_from(lm, cache)
    report = {"version": mlx_lm.__version__, "weights": "ours, copied by name", "prefill": [], "step": []}

    # Same weights and caches: the next-token logits must agree (up to bf16 rounding) or the comparison is void.
    token = mx.array([[last_token]], mx.int32)
    ours = model(token, clone_cache(model, cache, "replay"))[0, -1].astype(mx.float32)
    saved = [list(c.cache) if hasattr(c, "cache") else c.offset for c in lm_cache]
    theirs = lm(token, cache=lm_cache)[0, -1].astype(mx.float32)
    mx.eval(ours, theirs)
    for c, s in zip(lm_cache, saved):
        if hasattr(c, "cache"):
            c.cache = list(s)
        else:
            c.offset = s
    report["logits_check"] = {
        "max_abs_diff": (ours - theirs).abs().max().item(), "max_abs_logit": ours.abs().max().item(),
        "same_argmax": bool(ours.argmax().item() == theirs.argmax().item()),
    }
    log(f"  logits vs ours: {report['logits_check']}")

    # The two engines alternate, a few repeats at a time, so that a change in the machine's speed during the run
    # (these steps are bound by host-side launch work) touches both alike; the ratios come from these pairs.
    chunk = max(opts.repeats // ALTERNATIONS, 3)
    for S in opts.step_sizes:
        theirs, ours = [], []
        for _ in range(ALTERNATIONS):
            theirs.append(mlx_lm_step_ms(lm, lm_cache, S, chunk, rng, cfg.vocab_size))
            ours.append(step_ms(model, cache, S, chunk, rng))
        ms, ours_ms = statistics.median(theirs), statistics.median(ours)
        report["step"].append({"S": S, "ms": ms, "ours_ms": ours_ms, "ours_over_mlx_lm": ours_ms / ms})
        log(f"  mlx-lm step S={S}: {ms:.2f} ms (ours alongside: {ours_ms:.2f} ms)")
    theirs, ours = [], []
    for _ in range(ALTERNATIONS // 2):
        theirs.append(mlx_lm_decode_tps(lm, lm_cache, last_token, opts.gen_tokens))
        out, seconds, _ = run_decode(model, prompt, opts.gen_tokens)
        ours.append(decode_rate(out, seconds))
    report["decode_tokens_per_s"] = statistics.median(theirs)
    report["ours_decode_tokens_per_s"] = statistics.median(ours)
    log(f"  mlx-lm plain decoding: {report['decode_tokens_per_s']:.1f} tok/s "
        f"(ours alongside: {report['ours_decode_tokens_per_s']:.1f} tok/s)")

    lengths = [n for n in opts.prefill if n <= opts.mlx_lm_max_prefill]
    report["prefill_skipped"] = [n for n in opts.prefill if n > opts.mlx_lm_max_prefill]
    for n in lengths:
        row = timed_prefill(lambda tokens: mlx_lm_prefill(lm, tokens), rng, cfg.vocab_size, n, opts.prefill_repeats)
        report["prefill"].append(row)
        log(f"  mlx-lm prefill {n}: {row['seconds']:.3f} s (first call at this length {row['first_call_seconds']:.2f} s)")
    return report


# ---------------------------------------------------------------------------------------------- the run

def run_bench(opts: BenchOptions, log=print, on_section=None) -> dict:
    """Run every measurement; -> the report (a JSON-ready dict). on_section(report) is called after each
    section, so a long run can be saved as it goes."""
    opts.check()
    section = on_section or (lambda report: None)
    rng = np.random.default_rng(opts.seed)
    cfg = arch_config(opts.arch, opts.layers)
    name = device_name()
    report = {"meta": {
        "arch": opts.arch, "layers": opts.layers, "layer_types": cfg.layer_types, "bits": opts.bits,
        "context": opts.context, "device": name, "mlx": mx.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"), "options": asdict(opts), "compiled_steps": compiled.enabled(),
    }}

    t0 = time.perf_counter()
    model = build_target(cfg, opts.bits, opts.seed)
    report["meta"]["build_seconds"] = time.perf_counter() - t0
    report["meta"]["parameter_bytes"] = sum(p.nbytes for _, p in tree_flatten(model.parameters()))
    log(f"built {opts.arch}, {opts.layers} layers, {opts.bits}-bit on {name} "
        f"in {report['meta']['build_seconds']:.1f} s")

    prompt = random_tokens(rng, cfg.vocab_size, opts.context + 1)  # the context, then the token to decode
    seconds = timed(lambda: prefill(model, prompt[:-1])[1])  # also the warm-up of the prefill path
    cache, _ = prefill(model, prompt[:-1])
    report["prefill"] = []
    for n in opts.prefill:
        row = timed_prefill(lambda tokens: prefill(model, tokens)[1], rng, cfg.vocab_size, n, opts.prefill_repeats)
        report["prefill"].append(row)
        log(f"prefill {n}: {row['seconds']:.3f} s ({row['tokens_per_s']:.0f} tok/s; first call at this length "
            f"{row['first_call_seconds']:.3f} s)")
    report["meta"]["context_prefill_seconds"] = seconds
    section(report)

    report["step"] = []
    for S in opts.step_sizes:
        ms = step_ms(model, cache, S, opts.repeats, rng)
        row = {"S": S, "ms": ms, "ms_per_token": ms / S}
        if report["meta"]["compiled_steps"]:  # what compiling the step gains
            row["eager_ms"] = step_ms(model, cache, S, opts.repeats, rng, eager=True)
        report["step"].append(row)
        log(f"step S={S}: {ms:.2f} ms" + (f" (eager {row['eager_ms']:.2f} ms)" if "eager_ms" in row else ""))
    report["consistency"] = window_consistency(model, cache, COMMIT_WINDOW, rng)
    log(f"window vs one-by-one forwards: {report['consistency']}")
    section(report)

    report["commit"] = {m: measure_commit(model, cache, m, opts.repeats, rng) for m in COMMIT_METHODS}
    for m, row in report["commit"].items():
        log(f"commit {m}: forward {row['window_forward_ms']:.2f} ms, commit alone {row['commit_alone_ms']:.3f} ms, "
            f"in a round {row['commit_in_round_ms']:.3f} ms (prepared in {row['prepare_host_ms']:.3f} ms during the "
            f"forward), holds {row['window_bytes']['total'] / 2**20:.1f} MiB")
    section(report)

    report["moe"] = measure_moe(model, [1, 5, 16], opts.repeats)
    for row in report["moe"]:
        log(f"MoE S={row['S']}: as run {row['fused_ms']:.3f} ms, ops {row['ops_ms']:.3f} ms, "
            f"ops with separate gate/up {row['unfused_ms']:.3f} ms")
    report["components"] = measure_components(model, cache, sorted({1, max(opts.step_sizes)}), opts.repeats)
    for row in report["components"]:
        log(f"components: {row}")
    section(report)

    step1 = next((row["ms"] for row in report["step"] if row["S"] == 1), None)
    if step1 is None:
        step1 = step_ms(model, cache, 1, opts.repeats, rng)
    read = step_bytes(model, cache)
    achieved = read["total"] / (step1 / 1e3) / 1e9
    nominal = opts.bandwidth_gbs or nominal_bandwidth_gbs(name)
    report["bandwidth"] = {"bytes": read, "step_ms": step1, "achieved_gbs": achieved, "nominal_gbs": nominal,
                           "fraction_of_nominal": achieved / nominal if nominal else None}
    log(f"bandwidth at S=1: {achieved:.1f} GB/s" + (f" of {nominal:.0f} ({achieved / nominal:.1%})" if nominal else ""))
    section(report)

    draft_cost = opts.draft_cost_ms if opts.draft_cost_ms is not None else step1 / 10
    log("speculative decoding (oracle draft):")
    report["speculative"] = measure_speculative(model, prompt, opts, draft_cost, log)
    section(report)

    if not opts.mlx_lm:
        report["mlx_lm"] = {"skipped": "--no-mlx-lm"}
    elif not mlx_lm_available():
        report["mlx_lm"] = {"skipped": "mlx_lm is not installed"}
    else:
        log("mlx-lm:")
        try:
            report["mlx_lm"] = measure_mlx_lm(model, cache, prompt, opts, rng, log)
        except Exception as e:  # the baseline failing must not cost the numbers above
            report["mlx_lm"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  mlx-lm failed: {report['mlx_lm']['error']}")
        lm = report["mlx_lm"]
        if lm.get("decode_tokens_per_s"):
            lm["plain_decode_ours_over_mlx_lm"] = lm["ours_decode_tokens_per_s"] / lm["decode_tokens_per_s"]
            for r in report["speculative"]["runs"]:  # speculative tokens/s against mlx-lm's plain decoding
                r["over_mlx_lm"] = r["tokens_per_s"] / lm["decode_tokens_per_s"]
        ours = {row["tokens"]: row["seconds"] for row in report["prefill"]}
        for row in lm.get("prefill", []):
            if row["tokens"] in ours:
                row["ours_over_mlx_lm"] = ours[row["tokens"]] / row["seconds"]
    section(report)
    return report


def write_report(report: dict, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


def format_table(report: dict) -> str:
    """A short plain-text summary of a report."""
    meta, lm = report["meta"], report.get("mlx_lm", {})
    lines = [f"specdec bench: {meta['arch']}, {meta['layers']} layers, {meta['bits']}-bit, context {meta['context']}, "
             f"{meta['device']}, mlx {meta['mlx']}" + (f", mlx-lm {lm['version']}" if "version" in lm else "")]
    lines.append(f"first prefill of the context (warm-up, kernels compile): {meta['context_prefill_seconds']:.2f} s")
    theirs_prefill = {row["tokens"]: row for row in lm.get("prefill", [])}
    lines.append(f"{'prefill':<10}{'tokens':>8}{'ours s':>10}{'tok/s':>10}{'mlx-lm s':>10}{'ours/mlx-lm':>13}"
                 f"{'| first call: ours s':>21}{'mlx-lm s':>10}")
    for row in report["prefill"]:
        t = theirs_prefill.get(row["tokens"])
        extra = f"{t['seconds']:>10.3f}{row['seconds'] / t['seconds']:>13.4f}" if t else f"{'-':>10}{'-':>13}"
        first = f"{row['first_call_seconds']:>21.3f}" + (f"{t['first_call_seconds']:>10.2f}" if t else f"{'-':>10}")
        lines.append(f"{'':<10}{row['tokens']:>8}{row['seconds']:>10.3f}{row['tokens_per_s']:>10.0f}{extra}{first}")
    theirs_step = {row["S"]: row for row in lm.get("step", [])}
    lines.append(f"{'step':<10}{'S':>8}{'ours ms':>10}{'ms/token':>10}{'eager ms':>10}{'| ours ms':>10}{'mlx-lm ms':>10}"
                 f"{'ours/mlx-lm':>13}  (right of |: the two engines taking turns)")
    for row in report["step"]:
        t = theirs_step.get(row["S"])
        extra = (f"{t['ours_ms']:>10.2f}{t['ms']:>10.2f}{t['ours_over_mlx_lm']:>13.2f}" if t
                 else f"{'-':>10}{'-':>10}{'-':>13}")
        eager = f"{row['eager_ms']:>10.2f}" if "eager_ms" in row else f"{'-':>10}"
        lines.append(f"{'':<10}{row['S']:>8}{row['ms']:>10.2f}{row['ms_per_token']:>10.2f}{eager}{extra}")
    for m, row in report["commit"].items():
        lines.append(f"commit {m:<7} window S={row['window']} forward {row['window_forward_ms']:.2f} ms; commit "
                     f"alone {row['commit_alone_ms']:.3f} ms, in a round {row['commit_in_round_ms']:.3f} ms "
                     f"(next step {row['next_step_ms']:.2f} ms); holds {row['window_bytes']['total'] / 2**20:.2f} MiB")
    for row in report["moe"]:
        lines.append(f"MoE layer S={row['S']:<3} as run {row['fused_ms']:.3f} ms, ops {row['ops_ms']:.3f} ms, "
                     f"separate gate/up {row['unfused_ms']:.3f} ms")
    for row in report["components"]:
        lines.append(f"S={row['S']:<3} ms: " + ", ".join(f"{k[:-3]} {v:.3f}" for k, v in row.items() if k != "S"))
    c = report["consistency"]
    lines.append(f"window of {c['S']} vs one-by-one: hidden max rel diff {c['hidden_max_rel_diff']:.2g}, "
                 f"same argmax {c['same_argmax']:.0%}")
    bw = report["bandwidth"]
    nominal = f" = {bw['fraction_of_nominal']:.1%} of {bw['nominal_gbs']:.0f} GB/s" if bw["nominal_gbs"] else ""
    lines.append(f"bandwidth S=1: {bw['bytes']['total'] / 1e6:.1f} MB in {bw['step_ms']:.2f} ms = "
                 f"{bw['achieved_gbs']:.1f} GB/s{nominal}")
    spec = report["speculative"]
    decode = f"plain decoding: {spec['baseline_tokens_per_s']:.1f} tok/s"
    if lm.get("decode_tokens_per_s"):
        decode += (f"; alternating runs: ours {lm['ours_decode_tokens_per_s']:.1f}, mlx-lm "
                   f"{lm['decode_tokens_per_s']:.1f} tok/s (ours/mlx-lm {lm['plain_decode_ours_over_mlx_lm']:.2f})")
    lines.append(decode)
    lines.append(f"{'alpha':>6}{'K':>5}{'tau':>7}{'E[tau]':>8}{'tok/s':>9}{'speedup':>9}"
                 f"{'w/ draft':>10}{'resyncs':>9}{'/mlx-lm':>9}  (draft cost {spec['draft_cost_ms']:.3f} ms/token; "
                 f"speedup over our plain decoding, /mlx-lm over mlx-lm's)")
    for r in spec["runs"]:
        expected = f"{r['tau_expected']:>8.2f}" if r["tau_expected"] else f"{'-':>8}"
        over = f"{r['over_mlx_lm']:>9.2f}" if "over_mlx_lm" in r else f"{'-':>9}"
        lines.append(f"{r['alpha']:>6}{r['K']:>5}{r['tau']:>7.2f}{expected}{r['tokens_per_s']:>9.1f}"
                     f"{r['speedup']:>9.2f}{r['speedup_with_draft_cost']:>10.2f}{r['resyncs'] or 0:>9}{over}")
    if "logits_check" in lm:
        c = lm["logits_check"]
        lines.append(f"mlx-lm logits vs ours: max |diff| {c['max_abs_diff']:.3g} (max |logit| "
                     f"{c['max_abs_logit']:.3g}), same argmax: {c['same_argmax']}")
    for key in ("skipped", "error"):
        if key in lm:
            lines.append(f"mlx-lm {key}: {lm[key]}")
    return "\n".join(lines)
