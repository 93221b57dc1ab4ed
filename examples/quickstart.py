"""Speculative decoding in five lines, on the demo pair bundled with specdec (offline).

    python examples/quickstart.py
"""

from specdec import generate, load
from specdec.generate import demo_path

model, tokenizer = load()  # the bundled demo target (a small Qwen3.5-MoE trained on Python code)
draft, _ = load(demo_path("draft"))  # its bundled dense Qwen3 draft

result = generate(model, tokenizer, "def fibonacci(n):", draft=draft, num_draft_tokens=4, max_tokens=120)
print(result.text)
print(f"\ntau {result.stats.tau:.2f}, acceptance {result.stats.acceptance_rate:.0%}, "
      f"{result.generation_tps:.1f} tokens/s, finish: {result.finish_reason}")
