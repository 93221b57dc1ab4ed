"""Text in and out: a `tokenizers` tokenizer, the checkpoint's chat template, and a streaming detokenizer.

Everything is read from a checkpoint folder the way Hugging Face lays it out:
  tokenizer.json           the tokenizer itself (loaded with the `tokenizers` library, no transformers)
  tokenizer_config.json    special tokens, chat_template, add_bos_token (used only if tokenizer.json has no post-processor)
  chat_template.jinja      the chat template in its own file (newer layout; wins over the others)
  chat_template.json       {"chat_template": ...} (the processor layout of multimodal checkpoints)
  config.json              eos_token_id (int or list), top level or under text_config
  generation_config.json   eos_token_id (int or list)
Generation stops at any of the EOS ids found in any of these files.

Chat templates come from the Hub and are untrusted code: they render in jinja2's immutable sandbox,
and any attempt to reach an unsafe attribute (`__class__`, `list.append`, ...) fails at once.
"""

import json
import re
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from tokenizers import Tokenizer as _Backend

from .errors import PromptError, SpecdecError, TokenizerError

# The named special tokens a chat template can read (`{{ bos_token }}`, ...), as transformers passes them.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning goes by; templates read `reasoning_content` (Qwen) or `thinking`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_REPLACEMENT = "\ufffd"  # what a decoder yields for an incomplete UTF-8 sequence
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class StreamingDetokenizer:
    """Turns token ids into text one token at a time, never emitting half a character.

    Byte-level BPE can split one character over several tokens; until the last byte arrives the decoded
    text ends in U+FFFD, so that text is held back. With byte fallback (SentencePiece style, `<0xE3>`
    tokens) a run of byte tokens is decoded as a whole (one invalid byte turns the entire run into U+FFFD),
    so text is also held while the last token is a byte token. Each step decodes only the tokens since the last
    point where the text was complete, plus the tokens just before it as context (decoders such as
    SentencePiece's strip the leading space of the first token they see, so a token must never be
    decoded alone). The pieces returned by `add` and `finalize` concatenate to `decode(tokens)`.
    """

    def __init__(self, backend: _Backend, skip_special_tokens: bool = False):
        self._backend = backend
        self._skip_special = skip_special_tokens
        self.tokens: list[int] = []
        self._context_start = 0  # tokens[context_start:read_start] are emitted; decoded only as context
        self._read_start = 0  # tokens[read_start:] are not emitted yet
        self._text = ""
        self._byte_fallback = getattr(backend.model, "byte_fallback", False)
        # skipped special tokens vanish before decoding, so byte tokens on both sides of one form one run
        self._skipped_ids = (
            {i for i, t in backend.get_added_tokens_decoder().items() if t.special} if skip_special_tokens else set()
        )

    @property
    def text(self) -> str:
        """All text emitted so far (held-back bytes of an unfinished character are not in it)."""
        return self._text

    def add(self, token_id: int) -> str:
        """Take one token; return the text it completes (often "", or several tokens' worth at once)."""
        token_id = int(token_id)
        self.tokens.append(token_id)
        if self._byte_fallback and (
            token_id in self._skipped_ids or _BYTE_TOKEN.fullmatch(self._backend.id_to_token(token_id) or "")
        ):
            return ""
        return self._emit(final=False)

    def finalize(self) -> str:
        """Flush whatever is held back (an unfinished character decodes as U+FFFD) and end the stream."""
        return self._emit(final=True)

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip_special) if ids else ""

    def _emit(self, final: bool) -> str:
        if self._read_start == len(self.tokens):
            return ""
        context = self._decode(self.tokens[self._context_start : self._read_start])
        window = self._decode(self.tokens[self._context_start :])
        if window.endswith(_REPLACEMENT) and not final:
            return ""
        piece = window[len(context) :]
        if piece:  # tokens without text (skipped special tokens) are no context: keep the older one
            self._context_start = self._read_start
        self._read_start = len(self.tokens)
        self._text += piece
        return piece


