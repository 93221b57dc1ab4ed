"""How well does a draft fit a target, and how much faster does decoding get? Runs the bundled prompt
suites (or your own JSONL) and prints tau, acceptance and speedup per category.
The command line does the same: `specdec eval --output report.json --plots plots/`.

    python examples/acceptance_eval.py
"""

from specdec import load
from specdec.evaluate import bundled_suites, evaluate, format_table, read_prompts
from specdec.generate import demo_path

model, tokenizer = load()
draft, _ = load(demo_path("draft"))
prompts = [row for path in bundled_suites().values() for row in read_prompts(path)[:3]]
report = evaluate(model, tokenizer, prompts, draft, num_draft_tokens=4, max_tokens=64)
print(format_table(report))
