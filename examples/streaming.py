"""Stream text as each speculative round is verified; sampling at T > 0 stays lossless.

    python examples/streaming.py
"""

from specdec import load, stream_generate
from specdec.generate import demo_path

model, tokenizer = load()
draft, _ = load(demo_path("draft"))

for chunk in stream_generate(model, tokenizer, "class Stack:\n", draft=draft, num_draft_tokens=4,
                             max_tokens=150, temperature=0.7, top_p=0.95, seed=0, stop=["\nclass "]):
    print(chunk.text, end="", flush=True)
print(f"\n[{chunk.finish_reason}] tau {chunk.stats.tau:.2f}")
