"""The demo corpus: the Python standard library's own source, split by file.

Every machine with Python has this text, so the recipe needs no download. A file
goes to the held-out split when a hash of its path (relative to the stdlib root,
with '/' separators) falls in the last 5 of 100 buckets: the same file lands on
the same side on every machine and every Python version.
"""

import hashlib
import json
import sysconfig
from pathlib import Path

import numpy as np

EOS, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]
HELDOUT_PERCENT = 5
MAX_FILE_BYTES = 256_000  # a few generated tables and doc dumps are bigger; they are not code anyone writes

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_heldout(relpath: str) -> bool:
    bucket = int(hashlib.sha256(relpath.encode()).hexdigest()[:8], 16) % 100
    return bucket >= 100 - HELDOUT_PERCENT


def stdlib_files(root: Path | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of every stdlib *.py file, sorted by path.

    Skips installed third-party packages, build-configuration modules (they hold
    the paths of the machine Python was built on) and files that are not UTF-8."""
    root = root or stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        parts = rel.split("/")
        if "site-packages" in parts or "__pycache__" in parts or parts[0].startswith("config-"):
            continue
        if parts[-1].startswith("_sysconfigdata") or path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            files.append((rel, text))
    return files


def split_files(files):
    train = [(p, t) for p, t in files if not is_heldout(p)]
    heldout = [(p, t) for p, t in files if is_heldout(p)]
    return train, heldout


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE (GPT-2 style pre-tokenization), special tokens first (ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_config(max_length: int) -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "model_max_length": max_length,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                     "normalized": False, "single_word": False}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }


def encode_files(tok, files) -> np.ndarray:
    """All files as one token stream, each file followed by EOS."""
    eos = tok.token_to_id(EOS)
    encodings = tok.encode_batch([t for _, t in files])
    ids = [np.array(e.ids + [eos], dtype=np.uint16) for e in encodings]
    return np.concatenate(ids) if ids else np.zeros(0, np.uint16)


def prepare(data_dir: Path, vocab_size: int = 8192, max_length: int = 4096) -> dict:
    """Tokenizer + tokenized train/held-out streams in data_dir. Returns a summary."""
    data_dir.mkdir(parents=True, exist_ok=True)
    train, heldout = split_files(stdlib_files())
    tok = train_tokenizer((t for _, t in train), vocab_size)
    tok.save(str(data_dir / "tokenizer.json"))
    (data_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(max_length), indent=2))
    train_ids, heldout_ids = encode_files(tok, train), encode_files(tok, heldout)
    np.save(data_dir / "train.npy", train_ids)
    np.save(data_dir / "heldout.npy", heldout_ids)
    summary = {
        "python": sysconfig.get_python_version(),
        "files_train": len(train), "files_heldout": len(heldout),
        "bytes_train": sum(len(t.encode()) for _, t in train),
        "bytes_heldout": sum(len(t.encode()) for _, t in heldout),
        "tokens_train": int(train_ids.size), "tokens_heldout": int(heldout_ids.size),
        "vocab_size": tok.get_vocab_size(),
    }
    (data_dir / "corpus.json").write_text(json.dumps(summary, indent=2))
    return summary
