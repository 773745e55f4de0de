"""Eviction cost of every method: time to first token, what it adds to a plain prefill, peak memory.

For each prompt length, every method (and a plain prefill) runs to its first token on the
same prompt, several repetitions in rotating order; a method's *added* time is the median
over repetitions of its time to first token minus the plain prefill's of the same
repetition. Its *isolated* added time is its own work timed alone (see
:func:`~lookaheadkv.bench.common.added_work`, and :func:`~lookaheadkv.bench.common.tail_work`
for LookaheadKV, whose tokens ride in the prefill): on a CPU this is the number to read for
the cheap scorers, whose cost drowns in the noise of a whole prefill. Peak memory comes from
one fresh process per method and length (:mod:`lookaheadkv.bench.memory`).

Run it as ``lookaheadkv bench [options]`` (e.g. ``lookaheadkv bench --out runs/bench-cost``;
``--model tiny --lengths 256,512 --reps 1 --no-memory`` for a quick look); it writes ``results.json``, ``table.md`` and ``cost.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .common import (
    METHODS,
    MODELS,
    PLAIN,
    Clock,
    LastChunk,
    added_work,
    bench_model,
    budget_arg,
    capture_prefill,
    environment,
    make_method,
    markdown_table,
    median,
    paired_runs,
    parse_ints,
    prompt_ids,
    tail_work,
)

DEFAULT_METHODS = tuple(m for m in METHODS if m not in (PLAIN, "oracle"))
#: Default repetitions of a tail method's isolated time (each a difference of two ~1.5 s forwards at 4K on a CPU);
#: a tail method always gets at least ``iso_reps``.
TAIL_REPS = 15
#: The paper's headline (Llama-3.1-8B on a GPU, 32K tokens, budget 128): LAQ adds 554 ms, LookaheadKV 38 ms.
PAPER_RATIO = "LAQ 554 ms / LookaheadKV 38 ms = 14.5x (Llama-3.1-8B, GPU, 32K tokens, budget 128)"
SPECKV_DRAFT = "self-draft: the target model decodes the draft (the bundled SmolLM2 has no smaller sibling)"


@dataclass
class CostRow:
    """One method at one prompt length; times are medians in milliseconds."""

    method: str
    length: int
    ttft_ms: float  # time to first token
    prefill_ms: float  # its prefill, observer included
    added_ms: float  # time to first token minus the plain prefill's, paired by repetition
    isolated_ms: float | None  # the method's own work timed alone (None for plain)
    share_pct: float | None  # isolated_ms as a share of the plain prefill
    peak_mib: float | None = None  # peak RSS above the baseline process (None: not measured)
    separate_ms: float | None = None  # LookaheadKV only: the lookahead tokens as a separate forward over the cache, alone
    isolated_runs_ms: list[float] | None = None  # every isolated run (isolated_ms is their median), for the ratios' intervals


def measure(
    model,
    tokenizer,
    lengths: list[int],
    methods: dict,
    *,
    reps: int = 3,
    iso_reps: int = 5,
    tail_reps: int = TAIL_REPS,
    log: Callable[[str], None] | None = None,
) -> list[CostRow]:
    """Time every method (plus the plain prefill) at every length; one row per (length, method).

    ``methods`` maps names to policies (see :func:`~lookaheadkv.bench.common.make_method`).
    A tail method's own work is timed ``max(iso_reps, tail_reps)`` times. Before timing, every
    method runs once at the shortest length (lazy initialisation and first-call allocations are
    not timed).
    """
    log = log or (lambda text: None)
    clock = Clock(model.device)
    policies = {PLAIN: None} | methods
    paired_runs(model, prompt_ids(model, tokenizer, min(lengths)), policies, 1, clock)
    rows = []
    for length in lengths:
        input_ids = prompt_ids(model, tokenizer, length)
        log(f"{length} tokens: {reps} paired repetitions of {len(policies)} runs")
        runs = paired_runs(model, input_ids, policies, reps, clock)
        state, capture = capture_prefill(model, input_ids)
        tails = {name for name, p in policies.items() if p is not None and p.tail(model) is not None}
        last = LastChunk(model, input_ids) if tails else None
        for name in tails:  # untimed: allocate each variant's cache once
            last.run(model)
            last.run(model, policies[name].tail(model))
        plain = runs[PLAIN]
        plain_prefill = median([t.prefill for t in plain])
        isolated = isolated_runs(model, state, capture, last, policies, tails, iso_reps, clock, log, length, tail_reps)
        for name, policy in policies.items():
            alone, separate = isolated.get(name, ([], []))
            rows.append(
                CostRow(
                    method=name,
                    length=length,
                    ttft_ms=1000 * median([t.total for t in runs[name]]),
                    prefill_ms=1000 * median([t.prefill for t in runs[name]]),
                    added_ms=1000 * median([t.total - p.total for t, p in zip(runs[name], plain)]),
                    isolated_ms=1000 * median(alone) if alone else None,
                    share_pct=100 * median(alone) / plain_prefill if alone else None,
                    separate_ms=1000 * median(separate) if separate else None,
                    isolated_runs_ms=[1000 * t for t in alone] or None,
                )
            )
        del state, capture, last
    return rows


def isolated_runs(
    model, state, capture, last, policies: dict, tails: set, iso_reps: int, clock, log, length: int, tail_reps: int = TAIL_REPS
) -> dict:
    """Every method's own work timed alone: per name, (seconds of each run, seconds of each separate-pass run).

    The methods take turns, one run each per round in an order that rotates every round (as
    :func:`~lookaheadkv.bench.common.paired_runs` does), so a machine that drifts over the
    minutes of a length drifts under all of them alike and their ratios stay comparable. A
    tail method gets ``max(iso_reps, tail_reps)`` runs (each a difference of two timed forwards:
    noisier) and ``iso_reps`` of its separate pass. When the tail has more rounds than the
    others, their runs are spread evenly over all the rounds (:func:`spread`), not bunched at
    the start.
    """
    names = [name for name, policy in policies.items() if policy is not None]
    reps = {name: max(iso_reps, tail_reps) if name in tails else iso_reps for name in names}
    rounds = max(reps.values(), default=0)
    out = {name: ([], []) for name in names}
    log(f"{length} tokens: each method's own work alone, {rounds} rounds")
    for rnd in range(rounds):
        shift = rnd % len(names)
        for name in names[shift:] + names[:shift]:
            policy = policies[name]
            if spread(rnd, reps[name], rounds):
                if name in tails:
                    out[name][0].append(tail_work(model, last, policy, clock, rnd))
                else:
                    out[name][0].append(added_work(model, state, capture, policy, clock))
            if name in tails and spread(rnd, iso_reps, rounds):
                out[name][1].append(added_work(model, state, capture, policy, clock))
        if rounds >= 20 and (rnd + 1) % (rounds // 10) == 0:
            log(f"{length} tokens: {rnd + 1} of {rounds} rounds")
    return out


def spread(rnd: int, runs: int, rounds: int) -> bool:
    """Whether round ``rnd`` of ``rounds`` holds one of ``runs`` runs spaced evenly over them (all when ``runs >= rounds``)."""
    return (rnd + 1) * runs // rounds > rnd * runs // rounds


def add_memory(rows: list[CostRow], model_name: str, budget: int, threads: int | None, jobs: int) -> float:
    """Fill ``peak_mib`` of every row from fresh processes; returns the baseline process's MiB."""
    from .memory import peaks_above_baseline

    baseline, above = peaks_above_baseline(model_name, [(r.method, r.length) for r in rows], budget, threads, jobs)
    for row in rows:
        row.peak_mib = above[(row.method, row.length)]
    return baseline


