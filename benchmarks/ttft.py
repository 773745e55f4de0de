"""Time to first token of a plain prefill, SnapKV and LookaheadKV side by side, and what each scorer adds.

Three measurements at every prompt length, all on the same prompt (the bundled essays):

1. Time to first token (prefill + scoring + top-k + eviction + first token): medians of
   paired repetitions, the three run in rotating order in each repetition; the
   differences to the plain prefill are paired too (same repetition).
2. The added work alone, timed over many repetitions, because a cheap scorer's cost drowns
   in the CPU noise of a whole prefill. SnapKV: its window observer called on every
   layer's query and key captured once from a real prefill, then its scores, the top-k and
   the eviction gather. LookaheadKV (its tokens inside the prefill, the default): what the
   n lookahead tokens add to the prefill's last 256-token forward (their rows through the
   layers with LoRA on, their attention rows), against the same forward without them, then
   the top-k and the gather; and, beside it, the same tokens as a separate forward over the
   finished cache (how the evaluation runner scores). Each is reported as a share of the
   plain prefill, next to the floor n / L (the lookahead tokens' share of the tokens
   processed: 0.8% at 4K).
3. Peak memory of SnapKV and LookaheadKV: peak RSS of one fresh process per method and
   length, above a process that only holds the model, and their ratio.

LookaheadKV runs with the modules shipped for the model when there are some, else random
ones (same cost). Usage::

    python benchmarks/ttft.py                                   # SmolLM2 at 1K, 2K, 4K
    python benchmarks/ttft.py --model tiny --lengths 256,512 --reps 3 --iso-reps 5 --json /tmp/ttft.json
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict

from lookaheadkv.bench.common import MODELS, PLAIN, bench_model, environment, make_method, markdown_table, parse_ints, write_json
from lookaheadkv.bench.cost import measure, ms
from lookaheadkv.bench.memory import peaks_above_baseline

SCORERS = ("snapkv", "lookahead")


def pct(value: float | None) -> str | None:
    return None if value is None else f"{value:.2f}%"


def main(argv: list[str] | None = None) -> dict:
    """Measure, print the markdown table, write the JSON; returns the results."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--lengths", type=parse_ints, default=[1024, 2048, 4096], help="prompt tokens, comma-separated")
    parser.add_argument("--reps", type=int, default=5, help="paired repetitions per length")
    parser.add_argument("--iso-reps", type=int, default=20, help="timings of each scorer's work alone per length")
    parser.add_argument("--budget", type=int, default=128, help="KV entries kept per head and layer")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--jobs", type=int, default=1, help="memory processes run at once (peaks are per process)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = bench_model(args.model)
    env = environment(args.model, model)
    policies = {name: make_method(name, model, args.budget) for name in SCORERS}
    n_lookahead = policies["lookahead"].resolve(model).config.n_lookahead
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    rows = measure(model, tokenizer, args.lengths, policies, reps=args.reps, iso_reps=args.iso_reps, log=log)
    by = {(r.method, r.length): r for r in rows}

    memory = None
    if not args.no_memory:
        log(f"peak memory: {2 * len(args.lengths) + 1} fresh processes")
        _, memory = peaks_above_baseline(args.model, [(m, n) for n in args.lengths for m in SCORERS], args.budget, args.threads, args.jobs)

    def ttft(method: str, n: int) -> str:
        row = by[(method, n)]
        return ms(row.ttft_ms) if method == PLAIN else f"{ms(row.ttft_ms)} ({'+' if row.added_ms >= 0 else ''}{ms(row.added_ms)})"

    def alone(method: str, n: int) -> str:
        row = by[(method, n)]
        return f"{ms(row.isolated_ms)} ({pct(row.share_pct)})"

    def separate(n: int) -> str | None:
        row = by[("lookahead", n)]
        if row.separate_ms is None:
            return None
        return f"{ms(row.separate_ms)} ({pct(100 * row.separate_ms / by[(PLAIN, n)].prefill_ms)})"

    def peak(method: str, n: int) -> str | None:
        value = None if memory is None else memory[(method, n)]
        return None if value is None else f"{value:.1f}"

    def ratio(n: int) -> str | None:
        if memory is None or not memory[("snapkv", n)] or memory[("lookahead", n)] is None:
            return None
        return f"{memory[('lookahead', n)] / memory[('snapkv', n)]:.2f}"

    table = markdown_table(
        ["tokens", "plain TTFT ms", "SnapKV TTFT ms (paired diff)", "LookaheadKV TTFT ms (paired diff)",
         "SnapKV added alone ms (% of prefill)", "LookaheadKV added alone ms (% of prefill)",
         "LookaheadKV as a separate pass, alone ms (%)", "floor n/L",
         "SnapKV peak MiB", "LookaheadKV peak MiB", "LookaheadKV / SnapKV memory"],
        [[n, ttft(PLAIN, n), ttft("snapkv", n), ttft("lookahead", n), alone("snapkv", n), alone("lookahead", n),
          separate(n), pct(100 * n_lookahead / n), peak("snapkv", n), peak("lookahead", n), ratio(n)] for n in args.lengths],
    )
    report = "\n".join([
        f"# Time to first token on {args.model}: plain prefill, SnapKV, LookaheadKV (budget {args.budget})",
        "",
        f"`{env['command']}`",
        "",
        f"{env['date']} | torch {env['torch']} | {env['threads']} threads | {env['machine']} | medians of {args.reps} paired "
        f"repetitions (rotating order) and {args.iso_reps} isolated runs | n = {n_lookahead} lookahead tokens | "
        f"LookaheadKV modules: {env['lookahead_modules']}",
        "",
        table,
        "",
        "Peak MiB: peak RSS of a fresh process running the method once, above a process that only holds the model.",
    ])
    print(report)
    results = {
        "environment": env,
        "budget": args.budget,
        "reps": args.reps,
        "iso_reps": args.iso_reps,
        "n_lookahead": n_lookahead,
        "rows": [asdict(r) for r in rows],
        "peak_mib": None if memory is None else [{"method": m, "length": n, "mib": v} for (m, n), v in memory.items()],
    }
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
