"""Prompt suites for the acceptance evaluation, cut from the held-out stdlib files only.

One JSONL file per category under specdec/suites/, one object per line:
{"id", "category", "prompt", "source" (stdlib-relative path), "tokens"}.

    code_completion    a function's def line and first body lines
    docstring_to_code  a function's def line and docstring; the body is to be written
    repetitive_edit    a function, then the start of a copy of it with one name changed
                       (text that favours prompt lookup)
    free_text          the first part of a long docstring: prose, no code
"""

import ast
import json
import random
import re
import textwrap
from pathlib import Path

import corpus

PER_CATEGORY = 12
MAX_TOKENS = 400
CATEGORIES = ("code_completion", "docstring_to_code", "repetitive_edit", "free_text")
UNWANTED = re.compile(r"/root|/home/|pyenv|\t")  # no machine paths, no tab-indented code


def functions(text: str):
    """(node, dedented source) of every function with a body of several statements."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return []
    lines = text.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.body) >= 3:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
            src = textwrap.dedent("".join(lines[start:node.end_lineno]))
            if not src[:1].isspace():  # dedent fails where a string literal sits at column 0
                out.append((node, start, src))
    return out


def code_completion(node, start, src):
    body_line = node.body[0].lineno - 1 - start
    lines = src.splitlines(keepends=True)
    if ast.get_docstring(node) is not None:
        body_line = node.body[1].lineno - 1 - start
    return "".join(lines[: body_line + 3]) if len(lines) > body_line + 6 else None


def docstring_to_code(node, start, src):
    doc = node.body[0]
    if ast.get_docstring(node) is None or len(ast.get_docstring(node)) < 40:
        return None
    lines = src.splitlines(keepends=True)
    end = doc.end_lineno - start
    return "".join(lines[:end]) if len(lines) > end + 3 else None


def repetitive_edit(node, start, src):
    lines = src.splitlines(keepends=True)
    if not 8 <= len(lines) <= 40:
        return None
    name = node.name
    renamed = name + "_v2" if not name.startswith("__") else name.strip("_") + "_v2"
    edited = re.sub(rf"\b{re.escape(name)}\b", renamed, src)
    head = "".join(edited.splitlines(keepends=True)[:3])
    return src + "\n\n" + head


def free_text(node, start, src):
    doc = ast.get_docstring(node, clean=True) if node is not None else None
    if doc is None or len(doc) < 400 or ">>>" in doc:
        return None
    cut = doc.rfind(" ", 0, len(doc) // 2)
    return doc[:cut] if cut > 100 else None


def candidates(files):
    """All candidate prompts per category, in a fixed order."""
    found = {c: [] for c in CATEGORIES}
    makers = {"code_completion": code_completion, "docstring_to_code": docstring_to_code,
              "repetitive_edit": repetitive_edit}
    for rel, text in files:
        try:
            module = ast.parse(text)
        except SyntaxError:
            continue
        docs = [module] + [n for n in ast.walk(module) if isinstance(n, (ast.ClassDef, ast.FunctionDef))]
        for n in docs:
            prose = free_text(n, 0, "")
            if prose:
                found["free_text"].append((rel, prose))
        for node, start, src in functions(text):
            for cat, make in makers.items():
                prompt = make(node, start, src)
                if prompt:
                    found[cat].append((rel, prompt))
    return found


def build(tokenizer_path: Path, out_dir: Path, seed: int = 0) -> dict:
    """Write out_dir/<category>.jsonl; prompts spread over as many files as possible."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    _, heldout = corpus.split_files(corpus.stdlib_files())
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for cat, items in candidates(heldout).items():
        items = [(rel, p) for rel, p in items if not UNWANTED.search(p)]
        random.Random(f"{seed}-{cat}").shuffle(items)
        chosen, used_files = [], set()
        for pass_ in range(2):  # first one prompt per file, then fill up
            for rel, prompt in items:
                n = len(tok.encode(prompt).ids)
                if len(chosen) == PER_CATEGORY or n > MAX_TOKENS or n < 16:
                    continue
                if (pass_ == 0 and rel in used_files) or any(prompt == c["prompt"] for c in chosen):
                    continue
                used_files.add(rel)
                chosen.append({"id": f"{cat}-{len(chosen) + 1:02d}", "category": cat, "prompt": prompt,
                               "source": rel, "tokens": n})
        with open(out_dir / f"{cat}.jsonl", "w") as f:
            for row in chosen:
                f.write(json.dumps(row) + "\n")
        counts[cat] = len(chosen)
    return counts