def ratios(rows: list[CostRow], num: str = "laq", den: str = "lookahead") -> dict[int, dict[str, object]]:
    """Per length, ``num``'s added time over ``den``'s: isolated (with a 95% interval), against ``den``'s separate pass, and paired.

    None where the denominator is not positive: a difference of two timed runs that came out
    at or below zero is below the measurement's noise, not a cost.
    """
    by = {(r.method, r.length): r for r in rows}
    out = {}
    for length in sorted({r.length for r in rows}):
        a, b = by.get((num, length)), by.get((den, length))
        if a is None or b is None:
            continue
        out[length] = {
            "isolated": a.isolated_ms / b.isolated_ms if b.isolated_ms and b.isolated_ms > 0 else None,
            "isolated_ci": ratio_interval(a.isolated_runs_ms, b.isolated_runs_ms),
            "separate": a.isolated_ms / b.separate_ms if b.separate_ms and b.separate_ms > 0 else None,
            "paired": a.added_ms / b.added_ms if b.added_ms > 0 and a.added_ms > 0 else None,
        }
    return out


def ratio_interval(num: list[float] | None, den: list[float] | None, draws: int = 2000, seed: int = 0) -> list[float | None] | None:
    """95% bootstrap interval of ``median(num) / median(den)``, each list resampled on its own.

    The upper end is None (unbounded) when more than 2.5% of the resamples have a median
    denominator at or below zero. None without at least 2 runs on each side.
    """
    if not num or not den or len(num) < 2 or len(den) < 2:
        return None
    return _bootstrap([(num, den)], draws, seed)