class Tokenizer:
    """A checkpoint's tokenizer: encode, decode, stream, and render chat prompts.

    Build it with `Tokenizer.from_dir(path)`. `backend` is the underlying `tokenizers.Tokenizer`.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        special_tokens: Mapping[str, str] | None = None,
        eos_token_ids: Iterable[int] = (),
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
        chat_templates: Mapping[str, str] | None = None,
        chat_template_file: str = "chat template",
    ):
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.bos_token_id = self._special_id("bos_token")
        eos_id = self._special_id("eos_token")
        self.eos_token_ids: set[int] = set(eos_token_ids) | ({eos_id} if eos_id is not None else set())
        # tokenizer.json's post-processor adds BOS/EOS when the file has one (transformers 5 does the same and
        # ignores add_bos_token then); a file without one falls back on add_bos_token / add_eos_token.
        ours = backend.post_processor is None
        self._prefix = [self.bos_token_id] if ours and add_bos_token and self.bos_token_id is not None else []
        self._suffix = [eos_id] if ours and add_eos_token and eos_id is not None else []
        self.chat_templates = dict(chat_templates or {})
        self._chat_template_file = chat_template_file

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"tokenizer_config.json: {name} {token!r} is not in the vocabulary of tokenizer.json")
        return token_id

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"tokenizer folder {str(path)!r} does not exist")
        backend = _load_backend(path / "tokenizer.json")
        config = _read_json_object(path / "tokenizer_config.json") or {}
        special_tokens = {}
        for name in SPECIAL_TOKEN_NAMES:
            token = _token_content(config.get(name), f"tokenizer_config.json: {name}")
            if token is not None:
                special_tokens[name] = token
        templates, template_file = _read_chat_templates(path, config)
        return cls(
            backend,
            special_tokens=special_tokens,
            eos_token_ids=_read_eos_ids(path),
            add_bos_token=_optional_bool(config, "add_bos_token"),
            add_eos_token=_optional_bool(config, "add_eos_token"),
            chat_templates=templates,
            chat_template_file=template_file,
        )

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added tokens included (the model's embedding may be larger: padding)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_templates)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        return self._prefix + ids + self._suffix if add_special_tokens else ids

    def decode(self, ids: Iterable[int] | int, skip_special_tokens: bool = False) -> str:
        ids = [ids] if isinstance(ids, int) else ids
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = False) -> StreamingDetokenizer:
        return StreamingDetokenizer(self.backend, skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` with the checkpoint's chat template into the prompt string.

        Extra keyword arguments (e.g. `enable_thinking=False`) are passed to the template.
        `chat_template` picks a named template of the checkpoint, or is a template source itself.
        """
        if not messages:
            raise PromptError("apply_chat_template got no messages")
        if any(not isinstance(m, Mapping) for m in messages):
            raise TokenizerError("apply_chat_template: every message must be a dict with 'role' and 'content'")
        if tools is not None and any(not isinstance(t, Mapping) for t in tools):
            raise TokenizerError("apply_chat_template: tools must be JSON-schema dicts")
        source, where = self._pick_template(chat_template, tools)
        template = _compile(source, where)
        variables = {
            **self.special_tokens,
            **_plain(kwargs),
            "messages": [_with_reasoning_aliases(m) for m in _plain(messages)],
            "tools": _plain(tools),
            "documents": _plain(documents),
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            return template.render(**variables)
        except SpecdecError:
            raise
        except SecurityError as e:
            raise TokenizerError(f"{where}: the chat template tried an unsafe operation: {e}") from None
        except Exception as e:
            raise TokenizerError(f"{where}: the chat template failed: {type(e).__name__}: {e}") from None

    def _pick_template(self, name: str | None, tools: list | None) -> tuple[str, str]:
        """The template source to render, and where it came from (for error messages)."""
        if name is not None and name not in self.chat_templates:
            return name, "chat_template argument"  # not a known name: a template source
        if name is not None:
            return self.chat_templates[name], self._chat_template_file
        if not self.chat_templates:
            raise TokenizerError(
                "this tokenizer has no chat template (none in tokenizer_config.json, chat_template.jinja "
                "or chat_template.json); pass chat_template=... or encode a plain prompt"
            )
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"], self._chat_template_file
        if "default" in self.chat_templates:
            return self.chat_templates["default"], self._chat_template_file
        if len(self.chat_templates) == 1:
            return next(iter(self.chat_templates.values())), self._chat_template_file
        raise TokenizerError(f"several chat templates {sorted(self.chat_templates)} and none is 'default'; pick one")


# ---- reading the checkpoint files -------------------------------------------------------------------------


def _load_backend(file: Path) -> _Backend:
    if not file.is_file():
        raise TokenizerError(f"{file.name} not found in {str(file.parent)!r}")
    try:
        return _Backend.from_file(str(file))
    except Exception as e:
        reason = e
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{file.name} is not valid JSON: {e}") from None
    raise TokenizerError(f"{file.name} is not a `tokenizers` tokenizer file: {reason}")


def _read_json_object(file: Path) -> dict | None:
    """The JSON object in `file`, or None if there is no such file."""
    if not file.is_file():
        return None
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{file.name} is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise TokenizerError(f"{file.name} must hold a JSON object, found {type(value).__name__}")
    return value


def _token_content(value: Any, where: str) -> str | None:
    """A special token is written as a string or as an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is None or isinstance(value, str):
        return value
    raise TokenizerError(f"{where} must be a string or a dict with 'content', found {value!r}")


def _optional_bool(config: dict, key: str) -> bool | None:
    value = config.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise TokenizerError(f"tokenizer_config.json: {key} must be true or false, found {value!r}")


def _eos_ids(value: Any, where: str) -> set[int]:
    if value is None:
        return set()
    ids = value if isinstance(value, list) else [value]
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
        raise TokenizerError(f"{where} must be a token id or a list of token ids, found {value!r}")
    return set(ids)


def _read_eos_ids(path: Path) -> set[int]:
    ids = set()
    config = _read_json_object(path / "config.json") or {}
    ids |= _eos_ids(config.get("eos_token_id"), "config.json: eos_token_id")
    text_config = config.get("text_config")
    if isinstance(text_config, dict):  # multimodal checkpoints keep the language model's settings here
        ids |= _eos_ids(text_config.get("eos_token_id"), "config.json: text_config.eos_token_id")
    generation = _read_json_object(path / "generation_config.json") or {}
    ids |= _eos_ids(generation.get("eos_token_id"), "generation_config.json: eos_token_id")
    return ids


def _named_templates(value: Any, where: str) -> dict[str, str]:
    """`chat_template` is one template, or a list of {"name": ..., "template": ...}."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str) for t in value
    ):
        return {t["name"]: t["template"] for t in value}
    raise TokenizerError(f"{where} must be a string or a list of {{'name', 'template'}} dicts")


