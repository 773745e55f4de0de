"""Where LookaheadKV's in-prefill cost goes: operator time of the prefill's last forward with its tokens and without.

The cost benchmark times what the lookahead tokens add to a prefill as a difference of two
wall-clock forwards, which a noisy CPU blurs. This script looks inside instead: the torch
profiler records the last 256-token forward of a prompt (``bench.common.LastChunk``) with
the tokens plus scoring, top-k and gather, and the same forward without them, ``--reps``
times each (alternating), and prints the operators whose summed self time differs most,
per run on average, and the time inside the named range around the tokens' attention rows
(``lookaheadkv::tail_rows``, recorded by the engine). The difference of the totals is the
tokens' operator time; Python overhead between operators is not in it. Usage::

    python benchmarks/profile_tail.py --length 4096 --reps 5 --threads 2
    python benchmarks/profile_tail.py --model tiny --length 256 --reps 2 --json /tmp/profile.json
"""

from __future__ import annotations

import argparse
from collections import Counter

from lookaheadkv.bench.common import MODELS, LastChunk, bench_model, environment, make_method, markdown_table, prompt_ids, run_tail, write_json
from lookaheadkv.engine.attention import TAIL_ROWS


def profile_once(fn) -> tuple[Counter, Counter, float]:
    """Self CPU time (ms) and call count per operator of one call of ``fn``, and the ms inside the tail-rows range."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    times, calls, rows = Counter(), Counter(), 0.0
    for event in prof.key_averages():
        if event.key == TAIL_ROWS:  # a named range, not an operator: its operators are counted on their own
            rows += event.cpu_time_total / 1000
            continue
        times[event.key] += event.self_cpu_time_total / 1000
        calls[event.key] += event.count
    return times, calls, rows


def main(argv: list[str] | None = None) -> dict:
    """Profile, print the table, write the JSON; returns the results."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--length", type=int, default=4096, help="prompt tokens")
    parser.add_argument("--reps", type=int, default=5, help="profiled runs with the tokens and without, each")
    parser.add_argument("--budget", type=int, default=128, help="KV entries kept per head and layer")
    parser.add_argument("--top", type=int, default=12, help="operators listed")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.reps < 1 or args.length < 2:
        parser.error("--reps must be >= 1 and --length >= 2")

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = bench_model(args.model)
    env = environment(args.model, model)
    policy = make_method("lookahead", model, args.budget)
    last = LastChunk(model, prompt_ids(model, tokenizer, args.length))

    def with_tokens():
        run_tail(model, last, policy)

    def without():
        last.run(model)

    for _ in range(2):  # untimed: allocations, lazy loading
        with_tokens(), without()
    totals = {"with": (Counter(), Counter()), "without": (Counter(), Counter())}
    rows_ms = 0.0
    for rep in range(args.reps):
        for name, fn in (("with", with_tokens), ("without", without)) if rep % 2 == 0 else (("without", without), ("with", with_tokens)):
            times, counts, range_ms = profile_once(fn)
            totals[name][0].update(times)
            totals[name][1].update(counts)
            rows_ms += range_ms / args.reps
    per_run = {name: {op: t / args.reps for op, t in times.items()} for name, (times, _) in totals.items()}
    calls = {name: {op: c / args.reps for op, c in counts.items()} for name, (_, counts) in totals.items()}
    ops = set(per_run["with"]) | set(per_run["without"])
    diff = sorted(((per_run["with"].get(op, 0.0) - per_run["without"].get(op, 0.0), op) for op in ops), reverse=True)
    total_with, total_without = sum(per_run["with"].values()), sum(per_run["without"].values())
    rows = [[op, f"{d:.1f}", f"{calls['with'].get(op, 0):.0f}", f"{calls['without'].get(op, 0):.0f}"] for d, op in diff[: args.top]]
    report = "\n".join([
        f"# LookaheadKV's tokens in a prefill's last forward: operator time on {args.model}, {args.length} tokens",
        "",
        f"`{env['command']}`",
        "",
        f"{env['date']} | torch {env['torch']} | {env['threads']} threads | {env['machine']} | mean of {args.reps} profiled runs each",
        "",
        f"Operator self time per run: {total_with:.0f} ms with the tokens (+ scoring, top-k, gather), {total_without:.0f} ms "
        f"without: **+{total_with - total_without:.0f} ms** (a difference of two profiled forwards). The tokens' attention "
        f"rows alone, timed inside their named range (`{TAIL_ROWS}`: QK^T, mask, softmax, the scorer's sum over the rows "
        f"and AV, in every layer; profiler overhead included): {rows_ms:.0f} ms per run.",
        "",
        markdown_table(["operator", "+ms per run", "calls with", "calls without"], rows),
    ])
    print(report)
    results = {
        "environment": env,
        "length": args.length,
        "reps": args.reps,
        "total_ms": {"with": total_with, "without": total_without, "added": total_with - total_without},
        "tail_rows_ms": rows_ms,
        "added_ms_by_operator": {op: d for d, op in diff},
    }
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
