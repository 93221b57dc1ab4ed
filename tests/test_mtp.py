"""The MTP head and its proposer.

Tiny checkpoints get random `mtp.*` tensors added on disk, in the Hugging Face layout (zero-centred norms,
per-expert experts; Qwen3.5-MoE and Qwen3-Next) and in an MLX-quantized layout (an mlx_lm conversion of the
target plus `mtp.layers.0.mlp.switch_mlp.*` quantized with mx.quantize, 8-bit router gates). The draft logits
are checked against the head written out longhand in numpy, with the target's hidden states from
transformers, through partial, full and k = 0 rounds, greedy and sampled. Then greedy speculation with
draft="mtp" must reproduce plain greedy decoding, and leave the target's cache as plain decoding does.
"""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from specdec import engine
from specdec.drafts import mtp as mtp_module
from specdec.cache import KVCache, make_cache
from specdec.drafts.mtp import MTPProposer, load_mtp
from specdec.engine import speculate
from specdec.errors import DraftError
from specdec.generate import generate, load, make_proposer
from specdec.loading import load_model
from specdec.sampling import SamplingParams

GREEDY = SamplingParams()


# ------------------------------------------------------------------------------------- the reference head


def rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1.0 + w)  # zero-centred weight


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def rope(x, positions, dims, theta):
    """Rotate-half RoPE on the first `dims` of each head; x [S, heads, D]."""
    angles = positions[:, None] * theta ** (-np.arange(0, dims, 2) / dims)
    cos = np.cos(np.concatenate([angles, angles], -1))[:, None]
    sin = np.sin(np.concatenate([angles, angles], -1))[:, None]
    rot, rest = x[..., :dims], x[..., dims:]
    half = dims // 2
    rotated = np.concatenate([-rot[..., half:], rot[..., :half]], -1)
    return np.concatenate([rot * cos + rotated * sin, rest], -1)


