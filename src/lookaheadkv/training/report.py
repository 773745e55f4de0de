"""The loss curve and held-out recall of a training run, from its log.jsonl."""

from __future__ import annotations

from pathlib import Path

from ..records import read_records


def read_log(run: str | Path) -> list[dict]:
    """The run's log records (a line cut by a kill is skipped, with a warning)."""
    return read_records(Path(run) / "log.jsonl")


def plot_log(run: str | Path, out: str | Path | None = None) -> Path:
    """Training loss (and a running mean) with held-out recall@128 of LookaheadKV and SnapKV (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = read_log(run)
    steps = [r["step"] for r in log]
    loss = [r["loss"] for r in log]
    window = max(1, len(loss) // 20)
    smooth = [sum(loss[max(0, i - window + 1) : i + 1]) / len(loss[max(0, i - window + 1) : i + 1]) for i in range(len(loss))]
    evals = [r for r in log if "heldout" in r]
    fig, axes = plt.subplots(1, 2 if evals else 1, figsize=(10 if evals else 5, 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, loss, alpha=0.35, label="loss (batch mean)")
    ax.plot(steps, smooth, label=f"running mean ({window} steps)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("KL(ground truth || predicted)")
    ax.grid(alpha=0.3)
    ax.legend()
    if evals:
        ax = axes[0][1]
        budgets = sorted({int(k.split("@")[1]) for k in evals[0]["heldout"]})
        for b in budgets:
            line = ax.plot([r["step"] for r in evals], [r["heldout"][f"lookahead@{b}"] for r in evals], marker="o", label=f"LookaheadKV @{b}")[0]
            ax.axhline(evals[0]["heldout"][f"snapkv@{b}"], color=line.get_color(), ls="--", lw=1, label=f"SnapKV @{b}")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("held-out attention recall")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    out = Path(out) if out is not None else Path(run) / "training.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
