"""Prompt lookup (n-gram) drafting: no draft model; proposes continuations of n-grams already in the context.
It shines when the output repeats the input (edits, refactors, quoting).

    python examples/prompt_lookup.py
"""

from specdec import generate, load

model, tokenizer = load()
code = '''def area(width, height):
    """Return the area of a rectangle."""
    return width * height


def perimeter(width, height):
    """Return the perimeter of a rectangle."""
    return 2 * (width + height)
'''
prompt = code + "\n\n# The same functions, unchanged:\n" + code.split("\n")[0] + "\n"
result = generate(model, tokenizer, prompt, draft="ngram", num_draft_tokens="auto", max_tokens=80)
print(result.text)
print(f"\nn-gram: tau {result.stats.tau:.2f}, acceptance {result.stats.acceptance_rate:.0%}")
