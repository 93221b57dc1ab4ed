"""specdec.tokenizer against transformers, on small tokenizers trained here.

Two layouts: a byte-level BPE with a ChatML template (Qwen style, no BOS) and a SentencePiece-style BPE
with byte fallback and a BOS token (Llama style, whose decoder strips the first leading space).
"""

import json
import random

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from specdec.errors import PromptError, TokenizerError
from specdec.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

WORDS = (
    "the quick brown fox jumps over a lazy dog while speculative decoding drafts tokens "
    "héllo wörld café naïve garçon Straße größer 日本語 東京 こんにちは 世界 中文 你好 "
    "привет мир γειά σου κόσμε 🙂 🚀 👍🏽 ∑ → ≤"
).split()
SAMPLE = "Héllo wörld! 日本語のテキスト、🙂🚀 and 👍🏽 — naïve café, привет κόσμε ∑x≤1 ✨新しい"

CHATML = """\
{%- if tools %}
<|im_start|>system
{{ messages[0].content if messages[0].role == 'system' else 'You are a helpful assistant.' }}

# Tools
{% for tool in tools %}
{{ tool | tojson }}
{{ tool.function.parameters | tojson(indent=2) }}
{% endfor %}
<|im_end|>
{% endif %}
{%- set ns = namespace(users=0) %}
{%- for message in messages %}
  {%- if message.role not in ['system', 'user', 'assistant', 'tool'] %}
    {{- raise_exception('Unknown role: ' + message.role) }}
  {%- endif %}
  {%- if message.role == 'system' and tools %}{% continue %}{% endif %}
  {%- if message.role == 'user' %}{% set ns.users = ns.users + 1 %}{% endif %}
<|im_start|>{{ message.role }}
{% if message.reasoning_content is defined %}
<think>{{ message.reasoning_content }}</think>
{% endif %}
{{ message.content }}<|im_end|>
{% endfor %}
{%- for i in range(10) %}{% if i == 1 %}{% break %}{% endif %}<!-- users={{ ns.users }} eos={{ eos_token }} -->
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}
<think>

</think>

{% endif %}
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [
        {"role": "system", "content": "Réponds en français 🙂"},
        {"role": "user", "content": "日本語で？"},
        {"role": "assistant", "content": "はい。", "reasoning": "the user wants Japanese", "tool_calls": None},
        {"role": "user", "content": "  spaces  and\nnewlines\n"},
    ],
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "météo",
            "description": "Weather <for> a city & its région",
            "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "東京?"}}},
        },
    }
]


def _corpus(n_lines=400, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n_lines)] + [SAMPLE]


def _write(folder, backend, tokenizer_config, **extra_files):
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for name, content in extra_files.items():
        name = name.replace("__", ".")
        (folder / name).write_text(content if isinstance(content, str) else json.dumps(content))
    return folder


@pytest.fixture(scope="module")
def byte_level_backend():
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer)
    return backend


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory, byte_level_backend):
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": {"__type": "AddedToken", "content": "<|endoftext|>", "special": True, "normalized": False},
        "add_bos_token": False,
        "chat_template": CHATML,
    }
    return _write(tmp_path_factory.mktemp("qwen"), byte_level_backend, config)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """SentencePiece-style: '▁' for spaces, <0xXX> byte fallback, BOS added by the post-processor."""
    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator([line for line in _corpus() if "🙂" not in line and "👍" not in line], trainer)
    spec = json.loads(backend.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):  # byte fallback: characters the training never saw become <0xXX> tokens
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    backend = Backend.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))]
    )
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False}
    return _write(tmp_path_factory.mktemp("llama"), backend, config)


def _reference(folder):
    return transformers.AutoTokenizer.from_pretrained(str(folder))


TEXTS = [SAMPLE, "", " leading space", "plain ascii text.", "<|im_start|>user\nhi<|im_end|>", "🙂🙂🙂", "a\n\n  b\t"]


@pytest.mark.parametrize("layout", ["qwen_dir", "llama_dir"])
def test_encode_decode_match_transformers(layout, request):
    folder = request.getfixturevalue(layout)
    ours, ref = Tokenizer.from_dir(folder), _reference(folder)
    assert ours.vocab_size == len(ref)
    assert ours.bos_token_id == ref.bos_token_id
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), (text, special)
        for skip in (True, False):
            assert ours.decode(ids) == ref.decode(ids)
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


def test_bos_follows_the_config(llama_dir, tmp_path):
    tok = Tokenizer.from_dir(llama_dir)
    bos = tok.token_to_id("<s>")
    assert tok.bos_token_id == bos and tok.encode("hi")[0] == bos and tok.encode("hi", False)[0] != bos
    # tokenizer.json's post-processor decides when there is one; add_bos_token is then ignored, as in transformers
    config = json.loads((llama_dir / "tokenizer_config.json").read_text())
    backend = Backend.from_file(str(llama_dir / "tokenizer.json"))
    folder = _write(tmp_path / "false", backend, {**config, "add_bos_token": False})
    assert Tokenizer.from_dir(folder).encode(SAMPLE) == _reference(folder).encode(SAMPLE)
    assert Tokenizer.from_dir(folder).encode(SAMPLE)[0] == bos
    # a tokenizer.json without a post-processor: add_bos_token says whether to add BOS
    spec = json.loads(backend.to_str())
    spec["post_processor"] = None
    backend = Backend.from_str(json.dumps(spec))
    no_bos = Tokenizer.from_dir(_write(tmp_path / "none", backend, {**config, "add_bos_token": False}))
    with_bos = Tokenizer.from_dir(_write(tmp_path / "true", backend, {**config, "add_bos_token": True}))
    assert no_bos.encode(SAMPLE) == tok.encode(SAMPLE, add_special_tokens=False)
    assert with_bos.encode(SAMPLE) == tok.encode(SAMPLE) and with_bos.encode(SAMPLE, False) == no_bos.encode(SAMPLE)


def test_qwen_layout_has_no_bos(qwen_dir):
    tok = Tokenizer.from_dir(qwen_dir)
    assert tok.bos_token_id is None
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)
    assert tok.eos_token_ids == {tok.token_to_id("<|im_end|>")}
    assert tok.token_to_id("not a token") is None


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_transformers(qwen_dir, messages, generation_prompt):
    ours, ref = Tokenizer.from_dir(qwen_dir), _reference(qwen_dir)
    assert ours.has_chat_template
    for kwargs in ({}, {"tools": TOOLS}, {"enable_thinking": False}):
        got = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs)
        want = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
        assert got == want
        assert got.startswith("<|im_start|>") and got.endswith("\n")
    if len(messages) > 1:  # the reasoning given as "reasoning" reaches the template as reasoning_content
        assert "はい。" in got and "<think>the user wants Japanese</think>" in got


def test_tojson_is_plain_json(qwen_dir):
    prompt = Tokenizer.from_dir(qwen_dir).apply_chat_template(CONVERSATIONS[0], tools=TOOLS)
    assert json.dumps(TOOLS[0], ensure_ascii=False) in prompt  # no \u escapes, no HTML escaping of < & >
    assert json.dumps(TOOLS[0]["function"]["parameters"], ensure_ascii=False, indent=2) in prompt


def test_template_globals(tmp_path, byte_level_backend):
    template = "{{ strftime_now('%Y') }}|{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ messages | length }}"
    folder = _write(tmp_path, byte_level_backend,
                    {"eos_token": {"content": "<|im_end|>"}, "bos_token": "<|im_start|>", "pad_token": "<|endoftext|>"},
                    chat_template__jinja=template)
    year, rest = Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "x"}]).split("|", 1)
    assert len(year) == 4 and year.isdigit()
    assert rest == "<|im_start|>|<|im_end|>|<|endoftext|>|1"


def test_template_file_layouts(tmp_path, byte_level_backend):
    messages = [{"role": "user", "content": "x"}]
    # chat_template.jinja wins over tokenizer_config.json, as in transformers
    folder = _write(tmp_path / "jinja", byte_level_backend, {"chat_template": "from config"},
                    chat_template__jinja="from jinja {{ messages[0].content }}")
    assert Tokenizer.from_dir(folder).apply_chat_template(messages) == "from jinja x"
    assert _reference(folder).apply_chat_template(messages, tokenize=False) == "from jinja x"
    folder = _write(tmp_path / "json", byte_level_backend, {},
                    chat_template__json={"chat_template": "json {{ 1 + 1 }}"})
    assert Tokenizer.from_dir(folder).apply_chat_template(messages) == "json 2"
    named = [{"name": "default", "template": "plain"}, {"name": "tool_use", "template": "tools={{ tools | length }}"}]
    tok = Tokenizer.from_dir(_write(tmp_path / "named", byte_level_backend, {"chat_template": named}))
    assert tok.apply_chat_template(messages) == "plain"
    assert tok.apply_chat_template(messages, tools=TOOLS) == "tools=1"
    assert tok.apply_chat_template(messages, chat_template="tool_use", tools=[]) == "tools=0"
    # newer layout: extra named templates as files
    folder = _write(tmp_path / "extra", byte_level_backend, {}, chat_template__jinja="plain")
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "rag.jinja").write_text("rag {{ documents | length }}")
    tok = Tokenizer.from_dir(folder)
    assert tok.apply_chat_template(messages, chat_template="rag", documents=[{"text": "d"}]) == "rag 1"
    assert tok.apply_chat_template(messages) == "plain"


def test_eos_ids_are_the_union_of_all_files(tmp_path, byte_level_backend):
    folder = _write(tmp_path, byte_level_backend, {"eos_token": "<|im_end|>"},
                    config__json={"eos_token_id": [0], "text_config": {"eos_token_id": 5}},
                    generation_config__json={"eos_token_id": [7, 0]})
    tok = Tokenizer.from_dir(folder)
    assert tok.eos_token_ids == {0, 5, 7, tok.token_to_id("<|im_end|>")}
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 9}))
    (folder / "config.json").write_text("{}")
    assert Tokenizer.from_dir(folder).eos_token_ids == {9, tok.token_to_id("<|im_end|>")}


def _stream(tok, ids, **kwargs):
    detok = tok.detokenizer(**kwargs)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.finalize())
    assert detok.tokens == list(ids)
    assert detok.text == "".join(pieces)
    return pieces


@pytest.mark.parametrize("layout", ["qwen_dir", "llama_dir"])
def test_streaming_detokenizer(layout, request):
    tok = Tokenizer.from_dir(request.getfixturevalue(layout))
    text = " ".join([SAMPLE] * 3) + " 👨‍👩‍👧 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 end"
    ids = tok.encode(text, add_special_tokens=False)
    # the test means something only if some character is split over several tokens
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces = _stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(bool(p) for p in pieces) > len(ids) // 5  # text arrives as it is finished, not at the end
    with_bos = tok.encode(text)
    assert "".join(_stream(tok, with_bos, skip_special_tokens=True)) == tok.decode(with_bos, skip_special_tokens=True)


@pytest.mark.parametrize("layout", ["qwen_dir", "llama_dir"])
def test_streaming_random_ids(layout, request):
    """Any id sequence (broken UTF-8 included) concatenates to exactly what decode gives."""
    tok = Tokenizer.from_dir(request.getfixturevalue(layout))
    rng = random.Random(1)
    for _ in range(40):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 60))]
        ids[rng.randrange(len(ids))] = tok.token_to_id("<|im_end|>") or tok.token_to_id("</s>")
        for skip in (False, True):
            assert "".join(_stream(tok, ids, skip_special_tokens=skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_streaming_decodes_short_windows(qwen_dir):
    tok = Tokenizer.from_dir(qwen_dir)
    lengths = []
    real = tok.backend

    class CountingBackend:
        def decode(self, ids, skip_special_tokens=False):
            lengths.append(len(ids))
            return real.decode(ids, skip_special_tokens=skip_special_tokens)

        def __getattr__(self, name):
            return getattr(real, name)

    ids = tok.encode(" ".join([SAMPLE] * 20), add_special_tokens=False)
    tok.backend = CountingBackend()
    assert len(ids) > 300
    _stream(tok, ids)
    assert max(lengths) <= 8  # each step re-decodes a few tokens, never the whole sequence


# ---- errors ------------------------------------------------------------------------------------------------


def test_missing_folder_and_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        Tokenizer.from_dir(tmp_path)


def test_bad_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{ not json")
    with pytest.raises(TokenizerError, match="tokenizer.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"hello": "world"}')
    with pytest.raises(TokenizerError, match="tokenizer.json is not a `tokenizers` tokenizer file"):
        Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{'single': 'quotes'}", "tokenizer_config.json is not valid JSON"),
        ("[1, 2]", "tokenizer_config.json must hold a JSON object"),
        ('{"eos_token": 3}', "tokenizer_config.json: eos_token must be a string"),
        ('{"add_bos_token": "yes"}', "tokenizer_config.json: add_bos_token must be true or false"),
        ('{"chat_template": {"a": 1}}', "tokenizer_config.json: chat_template must be"),
        ('{"eos_token": "<|not_here|>"}', "eos_token '<|not_here|>' is not in the vocabulary"),
        ('{"bos_token": {"content": "<nope>"}}', "bos_token '<nope>' is not in the vocabulary"),
    ],
)
def test_bad_tokenizer_config(tmp_path, byte_level_backend, content, message):
    _write(tmp_path, byte_level_backend, {})
    (tmp_path / "tokenizer_config.json").write_text(content)
    with pytest.raises(TokenizerError, match=message):
        Tokenizer.from_dir(tmp_path)


def test_bad_eos_ids(tmp_path, byte_level_backend):
    _write(tmp_path, byte_level_backend, {}, generation_config__json={"eos_token_id": "2"})
    with pytest.raises(TokenizerError, match="generation_config.json: eos_token_id"):
        Tokenizer.from_dir(tmp_path)


def test_chat_template_errors(tmp_path, byte_level_backend, qwen_dir):
    messages = [{"role": "user", "content": "x"}]
    no_template = Tokenizer.from_dir(_write(tmp_path / "none", byte_level_backend, {}))
    assert not no_template.has_chat_template
    with pytest.raises(TokenizerError, match="no chat template"):
        no_template.apply_chat_template(messages)

    broken = Tokenizer.from_dir(_write(tmp_path / "broken", byte_level_backend, {},
                                       chat_template__jinja="{% for m in messages %}{{ m.content }}"))
    with pytest.raises(TokenizerError, match="chat_template.jinja: chat template syntax error on line 1"):
        broken.apply_chat_template(messages)

    tok = Tokenizer.from_dir(qwen_dir)
    with pytest.raises(TokenizerError, match="Unknown role: robot"):
        tok.apply_chat_template([{"role": "robot", "content": "beep"}])
    with pytest.raises(PromptError):
        tok.apply_chat_template([])


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",  # jinja2 alone would print "" here
        "{{ raise_exception.__globals__ }}",
        "{{ messages.append(1) }}",
        "{% set x = messages[0].update({'role': 'system'}) %}",
        "{{ cycler.__init__.__globals__.os }}",
    ],
)
def test_sandbox_blocks_python_internals(qwen_dir, template):
    with pytest.raises(TokenizerError, match="unsafe"):
        Tokenizer.from_dir(qwen_dir).apply_chat_template([{"role": "user", "content": "x"}], chat_template=template)
