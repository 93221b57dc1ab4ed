"""Self-speculation with the target's own multi-token-prediction (MTP) head: no separate draft model.
Qwen3-Next and Qwen3.5 checkpoints ship `mtp.*` weights; so does the bundled demo target.

    python examples/mtp.py
"""

from specdec import generate, load

model, tokenizer = load()  # or load("Qwen/Qwen3-Next-80B-A3B-Instruct")
result = generate(model, tokenizer, "import os\n\ndef walk(path):", draft="mtp", num_draft_tokens=2, max_tokens=120)
print(result.text)
print(f"\nMTP: tau {result.stats.tau:.2f}, acceptance by position {result.stats.acceptance_by_position}")
