"""Build the bundled demo pair: a small Qwen3.5-MoE target with one MTP layer, and a
dense Qwen3 draft distilled from it, both trained on the Python standard library.

    python drafts/demo/recipe.py --out specdec/demo              # everything (wants CUDA)
    python drafts/demo/recipe.py --device cpu --tiny --out out/demo-smoke
    python drafts/demo/recipe.py prepare --data .demo-data       # corpus + tokenizer only
    python drafts/demo/recipe.py eval --out specdec/demo         # tau of the saved bundle

Stages: prepare (corpus.py) -> train (target + MTP jointly, then the draft by
distillation) -> measure (held-out loss, tau of greedy speculative decoding) ->
export (HF folders; the MTP tensors are added to the target's shards) -> suites.
MTP.md says exactly what the MTP layer computes.
"""

import argparse
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

MAX_SHARD_BYTES = 15_000_000


# ---------------------------------------------------------------- model shapes

def target_config(vocab_size: int, eos_id: int, tiny: bool = False):
    from transformers import Qwen3_5MoeTextConfig

    width = dict(hidden_size=64, num_hidden_layers=4, head_dim=16, linear_key_head_dim=16,
                 linear_value_head_dim=16, num_experts=4, moe_intermediate_size=32,
                 shared_expert_intermediate_size=64) if tiny else \
        dict(hidden_size=256, num_hidden_layers=8, head_dim=64, linear_key_head_dim=64,
             linear_value_head_dim=64, num_experts=8, moe_intermediate_size=128,
             shared_expert_intermediate_size=256)
    return Qwen3_5MoeTextConfig(
        vocab_size=vocab_size, num_attention_heads=4, num_key_value_heads=2,
        linear_num_key_heads=2, linear_num_value_heads=4, linear_conv_kernel_dim=4,
        full_attention_interval=4, num_experts_per_tok=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        eos_token_id=eos_id, pad_token_id=eos_id, mtp_num_hidden_layers=1, **width)


def draft_config(vocab_size: int, eos_id: int, tiny: bool = False):
    from transformers import Qwen3Config

    width = dict(hidden_size=64, head_dim=16, intermediate_size=64) if tiny else \
        dict(hidden_size=256, head_dim=64, intermediate_size=128)
    return Qwen3Config(
        vocab_size=vocab_size, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
        eos_token_id=eos_id, pad_token_id=eos_id, **width)


class MTPHead(nn.Module):
    """One Qwen3-Next/Qwen3.5 MTP layer; embedding and lm_head are the target's.

    Row p of an MTP sequence sees (token p+1, target hidden h_p) at RoPE position p
    and predicts token p+2; h_p is the target's last hidden state after its final
    norm (what lm_head reads). Parameter names match the checkpoint's `mtp.*`."""

    def __init__(self, target):
        super().__init__()
        from transformers.models.qwen3_5_moe.modeling_qwen3_5_moe import (
            Qwen3_5MoeDecoderLayer, Qwen3_5MoeRMSNorm)

        config = target.config
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = Qwen3_5MoeRMSNorm(hidden, eps=eps)
        self.pre_fc_norm_hidden = Qwen3_5MoeRMSNorm(hidden, eps=eps)
        # layer_idx only picks the layer type (we never pass a cache); sharing the
        # target's config keeps its attention and experts implementations in step.
        full_attention = config.layer_types.index("full_attention")
        self.layers = nn.ModuleList([Qwen3_5MoeDecoderLayer(config, full_attention)])
        self.norm = Qwen3_5MoeRMSNorm(hidden, eps=eps)
        std = config.initializer_range
        for p in self.parameters():  # every 1-d parameter here is a (1 + w) norm weight
            nn.init.zeros_(p) if p.ndim == 1 else nn.init.normal_(p, std=std)

    def combine(self, next_embeds, hidden):
        x = torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], -1)
        return self.fc(x)

    def block(self, x, position_embeddings, attention_mask=None):
        """attention_mask None means causal over the MTP sequence."""
        out = self.layers[0](x, position_embeddings=position_embeddings, attention_mask=attention_mask)
        return self.norm(out[0] if isinstance(out, tuple) else out)


def rope(target, x, positions):
    return target.model.rotary_emb(x, positions.unsqueeze(0).expand(x.shape[0], -1))