def combined_ratio(runs: list[tuple[list[float], list[float]]], draws: int = 2000, seed: int = 0) -> tuple[float | None, list[float | None] | None]:
    """Several benchmark runs combined: the geometric mean of their ratios of medians, and its 95% interval.

    ``runs`` holds one ``(num, den)`` pair of timing lists per benchmark run. Each run's ratio
    compares the two methods under that run's machine state; the runs weigh equally. (Pooling
    all timings into one median per method would mix machine states: a fast run's cheap
    timings and a slow run's dear ones make medians that no single state has.) The bootstrap
    resamples within each run. The ratio is None when a run's median is not positive; the
    interval is None unless every run has at least 2 timings on each side.
    """
    if not runs or any(not n or not d for n, d in runs):
        return None, None
    ratio = _geomean_ratio([(median(n), median(d)) for n, d in runs])
    if any(len(n) < 2 or len(d) < 2 for n, d in runs):
        return ratio, None
    return ratio, _bootstrap(runs, draws, seed)


def _geomean_ratio(medians: list[tuple[float, float]]) -> float | None:
    if any(d <= 0 or n <= 0 for n, d in medians):
        return None
    if len(medians) == 1:
        return medians[0][0] / medians[0][1]
    return math.exp(sum(math.log(n / d) for n, d in medians) / len(medians))


def _bootstrap(strata: list[tuple[list[float], list[float]]], draws: int, seed: int) -> list[float | None]:
    """95% interval of the geometric mean of the strata's ratios of medians, each list resampled within its stratum.

    With one stratum this is the ratio of the two medians. A resample with a median at or
    below zero counts as unbounded.
    """
    rng = random.Random(seed)
    values = []
    for _ in range(draws):
        medians = []
        for n, d in strata:
            m = median(rng.choices(d, k=len(d)))
            medians.append((median(rng.choices(n, k=len(n))), m))
        ratio = _geomean_ratio(medians)
        values.append(math.inf if ratio is None else ratio)
    values.sort()
    lo, hi = values[int(0.025 * draws)], values[int(0.975 * draws) - 1]
    return [lo if math.isfinite(lo) else None, hi if math.isfinite(hi) else None]


def format_ratio(ratio: float | None, interval: list[float | None] | None = None) -> str:
    """``10.9x [8.8, 13.9]``; "-" for no ratio, "unbounded" for an open upper end, no brackets without a lower end."""
    text = "-" if ratio is None else f"{ratio:.1f}x"
    if interval and interval[0] is not None:
        text += f" [{interval[0]:.1f}, {'unbounded' if interval[1] is None else f'{interval[1]:.1f}'}]"
    return text


