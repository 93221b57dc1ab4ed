"""Find a checkpoint (local folder or Hub id), read its config, and load its safetensors into a Model.

Checkpoint quirks are handled here, once, by renaming and reshaping tensors into our parameter tree
(`sanitize`): multimodal prefixes, per-expert or fused experts, MLX `switch_mlp` conversions,
Qwen3-Next's per-head interleaved projections, zero-centred norms, conv layouts, quantized tensors.
Experts are fused to one gate+up tensor here, and the per-expert originals are dropped.
"""

import json
import os
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import CheckpointError, ConfigError
from .models.config import ModelConfig
from .models.model import Model

CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt"]
DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
GDN_PARTS = ("qkv", "z", "b", "a")


def resolve(path_or_repo: str | os.PathLike) -> Path:
    """A local checkpoint folder, or a Hub repo id fetched through huggingface_hub (HF cache, HF_HUB_OFFLINE)."""
    path = Path(path_or_repo).expanduser()
    if path.is_dir():
        return path
    name = str(path_or_repo)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise CheckpointError(f"no checkpoint folder at {name!r} (and it is not a Hub repo id 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_FILES))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(
            f"{name!r} is not in the local Hugging Face cache and the Hub cannot be reached "
            f"(offline or HF_HUB_OFFLINE=1): download it first or pass a local folder"
        ) from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot fetch {name!r} from the Hugging Face Hub: {e}") from e


def read_json(path: Path, what: str, required=True):
    if not path.exists():
        if required:
            raise ConfigError(f"{what} not found: {path.name} is missing in {path.parent}")
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path.name} is not valid JSON: {e}") from e


def read_config(folder: Path) -> tuple[ModelConfig, dict]:
    raw = read_json(folder / "config.json", "model config")
    return ModelConfig.from_hf(raw), raw


def read_safetensors(folder: Path) -> dict:
    index = read_json(folder / "model.safetensors.index.json", "index", required=False)
    if index is not None:
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError("model.safetensors.index.json has no 'weight_map'")
        files = sorted(set(index["weight_map"].values()))
        missing = [f for f in files if not (folder / f).exists()]
        if missing:
            raise CheckpointError(f"shard(s) listed in model.safetensors.index.json are missing: {', '.join(missing)}")
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors weights in {folder} (pickle/.bin checkpoints are not loaded)")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(folder / f)))
        except Exception as e:  # mlx raises RuntimeError/ValueError on a damaged file
            raise CheckpointError(f"cannot read {f}: {e}") from e
    return weights


# ---------------------------------------------------------------------------------------------- sanitize

def canonical_name(key: str) -> str | None:
    """Checkpoint key -> our parameter name; None for tensors we skip (vision tower)."""
    if key.startswith(("model.visual.", "visual.", "vision_tower.", "model.vision_tower.")):
        return None
    for old, new in (
        ("model.language_model.", "model."),
        ("language_model.model.", "model."),
        ("language_model.lm_head.", "lm_head."),
        ("language_model.", ""),
    ):
        if key.startswith(old):
            return new + key[len(old) :]
    return key


QUANT_SUFFIXES = ("weight", "scales", "biases")


def split_suffix(key: str):
    head, _, tail = key.rpartition(".")
    return head, tail