def count_params(target, mtp, draft) -> dict:
    c = target.config
    embed = target.model.embed_tokens.weight.numel()
    head = target.lm_head.weight.numel()
    experts = sum(p.numel() for n, p in target.named_parameters() if ".experts." in n)
    target_total = sum(p.numel() for p in target.parameters())
    target_body = target_total - embed - head
    active = target_body - experts + experts * c.num_experts_per_tok // c.num_experts
    draft_total = sum(p.numel() for p in draft.parameters())
    draft_body = draft_total - draft.model.embed_tokens.weight.numel()
    return {
        "target_total": target_total, "target_non_embedding": target_body,
        "target_active_non_embedding": active, "target_active_with_lm_head": active + head,
        "mtp_total": sum(p.numel() for p in mtp.parameters()),
        "draft_total": draft_total, "draft_non_embedding": draft_body,
        "draft_to_target_active_non_embedding": round(draft_body / active, 3),
    }


# ---------------------------------------------------------------- losses

def ce(logits, labels):
    return F.cross_entropy(logits.float().flatten(0, -2), labels.flatten())


def router_balance_loss(router_logits, top_k: int):
    """Switch-style load balancing, averaged over layers: E * sum_e(load_e * prob_e)."""
    if not router_logits:
        return torch.zeros(())
    total = 0.0
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        experts = probs.shape[-1]
        load = F.one_hot(probs.topk(top_k, -1).indices, experts).float().sum(1).mean(0) / top_k
        total = total + experts * (load * probs.mean(0)).sum()
    return total / len(router_logits)


def mtp_second_step_mask(n1: int, n2: int, device):
    """Step-1 rows are causal among themselves; step-2 row r (one per step-1 row r,
    appended after them) sees step-1 rows 0..r and itself: exactly what an MTP
    KV cache holds when the second draft token is proposed."""
    q = torch.arange(n1 + n2, device=device)[:, None]
    k = torch.arange(n1 + n2, device=device)[None, :]
    step1 = (q < n1) & (k <= q)
    step2 = (q >= n1) & (((k < n1) & (k <= q - n1)) | (k == q))
    return (step1 | step2)[None, None]


def target_losses(target, mtp, x, with_router: bool = True) -> dict:
    B, T = x.shape
    out = target.model(input_ids=x, use_cache=False, output_router_logits=with_router)
    h = out.last_hidden_state
    losses = {"main": ce(target.lm_head(h[:, :-1]), x[:, 1:])}
    router = getattr(out, "router_logits", None)
    losses["aux"] = router_balance_loss(router, target.config.num_experts_per_tok).to(h.device)

    # step 1: row p = (token p+1, h_p) at position p -> token p+2
    embeds = target.model.embed_tokens(x)
    s1 = mtp.combine(embeds[:, 1:], h[:, :-1])
    pos1 = torch.arange(T - 1, device=x.device)
    m1 = mtp.block(s1, rope(target, s1, pos1))
    losses["mtp1"] = ce(target.lm_head(m1[:, :-1]), x[:, 2:])

    # step 2 (the second draft token): row r = (token r+2, MTP output m1_r) at position r+1
    s2 = mtp.combine(embeds[:, 2:], m1[:, :-1])
    n1, n2 = T - 1, T - 2
    seq = torch.cat([s1, s2], 1)
    pos = torch.cat([pos1, torch.arange(n2, device=x.device) + 1])
    m2 = mtp.block(seq, rope(target, seq, pos), mtp_second_step_mask(n1, n2, x.device))[:, n1:]
    losses["mtp2"] = ce(target.lm_head(m2[:, :-1]), x[:, 3:])
    return losses


def distill_losses(target, draft, x) -> dict:
    """KL(target || draft) over the whole distribution, and CE against the target's
    greedy token: the second pulls the draft's argmax onto the target's, which is
    what greedy acceptance counts."""
    with torch.no_grad():
        teacher = target.lm_head(target.model(input_ids=x, use_cache=False).last_hidden_state).float()
    student = draft(input_ids=x, use_cache=False).logits.float()
    kl = F.kl_div(student.log_softmax(-1).flatten(0, 1), teacher.log_softmax(-1).flatten(0, 1),
                  log_target=True, reduction="batchmean")
    return {"kl": kl, "ce_greedy": ce(student, teacher.argmax(-1))}


# ---------------------------------------------------------------- training

