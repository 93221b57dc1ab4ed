"""Acceptance-rate evaluation: how well a draft fits a target, and how much faster decoding gets.

For every prompt of a suite, the same target decodes the same prompt twice in one process — once
speculatively, once plainly (K = 0) — so the speedup compares like with like. Results are summed per
category and overall: tau, acceptance rate, acceptance by position, tokens/s of both, and the speedup.
"""

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .engine import Stats
from .errors import SpecdecError
from .generate import generate


def bundled_suites() -> dict:
    folder = resources.files("specdec") / "suites"
    return {p.name[: -len(".jsonl")]: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".jsonl")}


def read_prompts(path) -> list:
    """JSONL: one object per line with "prompt" (text) and optionally "category"."""
    rows = []
    for i, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise SpecdecError(f"{path}:{i}: not valid JSON: {e}") from e
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise SpecdecError(f"{path}:{i}: each line needs a non-empty \"prompt\" string")
        rows.append({"category": str(row.get("category", Path(path).stem)), "prompt": row["prompt"]})
    if not rows:
        raise SpecdecError(f"{path}: no prompts")
    return rows


def decode_time(stats: Stats) -> float:
    return stats.draft_time + stats.verify_time + stats.commit_time


@dataclass
class Tally:
    """Sums over prompts; ratios are taken at the end so long outputs weigh more, as in a real workload."""

    stats: Stats = field(default_factory=Stats)
    prompts: int = 0
    spec_tokens: int = 0
    spec_time: float = 0.0
    plain_tokens: int = 0
    plain_time: float = 0.0

    def add(self, spec, plain):
        s, t = self.stats, spec.stats
        s.rounds += t.rounds
        s.drafted += t.drafted
        s.accepted += t.accepted
        s.emitted += t.emitted
        for i, (d, a) in enumerate(zip(t.drafted_at, t.accepted_at)):
            if i == len(s.drafted_at):
                s.drafted_at.append(0)
                s.accepted_at.append(0)
            s.drafted_at[i] += d
            s.accepted_at[i] += a
        self.prompts += 1
        self.spec_tokens += spec.generation_tokens
        self.spec_time += decode_time(spec.stats)
        self.plain_tokens += plain.generation_tokens
        self.plain_time += decode_time(plain.stats)

    def report(self) -> dict:
        spec_tps = self.spec_tokens / self.spec_time if self.spec_time else 0.0
        plain_tps = self.plain_tokens / self.plain_time if self.plain_time else 0.0
        return {
            "prompts": self.prompts, "tau": self.stats.tau, "acceptance_rate": self.stats.acceptance_rate,
            "acceptance_by_position": self.stats.acceptance_by_position, "rounds": self.stats.rounds,
            "drafted": self.stats.drafted, "accepted": self.stats.accepted,
            "spec_tokens_per_s": spec_tps, "plain_tokens_per_s": plain_tps,
            "speedup": spec_tps / plain_tps if plain_tps else 0.0,
        }


def evaluate(model, tokenizer, prompts: list, draft, num_draft_tokens=4, max_tokens=128, progress=True,
             **sampling) -> dict:
    """-> {"categories": {name: report}, "overall": report}."""
    from tqdm import tqdm

    # Warm up both paths once so one-time costs (allocation, first-call compilation) count for neither.
    first = prompts[0]["prompt"]
    generate(model, tokenizer, first, draft=draft, num_draft_tokens=num_draft_tokens, max_tokens=8, **sampling)
    generate(model, tokenizer, first, draft=None, max_tokens=8, **sampling)

    tallies, overall = {}, Tally()
    for row in tqdm(prompts, desc="eval", unit="prompt", disable=not progress):
        spec = generate(model, tokenizer, row["prompt"], draft=draft, num_draft_tokens=num_draft_tokens,
                        max_tokens=max_tokens, **sampling)
        plain = generate(model, tokenizer, row["prompt"], draft=None, max_tokens=max_tokens, **sampling)
        tallies.setdefault(row["category"], Tally()).add(spec, plain)
        overall.add(spec, plain)
    return {"categories": {c: t.report() for c, t in tallies.items()}, "overall": overall.report()}


def format_table(report: dict) -> str:
    head = f"{'category':<20}{'n':>4}{'tau':>7}{'accept':>8}{'spec tok/s':>12}{'plain tok/s':>13}{'speedup':>9}  by position"
    lines = [head, "-" * len(head)]
    rows = list(report["categories"].items()) + [("overall", report["overall"])]
    for name, r in rows:
        by_pos = " ".join(f"{a:.2f}" for a in r["acceptance_by_position"])
        lines.append(
            f"{name:<20}{r['prompts']:>4}{r['tau']:>7.2f}{r['acceptance_rate']:>8.1%}"
            f"{r['spec_tokens_per_s']:>12.1f}{r['plain_tokens_per_s']:>13.1f}{r['speedup']:>8.2f}x  {by_pos}"
        )
    return "\n".join(lines)


def plot(report: dict, folder) -> list:
    """PNG plots (acceptance by position, speedup by category); needs the `plot` extra (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in list(report["categories"].items()) + [("overall", report["overall"])]:
        by_pos = r["acceptance_by_position"]
        ax.plot(range(1, len(by_pos) + 1), by_pos, marker="o", label=name, linewidth=3 if name == "overall" else 1)
    longest = max(len(r["acceptance_by_position"]) for r in report["categories"].values())
    ax.set_xticks(range(1, longest + 1))
    ax.set(xlabel="draft position", ylabel="acceptance", ylim=(0, 1.05), title="Acceptance by draft position")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "acceptance_by_position.png", dpi=120)
    written.append(folder / "acceptance_by_position.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    names = list(report["categories"]) + ["overall"]
    values = [report["categories"][n]["speedup"] for n in names[:-1]] + [report["overall"]["speedup"]]
    ax.bar(names, values, color=["#4c72b0"] * (len(names) - 1) + ["#dd8452"])
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set(ylabel="speedup vs plain decoding", title="Speedup by category")
    ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(folder / "speedup_by_category.png", dpi=120)
    written.append(folder / "speedup_by_category.png")
    plt.close(fig)
    return written