def fuse_experts(w: dict, num_experts: int):
    """Every expert layout -> `mlp.experts.gate_up.*` [E, 2I, H] and `mlp.experts.down.*` [E, H, I]."""
    out = {}
    per_expert = {}
    for key, value in w.items():
        m = re.match(r"(.*\.mlp)\.experts\.(\d+)\.(gate|up|down)_proj\.weight$", key)
        if m:
            per_expert.setdefault(m.group(1), {}).setdefault(m.group(3), {})[int(m.group(2))] = value
            continue
        m = re.match(r"(.*\.mlp)\.experts\.(gate_up_proj|down_proj)$", key)  # HF fused, no .weight
        if m:
            out[f"{m.group(1)}.experts.{'gate_up' if m.group(2) == 'gate_up_proj' else 'down'}.weight"] = value
            continue
        m = re.match(r"(.*\.mlp)\.switch_mlp\.(gate|up|down)_proj\.(weight|scales|biases)$", key)
        if m:
            per_expert.setdefault(m.group(1), {}).setdefault(f"switch.{m.group(2)}", {})[m.group(3)] = value
            continue
        out[key] = value
    for prefix, parts in per_expert.items():
        if "switch.gate" in parts:  # MLX layout: already stacked, maybe quantized
            gate, up, down = parts["switch.gate"], parts.get("switch.up"), parts.get("switch.down")
            if up is None or down is None or set(gate) != set(up):
                raise CheckpointError(f"{prefix}.switch_mlp needs gate_proj, up_proj and down_proj with the same tensors")
            for s in gate:
                if gate[s].shape != up[s].shape:
                    raise CheckpointError(
                        f"{prefix}.switch_mlp.up_proj.{s} has shape {tuple(up[s].shape)}, expected "
                        f"{tuple(gate[s].shape)} like gate_proj.{s}"
                    )
                out[f"{prefix}.experts.gate_up.{s}"] = mx.concatenate([gate[s], up[s]], axis=1)
            for s, v in down.items():
                out[f"{prefix}.experts.down.{s}"] = v
            continue
        for name in ("gate", "up", "down"):
            got = parts.get(name, {})
            missing = [e for e in range(num_experts) if e not in got]
            if missing:
                raise CheckpointError(f"missing tensor {prefix}.experts.{missing[0]}.{name}_proj.weight")
            extra = sorted(e for e in got if e >= num_experts)
            if extra:
                raise CheckpointError(
                    f"unexpected tensor {prefix}.experts.{extra[0]}.{name}_proj.weight (num_experts is {num_experts})"
                )
            want = parts["gate" if name == "up" else name][0].shape  # every expert alike; up like gate
            for e in range(num_experts):
                if got[e].shape != want:
                    raise CheckpointError(
                        f"tensor {prefix}.experts.{e}.{name}_proj.weight has shape {tuple(got[e].shape)}, "
                        f"expected {tuple(want)} like expert 0's {'gate' if name == 'up' else name}_proj"
                    )
        stack = {n: mx.stack([parts[n][e] for e in range(num_experts)]) for n in ("gate", "up", "down")}
        out[f"{prefix}.experts.gate_up.weight"] = mx.concatenate([stack["gate"], stack["up"]], axis=1)
        out[f"{prefix}.experts.down.weight"] = stack["down"]
    return out


def deinterleave_qwen3_next(w: dict, cfg: ModelConfig):
    """Qwen3-Next packs in_proj_qkvz / in_proj_ba per k-head ([q k v z] per head); reorder the rows to
    the canonical [all q | all k | all v] [all z] and [all b] [all a] parts. Rows are output channels,
    so the same permutation applies to quantized weights, scales and biases."""
    Hk, Hv, Dk, Dv = cfg.linear_num_key_heads, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim
    r = Hv // Hk
    out = {}
    for key, value in w.items():
        head, suffix = split_suffix(key)
        if head.endswith("linear_attn.in_proj_qkvz"):
            base = head[: -len("in_proj_qkvz")]
            x = value.reshape(Hk, 2 * Dk + 2 * r * Dv, -1)
            q, k, v, z = mx.split(x, [Dk, 2 * Dk, 2 * Dk + r * Dv], axis=1)
            flat = lambda t: t.reshape(-1, value.shape[-1])
            out[f"{base}in_proj_qkv.{suffix}"] = mx.concatenate([flat(q), flat(k), flat(v)], axis=0)
            out[f"{base}in_proj_z.{suffix}"] = flat(z)
        elif head.endswith("linear_attn.in_proj_ba"):
            base = head[: -len("in_proj_ba")]
            x = value.reshape(Hk, 2 * r, -1)
            b, a = mx.split(x, [r], axis=1)
            out[f"{base}in_proj_b.{suffix}"] = b.reshape(Hv, -1)
            out[f"{base}in_proj_a.{suffix}"] = a.reshape(Hv, -1)
        else:
            out[key] = value
    return out


def norm_keys(key: str) -> bool:
    return key.endswith(
        ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight",
         "pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight")
    ) or key in ("model.norm.weight", "mtp.norm.weight")


