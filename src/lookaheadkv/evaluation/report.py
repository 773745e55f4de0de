"""Summaries of a results file: means with 95% bootstrap CIs, paired differences to SnapKV, plots."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..policies.speckv import speckv_label
from .metrics import bootstrap_ci, paired_bootstrap_diff

METRICS = {"score": "task score", "graded": "graded score", "fidelity_f1": "fidelity F1 to full cache", "recall": "attention recall"}
UNINFORMATIVE = 0.30  # groups where the full cache itself scores below this are marked
POOLED = "all informative groups"


def _groups(summary: dict) -> list[str]:
    """Task groups in name order, the pooled one first."""
    groups = sorted({g for g, _, _ in summary})
    return [g for g in groups if g == POOLED] + [g for g in groups if g != POOLED]


def _order(methods):
    first = ["full", "oracle", "lookahead", "snapkv"]
    return [m for m in first if m in methods] + sorted(m for m in methods if m not in first)


def method_labels(rows: list[dict]) -> dict[str, str]:
    """Display name per method: its name, except SpecKV, which names its draft model or says it is
    the self-draft upper bound (rows without a ``draft`` were drafted by the target itself)."""
    labels = {r["method"]: r["method"] for r in rows}
    drafts = sorted({str(r.get("draft")) for r in rows if r["method"] == "speckv" and r.get("draft") is not None})
    if "speckv" in labels:
        self_drafted = any(r["method"] == "speckv" and r.get("draft") is None for r in rows)
        parts = ([speckv_label(None)] if self_drafted else []) + [speckv_label(d) for d in drafts]
        labels["speckv"] = " / ".join(parts) if parts else speckv_label(None)
    return labels


def _label(summary_entries, method: str) -> str:
    return next((e["label"] for e in summary_entries if "label" in e), method)


def summarise(rows: list[dict], baseline: str = "snapkv", n_boot: int = 1000, pooled: bool = True) -> dict:
    """Per (group, method, budget): n, errors, and (mean, lo, hi) of every metric, plus the paired diff to ``baseline``.

    With ``pooled`` and more than one informative group, the samples of every informative
    group (full cache at or above 30%) are also summarised together as :data:`POOLED`, the
    one-number comparison across tasks (each sample counts once).
    """
    labels = method_labels(rows)
    by_key: dict[tuple, dict[str, dict]] = defaultdict(dict)  # (group, method, budget) -> sample -> row
    errors: dict[tuple, int] = defaultdict(int)
    for r in rows:
        key = (r["group"], r["method"], r["budget"])
        if "error" in r:
            errors[key] += 1
        else:
            by_key[key][r["sample_id"]] = r
    full_mean = {g: sum(s["score"] for s in samples.values()) / len(samples) for (g, m, _), samples in by_key.items() if m == "full"}
    informative = {g for g, mean in full_mean.items() if mean >= UNINFORMATIVE}
    if pooled and len(informative) > 1:  # sample ids name their task, so they stay distinct when pooled
        for (g, m, b), samples in list(by_key.items()):
            if g in informative:
                by_key[(POOLED, m, b)].update(samples)
        for (g, m, b), count in list(errors.items()):
            if g in informative:
                errors[(POOLED, m, b)] += count
        pooled_full = [s["score"] for (g, m, _), samples in by_key.items() if g == POOLED and m == "full" for s in samples.values()]
        full_mean[POOLED] = sum(pooled_full) / len(pooled_full)
    out = {}
    for key in sorted(set(by_key) | set(errors), key=str):
        samples = by_key.get(key, {})
        group, method, budget = key
        entry = {"n": len(samples), "errors": errors.get(key, 0)}
        for metric in METRICS:
            values = [samples[i][metric] for i in sorted(samples) if metric in samples[i]]  # file order must not move the CI
            if values:
                entry[metric] = bootstrap_ci(values, n_boot=n_boot)
        base = by_key.get((group, baseline, budget))
        if base and method != baseline and method != "full":
            common = sorted(set(samples) & set(base))
            if common:
                entry["diff_vs_" + baseline] = paired_bootstrap_diff(
                    [samples[i]["score"] for i in common], [base[i]["score"] for i in common], n_boot=n_boot
                )
        entry["label"] = labels.get(method, method)
        out[key] = entry
    for key, entry in out.items():
        if key[0] in full_mean:
            entry["uninformative"] = full_mean[key[0]] < UNINFORMATIVE
    return out


def _cell(triple) -> str:
    if triple is None:
        return "-"
    mean, lo, hi = triple
    return f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def markdown(summary: dict, metric: str = "score", baseline: str = "snapkv") -> str:
    """One table per group: methods as rows, budgets as columns, mean [95% CI] in percent."""
    groups = _groups(summary)
    budgets = sorted({b for _, m, b in summary if m != "full"})
    lines = []
    for group in groups:
        entries = {(m, b): e for (g, m, b), e in summary.items() if g == group}
        methods = _order({m for m, _ in entries})
        flag = next(iter(entries.values())).get("uninformative", False)
        n = max(e["n"] for e in entries.values())
        note = " (uninformative: the full cache scores below 30%)" if flag else ""
        lines += [f"**{group}** ({METRICS[metric]}, %, mean [95% CI], n = {n}){note}", ""]
        lines.append("| method | " + " | ".join(f"budget {b}" for b in budgets) + " |")
        lines.append("|---|" + "---|" * len(budgets))
        for m in methods:
            if m == "full":
                cells = [_cell(entries[(m, 0)].get(metric))] * len(budgets)
            else:
                cells = []
                for b in budgets:
                    e = entries.get((m, b))
                    cell = _cell(e.get(metric)) if e else "-"
                    diff = e.get("diff_vs_" + baseline) if e and metric == "score" else None
                    if diff is not None:
                        cell += f" (Δ {100 * diff[0]:+.1f} [{100 * diff[1]:+.1f}, {100 * diff[2]:+.1f}])"
                    if e and e["errors"]:
                        cell += f" ({e['errors']} errors)"
                    cells.append(cell)
            lines.append(f"| {_label([e for (mm, _), e in entries.items() if mm == m], m)} | " + " | ".join(cells) + " |")
        lines.append("")
    if metric == "score":
        lines.append(f"Δ: paired-bootstrap mean difference to {baseline} at the same budget on the same samples, with its 95% CI.")
    return "\n".join(lines)


def plot(summary: dict, path: str | Path, metric: str = "score") -> Path:
    """Score versus budget per method, one panel per task group (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups(summary)
    cols = min(3, len(groups))
    rows_ = -(-len(groups) // cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(4.2 * cols, 3.6 * rows_), squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, group in zip(axes.flat, groups):
        entries = {(m, b): e for (g, m, b), e in summary.items() if g == group and metric in e}
        budgets = sorted({b for m, b in entries if m != "full"})
        for m in _order({m for m, _ in entries}):
            if m == "full":
                ax.axhline(100 * entries[(m, 0)][metric][0], color="black", ls="--", lw=1, label="full")
                continue
            label = _label([e for (mm, _), e in entries.items() if mm == m], m)
            xs = [b for b in budgets if (m, b) in entries]
            ys = [100 * entries[(m, b)][metric][0] for b in xs]
            lo = [100 * entries[(m, b)][metric][1] for b in xs]
            hi = [100 * entries[(m, b)][metric][2] for b in xs]
            line = ax.plot(xs, ys, marker="o", label=label, lw=2 if m == "lookahead" else 1)[0]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        flag = " (uninformative)" if next(iter(entries.values()), {}).get("uninformative") else ""
        ax.set_title(group + flag)
        ax.set_xlabel("KV budget per head")
        ax.set_ylabel(METRICS[metric] + " (%)")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def dots(summary: dict, path: str | Path, group: str | None = None, metric: str = "score", title: str = "") -> Path:
    """One group's methods as a dot plot (PNG): a row per method, the mean with its 95% CI as whiskers.

    Made for a few points: every method has its own row, so methods with the same score stay
    visible side by side; each budget has its own marker and offset within a row, and every dot
    is labelled with its value. The full cache is the top row and a dashed reference line.
    ``group`` defaults to the pooled group when there is one, else the first.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    group = group or _groups(summary)[0]
    entries = {(m, b): e for (g, m, b), e in summary.items() if g == group and metric in e}
    budgets = sorted({b for m, b in entries if m != "full"})
    methods = [m for m in _order({m for m, _ in entries}) if m != "full"]
    first = budgets[0] if budgets else 0
    methods.sort(key=lambda m: -entries[(m, first)][metric][0] if (m, first) in entries else 1)
    rows = (["full"] if ("full", 0) in entries else []) + methods
    markers, colours = "osD^v", ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b"]
    fig, ax = plt.subplots(figsize=(7.2, 0.9 + 0.48 * len(rows)))
    step = 0.32 / max(1, len(budgets) - 1) if len(budgets) > 1 else 0.0
    for y, m in enumerate(rows):
        keys = [(m, 0)] if m == "full" else [(m, b) for b in budgets]
        for i, key in enumerate(keys):
            if key not in entries:
                continue
            mean, lo, hi = (100 * v for v in entries[key][metric])
            dy = 0.0 if m == "full" else (i - (len(keys) - 1) / 2) * step
            colour = "black" if m == "full" else colours[i % len(colours)]
            ax.errorbar(mean, y + dy, xerr=[[mean - lo], [hi - mean]], fmt=markers[i % len(markers)] if m != "full" else "s",
                        color=colour, ms=7, capsize=3, lw=1.4, zorder=3)
            ax.annotate(f"{mean:.0f}", (hi, y + dy), xytext=(5, 0), textcoords="offset points", va="center", fontsize=8, color=colour)
    if ("full", 0) in entries:
        ax.axvline(100 * entries[("full", 0)][metric][0], color="black", ls="--", lw=0.8, zorder=1)
    labels = [_label([e for (mm, _), e in entries.items() if mm == m], m) for m in rows]
    ax.set_yticks(range(len(rows)), [("full cache" if m == "full" else lab) for m, lab in zip(rows, labels)])
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlim(-2, 109)
    ax.set_xlabel(f"{METRICS[metric]} (%), mean and 95% bootstrap CI")
    ax.grid(axis="x", alpha=0.3)
    n = max(e["n"] for e in entries.values())
    ax.set_title(title or f"{group}: n = {n} prompts", fontsize=10)
    if len(budgets) > 1:
        handles = [plt.Line2D([], [], marker=markers[i % len(markers)], color=colours[i % len(colours)], ls="", label=f"budget {b}") for i, b in enumerate(budgets)]
        ax.legend(handles=handles, fontsize=8, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def terminal(summary: dict, metric: str = "score") -> None:
    """Print the summary as rich tables."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    budgets = sorted({b for _, m, b in summary if m != "full"})
    for group in _groups(summary):
        entries = {(m, b): e for (g, m, b), e in summary.items() if g == group}
        flag = " (uninformative: the full cache scores below 30%)" if next(iter(entries.values())).get("uninformative") else ""  # not [..]: rich markup
        table = Table(title=f"{group}: {METRICS[metric]} (%), mean [95% CI]{flag}")
        table.add_column("method")
        for b in budgets:
            table.add_column(f"budget {b}")
        for m in _order({m for m, _ in entries}):
            if m == "full":
                table.add_row(m, *[_cell(entries[(m, 0)].get(metric))] * len(budgets))
            else:
                table.add_row(_label([e for (mm, _), e in entries.items() if mm == m], m), *[_cell(entries[(m, b)].get(metric)) if (m, b) in entries else "-" for b in budgets])
        console.print(table)
