"""Peak memory of SnapKV prefill + eviction next to a plain prefill: linear in the prompt, not quadratic.

SnapKV scores every layer with explicit (heads x window x L) attention rows, never an L x L
matrix, so what it adds to a plain prefill should grow linearly with the prompt length L.
Each number is the peak RSS of a fresh process that runs once (its own high-water mark),
above a process that only holds the model (see :mod:`lookaheadkv.bench.memory`). The per-1K-token
increments between consecutive lengths stay flat when growth is linear; quadratic growth
would double them at every doubling of L (an L x L fp32 matrix for SmolLM2's 9 heads is
576 MiB per layer at 4K tokens).

Usage::

    python benchmarks/scoring_memory.py                      # SmolLM2 at 1K, 2K, 4K tokens
    python benchmarks/scoring_memory.py --model tiny --lengths 256,512 --json /tmp/mem.json
"""

from __future__ import annotations

import argparse
import sys

from lookaheadkv.bench.common import MODELS, command_line, markdown_table, parse_ints, write_json
from lookaheadkv.bench.memory import peaks_above_baseline

METHODS = ("plain", "snapkv")


def per_1k(values: dict[int, float | None], lengths: list[int]) -> dict[int, float | None]:
    """MiB per 1K tokens between each length and the previous one (None at the first length)."""
    out: dict[int, float | None] = {lengths[0]: None}
    for prev, length in zip(lengths, lengths[1:]):
        a, b = values[prev], values[length]
        out[length] = None if a is None or b is None else (b - a) * 1024 / (length - prev)
    return out


def mib(value: float | None) -> str | None:
    return None if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> dict:
    """Measure, print the markdown table, write the JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="smollm2")
    parser.add_argument("--lengths", type=parse_ints, default=[1024, 2048, 4096], help="prompt tokens, comma-separated")
    parser.add_argument("--budget", type=int, default=128, help="KV entries kept per head and layer")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads in each process")
    parser.add_argument("--jobs", type=int, default=1, help="processes run at once (peaks are per process)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    lengths = sorted(args.lengths)

    runs = [(method, length) for length in lengths for method in METHODS]
    print(f"{len(runs) + 1} fresh processes ...", file=sys.stderr, flush=True)
    baseline, above = peaks_above_baseline(args.model, runs, args.budget, args.threads, args.jobs)
    plain = {length: above[("plain", length)] for length in lengths}
    snap = {length: above[("snapkv", length)] for length in lengths}
    plain_step, snap_step = per_1k(plain, lengths), per_1k(snap, lengths)
    extra = {n: None if plain[n] is None or snap[n] is None else snap[n] - plain[n] for n in lengths}

    table = markdown_table(
        ["tokens", "plain prefill MiB", "SnapKV prefill+eviction MiB", "SnapKV - plain MiB", "plain per 1K tokens", "SnapKV per 1K tokens"],
        [[n, mib(plain[n]), mib(snap[n]), mib(extra[n]), mib(plain_step[n]), mib(snap_step[n])] for n in lengths],
    )
    steps = [snap_step[n] for n in lengths[1:] if snap_step[n]]
    lines = [
        f"# Peak memory of SnapKV scoring on {args.model} (budget {args.budget})",
        "",
        f"`{command_line()}`",
        "",
        f"MiB above a process that only holds the model ({baseline:.0f} MiB); each number from its own fresh process.",
        "",
        table,
    ]
    if len(steps) >= 2:
        lines += ["", f"SnapKV's increment per 1K tokens, last over first: {steps[-1] / steps[0]:.2f} (1 = linear; quadratic growth doubles it at each doubling)."]
    print("\n".join(lines))

    results = {
        "command": command_line(),
        "model": args.model,
        "budget": args.budget,
        "threads": args.threads,
        "baseline_mib": baseline,
        "rows": [
            {"length": n, "plain_mib": plain[n], "snapkv_mib": snap[n], "snapkv_minus_plain_mib": extra[n],
             "plain_per_1k_mib": plain_step[n], "snapkv_per_1k_mib": snap_step[n]}
            for n in lengths
        ],
    }
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