def _read_chat_templates(path: Path, config: dict) -> tuple[dict[str, str], str]:
    """The checkpoint's chat templates by name, and the file they came from (for error messages)."""
    templates = _named_templates(config.get("chat_template"), "tokenizer_config.json: chat_template")
    where = "tokenizer_config.json"
    processor = _read_json_object(path / "chat_template.json")
    if processor is not None:
        templates = _named_templates(processor.get("chat_template"), "chat_template.json: chat_template")
        where = "chat_template.json"
    extra = path / "additional_chat_templates"
    if extra.is_dir():
        templates.update({f.stem: f.read_text(encoding="utf-8") for f in sorted(extra.glob("*.jinja"))})
    if (path / "chat_template.jinja").is_file():
        templates["default"] = (path / "chat_template.jinja").read_text(encoding="utf-8")
        where = "chat_template.jinja"
    return templates, where


# ---- the chat template sandbox ----------------------------------------------------------------------------


class _StrictSandbox(ImmutableSandboxedEnvironment):
    # jinja2 turns an unsafe attribute into an undefined value that only fails when used further (so
    # `{{ ''.__class__ }}` would print ""); fail on the attempt itself instead.
    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _raise_exception(message: str):
    raise TokenizerError(f"chat template: {message}")


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    # jinja2's own tojson escapes <, >, & and ' for HTML; chat templates want plain JSON, as transformers renders.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=16)
def _compile(source: str, where: str) -> jinja2.Template:
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{where}: chat template syntax error on line {e.lineno}: {e.message}") from None


def _plain(value: Any) -> Any:
    """A copy made of plain JSON types only: the template must never see objects with methods of their own."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    # Subclasses (str enums, numpy floats) and numpy/mlx scalars back to the base types.
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, str):
        return str.__str__(value)
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        return _plain(value.item())
    return f"<{type(value).__name__}>"


def _with_reasoning_aliases(message: dict) -> dict:
    # Drop None values (APIs send content=None; templates handle a missing key, not a literal None), and
    # give the reasoning under every name templates read it by.
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message