def sanitize(weights: dict, cfg: ModelConfig) -> tuple[dict, dict]:
    """Checkpoint tensors -> (our parameters, MTP parameters). Also decides cfg.in_proj_groups."""
    w = {}
    for key, value in weights.items():
        name = canonical_name(key)
        if name is not None:
            w[name] = value
    if cfg.tie_word_embeddings:
        w.pop("lm_head.weight", None)
    if not cfg.hybrid:
        return w, {}

    # HF hybrid checkpoints store conv1d as [C, 1, K] and norms zero-centred (applied as 1 + w);
    # MLX conversions store conv1d as [C, K, 1] with the +1 already folded into the norms.
    conv_keys = [k for k in w if k.endswith("conv1d.weight")]
    folded = bool(conv_keys) and all(w[k].shape[-1] == 1 and w[k].shape[1] != 1 for k in conv_keys)
    for k in conv_keys:
        w[k] = w[k].reshape(w[k].shape[0], -1)
    if not folded:  # fold in float32 and keep it: 1 + w rounded to bf16 loses bits that HF keeps
        for k in [k for k in w if norm_keys(k)]:
            w[k] = w[k].astype(mx.float32) + 1.0

    if cfg.model_type == "qwen3_next":
        w = deinterleave_qwen3_next(w, cfg)
    if cfg.num_experts:
        w = fuse_experts(w, cfg.num_experts)
    mtp = {k: w.pop(k) for k in [k for k in w if k.startswith("mtp.")]}
    return w, mtp


def gdn_groups(w: dict, quant: dict | None) -> list:
    """Partition the GDN input-projection parts so that parts fused into one Linear are quantized alike
    (same bits and group size, or all full precision) in every layer."""
    bases = [k[: -len(".in_proj_qkv.weight")] for k in w if k.endswith("linear_attn.in_proj_qkv.weight")]
    groups: dict = {}
    for part in GDN_PARTS:
        signature = tuple(quant_params(f"{b}.in_proj_{part}", w, quant) for b in bases)
        groups.setdefault(signature, []).append(part)
    return list(groups.values())


def fuse_gdn_projections(w: dict, groups: list, quant: dict | None):
    """in_proj_{qkv,z,b,a} -> in_proj.{i} per group (rows concatenated; quantized rows concatenate too)."""
    out = {k: v for k, v in w.items() if not re.match(r".*linear_attn\.in_proj_(qkv|z|b|a)\.\w+$", k)}
    for key in [k for k in w if k.endswith("linear_attn.in_proj_qkv.weight")]:
        base = key[: -len(".in_proj_qkv.weight")]
        for i, group in enumerate(groups):
            params = quant_params(f"{base}.in_proj_{group[0]}", w, quant)
            if params is not None:
                quant["_overrides"][f"{base}.in_proj.{i}"] = dict(zip(("group_size", "bits", "mode"), params))
            for s in QUANT_SUFFIXES:
                parts = [w.get(f"{base}.in_proj_{p}.{s}") for p in group]
                if all(p is None for p in parts):
                    continue
                for p, t in zip(group, parts):
                    if t is None:
                        raise CheckpointError(f"missing tensor {base}.in_proj_{p}.{s}")
                out[f"{base}.in_proj.{i}.{s}"] = mx.concatenate(parts, axis=0)
    return out


def quant_params(path: str, w: dict, quant: dict | None):
    """(group_size, bits, mode) for a quantized module path, or None when it is stored in full precision."""
    if f"{path}.scales" not in w:
        return None
    if not quant:
        raise CheckpointError(f"{path} holds quantized tensors but config.json has no 'quantization' block")
    override = quant.get("_overrides", {}).get(path)
    params = {**quant, **override} if isinstance(override, dict) else quant
    return (params.get("group_size", 64), params.get("bits", 4), params.get("mode", "affine"))