def ms(value: float | None) -> str | None:
    """Milliseconds with 3 significant digits or more."""
    if value is None:
        return None
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def markdown(rows: list[CostRow], env: dict, budget: int, reps: int, iso_reps: int, tail_reps: int = TAIL_REPS) -> str:
    """The results as a markdown report: the command, the setup, the table and the LAQ / LookaheadKV ratios."""
    order = {m: i for i, m in enumerate(METHODS)}
    table = markdown_table(
        ["method", "tokens", "TTFT ms", "prefill ms", "added ms (paired)", "added ms (alone)", "alone % of prefill", "peak MiB"],
        [
            [r.method, r.length, ms(r.ttft_ms), ms(r.prefill_ms), ms(r.added_ms) if r.method != PLAIN else None, ms(r.isolated_ms),
             None if r.share_pct is None else f"{r.share_pct:.2f}", None if r.peak_mib is None else f"{r.peak_mib:.1f}"]
            for r in sorted(rows, key=lambda r: (r.length, order[r.method]))
        ],
        labels=2,
    )
    ratio_lines = [
        f"- {length} tokens: {format_ratio(v['isolated'], v.get('isolated_ci'))} alone"
        + (f", {format_ratio(v['separate'])} against LookaheadKV as a separate pass" if v.get("separate") else "")
        + f", {format_ratio(v['paired'])} paired"
        for length, v in ratios(rows).items()
    ]
    notes = []
    if any(r.method == "lookahead" for r in rows):
        notes.append(f"LookaheadKV modules: {env['lookahead_modules']}.")
        separate = [f"{r.length}: {ms(r.separate_ms)} ms" for r in sorted(rows, key=lambda r: r.length) if r.method == "lookahead" and r.separate_ms]
        if separate:
            notes.append("LookaheadKV as a separate forward over the finished cache (how the evaluation runner scores, "
                         "sharing one prefill between methods), alone: " + ", ".join(separate) + ".")
    if any(r.method == "speckv" for r in rows):
        notes.append(f"SpecKV: {SPECKV_DRAFT}.")
    lines = [
        f"# Eviction cost on {env['model']} (budget {budget})",
        "",
        f"`{env['command']}`",
        "",
        f"{env['date']} | torch {env['torch']} | transformers {env['transformers']} | {env['threads']} threads | {env['machine']} | "
        f"medians of {reps} paired repetitions and of {iso_reps} isolated runs per method ({max(iso_reps, tail_reps)} for "
        "LookaheadKV's tokens), each in rotating order",
        "",
        "TTFT = prefill + scoring + selection + eviction + first token. *added (paired)*: TTFT minus the plain "
        "prefill's in the same repetition. *added (alone)*: the method's own work timed in isolation (observer "
        "replayed on captured attention inputs, then scoring, top-k and the gather; for LookaheadKV, whose tokens run "
        "in the prefill, what they add to the prefill's last 256-token forward, against the same forward without "
        "them, plus scoring, top-k and the gather). *peak MiB*: peak RSS of a fresh process running it once, above a "
        "process that only holds the model.",
        "",
        table,
    ]
    if notes:
        lines += ["", *notes]
    if ratio_lines:
        lines += ["", "LAQ added / LookaheadKV added (alone: ratio of the medians, [95% bootstrap interval] over the isolated runs):",
                  *ratio_lines, f"- paper: {PAPER_RATIO}"]
    return "\n".join(lines) + "\n"


