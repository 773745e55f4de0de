"""Long answers in bounded memory: eviction during decoding, per policy and decode budget (issue 21).

Prompts of about 2K tokens whose answers run 256-1024 tokens (lookaheadkv.tasks.longgen: detailed
summaries, extracting every item of a kind, few-shot step-by-step sums, essay continuation; eval-split
essays and needles). Each prompt is prefilled once (policies.SharedPrefill); the full cache answers
first, then every method at every decode budget: the prompt cut to the budget at prefill, and the
whole cache (prompt and answer) held at or under it while decoding, re-scored every --interval tokens
(engine.rescore). All (method, decode budget) rows of a prompt decode as ONE batch
(engine.batch_rescore.decode_budgeted_batch: one forward per step for all rows, each row re-scored on
its own cache, the same tokens as decoding it alone); --no-batch decodes them one after the other.
Written to --out:

* ``results.jsonl``: one row per (prompt, method, decode budget), resumable (rerun the same command);
* ``report.md``: fidelity to the full-cache answer (token F1, ROUGE-L) and the task score where the
  answer can be checked (share of the items / running totals it holds), means with 95% bootstrap CIs;
  the cost of re-scoring: each re-scoring's time as a share of the decoding time of the interval it
  closes (per-step observer work, e.g. H2O's attention rows, is inside that decoding time); batched,
  a row is charged each batched step's time divided by the rows in it (its ``decode_seconds`` too),
  and ``batch_rows`` says how many rows shared the batch (1: decoded alone);
* ``memory.png``: KV-cache memory against generated tokens, the full cache vs each decode budget.

    python benchmarks/long_generation.py --out runs/longgen --methods lookahead,snapkv,h2o,tova,streamingllm,random \\
        --decode-budgets 128,256,512 --prompts-per-task 10 --length 2048 --max-new-tokens 1024 --threads 2
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from lookaheadkv.engine.batch_rescore import decode_budgeted_batch
from lookaheadkv.bench.common import environment
from lookaheadkv.engine.cache import copy_cache, gather
from lookaheadkv.engine.decode import decode
from lookaheadkv.engine.generate import eos_ids
from lookaheadkv.engine.rescore import BudgetedDecoding, DecodeBudget, decode_scorer
from lookaheadkv.evaluation.metrics import bootstrap_ci, rouge_l, score_sample, token_f1
from lookaheadkv.evaluation.runner import shard_from_text
from lookaheadkv.models import load_model
from lookaheadkv.policies import SharedPrefill, make_policy
from lookaheadkv.records import append_record, read_records
from lookaheadkv.tasks.longgen import LONG_TASKS, make_long_suite


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--model", default=None, help="hub id or folder (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--modules", default=None, help="LookaheadKV modules (default: the shipped ones)")
    p.add_argument("--methods", default="lookahead,snapkv,h2o,tova,streamingllm,random")
    p.add_argument("--decode-budgets", default="128,256,512")
    p.add_argument("--tasks", default=",".join(LONG_TASKS))
    p.add_argument("--prompts-per-task", type=int, default=10)
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--interval", type=int, default=32)
    p.add_argument("--recent", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--plot-method", default="lookahead", help="the method whose memory curves are drawn beside the full cache")
    p.add_argument("--shard", default=None, help="i/n: only the prompts whose number within their task is i mod n (n processes, each with its own --out; then merge_shards)")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-batch", action="store_true", help="decode each (method, decode budget) alone, one after the other (slower; the same tokens)")
    return p.parse_args(argv)


def build_policies(methods, modules, budget):
    policies = {}
    for name in methods:
        kwargs = {"modules": modules} if name == "lookahead" and modules else {}
        policies[name] = make_policy(name, budget=budget, **kwargs)
        if not policies[name].has_decode_scorer:
            raise SystemExit(f"error: {name} has no decode-time scorer: {policies[name].no_decode_scorer}")
    return policies


def row_for(sample, method, budget, tokens, tokenizer, reference, seconds, entries, rescorings, batch_rows=1):
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    row = {
        "id": sample.id, "task": sample.task, "method": method, "decode_budget": budget, "prompt_tokens": sample.n_tokens,
        "new_tokens": len(tokens), "text": text, "decode_seconds": seconds, "entries": entries, "rescorings": rescorings,
        "batch_rows": batch_rows,
        "task_score": score_sample(sample, text)["score"] if sample.metric == "all" else None,
    }  # fmt: skip
    if reference is not None:
        row["f1"], row["rouge_l"] = token_f1(text, reference), rouge_l(text, reference)
    return row


@torch.no_grad()
def run_sample(model, tokenizer, sample, policies, budgets, args, done, path):
    ids = torch.tensor([sample.prompt_ids])
    shared = SharedPrefill(model, ids, policies)
    state, eos, length = shared.state, eos_ids(model, tokenizer), len(sample.prompt_ids)
    full = next((r for r in done if r["id"] == sample.id and r["method"] == "full"), None)
    if full is None:
        start = time.perf_counter()
        tokens = decode(model, copy_cache(state.cache), state.logits, length, args.max_new_tokens, eos_token_ids=eos)
        entries = [length + t for t in range(len(tokens))]
        full = row_for(sample, "full", 0, tokens, tokenizer, None, time.perf_counter() - start, entries, [])
        append_record(path, full)
    todo = [
        (name, budget) for name in policies for budget in budgets
        if not any(r["id"] == sample.id and r["method"] == name and r["decode_budget"] == budget for r in done)
    ]  # fmt: skip

    def budgeted(name, budget):
        kept = shared.kept(name, budget)
        return BudgetedDecoding(
            model, gather(state.cache, kept), kept, length, DecodeBudget(budget, args.interval, args.recent), decode_scorer(shared.policy(name, budget), model),
            prefill=state, observer=shared.observers[name],
        )  # fmt: skip

    def record(name, budget, run, tokens, seconds, batch_rows):
        rescorings = [[r.fed, r.seconds, r.interval_seconds] for r in run.record.rescorings]
        append_record(path, row_for(sample, name, budget, tokens, tokenizer, full["text"], seconds, run.record.entries, rescorings, batch_rows))

    if getattr(args, "no_batch", False):
        for name, budget in todo:
            run = budgeted(name, budget)
            start = time.perf_counter()
            tokens = decode(model, run.cache, state.logits, length, args.max_new_tokens, eos_token_ids=eos, observers=run.observers(), after_step=run.after_step)
            record(name, budget, run, tokens, time.perf_counter() - start, 1)
    elif todo:  # every row of the prompt as one batch; the rows are written once it is done (a rerun redoes an interrupted batch)
        runs = [budgeted(name, budget) for name, budget in todo]
        outputs = decode_budgeted_batch(model, runs, state.logits, length, args.max_new_tokens, eos_token_ids=eos)
        for (name, budget), run, tokens in zip(todo, runs, outputs):
            record(name, budget, run, tokens, run.record.seconds, len(runs))


def _ci(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean, lo, hi = bootstrap_ci(values)
    return f"{100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def report(rows, methods, budgets) -> str:
    full = [r for r in rows if r["method"] == "full"]
    lines = [
        f"Long generation: {len(full)} prompts, {np.mean([r['prompt_tokens'] for r in full]):.0f} prompt tokens on average, "
        f"full-cache answers of {np.mean([r['new_tokens'] for r in full]):.0f} tokens on average (min {min(r['new_tokens'] for r in full)}, max {max(r['new_tokens'] for r in full)}).",
        "",
        "Fidelity to the full-cache answer and task score (%, mean [95% CI]); the task score over the checkable prompts only.",
        "",
        "| method | decode budget | n | token F1 | ROUGE-L | task score |",
        "|---|---:|---:|---:|---:|---:|",
        f"| full cache | - | {len(full)} | 100 | 100 | {_ci([r['task_score'] for r in full])} |",
    ]
    for name in methods:
        for b in budgets:
            sel = [r for r in rows if r["method"] == name and r["decode_budget"] == b]
            if sel:
                lines.append(f"| {name} | {b} | {len(sel)} | {_ci([r['f1'] for r in sel])} | {_ci([r['rouge_l'] for r in sel])} | {_ci([r['task_score'] for r in sel])} |")
    lines += [
        "", "Cost of re-scoring: per answer, the mean over its re-scorings of (re-scoring time / decoding time of the interval it closes), %, mean [95% CI] over answers."
        + (" Rows decoded as one batch are charged each batched step's time divided by the rows in it, so their interval is shorter than decoding alone." if any(r.get("batch_rows", 1) > 1 for r in rows) else ""), "",
        "| method | decode budget | re-scorings per answer | ms per re-scoring (median) | share of the interval's decoding |",
        "|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for name in methods:
        for b in budgets:
            sel = [r for r in rows if r["method"] == name and r["decode_budget"] == b]
            shares = [float(np.mean([s / i for _, s, i in r["rescorings"] if i > 0])) for r in sel if r["rescorings"]]
            ms = [1000 * s for r in sel for _, s, _ in r["rescorings"]]
            if sel:
                count = np.mean([len(r["rescorings"]) for r in sel])
                lines.append(f"| {name} | {b} | {count:.1f} | {np.median(ms) if ms else 0:.1f} | {_ci(shares)} |")
    return "\n".join(lines) + "\n"


def in_shard(samples, shard: str | None):
    """The samples of shard ``i/n``: those whose number within their task (the id's last part) is i mod n."""
    if shard is None:
        return samples
    try:
        index, count = shard_from_text(shard)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    return [s for s in samples if int(s.id.rsplit("/", 1)[1]) % count == index]


def merge_shards(out: Path, others: list[Path]) -> int:
    """Append to ``out``'s results (and provenance) the rows of other shards' folders that ``out`` lacks; returns how many."""
    have = {(r["id"], r["method"], r["decode_budget"]) for r in read_records(out / "results.jsonl")}
    added = 0
    for folder in others:
        for r in read_records(folder / "results.jsonl"):
            if (r["id"], r["method"], r["decode_budget"]) not in have:
                append_record(out / "results.jsonl", r)
                have.add((r["id"], r["method"], r["decode_budget"]))
                added += 1
        if (folder / "runs.jsonl").exists():
            known = read_records(out / "runs.jsonl") if (out / "runs.jsonl").exists() else []
            for r in read_records(folder / "runs.jsonl"):
                if r not in known:
                    append_record(out / "runs.jsonl", r)
    return added


def provenance(path: Path) -> str:
    """The report's last lines: the runs (and restarts) that wrote results.jsonl."""
    if not path.exists():
        return ""
    lines = ["", "Written by (each start or resume of the run):", ""]
    for r in read_records(path):
        e = r["environment"]
        lines.append(f"- {e['date']}, {e['machine']}, {e['threads']} threads, torch {e['torch']}, commit {e['commit']}: `{e['command']}`")
    return "\n".join(lines) + "\n"


def plot_memory(rows, model, method, budgets, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    per_entry = 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * next(model.parameters()).element_size() / 2**20  # MiB per entry per KV head
    full = next((r for r in rows if r["method"] == "full"), None)
    if full is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(np.array(full["entries"]) * per_entry, label="full cache", color="black")
    for b in budgets:
        r = next((r for r in rows if r["id"] == full["id"] and r["method"] == method and r["decode_budget"] == b), None)
        if r is not None:
            line = ax.plot(np.array(r["entries"]) * per_entry, label=f"{method}, decode budget {b}")[0]
            if b == min(budgets):  # what eviction at prefill only keeps: the budget, then one entry per token (arithmetic)
                ax.plot((b + np.arange(len(full["entries"]))) * per_entry, ls="--", color=line.get_color(), label=f"prefill-only eviction at {b} (no decode budget; computed)")
    ax.set(xlabel="generated tokens", ylabel="KV cache (MiB)", title=f"KV memory while decoding ({full['id']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv=None) -> str:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods, budgets = args.methods.split(","), [int(b) for b in args.decode_budgets.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.jsonl"
    model, tokenizer = load_model(args.model)
    if not args.report_only:
        # provenance of every (re)start: date, machine, threads, commit, command (the report quotes them)
        append_record(args.out / "runs.jsonl", {"environment": environment(args.model or "bundled:smollm2-135m-instruct", model)})
        policies = build_policies(methods, args.modules, max(budgets))
        samples = make_long_suite(tokenizer, args.prompts_per_task, args.length, args.seed, args.tasks.split(","), args.max_new_tokens)
        samples = in_shard(samples, args.shard)
        for i, sample in enumerate(samples):
            done = read_records(path) if path.exists() else []
            run_sample(model, tokenizer, sample, policies, budgets, args, done, path)
            print(f"[{i + 1}/{len(samples)}] {sample.id}", flush=True)
    rows = read_records(path)
    text = report(rows, methods, budgets) + provenance(args.out / "runs.jsonl")
    (args.out / "report.md").write_text(text)
    plot_memory(rows, model, args.plot_method, budgets, args.out / "memory.png")
    print(text)
    return text


if __name__ == "__main__":
    main()
