"""Public API: load(), generate(), stream_generate().

    model, tokenizer = load("Qwen/Qwen3.5-35B-A3B")            # or a local folder; None = bundled demo
    draft, _ = load("Qwen/Qwen3.5-0.8B")
    for chunk in stream_generate(model, tokenizer, "def fib(n):", draft=draft, num_draft_tokens=4):
        print(chunk.text, end="")

`draft` may be a loaded model, a path or Hub id, "ngram" (prompt lookup), "mtp" (the target's own MTP
head), or a Proposer; None decodes plainly (K = 0). `num_draft_tokens` is K, or "auto" to choose K each
round from measured costs (AdaptiveK).
"""

import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterator

from .adaptive import AdaptiveK
from .cache import DEFAULT_COMMIT_METHOD
from .drafts import DraftModelProposer, MTPProposer, NgramProposer, Proposer
from .engine import Stats, speculate
from .errors import DraftError, PromptError, SamplingError
from .loading import load_model
from .sampling import SamplingParams
from .tokenizer import Tokenizer


def demo_path(which: str = "target") -> Path:
    """The small trained pair bundled with the package (see drafts/demo)."""
    return Path(str(resources.files("specdec") / "demo" / which))


def load(path_or_repo=None, dtype: str | None = None, quantize: int | None = None):
    """-> (model, tokenizer). No path loads the bundled demo target. quantize: bits to quantize a float
    checkpoint to on load (group 64, router gates 8-bit)."""
    path = path_or_repo if path_or_repo is not None else demo_path("target")
    model, folder, _ = load_model(path, dtype, quantize=quantize)
    return model, Tokenizer.from_dir(folder)


@dataclass
class GenerationChunk:
    """One streamed piece: the new text and tokens of a round (stop strings and EOS already applied)."""

    text: str
    tokens: list
    finish_reason: str | None = None  # None while running, then "stop" or "length"
    stats: Stats | None = None


@dataclass
class GenerationResult:
    text: str
    tokens: list
    finish_reason: str
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float
    generation_tps: float
    stats: Stats = field(default_factory=Stats)


def make_proposer(draft, target, tokenizer=None, seed=None, commit_method=DEFAULT_COMMIT_METHOD) -> Proposer | None:
    if draft is None or isinstance(draft, Proposer):
        proposer = draft
    elif draft == "ngram":
        proposer = NgramProposer(target.config.vocab_size)
    elif draft == "mtp":  # the target's own multi-token-prediction head
        proposer = MTPProposer(target, seed=seed)
    elif isinstance(draft, (str, Path)):
        model, folder, _ = load_model(draft)
        if tokenizer is not None and (folder / "tokenizer.json").exists():
            same = Tokenizer.from_dir(folder).backend.get_vocab() == tokenizer.backend.get_vocab()
            if not same:
                raise DraftError(f"the draft at {draft} has another tokenizer vocabulary than the target")
        proposer = DraftModelProposer(model, commit_method, seed=seed)
    else:
        proposer = DraftModelProposer(draft, commit_method, seed=seed)
    if proposer is not None and proposer.vocab_size not in (None, target.config.vocab_size):
        raise DraftError(
            f"draft vocabulary size {proposer.vocab_size} does not match the target's "
            f"{target.config.vocab_size}: the draft must share the target's tokenizer"
        )
    return proposer


def encode_prompt(tokenizer, prompt, chat: bool, max_context: int) -> list:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise PromptError("the prompt is empty")
        if chat:
            prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = tokenizer.encode(prompt, add_special_tokens=False)
        else:
            ids = tokenizer.encode(prompt)
    else:
        ids = [int(t) for t in prompt]
    if not ids:
        raise PromptError("the prompt is empty (no tokens)")
    if len(ids) >= max_context:
        raise PromptError(f"the prompt has {len(ids)} tokens; the model's context is {max_context} tokens")
    return ids


def stream_generate(model, tokenizer, prompt, *, draft=None, num_draft_tokens: int | str = 4, max_tokens: int = 256,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                    seed: int | None = None, stop: list | None = None, chat: bool = False,
                    commit_method: str = DEFAULT_COMMIT_METHOD, stats: Stats | None = None) -> Iterator[GenerationChunk]:
    """Yield the text of each round as it is decided. The last chunk has finish_reason set."""
    params = SamplingParams(temperature, top_k, top_p, min_p, seed)
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise SamplingError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    if num_draft_tokens == "auto":
        num_draft_tokens = AdaptiveK()
    if not (callable(num_draft_tokens) or isinstance(num_draft_tokens, int) and 0 <= num_draft_tokens <= 64):
        raise DraftError(f"num_draft_tokens must be an integer in [0, 64] or 'auto', got {num_draft_tokens!r}")
    stops = [s for s in (stop or []) if s]
    ids = encode_prompt(tokenizer, prompt, chat, model.config.max_position_embeddings)
    proposer = make_proposer(draft, model, tokenizer, seed, commit_method)
    k = num_draft_tokens if proposer is not None else 0
    draft_slots = getattr(k, "max_k", 64) if callable(k) else k  # a verify window runs this far past the text
    room = model.config.max_position_embeddings - len(ids) - draft_slots
    if room < 1:
        raise PromptError(
            f"the prompt has {len(ids)} tokens: with {draft_slots} draft positions it leaves no room in the "
            f"model's context of {model.config.max_position_embeddings} tokens"
        )
    max_tokens = min(max_tokens, room)
    stats = stats if stats is not None else Stats()
    eos = tokenizer.eos_token_ids | set(model.config.eos_token_id)

    detok = tokenizer.detokenizer()
    held = ""  # decoded text not yet emitted: it may be the start of a stop string
    count = 0
    for tokens in speculate(model, ids, params, proposer, k, commit_method, stats):
        out_tokens, finish = [], None
        for t in tokens:
            if t in eos:
                finish = "stop"
                break
            out_tokens.append(t)
            held += detok.add(t)
            count += 1
            if count >= max_tokens:
                finish = "length"
                break
        if finish is not None:
            held += detok.finalize()
        hit = min((held.find(s) for s in stops if s in held), default=-1) if stops else -1
        if hit >= 0:
            yield GenerationChunk(held[:hit], out_tokens, "stop", stats)
            return
        if finish is not None:
            yield GenerationChunk(held, out_tokens, finish, stats)
            return
        # Hold back a tail that could still grow into a stop string.
        keep = max((len(s) - 1 for s in stops), default=0)
        emit = held[: len(held) - keep] if keep else held
        held = held[len(emit):]
        yield GenerationChunk(emit, out_tokens, None, stats)


def generate(model, tokenizer, prompt, **kwargs) -> GenerationResult:
    """Run to completion; same arguments as stream_generate."""
    stats = kwargs.pop("stats", None) or Stats()
    ids_len = len(encode_prompt(tokenizer, prompt, kwargs.get("chat", False), model.config.max_position_embeddings))
    text, tokens, finish = [], [], "length"
    start = time.perf_counter()
    for chunk in stream_generate(model, tokenizer, prompt, stats=stats, **kwargs):
        text.append(chunk.text)
        tokens += chunk.tokens
        finish = chunk.finish_reason or finish
    total = time.perf_counter() - start
    decode_time = max(total - stats.prefill_time, 1e-9)
    return GenerationResult(
        text="".join(text), tokens=tokens, finish_reason=finish, prompt_tokens=ids_len,
        generation_tokens=len(tokens), prompt_tps=ids_len / max(stats.prefill_time, 1e-9),
        generation_tps=len(tokens) / decode_time, stats=stats,
    )