def plot(rows: list[CostRow], path: Path, title: str) -> None:
    """Added time (isolated) against prompt length, one line per method, log-scaled axes.

    FullKV is left out: it evicts nothing, so it adds nothing.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method in (m for m in METHODS if m not in (PLAIN, "full")):
        points = sorted((r.length, r.isolated_ms) for r in rows if r.method == method and r.isolated_ms and r.isolated_ms > 0)
        if points:
            ax.plot(*zip(*points), marker="o", label=method)
    ax.set_xscale("log", base=2)
    lengths = sorted({r.length for r in rows})
    ax.set_xticks(lengths, [str(n) for n in lengths], minor=False)
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_yscale("log")
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("added time to first token, ms (method's work alone)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lookaheadkv bench", description="Eviction cost per method: TTFT, added time, peak memory.", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--model", choices=MODELS, default="smollm2", help="the bundled SmolLM2-135M, or a tiny random Llama")
    parser.add_argument("--lengths", type=parse_ints, default=[1024, 2048, 4096, 8192], help="prompt tokens, comma-separated")
    parser.add_argument("--methods", type=lambda t: [m for m in t.split(",") if m], default=list(DEFAULT_METHODS),
                        help=f"comma-separated, from: {', '.join(m for m in METHODS if m != PLAIN)} (the plain prefill always runs)")
    parser.add_argument("--oracle", action="store_true", help="also time the oracle (it decodes a whole answer first)")
    parser.add_argument("--budget", type=budget_arg, default=128, help="KV entries kept per head and layer (128), or a ratio of the prompt in (0, 1] (0.1)")
    parser.add_argument("--reps", type=int, default=3, help="paired repetitions per length")
    parser.add_argument("--iso-reps", type=int, default=5, help="isolated timings of each method's own work per length")
    parser.add_argument("--tail-reps", type=int, default=TAIL_REPS,
                        help="isolated timings of LookaheadKV's in-prefill tokens per length (at least --iso-reps): each is a "
                             "difference of two forwards, the noisiest figure, so it gets more")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--jobs", type=int, default=1, help="memory processes run at once (peaks are per process)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-cost"), help="folder for results.json, table.md, cost.png")
    parser.add_argument("--report-only", action="store_true", help="rewrite table.md and cost.png from --out's results.json; time nothing")
    return parser


def report_only(out: Path) -> str:
    """The table and plot of an earlier run, rebuilt from its ``results.json``."""
    path = out / "results.json"
    try:
        results = json.loads(path.read_text())
        rows = [CostRow(**{k: v for k, v in r.items() if k in CostRow.__dataclass_fields__}) for r in results["rows"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        print(f"error: cannot read {path} ({type(err).__name__}): run the benchmark into --out first", file=sys.stderr)
        raise SystemExit(2) from None
    report = markdown(rows, results["environment"], results["budget"], results["reps"], results["iso_reps"], results.get("tail_reps", TAIL_REPS))
    results["laq_over_lookahead"] = {str(k): v for k, v in ratios(rows).items()}
    path.write_text(json.dumps(results, indent=2) + "\n")
    (out / "table.md").write_text(report)
    plot(rows, out / "cost.png", f"Eviction cost on {results['environment']['model']}, budget {results['budget']}")
    return report


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, print the markdown table, write the results folder."""
    import torch

    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = sorted(set(args.methods) - set(METHODS) - {PLAIN})
    if unknown:
        parser.error(f"unknown methods {', '.join(unknown)}; choose from: {', '.join(m for m in METHODS if m != PLAIN)}")
    if min(args.reps, args.iso_reps, args.tail_reps) < 1:
        parser.error("--reps, --iso-reps and --tail-reps must be at least 1")
    if args.report_only:
        print(report_only(args.out))
        return
    methods = [m for m in METHODS if m in args.methods or (m == "oracle" and args.oracle)]
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = bench_model(args.model)
    env = environment(args.model, model)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    policies = {m: make_method(m, model, args.budget) for m in methods}
    rows = measure(model, tokenizer, args.lengths, policies, reps=args.reps, iso_reps=args.iso_reps, tail_reps=args.tail_reps, log=log)
    baseline = None
    if not args.no_memory:
        log(f"peak memory: {len(rows) + 1} fresh processes")
        baseline = add_memory(rows, args.model, args.budget, args.threads, args.jobs)
    report = markdown(rows, env, args.budget, args.reps, args.iso_reps, args.tail_reps)
    args.out.mkdir(parents=True, exist_ok=True)
    results = {
        "environment": env,
        "budget": args.budget,
        "reps": args.reps,
        "iso_reps": args.iso_reps,
        "tail_reps": args.tail_reps,
        "speckv_draft": SPECKV_DRAFT,
        "baseline_mib": baseline,
        "laq_over_lookahead": {str(k): v for k, v in ratios(rows).items()},
        "rows": [asdict(r) for r in rows],
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "table.md").write_text(report)
    plot(rows, args.out / "cost.png", f"Eviction cost on {args.model}, budget {args.budget}")
    print(report)
    print(f"wrote {args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'cost.png'}", file=sys.stderr)
