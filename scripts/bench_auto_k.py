"""Decode speed of plain decoding, fixed K and auto K, in one process, on the same prompts (greedy).

    python scripts/bench_auto_k.py --quantize 4                   # demo target, 4-bit on load, demo draft
    python scripts/bench_auto_k.py                                # demo target as shipped (bfloat16)
    python scripts/bench_auto_k.py --draft ngram --suite repetitive_edit

Each setting decodes every prompt; its tokens/s is all tokens over all decode time (draft + verify +
commit, no prefill). "auto" starts a fresh AdaptiveK for every prompt (what `-K auto` does), so each
prompt pays the policy's warm-up and learning; "auto-kept" keeps one policy across all prompts and repeats,
as a long-running server would. Settings take turns within a repeat (in a rotated order), so slow spells of a noisy
machine fall on all of them; the table shows the median over repeats. Every speculative output is checked
against plain decoding's (greedy speculation is lossless).
"""

import argparse
import statistics

from specdec.adaptive import AdaptiveK
from specdec.evaluate import bundled_suites, decode_time, read_prompts
from specdec.generate import demo_path, generate, load
from specdec.loading import load_model


def parse_k(value: str):
    return value if value in ("auto", "auto-kept") else int(value)


def run_setting(model, tokenizer, prompts, draft, k, max_tokens, kept_policy=None):
    """-> (tokens, seconds, drafted, accepted, rounds, outputs) summed over the prompts."""
    k = kept_policy if k == "auto-kept" else k
    tokens = seconds = drafted = accepted = rounds = 0
    outputs = []
    for prompt in prompts:
        result = generate(model, tokenizer, prompt, draft=draft if k != 0 else None, num_draft_tokens=k,
                          max_tokens=max_tokens)  # greedy
        s = result.stats
        tokens += result.generation_tokens
        seconds += decode_time(s)
        drafted, accepted, rounds = drafted + s.drafted, accepted + s.accepted, rounds + s.rounds
        outputs.append(result.tokens)
    return tokens, seconds, drafted, accepted, rounds, outputs


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="target (default: the bundled demo target)")
    p.add_argument("--draft", help="draft folder, 'ngram' or 'mtp' (default: the bundled demo draft)")
    p.add_argument("--quantize", type=int, metavar="BITS", help="quantize the target to BITS on load")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="target compute dtype")
    p.add_argument("--suite", action="append", help="bundled suite(s) (default: code_completion)")
    p.add_argument("--limit", type=int, default=3, help="prompts per suite (default 3)")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--ks", default="0,1,2,4,8,auto,auto-kept", help="settings to compare; 0 is plain decoding")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    ks = [parse_k(k) for k in args.ks.split(",")]
    if 0 not in ks:
        ks.insert(0, 0)
    suites = bundled_suites()
    prompts = [row["prompt"] for s in args.suite or ["code_completion"] for row in read_prompts(suites[s])[: args.limit]]
    model, tokenizer = load(args.model, dtype=args.dtype, quantize=args.quantize)
    draft_name = args.draft or str(demo_path("draft"))
    draft = draft_name if draft_name in ("ngram", "mtp") else load_model(draft_name)[0]

    policy = AdaptiveK()
    for k in ks:  # warm-up: first shapes compile
        run_setting(model, tokenizer, prompts[:1], draft, k, 16, policy)
    rates = {k: [] for k in ks}
    last = {}
    for r in range(args.repeats):
        for k in ks[r % len(ks):] + ks[: r % len(ks)]:
            tokens, seconds, drafted, accepted, rounds, outputs = run_setting(
                model, tokenizer, prompts, draft, k, args.max_tokens, policy)
            rates[k].append(tokens / seconds)
            last[k] = (tokens, drafted, accepted, rounds, outputs)
    plain_outputs = last[0][4]
    lossless = all(last[k][4] == plain_outputs for k in ks)

    plain = statistics.median(rates[0])
    print(f"target: {args.model or 'demo target'}"
          + (f" ({args.quantize}-bit on load)" if args.quantize else f" ({args.dtype or 'as stored'})")
          + f", draft: {args.draft or 'demo draft'}, {len(prompts)} prompts x {args.max_tokens} tokens, "
          + f"median of {args.repeats}")
    print(f"{'K':>6} {'tok/s':>8} {'vs plain':>9} {'tau':>6} {'accept':>7} {'drafts/round':>13}  runs (tok/s)")
    for k in ks:
        tokens, drafted, accepted, rounds, _ = last[k]
        rate = statistics.median(rates[k])
        runs = " ".join(f"{x:.1f}" for x in rates[k])
        accept = f"{accepted / drafted:.2f}" if drafted else "-"
        print(f"{str(k):>6} {rate:8.1f} {rate / plain:8.2f}x {tokens / rounds:6.2f} {accept:>7} "
              f"{drafted / rounds:13.2f}  {runs}")
    fixed = [k for k in ks if isinstance(k, int)]
    best = max(fixed, key=lambda k: statistics.median(rates[k]))
    for name in ("auto", "auto-kept"):
        if name in ks:
            auto = statistics.median(rates[name])
            print(f"{name}: {auto / plain:.2f}x plain, {auto / statistics.median(rates[best]):.2f}x the best "
                  f"fixed K ({best})")
    print(f"speculative outputs identical to plain decoding: {'yes' if lossless else 'NO'}")


if __name__ == "__main__":
    main()