def reference_head(t: dict, c: dict, embeds, hidden):
    """The MTP head over pairs (embedding of token t+1, hidden state at t) at positions 0..S-1 -> [S, H] after
    mtp.norm. t: HF-layout tensors (zero-centred norms, per-expert experts); c: config.json."""
    eps, D, nH, nKV = c["rms_norm_eps"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    rope_cfg = c.get("rope_parameters") or c
    rot_dims, theta = int(D * rope_cfg["partial_rotary_factor"]), rope_cfg["rope_theta"]
    L = "mtp.layers.0."
    S = embeds.shape[0]
    x = np.concatenate([rms(embeds, t["mtp.pre_fc_norm_embedding.weight"], eps),
                        rms(hidden, t["mtp.pre_fc_norm_hidden.weight"], eps)], -1) @ t["mtp.fc.weight"].T

    # gated full attention: q_proj gives [query | gate] per head; q/k norms; partial RoPE; GQA; causal
    a = rms(x, t[L + "input_layernorm.weight"], eps)
    qg = (a @ t[L + "self_attn.q_proj.weight"].T).reshape(S, nH, 2 * D)
    q, gate = qg[..., :D], qg[..., D:]
    k = (a @ t[L + "self_attn.k_proj.weight"].T).reshape(S, nKV, D)
    v = (a @ t[L + "self_attn.v_proj.weight"].T).reshape(S, nKV, D)
    positions = np.arange(S, dtype=np.float64)
    q = rope(rms(q, t[L + "self_attn.q_norm.weight"], eps), positions, rot_dims, theta)
    k = rope(rms(k, t[L + "self_attn.k_norm.weight"], eps), positions, rot_dims, theta)
    k, v = np.repeat(k, nH // nKV, axis=1), np.repeat(v, nH // nKV, axis=1)
    scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(D)
    scores = np.where(np.tril(np.ones((S, S), bool)), scores, -np.inf)
    o = np.einsum("hqk,khd->qhd", softmax(scores), v) * sigmoid(gate)
    x = x + o.reshape(S, -1) @ t[L + "self_attn.o_proj.weight"].T

    # sparse MoE: softmax router, top-k renormalised, plus the sigmoid-gated shared expert
    a = rms(x, t[L + "post_attention_layernorm.weight"], eps)
    probs = softmax(a @ t[L + "mlp.gate.weight"].T)
    moe = np.zeros_like(a)
    for s in range(S):
        top = np.argsort(-probs[s])[: c["num_experts_per_tok"]]
        for e, p in zip(top, probs[s, top] / probs[s, top].sum()):
            ex = f"{L}mlp.experts.{e}."
            h = silu(a[s] @ t[ex + "gate_proj.weight"].T) * (a[s] @ t[ex + "up_proj.weight"].T)
            moe[s] += p * (h @ t[ex + "down_proj.weight"].T)
    sh = L + "mlp.shared_expert."
    shared = (silu(a @ t[sh + "gate_proj.weight"].T) * (a @ t[sh + "up_proj.weight"].T)) @ t[sh + "down_proj.weight"].T
    x = x + moe + sigmoid(a @ t[L + "mlp.shared_expert_gate.weight"].T) * shared
    return rms(x, t["mtp.norm.weight"], eps)


def random_mtp(c: dict, seed: int) -> dict:
    """Random `mtp.*` tensors in the Hugging Face layout: per-expert experts, zero-centred norms."""
    rng = np.random.default_rng(seed)
    H, D, nH, nKV = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    E, I, Ish = c["num_experts"], c["moe_intermediate_size"], c["shared_expert_intermediate_size"]
    mat = lambda *shape: rng.normal(0.0, 0.08, shape).astype(np.float32)
    norm = lambda n: rng.normal(0.0, 0.3, n).astype(np.float32)
    L = "mtp.layers.0."
    t = {
        "mtp.fc.weight": mat(H, 2 * H), "mtp.pre_fc_norm_embedding.weight": norm(H),
        "mtp.pre_fc_norm_hidden.weight": norm(H), "mtp.norm.weight": norm(H),
        L + "input_layernorm.weight": norm(H), L + "post_attention_layernorm.weight": norm(H),
        L + "self_attn.q_proj.weight": mat(2 * nH * D, H), L + "self_attn.k_proj.weight": mat(nKV * D, H),
        L + "self_attn.v_proj.weight": mat(nKV * D, H), L + "self_attn.o_proj.weight": mat(H, nH * D),
        L + "self_attn.q_norm.weight": norm(D), L + "self_attn.k_norm.weight": norm(D),
        L + "mlp.gate.weight": mat(E, H), L + "mlp.shared_expert_gate.weight": mat(1, H),
        L + "mlp.shared_expert.gate_proj.weight": mat(Ish, H), L + "mlp.shared_expert.up_proj.weight": mat(Ish, H),
        L + "mlp.shared_expert.down_proj.weight": mat(H, Ish),
    }
    for e in range(E):
        ex = f"{L}mlp.experts.{e}."
        t.update({ex + "gate_proj.weight": mat(I, H), ex + "up_proj.weight": mat(I, H),
                  ex + "down_proj.weight": mat(H, I)})
    return t


def quantize_mtp(t: dict, group_size=32, bits=4):
    """HF-layout tensors -> (MLX layout: +1 folded into the norms, experts stacked into switch_mlp, matrices
    quantized, router gates at 8 bits; the HF-layout tensors that checkpoint stands for, dequantized)."""
    E = len({k.split(".")[5] for k in t if ".experts." in k})
    L = "mtp.layers.0.mlp."
    mats = {k: v for k, v in t.items() if v.ndim == 2 and ".experts." not in k}
    for p in ("gate", "up", "down"):
        mats[f"{L}switch_mlp.{p}_proj.weight"] = np.stack([t[f"{L}experts.{e}.{p}_proj.weight"] for e in range(E)])
    out = {k: v + 1.0 for k, v in t.items() if v.ndim == 1}
    dequantized = {}
    for key, w in mats.items():
        gs, b = (64, 8) if key.endswith(("mlp.gate.weight", "shared_expert_gate.weight")) else (group_size, bits)
        if w.shape[-1] % gs:  # left in full precision, as mlx_lm leaves it
            out[key], dequantized[key] = w, w
            continue
        q, scales, biases = mx.quantize(mx.array(w), gs, b)
        base = key[: -len(".weight")]
        out.update({key: np.array(q), f"{base}.scales": np.array(scales), f"{base}.biases": np.array(biases)})
        dequantized[key] = np.array(mx.dequantize(q, scales, biases, gs, b))
    ref = {k: v for k, v in t.items() if v.ndim == 1}
    ref.update({k: v for k, v in dequantized.items() if "switch_mlp" not in k})
    for p in ("gate", "up", "down"):
        for e in range(E):
            ref[f"{L}experts.{e}.{p}_proj.weight"] = dequantized[f"{L}switch_mlp.{p}_proj.weight"][e]
    return out, ref


# ------------------------------------------------------------------------------------------- checkpoints


@dataclass
class Case:
    name: str
    folder: Path
    target: object  # our loaded Model
    config: dict
    tensors: dict  # HF-layout mtp.* tensors the checkpoint stands for (float64)
    embed: np.ndarray
    lm_head: np.ndarray
    hidden: object  # tokens -> [S, H] the target's hidden states after its final norm, from a reference

    def __post_init__(self):
        self.mtp = load_mtp(self.target)

    def draft_logits(self, seq, drafts):
        """Reference logits of each draft step: the real pairs of `seq` (all tokens but the last processed
        by the target), then a chain fed with its own output and each draft."""
        hidden, embeds = list(self.hidden(seq[:-1])), list(self.embed[seq[1:]])
        logits = []
        for d in drafts:
            out = reference_head(self.tensors, self.config, np.array(embeds), np.array(hidden))[-1]
            logits.append(out @ self.lm_head.T)
            hidden.append(out)
            embeds.append(self.embed[d])
        return logits


def with_mtp(src: Path, dst: Path, mtp: dict, quant_overrides: dict | None = None) -> dict:
    """Copy a checkpoint folder and add `mtp` to its safetensors and `mtp_num_hidden_layers: 1` to its config."""
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    save_file({**tensors, **mtp}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["mtp_num_hidden_layers"] = 1
    for key in ("quantization", "quantization_config"):
        if quant_overrides and key in config:
            config[key].update(quant_overrides)
    (dst / "config.json").write_text(json.dumps(config))
    return config


@pytest.fixture(scope="module", params=["moe", "next"])
def hf_case(request, tiny, tmp_path_factory):
    import torch
    from transformers import AutoModelForCausalLM

    src = tiny.path(request.param)
    hf = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    config = json.loads((src / "config.json").read_text())
    mtp = random_mtp(config, seed=11)
    folder = tmp_path_factory.mktemp("mtp") / request.param
    config = with_mtp(src, folder, mtp)

    @torch.no_grad()
    def hidden(tokens):  # transformers' last_hidden_state is after the final norm
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: more threads only contend (50x slower on 2 busy cores)
        try:
            return hf.model(torch.tensor([tokens])).last_hidden_state[0].double().numpy()
        finally:
            torch.set_num_threads(threads)

    params = {k: v.detach().double().numpy() for k, v in hf.named_parameters()}
    return Case(request.param, folder, load_model(folder)[0], config, {k: v.astype(np.float64) for k, v in mtp.items()},
                params["model.embed_tokens.weight"], params["lm_head.weight"], hidden)


@pytest.fixture(scope="module")
def mlx_case(tiny, tmp_path_factory):
    """Qwen3-Next converted and 4-bit quantized by mlx_lm (which drops MTP heads), plus a quantized MTP head."""
    from mlx_lm import convert

    root = tmp_path_factory.mktemp("mtp_mlx")
    src = root / "hf"
    shutil.copytree(tiny.path("next"), src)
    config = json.loads((src / "config.json").read_text())
    # mlx_lm reads the RoPE settings at the top level
    config.update({k: config["rope_parameters"][k] for k in ("rope_theta", "partial_rotary_factor")})
    (src / "config.json").write_text(json.dumps(config))
    convert(str(src), str(root / "converted"), quantize=True, q_group_size=32, q_bits=4)
    mtp, reference = quantize_mtp(random_mtp(config, seed=12))
    gates = {f"mtp.layers.0.mlp.{g}": {"group_size": 64, "bits": 8} for g in ("gate", "shared_expert_gate")}
    folder = root / "with_mtp"
    config = with_mtp(root / "converted", folder, mtp, gates)
    target = load_model(folder)[0]
    stored = {k: mx.array(v) for k, v in load_file(folder / "model.safetensors").items()}
    dequant = lambda p: np.array(
        mx.dequantize(stored[f"{p}.weight"], stored[f"{p}.scales"], stored[f"{p}.biases"], 32, 4))

    def hidden(tokens):  # the quantized target is its own reference here: the head is what is under test
        _, h = target(mx.array([tokens]), return_hidden=True)
        return np.array(target.model.norm(h)[0]).astype(np.float64)

    return Case("mlx-4bit", folder, target, config, {k: v.astype(np.float64) for k, v in reference.items()},
                dequant("model.embed_tokens").astype(np.float64), dequant("lm_head").astype(np.float64), hidden)


# ------------------------------------------------------------------------------------------------ tests


def assert_head_matches_reference(case: Case, atol: float):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, case.config["vocab_size"], 14).tolist()
    target = case.target
    _, h = target(mx.array([tokens]), return_hidden=True)
    embeds = target.model.embed_tokens(mx.array([tokens[1:]]))
    hidden = target.model.norm(h[:, :-1])
    cache = KVCache()  # in two pieces, so the second runs at RoPE offset 6 against cached keys
    pieces = [case.mtp(embeds[:, :6], hidden[:, :6], cache), case.mtp(embeds[:, 6:], hidden[:, 6:], cache)]
    out = mx.concatenate(pieces, axis=1)
    ours = np.array(target.logits(out)[0])
    ref = reference_head(case.tensors, case.config, case.embed[tokens[1:]], case.hidden(tokens[:-1])) @ case.lm_head.T
    np.testing.assert_allclose(ours, ref, atol=atol, rtol=0)
    assert np.abs(ref).max() > 0.5  # logits with visible spread, not a degenerate head


def test_hf_head_matches_reference(hf_case):
    assert hf_case.target.config.mtp_num_hidden_layers == 1
    assert_head_matches_reference(hf_case, atol=2e-4)


def test_mlx_quantized_head_matches_reference(mlx_case):
    assert type(mlx_case.mtp.layers[0].mlp.experts.gate_up).__name__ == "QuantizedExpertLinear"
    assert mlx_case.mtp.layers[0].mlp.gate.bits == 8 and mlx_case.mtp.fc.bits == 4
    assert_head_matches_reference(mlx_case, atol=2e-4)


# (k, accepted) per round: partial, full (the bonus token follows the last draft), k = 0 rounds in a row
# (their hidden states wait), full acceptance right after k = 0, nothing accepted.
ROUNDS = [(3, 1), (2, 2), (0, 0), (4, 0), (1, 1), (0, 0), (0, 0), (3, 3), (2, 0), (4, 2), (0, 0), (3, 0)]


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rounds_match_reference(hf_case, temperature, monkeypatch):
    """Drive the proposer as the engine does, accepting a scripted number of drafts with an arbitrary target
    token after them; every round's drafts (greedy) or draft distributions (sampled) must be the reference's,
    and the head's cache must hold exactly the real pairs, as one fresh run over them makes it."""
    monkeypatch.setattr(mtp_module, "PREFILL_STEP", 3)  # the prompt and pending pairs go in pieces
    case, target = hf_case, hf_case.target
    params = SamplingParams(temperature, seed=5)
    rng = np.random.default_rng(1)
    V = case.config["vocab_size"]
    seq = rng.integers(0, V, 9).tolist()
    proposer = MTPProposer(target, mtp=case.mtp, seed=7)
    proposer.prefill(seq[:-1], target(mx.array([seq[:-1]]), return_hidden=True)[1])
    for r, (k, n) in enumerate(ROUNDS):
        what = f"{case.name} T={temperature} round {r} (k={k}, n={n})"
        drafts, q = proposer.propose(seq[-1], k, params)
        drafts = drafts.tolist()
        assert len(drafts) == k, what
        ref = case.draft_logits(seq, drafts)
        if params.greedy:
            assert q is None
            for i, (d, logits) in enumerate(zip(drafts, ref)):
                top2 = np.sort(logits)[-2:]
                assert d == logits.argmax() or top2[1] - top2[0] < 1e-4, f"{what}: draft {i}"
        elif k:
            z = np.stack(ref) / temperature
            want = z - z.max(-1, keepdims=True)
            want -= np.log(np.exp(want).sum(-1, keepdims=True))
            np.testing.assert_allclose(np.array(q), want, atol=2e-4, err_msg=what)

        window = seq + drafts[:n]  # what the target verified and kept: [.., last, d1..dn]
        _, h = target(mx.array([window]), return_hidden=True)
        next_token = int(rng.integers(V))
        proposer.commit(n, next_token, h[:, len(seq) - 1 :])
        seq = window + [next_token]

        cached = proposer.cache.offset
        pending = sum(x.shape[1] for x in proposer.pending_hidden)
        assert cached + pending == len(seq) - 1, what  # every position before `last` is cached or pending
        assert proposer.pending_tokens == seq[cached + 1 : -1], what
        fresh = KVCache()
        _, h = target(mx.array([seq[:-1]]), return_hidden=True)
        case.mtp(target.model.embed_tokens(mx.array([seq[1 : cached + 1]])), target.model.norm(h[:, :cached]), fresh)
        for got, want in zip(proposer.cache.state, fresh.state):
            np.testing.assert_allclose(np.array(got), np.array(want), atol=1e-5, err_msg=what)


# --------------------------------------------------------------------------------------- through the engine


def run(target, prompt, n_new, proposer=None, k=0, params=GREEDY):
    out = []
    for tokens in speculate(target, prompt, params, proposer, k):
        out += tokens
        if len(out) >= n_new:
            return out[:n_new]


def k_schedule(ks):
    it = iter(ks)
    return lambda: next(it)


def test_greedy_mtp_speculation_is_lossless(hf_case):
    """Speculative == plain greedy for K = 1..4 and a K schedule with k = 0 rounds, prompts of 1, 2 and 30
    tokens (one token: nothing to draft from in the first round)."""
    target, V = hf_case.target, hf_case.config["vocab_size"]
    rng = np.random.default_rng(2)
    schedule = [3, 0, 2, 4, 0, 0, 1, 4] * 8
    for prompt in ([7], [3, 1], rng.integers(0, V, 30).tolist()):
        plain = run(target, prompt, 24)
        for k in (1, 2, 3, 4, k_schedule(schedule)):
            got = run(target, prompt, 24, MTPProposer(target, mtp=hf_case.mtp), k)
            assert got == plain, f"{hf_case.name}: prompt of {len(prompt)}, K={k}"


def test_target_cache_matches_plain_decoding(hf_case, monkeypatch):
    """After every round the engine's target cache equals a fresh cache fed the committed tokens."""
    target = hf_case.target
    made = []
    monkeypatch.setattr(engine, "make_cache", lambda model, m="replay": made.append(make_cache(model, m)) or made[-1])
    prompt, out = [5, 9, 2, 40, 11], []
    proposer = MTPProposer(target, mtp=hf_case.mtp)
    for r, tokens in enumerate(speculate(target, prompt, GREEDY, proposer, k_schedule([3, 2, 0, 4, 1] * 4))):
        out += tokens
        committed = prompt + out[:-1]
        plain = make_cache(target)
        target(mx.array([committed]), plain)
        assert made[0].offset == plain.offset == len(committed)
        for got, want in zip(made[0], plain):
            pairs = zip(got.state, want.state) if isinstance(got, KVCache) else \
                [(got.conv_state, want.conv_state), (got.state, want.state)]
            for a, b in pairs:
                np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4, err_msg=f"round {r}")
        if r == 12:
            break


def test_sampled_mtp_runs_and_repeats_with_a_seed(hf_case):
    params = SamplingParams(0.9, top_p=0.95, seed=3)
    target = hf_case.target
    runs = [run(target, [4, 8, 15], 20, MTPProposer(target, mtp=hf_case.mtp, seed=1), 3, params) for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 20


def test_quantized_checkpoint_is_lossless(mlx_case):
    target = mlx_case.target
    prompt = [2, 71, 33, 8, 50, 6]
    assert run(target, prompt, 20, MTPProposer(target, mtp=mlx_case.mtp), 3) == run(target, prompt, 20)


def test_generate_with_draft_mtp(hf_case):
    model, tokenizer = load(hf_case.folder)
    plain = generate(model, tokenizer, "speculate", max_tokens=12)
    mtp = generate(model, tokenizer, "speculate", draft="mtp", num_draft_tokens=2, max_tokens=12)
    assert mtp.tokens == plain.tokens and mtp.stats.drafted > 0


def test_checkpoint_without_mtp_head_is_a_clear_error(tiny):
    with pytest.raises(DraftError, match="no MTP head"):
        make_proposer("mtp", tiny.model("moe"))


def test_more_than_one_mtp_layer_is_refused(hf_case):
    class Target:  # the real target, with a second MTP layer's tensor in its mtp weights
        def __getattr__(self, name):
            return getattr(hf_case.target, name)

    fake = Target()
    fake.mtp_weights = {**hf_case.target.mtp_weights, "mtp.layers.1.input_layernorm.weight": mx.ones((4,))}
    with pytest.raises(DraftError, match="exactly one"):
        load_mtp(fake)
