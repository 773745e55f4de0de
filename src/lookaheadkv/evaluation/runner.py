"""Methods x budgets x samples, side by side on the same prompts, resumable.

Per sample the runner prefills the prompt ONCE, with every method's observer in that
one pass; it then decodes the full-cache answer (the reference for fidelity), derives
the true importance of each prompt token from that answer (for attention recall, and
the Oracle's scores), and for each method and budget scores and selects what to keep;
the evictions at one budget are then decoded together as one batch (``decode_batch``).
Every finished (sample, method, budget) is appended to
``results.jsonl`` at once (:mod:`lookaheadkv.records`: a line cut by a kill is repaired or
dropped before the next append), so a killed run resumes where it stopped and recomputes
nothing finished; rows that failed are retried on a rerun (``keep_errors`` keeps them).

A run spreads over processes or machines by sharding: ``Runner(..., shard=(i, n))`` takes the
samples whose index is ``i`` modulo ``n`` and appends to ``shards/results-i-of-n.jsonl`` (resumable
as above); :func:`merge_shards` combines every shard's records (and any in ``results.jsonl``) into
``results.jsonl`` in a single run's order, so the report is the same as a single run's.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..engine.attention import check_eviction_window
from ..engine.cache import crop, gather
from ..engine.decode import decode, decode_batch
from ..engine.evict import parse_budget
from ..engine.generate import eos_ids
from ..policies import SharedPrefill, make_policy, split_method
from ..records import append_record, read_records, repair
from ..scoring import attention_recall, ground_truth
from ..tasks import Sample
from .metrics import exact_match, score_sample, token_f1

RESULTS = "results.jsonl"
SHARDS = "shards"
FULL = "full"


@dataclass
class EvalConfig:
    """What to run: methods (registry names) x budgets over a list of samples."""

    methods: list[str]  # registry names or specs with options ("lookahead:kernel=7", policies.split_method)
    budgets: list[int | float]
    method_options: dict[str, dict] = field(default_factory=dict)  # e.g. {"lookahead": {"modules": PATH}}
    batch_decode: bool = True  # decode each budget's evictions as one batch (engine.decode.decode_batch)

    def __post_init__(self):
        for method in self.methods:
            split_method(method)  # an unknown name or option: a one-line ValueError
        if not self.budgets:
            raise ValueError("budgets is empty: give at least one budget")
        try:  # entries (int) or ratios of the prompt (float), as generate reads them
            self.budgets = [parse_budget(b) for b in self.budgets]
        except ValueError as err:
            raise ValueError(f"bad budgets {self.budgets}: {err}") from None

    def runs(self) -> list[tuple[str, int]]:
        """(method, budget) pairs; the full cache once, with budget 0."""
        pairs = [(FULL, 0)]
        for method in self.methods:
            if method != FULL:
                pairs += [(method, b) for b in self.budgets]
        return pairs


def read_results(path: Path) -> list[dict]:
    """Every complete row of a results file (a line cut by a kill is skipped and reported)."""
    return read_records(path)


def latest_results(rows: list[dict]) -> list[dict]:
    """One row per (sample, method, budget): the last successful one, else the last error row.

    A rerun retries error rows and appends the new row after the old one; readers take this view.
    """
    best: dict[tuple, dict] = {}
    for r in rows:
        key = (r["sample_id"], r["method"], r["budget"])
        if key not in best or "error" not in r or "error" in best[key]:
            best[key] = r
    return list(best.values())


def shard_path(out: str | Path, index: int, count: int) -> Path:
    """Where shard ``index`` of ``count`` appends its records."""
    return Path(out) / SHARDS / f"results-{index}-of-{count}.jsonl"


def shard_from_text(text: str) -> tuple[int, int]:
    """``"i/n"`` (as every ``--shard`` option writes it) -> ``(i, n)``, or a one-line ``ValueError``."""
    try:
        index, count = (int(x) for x in text.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ValueError(f"--shard takes i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return index, count


def check_shard(shard: tuple[int, int] | None) -> tuple[int, int] | None:
    if shard is None:
        return None
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and 0 <= index < count):
        raise ValueError(f"shard must be (i, n) with 0 <= i < n, got {shard!r}: e.g. --shard 0/4 ... --shard 3/4")
    return shard


def merge_shards(out: str | Path, samples: list[Sample], config: EvalConfig) -> tuple[int, int]:
    """Combine ``results.jsonl`` and every shard's records into ``results.jsonl``; returns (records present, records expected).

    One row per (sample, method, budget) (:func:`latest_results`), ordered by sample, then
    method and budget as :meth:`EvalConfig.runs` lists them; rows of other samples or runs are
    kept after them. The file is replaced in one step (a concurrent reader sees the old or the
    new file), so shards finishing at once may both merge. Shard files are left in place.
    """
    out = Path(out)
    rows = read_results(out / RESULTS)
    for path in sorted((out / SHARDS).glob("results-*-of-*.jsonl")):
        repair(path)
        rows += read_results(path)
    latest = {(r["sample_id"], r["method"], r["budget"]): r for r in latest_results(rows)}
    order = [(s.id, m, b) for s in samples for m, b in config.runs()]
    merged = [latest.pop(key) for key in order if key in latest]
    present = len(merged)
    merged += list(latest.values())
    tmp = out / f".{RESULTS}.{os.getpid()}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in merged), encoding="utf-8")
    os.replace(tmp, out / RESULTS)
    return present, len(order)


class Runner:
    """Evaluate ``config`` on ``samples`` with ``model``, writing into ``out``.

    A rerun skips every (sample, method, budget) already in ``results.jsonl`` except error rows,
    which are retried (the new row is appended after the old one) unless ``keep_errors``.
    With ``shard=(i, n)`` only the samples whose index is ``i`` modulo ``n`` run, and their
    records go to :func:`shard_path` (a killed shard resumes from it); :func:`merge_shards`
    combines the shards.
    """

    def __init__(self, model, tokenizer, config: EvalConfig, out: str | Path, keep_errors: bool = False, shard: tuple[int, int] | None = None):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.keep_errors = keep_errors
        self.shard = check_shard(shard)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / RESULTS if self.shard is None else shard_path(self.out, *self.shard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.eos = eos_ids(model, tokenizer)
        self.policies: dict[str, object] = {}

    def policy(self, method: str):
        """The method's policy, built once per run (at the first budget; other budgets are copies made by SharedPrefill)."""
        if method not in self.policies:
            self.policies[method] = make_policy(method, budget=self.config.budgets[0], **self.config.method_options.get(split_method(method)[0], {}))
        return self.policies[method]

    def run(self, samples: list[Sample], on_sample: Callable[[int, int], None] | None = None) -> list[dict]:
        repair(self.path)  # a line cut by a kill: repaired or dropped (one warning), before anything is read or appended
        rows = read_results(self.path)
        if self.shard is not None:  # what a single run (or an earlier merge) already holds counts as done too
            rows = read_results(self.out / RESULTS) + rows
        done = {(r["sample_id"], r["method"], r["budget"]): r for r in latest_results(rows)}
        if not self.keep_errors:  # retried below
            done = {key: r for key, r in done.items() if "error" not in r}
        if self.shard is not None:
            index, count = self.shard
            samples = [s for i, s in enumerate(samples) if i % count == index]
        for i, sample in enumerate(samples):
            todo = [(m, b) for m, b in self.config.runs() if (sample.id, m, b) not in done]
            if todo:
                for row in self.run_sample(sample, todo, done.get((sample.id, FULL, 0))):
                    done[(sample.id, row["method"], row["budget"])] = row
            if on_sample:
                on_sample(i + 1, len(samples))
        return [done[(s.id, m, b)] for s in samples for m, b in self.config.runs() if (s.id, m, b) in done]

    @torch.no_grad()
    def run_sample(self, sample: Sample, todo: list[tuple[str, int]], full_row: dict | None):
        model = self.model
        methods = sorted({m for m, _ in todo if m != FULL})
        shared = SharedPrefill(model, torch.tensor([sample.prompt_ids]), {m: self.policy(m) for m in methods})
        state = shared.state
        if full_row is None:
            start = time.perf_counter()
            tokens = decode(model, state.cache, state.logits, state.length, sample.max_new_tokens, eos_token_ids=self.eos)
            crop(state.cache, state.length)
            full_row = self.row(sample, FULL, 0, tokens, None, None, time.perf_counter() - start)
            full_row["tokens"] = tokens
            self.append(full_row)
            yield full_row
        answer = [t for t in full_row["tokens"] if t not in self.eos] or full_row["tokens"][:1]
        reference = full_row["prediction"]
        truth = ground_truth(model, state, answer)  # (layers, heads, L): recall, and the Oracle's scores
        shared.set_truth(truth)
        pending = []  # (method, budget, kept, scoring seconds), decoded below in groups
        for method, budget in todo:
            if method == FULL:
                continue
            start = time.perf_counter()
            try:
                check_eviction_window(model, state.length + sample.max_new_tokens - 1)
                kept = shared.kept(method, budget)
                pending.append((method, budget, kept, time.perf_counter() - start))
            except Exception as err:  # a failing method must not stop the run
                yield self.failed(sample, method, budget, err)
        # Greedy decoding of every eviction of this prompt, one batch per budget (decode_batch:
        # the weights are read once per step for all of them; PyramidKV's per-layer sizes are
        # padded and masked); a row's seconds are its scoring time plus its share of its batch's
        # decoding time. Rows that kept everything (budget >= prompt) share the full cache.
        groups: dict[object, list] = {}
        for item in pending:
            groups.setdefault(item[1] if item[2] is not None else "full", []).append(item)
        for items in groups.values():
            start = time.perf_counter()
            try:
                caches = [state.cache if kept is None else gather(state.cache, kept) for _, _, kept, _ in items]
                if self.config.batch_decode and len(items) > 1:
                    outputs = decode_batch(model, caches, state.logits, state.length, sample.max_new_tokens, eos_token_ids=self.eos)
                else:
                    outputs = []
                    for cache in caches:
                        outputs.append(decode(model, cache, state.logits, state.length, sample.max_new_tokens, eos_token_ids=self.eos))
                        if cache is state.cache:
                            crop(state.cache, state.length)
                del caches
            except Exception as err:
                for method, budget, _, _ in items:
                    yield self.failed(sample, method, budget, err)
                continue
            share = (time.perf_counter() - start) / len(items)
            for (method, budget, kept, seconds), tokens in zip(items, outputs):
                row = self.row(sample, method, budget, tokens, kept, truth, seconds + share, reference)
                if split_method(method)[0] == "speckv":  # None: self-draft (the target's own answer, an upper bound)
                    row["draft"] = self.policies[method].draft_name
                self.append(row)
                yield row

    def failed(self, sample: Sample, method: str, budget: int, err: Exception) -> dict:
        row = {**self.base(sample, method, budget), "error": f"{type(err).__name__}: {err}", "trace": traceback.format_exc(limit=3)}
        self.append(row)
        return row

    def base(self, sample: Sample, method: str, budget: int) -> dict:
        return {"sample_id": sample.id, "task": sample.task, "group": sample.group, "length": sample.target_tokens, "n_tokens": sample.n_tokens, "method": method, "budget": budget}

    def row(self, sample, method, budget, tokens, kept, truth, seconds, reference=None) -> dict:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        row = {**self.base(sample, method, budget), "prediction": text, **score_sample(sample, text), "seconds": round(seconds, 3)}
        if reference is not None:
            row["fidelity_f1"] = token_f1(text, reference)
            row["fidelity_em"] = exact_match(text, reference)
        if truth is not None:
            row["recall"] = attention_recall(list(truth), kept) if kept is not None else 1.0
        return row

    def append(self, row: dict) -> None:
        append_record(self.path, row)  # repairs a line cut by an earlier kill first

