"""`specdec` command line: thin wrappers over the API. Errors print as one line, no traceback."""

import argparse
import json
import sys

from .cache import COMMIT_METHODS, DEFAULT_COMMIT_METHOD
from .errors import SpecdecError

EXAMPLES = """examples:
  specdec generate "def fib(n):"                        # bundled demo target + draft, offline
  specdec generate --model Qwen/Qwen3.5-35B-A3B --draft Qwen/Qwen3.5-0.8B -K 4 --prompt "Hello"
  specdec generate --model ./my-model --temp 0.7 --top-p 0.9 --seed 1 "Once upon a time"
"""


def draft_tokens(value: str):
    """-K: a number of draft tokens, or 'auto' (chosen each round from measured costs)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {value!r}") from None


def add_sampling(p):
    p.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def add_quantize(p):
    p.add_argument("--quantize", type=int, metavar="BITS",
                   help="quantize the (float) target to BITS on load: group 64, router gates 8-bit (the draft "
                   "stays as it is)")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="specdec", description="Lossless speculative decoding for Qwen3.5 / Qwen3-Next hybrid MoE models on MLX.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text (speculative when a draft is given)",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("prompt_text", nargs="?", metavar="PROMPT", help="the prompt (or use --prompt)")
    g.add_argument("--prompt", "-p", help="the prompt")
    g.add_argument("--model", "-m", help="target: local folder or Hugging Face repo id (default: bundled demo)")
    g.add_argument("--draft", "-d", help="draft model folder or repo id; 'ngram' for prompt lookup; 'mtp' for the "
                   "target's own MTP head; 'none' for plain "
                   "decoding (default: the bundled demo draft when --model is not given)")
    g.add_argument("-K", "--num-draft-tokens", type=draft_tokens, default=4,
                   help="draft tokens per round, or 'auto' to pick K each round from measured costs (default 4)")
    add_sampling(g)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: checkpoint's)")
    add_quantize(g)
    g.add_argument("--commit-method", choices=COMMIT_METHODS, default=DEFAULT_COMMIT_METHOD,
                   help="how GDN state is rolled back after a rejected draft: pick the state of the accepted "
                        f"position (states) or replay from the window start (replay, less memory); default "
                        f"{DEFAULT_COMMIT_METHOD}")
    g.add_argument("--json", action="store_true", help="print the result and stats as JSON")
    e = sub.add_parser("eval", help="acceptance-rate evaluation: tau, acceptance and speedup per prompt category",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  specdec eval                                          # bundled demo pair, bundled suites
  specdec eval --model T --draft D -K 4 --output report.json --plots plots/
  specdec eval --model T --draft ngram --prompts my_prompts.jsonl   # JSONL lines: {"category": ..., "prompt": ...}
""")
    e.add_argument("--model", "-m", help="target (default: bundled demo target)")
    e.add_argument("--draft", "-d", help="draft folder / repo id (default: the bundled demo draft without --model)")
    e.add_argument("-K", "--num-draft-tokens", type=draft_tokens, default=4,
                   help="draft tokens per round, or 'auto' (default 4)")
    e.add_argument("--suite", action="append", help="bundled suite(s) to run (default: all); see --list-suites")
    e.add_argument("--prompts", action="append", default=[], help="a JSONL file of your own prompts (repeatable)")
    e.add_argument("--list-suites", action="store_true", help="list the bundled suites and exit")
    e.add_argument("--limit", type=int, help="at most this many prompts per suite")
    add_sampling(e)
    e.set_defaults(max_tokens=96)
    e.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="compute dtype (default: checkpoint's)")
    add_quantize(e)
    e.add_argument("--output", "-o", help="write the JSON report here")
    e.add_argument("--plots", help="folder for PNG plots (needs the `plot` extra)")
    add_bench(sub)
    return parser


