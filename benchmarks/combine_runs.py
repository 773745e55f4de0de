"""Combine several runs of the cost benchmark at one prompt length: every run's ratio, and one ratio for all.

One run of ``lookaheadkv bench`` gives LAQ's and LookaheadKV's added time at a length as
medians of their isolated runs, with a 95% bootstrap interval on the ratio. On a noisy CPU
runs on different hours disagree by more than their intervals say, because the machine's
state moves between them. This script reads the ``results.json`` of several runs, prints
each run's ratio again, and combines them: the geometric mean of the runs' ratios (each
compares the methods under one machine state; the runs weigh equally), with a 95% interval
that resamples every run's timings within that run. Runs recorded on different machines
(``environment.machine``: CPU model and SIMD level) are refused: each host's runs are
combined on their own, since other hardware measures something else. It times nothing. Usage::

    python benchmarks/combine_runs.py docs/results/cost-4k-run{1,2,3,4,5}.json --length 4096
    python benchmarks/combine_runs.py runs/bench-cost-4k-long4 runs/bench-cost-4k-long5 --length 4096 --json /tmp/combined.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lookaheadkv.bench.common import markdown_table, median, write_json
from lookaheadkv.bench.cost import combined_ratio, format_ratio


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_run(path: Path, length: int, num: str, den: str) -> dict:
    """One run's isolated timings (ms) of ``num`` and ``den`` at ``length``; exits 2 with a one-line error if unusable."""
    file = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(file.read_text())
        rows = {(r["method"], r["length"]): r for r in results["rows"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        fail(f"cannot read {file} ({type(err).__name__}): give a results.json written by 'lookaheadkv bench'")
    runs = {}
    for method in (num, den):
        row = rows.get((method, length))
        if row is None or not row.get("isolated_runs_ms"):
            have = sorted({l for m, l in rows if m == method})
            fail(f"{file} has no isolated runs of {method} at {length} tokens (it has {have or 'none'}): "
                 "pick --length from those, or a run with both methods")
        runs[method] = row["isolated_runs_ms"]
    env = results.get("environment", {})
    return {"path": str(file), "date": env.get("date"), "machine": env.get("machine"), "command": env.get("command"),
            "num": runs[num], "den": runs[den]}


def main(argv: list[str] | None = None) -> dict:
    """Read the runs, print the table, write the JSON; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="results.json files, or the --out folders holding them")
    parser.add_argument("--length", type=int, required=True, help="prompt tokens")
    parser.add_argument("--num", default="laq", help="the method on top of the ratio")
    parser.add_argument("--den", default="lookahead", help="the method below")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    runs = [load_run(path, args.length, args.num, args.den) for path in args.runs]
    machines = sorted({str(run["machine"]) for run in runs})
    if len(machines) > 1:
        fail(f"the runs were recorded on different machines ({'; '.join(machines)}): combine each machine's runs separately")
    table = []
    for run in runs:
        run["ratio"], run["interval"] = combined_ratio([(run["num"], run["den"])])  # one run: its ratio of medians
        table.append([run["path"], run["date"], f"{median(run['num']):.0f}", f"{median(run['den']):.0f}",
                      f"{len(run['num'])} / {len(run['den'])}", format_ratio(run["ratio"], run["interval"])])
    ratio, interval = combined_ratio([(run["num"], run["den"]) for run in runs])
    counts = f"{sum(len(run['num']) for run in runs)} / {sum(len(run['den']) for run in runs)}"
    table.append([f"**{len(runs)} runs combined** (geometric mean)", None, None, None, counts, f"**{format_ratio(ratio, interval)}**"])
    print(markdown_table(["run", "date", f"{args.num} ms", f"{args.den} ms", "timings", f"{args.num} / {args.den} [95% interval]"], table))
    results = {
        "length": args.length,
        "num": args.num,
        "den": args.den,
        "machine": runs[0]["machine"],
        "runs": [{k: run[k] for k in ("path", "date", "command", "ratio", "interval")} for run in runs],
        "combined": {"ratio": ratio, "interval": interval, "how": "geometric mean of the runs' ratios of medians"},
    }
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    main()