def random_windows(tokens: np.ndarray, batch: int, seq: int, rng) -> torch.Tensor:
    starts = rng.integers(0, len(tokens) - seq, size=batch)
    return torch.from_numpy(np.stack([tokens[s:s + seq] for s in starts]).astype(np.int64))


def lr_at(step: int, progress: float, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(params, lr, device):
    params = [p for p in params if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def train_loop(name, params, step_loss, tokens, args, device, steps, seconds, lr, probe=None):
    """Shared loop: cosine schedule over max(step/steps, time/seconds); stops at either.
    probe() (a small held-out loss) is logged every --eval-every steps."""
    opt = make_optimizer(params, lr, device)
    rng = np.random.default_rng(args.seed)
    start, step, last = time.time(), 0, {}
    while True:
        progress = max(step / steps, (time.time() - start) / seconds)
        if progress >= 1.0:
            break
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, lr, args.warmup)
        x = random_windows(tokens, args.batch, args.seq, rng).to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, parts = step_loss(x)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % args.log_every == 0 or step == 1:
            last = {k: round(float(v.detach()), 4) for k, v in parts.items()}
            elapsed = time.time() - start
            print(f"[{name}] step {step} {elapsed:.0f}s lr {opt.param_groups[0]['lr']:.2e} "
                  f"{last} {step * x.numel() / elapsed:.0f} tok/s", flush=True)
        if probe is not None and step % args.eval_every == 0:
            print(f"[{name}] step {step} held-out {probe()}", flush=True)
    return {"steps": step, "seconds": round(time.time() - start, 1),
            "tokens": step * args.batch * args.seq, "last_logged": last}


def pick_experts_implementation(target, mtp, tokens, args, device):
    """Time a few forward+backward steps of each MoE implementation; keep the faster."""
    if not hasattr(target, "set_experts_implementation"):  # older transformers: one implementation
        return "default", {}
    rng = np.random.default_rng(1)
    timings = {}
    for impl in ("grouped_mm", "eager"):
        try:
            target.set_experts_implementation(impl)
            for i in range(4):
                if i == 1:
                    torch.cuda.synchronize() if device.type == "cuda" else None
                    t0 = time.time()
                x = random_windows(tokens, args.batch, args.seq, rng).to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    sum(target_losses(target, mtp, x).values()).backward()
            torch.cuda.synchronize() if device.type == "cuda" else None
            timings[impl] = (time.time() - t0) / 3
        except Exception as e:  # an implementation this torch build cannot run
            print(f"experts implementation {impl} failed: {type(e).__name__}: {e}", flush=True)
        target.zero_grad(set_to_none=True)
        mtp.zero_grad(set_to_none=True)
    best = min(timings, key=timings.get)
    target.set_experts_implementation(best)
    print(f"experts implementation: {best} (s/step {timings})", flush=True)
    return best, timings


# ---------------------------------------------------------------- measuring

@torch.inference_mode()
def heldout_losses(target, mtp, draft, tokens, args, device, max_windows: int) -> dict:
    n = min(max_windows, len(tokens) // args.seq)
    windows = torch.from_numpy(tokens[: n * args.seq].astype(np.int64)).view(n, args.seq)
    sums = {"target": 0.0, "mtp1": 0.0, "mtp2": 0.0, "draft": 0.0}
    for i in range(0, n, args.batch):
        x = windows[i:i + args.batch].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            parts = target_losses(target, mtp, x, with_router=False)
            sums["draft"] += float(ce(draft(input_ids=x, use_cache=False).logits[:, :-1], x[:, 1:])) * len(x)
        sums["target"] += float(parts["main"]) * len(x)
        sums["mtp1"] += float(parts["mtp1"]) * len(x)
        sums["mtp2"] += float(parts["mtp2"]) * len(x)
    return {k: round(v / n, 4) for k, v in sums.items()} | {"windows": n, "window_tokens": args.seq}


def heldout_prompts(tokens: np.ndarray, newline_ids: set, count: int, length: int) -> list[list[int]]:
    """`count` windows of held-out tokens, evenly spread, each starting after a newline
    and containing no file boundary (EOS, id 0)."""
    prompts, stride = [], len(tokens) // count
    for i in range(count):
        s = i * stride
        while s + length < len(tokens):
            if int(tokens[s]) in newline_ids and not (tokens[s + 1:s + 1 + length] == 0).any():
                prompts.append(tokens[s + 1:s + 1 + length].astype(np.int64).tolist())
                break
            s += 1
    return prompts


class SpecStats:
    """rounds, drafted, accepted per draft position; tau = emitted tokens / verify rounds."""

    def __init__(self, k: int):
        self.k, self.rounds, self.emitted = k, 0, 0
        self.accepted_at = [0] * k

    def add(self, n: int):
        self.rounds += 1
        self.emitted += n + 1
        for i in range(n):
            self.accepted_at[i] += 1

    def summary(self) -> dict:
        r = max(self.rounds, 1)
        return {"k": self.k, "rounds": self.rounds, "emitted": self.emitted,
                "tau": round(self.emitted / r, 3),
                "acceptance_rate": round(sum(self.accepted_at) / (r * self.k), 3),
                "per_position_acceptance": [round(a / r, 3) for a in self.accepted_at]}


def accepted_prefix(proposal, choice) -> int:
    n = 0
    while n < len(proposal) and proposal[n] == choice[n]:
        n += 1
    return n


@torch.inference_mode()
def target_step(target, ids, device):
    h = target.model(input_ids=torch.tensor([ids], device=device), use_cache=False).last_hidden_state[0]
    return h, target.lm_head(h).argmax(-1).tolist()


@torch.inference_mode()
def draft_propose(draft, seq, k, device):
    proposal = []
    for _ in range(k):
        logits = draft(input_ids=torch.tensor([seq + proposal], device=device), use_cache=False).logits
        proposal.append(int(logits[0, -1].argmax()))
    return proposal


@torch.inference_mode()
def mtp_propose(target, mtp, seq, hidden, k, device):
    """hidden: target hidden states of seq[:-1]. Row p = (seq[p+1], hidden[p]) at position p;
    each further draft appends the row (last draft, last MTP output) at the next position."""
    embed = target.model.embed_tokens
    x = mtp.combine(embed(torch.tensor(seq[1:], device=device)), hidden)[None]
    positions = torch.arange(x.shape[1], device=device)
    proposal = []
    for i in range(k):
        out = mtp.block(x, rope(target, x, positions))[0, -1]
        proposal.append(int(target.lm_head(out).argmax()))
        if i + 1 < k:
            row = mtp.combine(embed(torch.tensor(proposal[-1:], device=device)), out[None])
            x = torch.cat([x, row[None]], 1)
            positions = torch.cat([positions, positions[-1:] + 1])
    return proposal


def measure_tau(target, prompts, k, max_new, device, propose, seconds: float) -> dict:
    """Greedy speculative decoding without caches: the target re-reads the whole
    sequence each round, so the text is the target's own greedy text by construction."""
    stats, start = SpecStats(k), time.time()
    for prompt in prompts:
        hidden, choice = target_step(target, prompt, device)
        seq = prompt + [choice[-1]]  # the prefill's token; rounds start after it; hidden covers seq[:-1]
        while len(seq) - len(prompt) < max_new:
            proposal = propose(seq, hidden)
            verified, choice = target_step(target, seq + proposal, device)
            choice = choice[len(seq) - 1:]
            n = accepted_prefix(proposal, choice)
            hidden = verified[:len(seq) + n]
            seq = seq + proposal[:n] + [choice[n]]
            stats.add(n)
        if time.time() - start > seconds:
            break
    return stats.summary() | {"prompts": prompts.index(prompt) + 1, "seconds": round(time.time() - start, 1)}


def measure_all_tau(target, mtp, draft, prompts, args, device) -> dict:
    for m in (target, mtp, draft):
        m.float().eval()
    out = {}
    for k in args.draft_k:
        out[f"draft_k{k}"] = measure_tau(target, prompts, k, args.max_new, device,
                                         lambda seq, h: draft_propose(draft, seq, k, device), args.tau_seconds)
        print(f"tau draft K={k}: {out[f'draft_k{k}']}", flush=True)
    for k in args.mtp_k:
        out[f"mtp_k{k}"] = measure_tau(target, prompts, k, args.max_new, device,
                                       lambda seq, h: mtp_propose(target, mtp, seq, h, k, device), args.tau_seconds)
        print(f"tau MTP K={k}: {out[f'mtp_k{k}']}", flush=True)
    return out


# ---------------------------------------------------------------- export

def mtp_tensors(mtp, per_expert: bool) -> dict:
    """mtp.* tensors named like a model layer in the same checkpoint (per-expert or fused)."""
    out = {}
    for name, t in mtp.state_dict().items():
        t = t.detach().to("cpu", torch.bfloat16).contiguous()
        stem = f"mtp.{name}"
        if per_expert and name.endswith("experts.gate_up_proj"):
            base, inter = stem[: -len("gate_up_proj")], t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{base}{e}.gate_proj.weight"] = t[e, :inter].contiguous()
                out[f"{base}{e}.up_proj.weight"] = t[e, inter:].contiguous()
        elif per_expert and name.endswith("experts.down_proj"):
            base = stem[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{base}{e}.down_proj.weight"] = t[e].contiguous()
        else:
            out[stem] = t
    return out


def write_shards(tensors: dict, out_dir: Path, max_bytes: int = MAX_SHARD_BYTES):
    """Greedy sharding in the given order, HF file names and index, metadata {"format": "pt"}."""
    from safetensors.torch import save_file

    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_bytes - 64_000:  # leave room for the header
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total, "total_parameters": sum(t.numel() for t in tensors.values())},
             "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    assert all(p.stat().st_size <= max_bytes for p in out_dir.glob("*.safetensors"))


def write_tokenizer_and_generation(out_dir: Path, data_dir: Path, eos_id: int):
    from transformers import GenerationConfig

    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out_dir / name).write_bytes((data_dir / name).read_bytes())
    GenerationConfig(eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False).save_pretrained(out_dir)


def export_target(target, mtp, out_dir: Path, data_dir: Path):
    from safetensors import safe_open

    out_dir.mkdir(parents=True, exist_ok=True)
    for old in list(out_dir.glob("*.safetensors")) + list(out_dir.glob("*.index.json")):
        old.unlink()
    target.to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        target.save_pretrained(tmp)
        tensors = {}
        for path in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(str(path), "pt") as f:
                tensors.update({k: f.get_tensor(k) for k in f.keys()})
        (out_dir / "config.json").write_bytes((Path(tmp) / "config.json").read_bytes())
    per_expert = any(".experts.0." in k for k in tensors)
    if per_expert:  # our split of a fused tensor must equal transformers' own
        fused = target.model.layers[0].mlp.experts.gate_up_proj.detach().cpu()
        assert torch.equal(tensors["model.layers.0.mlp.experts.1.up_proj.weight"], fused[1, fused.shape[1] // 2:])
    tensors.update(mtp_tensors(mtp, per_expert))
    write_shards(tensors, out_dir)
    write_tokenizer_and_generation(out_dir, data_dir, target.config.eos_token_id)
    return per_expert


def export_draft(draft, out_dir: Path, data_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    draft.to(torch.bfloat16).save_pretrained(out_dir)
    write_tokenizer_and_generation(out_dir, data_dir, draft.config.eos_token_id)


def load_mtp(target, target_dir: Path):
    """Read mtp.* back from the shards (inverse of mtp_tensors)."""
    from safetensors import safe_open

    index = json.loads((target_dir / "model.safetensors.index.json").read_text())
    raw = {}
    for fname in sorted(set(index["weight_map"].values())):
        with safe_open(str(target_dir / fname), "pt") as f:
            raw.update({k[4:]: f.get_tensor(k) for k in f.keys() if k.startswith("mtp.")})
    mtp = MTPHead(target)
    state = {}
    for name, p in mtp.state_dict().items():
        if name.endswith("experts.gate_up_proj") and name not in raw:
            base = name[: -len("gate_up_proj")]
            state[name] = torch.stack([torch.cat([raw[f"{base}{e}.gate_proj.weight"],
                                                  raw[f"{base}{e}.up_proj.weight"]]) for e in range(p.shape[0])])
        elif name.endswith("experts.down_proj") and name not in raw:
            base = name[: -len("down_proj")]
            state[name] = torch.stack([raw[f"{base}{e}.down_proj.weight"] for e in range(p.shape[0])])
        else:
            state[name] = raw[name]
    mtp.load_state_dict({k: v.float() for k, v in state.items()})
    return mtp


def check_export(target_dir: Path, draft_dir: Path, target, mtp, draft) -> dict:
    """Reload with transformers (and load_mtp): every tensor must come back bit-exact."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3ForCausalLM

    def same(a, b):
        sa, sb = a.state_dict(), b.state_dict()
        return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu().float(), sb[k].cpu().float()) for k in sa)

    t2 = Qwen3_5MoeForCausalLM.from_pretrained(target_dir, dtype=torch.bfloat16)
    d2 = Qwen3ForCausalLM.from_pretrained(draft_dir, dtype=torch.bfloat16)
    mtp2 = load_mtp(t2, target_dir)
    assert same(t2, target) and same(d2, draft) and same(mtp2, mtp), "export does not round-trip"
    sizes = {p.name: p.stat().st_size for d in (target_dir, draft_dir) for p in d.glob("*.safetensors")}
    return {"round_trip_exact": True, "target_files": sorted(p.name for p in target_dir.iterdir()),
            "weights_bytes_total": sum(sizes.values()), "largest_file_bytes": max(sizes.values())}


# ---------------------------------------------------------------- driver

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", nargs="?", default="all", choices=["all", "prepare", "train", "eval", "suites"])
    p.add_argument("--data", type=Path, default=Path(".demo-data"), help="tokenizer + token streams")
    p.add_argument("--out", type=Path, default=Path("specdec/demo"), help="gets target/ and draft/")
    p.add_argument("--suites-out", type=Path, default=None, help="default specdec/suites (OUT/suites with --tiny)")
    p.add_argument("--report", type=Path, default=None, help="where the JSON report goes (default OUT/report.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and few steps: a smoke test")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--experts", default="grouped_mm", choices=["auto", "grouped_mm", "eager"],
                   help="transformers' MoE implementation; auto times both")
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--target-steps", type=int, default=100_000)
    p.add_argument("--target-seconds", type=float, default=190)
    p.add_argument("--target-lr", type=float, default=2e-3)
    p.add_argument("--draft-steps", type=int, default=100_000)
    p.add_argument("--draft-seconds", type=float, default=100)
    p.add_argument("--draft-lr", type=float, default=3e-3)
    p.add_argument("--mtp-weights", type=float, nargs=2, default=[0.5, 0.3])
    p.add_argument("--aux-weight", type=float, default=0.01)
    p.add_argument("--greedy-ce", type=float, default=0.5,
                   help="draft loss = KL(target||draft) + this * CE(target's greedy token)")
    p.add_argument("--eval-windows", type=int, default=96)
    p.add_argument("--eval-every", type=int, default=300)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new", type=int, default=96)
    p.add_argument("--draft-k", type=int, nargs="+", default=[4])
    p.add_argument("--mtp-k", type=int, nargs="+", default=[2])
    p.add_argument("--tau-seconds", type=float, default=35, help="per measurement")
    args = p.parse_args(argv)
    if args.tiny:
        args.batch, args.seq, args.warmup, args.log_every, args.eval_every = 2, 64, 2, 1, 2
        args.target_steps = args.draft_steps = 3
        args.eval_windows, args.prompts, args.prompt_len, args.max_new = 2, 2, 16, 8
    args.report = args.report or args.out / "report.json"
    args.suites_out = args.suites_out or (args.out / "suites" if args.tiny else Path("specdec/suites"))
    return args


def newline_token_ids(tokenizer_path: Path) -> set:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    return {i for i in range(tok.get_vocab_size()) if "\n" in tok.decode([i])}


def train(args) -> dict:
    from transformers import Qwen3_5MoeForCausalLM, Qwen3ForCausalLM
    import transformers

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    report = {"versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                           "python": platform.python_version()},
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "corpus": json.loads((args.data / "corpus.json").read_text()),
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(json.dumps(report, indent=1), flush=True)
    train_tokens = np.load(args.data / "train.npy")
    heldout_tokens = np.load(args.data / "heldout.npy")
    tok_cfg = json.loads((args.data / "tokenizer_config.json").read_text())
    eos_id = int(next(k for k, v in tok_cfg["added_tokens_decoder"].items() if v["content"] == corpus.EOS))
    vocab = report["corpus"]["vocab_size"]

    target = Qwen3_5MoeForCausalLM(target_config(vocab, eos_id, args.tiny)).to(device)
    mtp = MTPHead(target).to(device)
    draft = Qwen3ForCausalLM(draft_config(vocab, eos_id, args.tiny)).to(device)
    report["params"] = count_params(target, mtp, draft)
    print(json.dumps(report["params"]), flush=True)
    if args.experts == "auto":
        report["experts_implementation"] = pick_experts_implementation(target, mtp, train_tokens, args, device)
    else:
        target.set_experts_implementation(args.experts)
        report["experts_implementation"] = args.experts
    t0 = time.time()

    w1, w2 = args.mtp_weights

    def target_step_loss(x):
        parts = target_losses(target, mtp, x)
        return parts["main"] + w1 * parts["mtp1"] + w2 * parts["mtp2"] + args.aux_weight * parts["aux"], parts

    def probe():
        target.eval(), mtp.eval(), draft.eval()
        losses = heldout_losses(target, mtp, draft, heldout_tokens, args, device, 2 * args.batch)
        target.train(), mtp.train(), draft.train()
        return {k: losses[k] for k in ("target", "mtp1", "mtp2", "draft")}

    target.train(), mtp.train()
    report["target_training"] = train_loop("target", list(target.parameters()) + list(mtp.parameters()),
                                           target_step_loss, train_tokens, args, device,
                                           args.target_steps, args.target_seconds, args.target_lr, probe)

    def draft_step_loss(x):
        parts = distill_losses(target, draft, x)
        return parts["kl"] + args.greedy_ce * parts["ce_greedy"], parts

    target.eval(), mtp.eval(), draft.train()
    target.requires_grad_(False)
    report["draft_training"] = train_loop("draft", list(draft.parameters()), draft_step_loss, train_tokens,
                                          args, device, args.draft_steps, args.draft_seconds, args.draft_lr, probe)
    draft.eval()

    # measure what ships: weights rounded to bf16
    for m in (target, mtp, draft):
        m.to(torch.bfloat16).float()
    report["heldout_loss_nats_per_token"] = heldout_losses(target, mtp, draft, heldout_tokens, args, device,
                                                           args.eval_windows)
    print("held-out loss:", report["heldout_loss_nats_per_token"], flush=True)
    report["export"] = {"per_expert_names": export_target(target, mtp, args.out / "target", args.data)}
    export_draft(draft, args.out / "draft", args.data)
    report["export"] |= check_export(args.out / "target", args.out / "draft", target, mtp, draft)
    print("export:", report["export"], flush=True)
    args.report.write_text(json.dumps(report, indent=2))

    prompts = heldout_prompts(heldout_tokens, newline_token_ids(args.data / "tokenizer.json"),
                              args.prompts, args.prompt_len)
    report["tau"] = {"prompts": len(prompts), "prompt_tokens": args.prompt_len, "max_new": args.max_new,
                     "temperature": 0} | measure_all_tau(target, mtp, draft, prompts, args, device)
    report["train_seconds_total"] = round(time.time() - t0, 1)
    args.report.write_text(json.dumps(report, indent=2))
    return report


def evaluate(args) -> dict:
    """tau and held-out loss of a saved bundle (what the package ships)."""
    from transformers import Qwen3_5MoeForCausalLM, Qwen3ForCausalLM

    device = torch.device(args.device)
    target = Qwen3_5MoeForCausalLM.from_pretrained(args.out / "target", dtype=torch.float32).to(device).eval()
    draft = Qwen3ForCausalLM.from_pretrained(args.out / "draft", dtype=torch.float32).to(device).eval()
    mtp = load_mtp(target, args.out / "target").to(device).eval()
    heldout_tokens = np.load(args.data / "heldout.npy")
    report = {"heldout_loss_nats_per_token": heldout_losses(target, mtp, draft, heldout_tokens, args, device,
                                                            args.eval_windows)}
    print("held-out loss:", report["heldout_loss_nats_per_token"], flush=True)
    prompts = heldout_prompts(heldout_tokens, newline_token_ids(args.out / "target" / "tokenizer.json"),
                              args.prompts, args.prompt_len)
    report["tau"] = measure_all_tau(target, mtp, draft, prompts, args, device)
    return report


def main(argv=None):
    args = parse_args(argv)
    if args.stage in ("all", "prepare") and not (args.data / "train.npy").exists():
        print("corpus:", corpus.prepare(args.data, args.vocab), flush=True)
    if args.stage in ("all", "train"):
        report = train(args)
        print(json.dumps({k: report[k] for k in ("params", "heldout_loss_nats_per_token", "tau")}, indent=1))
    if args.stage == "eval":
        print(json.dumps(evaluate(args), indent=1))
    if args.stage in ("all", "suites"):
        import suites

        print("suites:", suites.build(args.out / "target" / "tokenizer.json", args.suites_out), flush=True)


if __name__ == "__main__":
    main()
