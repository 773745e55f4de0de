"""LookaheadKV modules side by side: paired differences (95% CIs) over the same prompts of several eval runs.

Each ``--run NAME=FOLDER`` is an ``lookaheadkv eval`` run folder (its ``results.jsonl``) made
with one set of modules; its ``lookahead`` rows become the method ``lookahead[NAME]`` (and its
variants, e.g. ``lookahead:kernel=7``, ``lookahead[NAME]:kernel=7``, each paired with the first
run's default too). The
other methods (full, oracle, SnapKV, LAQ, ...) are taken from the first run, where they were
run once. Only samples that every compared method finished count, so every difference is
paired: the same prompts, the same budgets.

Usage::

    python benchmarks/compare_modules.py --run old=runs/heldout-2k --run new=runs/heldout-2k-new \\
        --against snapkv,laq --out docs/results/heldout-modules.md
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

from lookaheadkv.evaluation.metrics import bootstrap_ci, paired_bootstrap_diff
from lookaheadkv.evaluation.runner import latest_results, read_results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", action="append", required=True, help="NAME=FOLDER, repeatable; the first run also gives the other methods")
    p.add_argument("--against", default="snapkv,laq", help="methods every lookahead[NAME] is paired against")
    p.add_argument("--group", default=None, help="only this task group (default: every group, and all pooled)")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    return p.parse_args(argv)


def load(runs: list[tuple[str, Path]]) -> list[dict]:
    rows = []
    for k, (name, folder) in enumerate(runs):
        path = folder / "results.jsonl"
        if not path.exists():
            raise SystemExit(f"error: {path} not found: give eval run folders as NAME=FOLDER")
        for r in latest_results(read_results(path)):
            if "error" in r:
                continue
            method = r["method"]
            if method == "lookahead" or method.startswith("lookahead:"):  # a variant keeps its options: lookahead[NAME]:kernel=7
                rows.append({**r, "method": f"lookahead[{name}]{method[len('lookahead'):]}"})
            elif k == 0:
                rows.append(r)
    return rows


def table(rows: list[dict], names: list[str], against: list[str]) -> str:
    by = defaultdict(dict)  # (method, budget) -> sample -> row
    for r in rows:
        by[(r["method"], r["budget"])][r["sample_id"]] = r
    ours = []  # lookahead[NAME] and its variants, in run order
    for n in names:
        ours += sorted({m for m, _ in by if m == f"lookahead[{n}]" or m.startswith(f"lookahead[{n}]:")}, key=lambda m: (":" in m, m))
    budgets = sorted({b for (m, b) in by if m != "full"})
    lines = []
    for b in budgets:
        methods = [m for m in ("full", "oracle", *against, *ours) if (m, 0 if m == "full" else b) in by]
        keys = [(m, 0 if m == "full" else b) for m in methods]
        common = sorted(set.intersection(*(set(by[k]) for k in keys)))
        lines += [f"### budget {b} (n = {len(common)} prompts every method finished)", "", "| method | score % [95% CI] | attention recall % |", "|---|---|---|"]
        for m, k in zip(methods, keys):
            mean, lo, hi = bootstrap_ci([by[k][s]["score"] for s in common])
            recalls = [by[k][s]["recall"] for s in common if by[k][s].get("recall") is not None]
            recall = f"{100 * sum(recalls) / len(recalls):.1f}" if recalls else "-"
            lines.append(f"| {m} | {100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] | {recall} |")
        lines += ["", "| paired difference | points [95% CI] |", "|---|---|"]
        # every one of ours against the baselines, and against the first of ours (the first run's default)
        pairs = [(a, o) for a in ours for o in against] + [(a, ours[0]) for a in ours[1:]]
        for a, o in pairs:
            ka, ko = (a, b), (o, b)
            if ka in by and ko in by:
                d, lo, hi = paired_bootstrap_diff([by[ka][s]["score"] for s in common], [by[ko][s]["score"] for s in common])
                lines.append(f"| {a} - {o} | {100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = []
    for item in args.run:
        name, sep, folder = item.partition("=")
        if not sep or not name or not folder:
            print(f"error: --run takes NAME=FOLDER, got {item!r}", file=sys.stderr)
            return 2
        runs.append((name, Path(folder)))
    rows = load(runs)
    if args.group:
        rows = [r for r in rows if r.get("group") == args.group]
    text = table(rows, [n for n, _ in runs], [m for m in args.against.split(",") if m])
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