def add_bench(sub):
    b = sub.add_parser("bench", help="time the target and speculative decoding on random weights (no checkpoint)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog="""examples:
  specdec bench --arch qwen3.5-35b-a3b --layers 8 --bits 4 --context 1024 --output bench.json
  specdec bench --arch tiny --quick                     # a smoke run, seconds on a CPU
""")
    b.add_argument("--arch", default="qwen3.5-35b-a3b", help="qwen3.5-35b-a3b | qwen3-next-80b-a3b | tiny")
    b.add_argument("--layers", type=int, default=8, help="decoder layers, 3 GDN : 1 attention (default 8)")
    b.add_argument("--bits", type=int, default=4, help="3 | 4 | 8 (group 64, router 8-bit) | 16 (bfloat16)")
    b.add_argument("--context", type=int, default=1024, help="tokens in the cache while timing steps (default 1024)")
    b.add_argument("--prefill", type=int, nargs="+", default=[1024, 4096], help="prompt lengths to time")
    b.add_argument("--step-sizes", type=int, nargs="+", default=list(range(1, 17)), help="S to time (default 1..16)")
    b.add_argument("--alphas", type=float, nargs="+", default=[0.6, 0.8, 0.9],
                   help="acceptance probabilities of the oracle draft (default 0.6 0.8 0.9)")
    b.add_argument("--draft-lengths", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="fixed K of the oracle runs, the largest also bounds auto K (default 1 2 4 8)")
    b.add_argument("--repeats", type=int, default=20, help="median of this many (default 20)")
    b.add_argument("--gen-tokens", type=int, default=128, help="tokens per end-to-end run (default 128)")
    b.add_argument("--draft-cost-ms", type=float, help="draft time per drafted token (default: 1/10 of a target step)")
    b.add_argument("--commit-method", choices=COMMIT_METHODS, default=DEFAULT_COMMIT_METHOD,
                   help=f"GDN commit method of the end-to-end runs (both are timed alone); default {DEFAULT_COMMIT_METHOD}")
    b.add_argument("--no-mlx-lm", action="store_true", help="skip the side-by-side mlx-lm run")
    b.add_argument("--mlx-lm-max-prefill", type=int, default=1024,
                   help="time mlx-lm's prefill only up to this length: it is slow off Apple GPUs (default 1024)")
    b.add_argument("--bandwidth-gbs", type=float, help="nominal memory bandwidth (default: known GPUs by name)")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--quick", action="store_true", help="fewer sizes and repeats")
    b.add_argument("--output", "-o", help="write the JSON report here (updated after each section)")


def resolve_draft(arg, model_given, dtype):
    """--draft value -> what generate() takes: a loaded model, a named proposer, or None."""
    from .generate import demo_path
    from .loading import load_model

    name = arg if arg is not None else (None if model_given else str(demo_path("draft")))
    if not name or name.lower() == "none":
        return None
    if name in ("mtp", "ngram"):
        return name
    return load_model(name, dtype=dtype)[0]


def cmd_eval(args):
    from .evaluate import bundled_suites, evaluate, format_table, plot, read_prompts
    from .generate import load

    suites = bundled_suites()
    if args.list_suites:
        print("\n".join(sorted(suites)))
        return
    unknown = [s for s in args.suite or [] if s not in suites]
    if unknown:
        raise SpecdecError(f"unknown suite {unknown[0]!r}; bundled suites: {', '.join(sorted(suites))}")
    files = [suites[s] for s in (args.suite or ([] if args.prompts else sorted(suites)))] + args.prompts
    prompts = []
    for f in files:
        rows = read_prompts(f)
        prompts += rows[: args.limit] if args.limit else rows
    model, tokenizer = load(args.model, dtype=args.dtype, quantize=args.quantize)
    draft = resolve_draft(args.draft, args.model is not None, args.dtype)
    report = evaluate(model, tokenizer, prompts, draft, num_draft_tokens=args.num_draft_tokens,
                      max_tokens=args.max_tokens, temperature=args.temp, top_k=args.top_k, top_p=args.top_p,
                      min_p=args.min_p, seed=args.seed)
    report["settings"] = {"model": args.model or "bundled demo target", "draft": args.draft or "bundled demo draft",
                          "quantize": args.quantize, "num_draft_tokens": args.num_draft_tokens,
                          "max_tokens": args.max_tokens, "temperature": args.temp}
    print(format_table(report))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"report: {args.output}")
    if args.plots:
        written = plot(report, args.plots)
        print("plots: " + (", ".join(map(str, written)) if written else "skipped (pip install 'specdec[plot]')"))


def cmd_generate(args):
    from .generate import load, stream_generate

    prompt = args.prompt if args.prompt is not None else args.prompt_text
    if prompt is None:
        raise SpecdecError("no prompt: pass it as an argument or with --prompt")
    model, tokenizer = load(args.model, dtype=args.dtype, quantize=args.quantize)
    draft = resolve_draft(args.draft, args.model is not None, args.dtype)
    text, tokens, finish = [], 0, None
    stream = not args.json
    for chunk in stream_generate(
        model, tokenizer, prompt, draft=draft, num_draft_tokens=args.num_draft_tokens, max_tokens=args.max_tokens,
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        stop=args.stop, chat=args.chat, commit_method=args.commit_method,
    ):
        if stream:
            print(chunk.text, end="", flush=True)
        text.append(chunk.text)
        tokens += len(chunk.tokens)
        finish, stats = chunk.finish_reason, chunk.stats
    decode_time = stats.draft_time + stats.verify_time + stats.commit_time
    summary = {
        "finish_reason": finish, "generation_tokens": tokens,
        "generation_tps": tokens / decode_time if decode_time else 0.0, **stats.as_dict(),
    }
    if args.json:
        print(json.dumps({"text": "".join(text), **summary}, indent=2))
        return
    print()
    print("-" * 60, file=sys.stderr)
    print(f"{tokens} tokens, {summary['generation_tps']:.1f} tok/s, finish: {finish}", file=sys.stderr)
    if draft is not None:
        by_pos = " ".join(f"{a:.2f}" for a in stats.acceptance_by_position)
        print(f"rounds {stats.rounds}  tau {stats.tau:.2f}  acceptance {stats.acceptance_rate:.2%} "
              f"({stats.accepted}/{stats.drafted})  by position: {by_pos}", file=sys.stderr)
        print(f"time: prefill {stats.prefill_time:.2f}s  draft {stats.draft_time:.2f}s  "
              f"verify {stats.verify_time:.2f}s  commit {stats.commit_time:.2f}s", file=sys.stderr)


def cmd_bench(args):
    from .bench import BenchOptions, format_table, run_bench, write_report

    opts = BenchOptions(
        arch=args.arch, layers=args.layers, bits=args.bits, context=args.context, prefill=tuple(args.prefill),
        step_sizes=tuple(args.step_sizes), alphas=tuple(args.alphas), draft_lengths=tuple(args.draft_lengths),
        repeats=args.repeats, gen_tokens=args.gen_tokens, draft_cost_ms=args.draft_cost_ms,
        commit_method=args.commit_method, mlx_lm=not args.no_mlx_lm, mlx_lm_max_prefill=args.mlx_lm_max_prefill,
        bandwidth_gbs=args.bandwidth_gbs, seed=args.seed,
    )
    opts = opts.quick() if args.quick else opts
    save = (lambda report: write_report(report, args.output)) if args.output else None
    report = run_bench(opts, log=lambda *a: print(*a, file=sys.stderr, flush=True), on_section=save)
    print(format_table(report))
    if args.output:
        print(f"report: {args.output}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        {"generate": cmd_generate, "eval": cmd_eval, "bench": cmd_bench}[args.command](args)
    except SpecdecError as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