def read_quantization(raw: dict) -> dict | None:
    q = raw.get("quantization") or raw.get("quantization_config")
    if q is None:
        text = raw.get("text_config") or {}
        q = text.get("quantization") or text.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict) or "bits" not in q:
        raise ConfigError("config.json 'quantization' must give at least 'bits' and 'group_size'")
    base = {k: q[k] for k in ("group_size", "bits", "mode") if k in q}
    overrides = {}
    for key, value in q.items():
        if isinstance(value, dict):
            name = canonical_name(key)
            if name is None:
                continue
            name = name.replace(".switch_mlp.gate_proj", ".experts.gate_up").replace(".switch_mlp.down_proj", ".experts.down")
            overrides[name] = value
            # Qwen3-Next's packed projections are split at load; each part keeps the packed one's settings.
            for packed, parts in (("in_proj_qkvz", ("qkv", "z")), ("in_proj_ba", ("b", "a"))):
                if name.endswith(f".{packed}"):
                    for part in parts:
                        overrides[f"{name[: -len(packed)]}in_proj_{part}"] = value
    return {**base, "_overrides": overrides}


# ------------------------------------------------------------------------------------------------- load

QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)
QUANTIZE_GROUP_SIZE = 64


def check_quantize_bits(bits):
    if bits not in QUANTIZE_BITS:
        raise ConfigError(f"quantize must be one of {', '.join(map(str, QUANTIZE_BITS))} bits, got {bits!r}")


def quantize_model(model: nn.Module, bits: int, group_size: int = QUANTIZE_GROUP_SIZE) -> dict:
    """Quantize a loaded float model in place, as mlx-community converts these models: every Linear,
    Embedding and expert stack at `bits`, the MoE router (`mlp.gate`) and `shared_expert_gate` at 8 bits
    (routing decisions are sensitive); matrices whose input size is not a multiple of group_size stay float.
    -> the quantization block describing it, as read_quantization returns one."""
    check_quantize_bits(bits)
    overrides = {}

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % group_size:
            return False
        if path.endswith(("mlp.gate", "shared_expert_gate")):
            overrides[path] = {"group_size": group_size, "bits": 8}
            return overrides[path]
        return True

    nn.quantize(model, group_size, bits, class_predicate=predicate)
    return {"group_size": group_size, "bits": bits, "mode": "affine", "_overrides": overrides}


def load_model(path_or_repo, dtype: str | None = None, lazy: bool = False, quantize: int | None = None):
    """-> (Model, folder, mtp_weights). dtype: None keeps the checkpoint's float dtype. quantize: bits to
    quantize a float checkpoint to on load (group 64, router gates 8-bit; see quantize_model); the MTP
    head, if any, stays in float."""
    folder = resolve(path_or_repo)
    cfg, raw = read_config(folder)
    quant = read_quantization(raw)
    if quantize is not None and quant is not None:
        raise ConfigError(f"{folder} is already quantized ({quant['bits']} bits); load it without quantize")
    if quantize is not None:
        check_quantize_bits(quantize)
    weights, mtp = sanitize(read_safetensors(folder), cfg)
    if quant is None:
        scales = next((k for k in weights if k.endswith(".scales")), None)
        if scales is not None:
            raise CheckpointError(
                f"{scales[: -len('.scales')]} holds quantized tensors but config.json has no 'quantization' block"
            )
    if cfg.hybrid and any(t == "linear_attention" for t in cfg.layer_types):
        cfg.in_proj_groups = gdn_groups(weights, quant)
        weights = fuse_gdn_projections(weights, cfg.in_proj_groups, quant)

    model = Model(cfg)
    if quant:
        def predicate(path, module):
            p = quant_params(path, weights, quant)
            return False if p is None else {"group_size": p[0], "bits": p[1], "mode": p[2]}

        nn.quantize(model, class_predicate=predicate)
    check_and_load(model, weights, dtype)
    if quantize is not None:
        quant = quantize_model(model, quantize)
    model.mtp_weights = mtp
    model.quantization = quant
    if not lazy:
        mx.eval(model.parameters())
    return model, folder, mtp


def keep_float32(key: str) -> bool:
    """Tiny tensors whose precision matters: GDN decay rates and (folded) norm weights."""
    return key.endswith("A_log") or norm_keys(key)


def check_and_load(model, weights: dict, dtype: str | None):
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise CheckpointError(f"missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor {unexpected[0]!r} in checkpoint" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )
    for key, value in weights.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(f"tensor {key!r} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}")
    if dtype is not None:
        if dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        target = DTYPES[dtype]
        weights = {
            k: v.astype(target) if mx.issubdtype(v.dtype, mx.floating) and not keep_float32(k) else v
            for k, v in weights.items()
        }
    model.load_weights(list(weights.items()), strict=True)
