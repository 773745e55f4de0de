"""Throughput of many prompts at once vs one at a time: tokens/s and peak memory, as ratios from one run.

    python benchmarks/batch_throughput.py --out runs/batch-throughput.json        # 8 prompts of 1K-2K tokens, SmolLM2
    python benchmarks/batch_throughput.py --tiny                                   # the same code at a tiny shape (tests)

For each method (LookaheadKV and SnapKV at budget 128, and the full cache) the same prompts of
different lengths are answered two ways: one at a time (``generate_ids`` per prompt) and batched
(``generate_batch_ids``: each prompt prefilled, scored and evicted alone, then every answer decoded
together, one forward per step for the whole batch). Every prompt gets exactly ``--new-tokens``
tokens (no end-of-sequence stop), so the two ways produce the same number of tokens. Each
(method, way) runs in its own fresh process (peak RSS only grows, see
``lookaheadkv.bench.memory``), after a short warm-up run of the same kind whose allocations are
not counted; a baseline process that only loads the model and warms up gives the memory every
peak is reported above. On a GPU (``--device cuda``) the peak is ``torch.cuda.max_memory_allocated``.

The table: tokens/s end to end (prefill, eviction and decoding of all prompts, the wall time of
the whole way), the batched / one-at-a-time speed-up, peak memory above the baseline both ways.
Timings need a quiet machine: the numbers of a run on a busy one are not results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from lookaheadkv.bench.common import bench_model, environment, make_method, markdown_table, prompt_ids, write_json
from lookaheadkv.bench.memory import MMAP_THRESHOLD, peak_mib, reset_peak
from lookaheadkv.engine.batch import generate_batch_ids
from lookaheadkv.engine.generate import generate_ids

MODES = ("single", "batched")
FULL = "full"


def prompts(model, tokenizer, count: int, low: int, high: int) -> list[torch.Tensor]:
    """``count`` prompts (1, L_i) with lengths spread evenly over [low, high], each from another place in the text."""
    lengths = [low + (high - low) * i // max(1, count - 1) for i in range(count)]
    stride = 97
    text = prompt_ids(model, tokenizer, high + stride * count)
    return [text[:, i * stride : i * stride + n] for i, n in enumerate(lengths)]


def run(model, policy, rows: list[torch.Tensor], mode: str, new_tokens: int) -> int:
    """Answer ``rows`` one way; returns the number of new tokens."""
    if mode == "single":
        return sum(len(generate_ids(model, r, policy, max_new_tokens=new_tokens)[0]) for r in rows)
    return sum(len(t) for t, _, _ in generate_batch_ids(model, [r[0] for r in rows], policy, max_new_tokens=new_tokens))


def worker(args) -> dict:
    """One (method, way) in this fresh process: a warm-up, then the timed run and its peak memory."""
    model, tokenizer = bench_model(args.model)
    if args.device != "cpu":
        model.to(args.device)
    rows = [r.to(model.device) for r in prompts(model, tokenizer, args.prompts, args.low, args.high)]
    method, mode = args.worker
    policy = None if method in (FULL, "baseline") else make_method(method, model, args.budget)
    warm = [r[:, :64] for r in rows[:2]]  # the kernels' one-time allocations, not counted
    run(model, policy, warm, "single" if mode == "baseline" else mode, 2)
    cuda = model.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset = reset_peak()
    if mode == "baseline":
        return {"peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_mib(), "reset": reset}
    start = time.perf_counter()
    tokens = run(model, policy, rows, mode, args.new_tokens)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_mib(), "reset": reset}


def measure(args, method: str, mode: str) -> dict:
    """:func:`worker` in a fresh Python process."""
    command = [sys.executable, __file__, "--worker", method, mode, *args.passthrough]
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))  # freed tensors go back to the system (bench.memory)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{method} {mode} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random model, 8 prompts of 48-96 tokens, 4 new tokens (to test the script)")
    parser.add_argument("--model", default="smollm2", help="smollm2 or tiny")
    parser.add_argument("--methods", default="lookahead,snapkv,full")
    parser.add_argument("--budget", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--lengths", default="1024,2048", help="shortest,longest prompt in tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.model, args.lengths, args.new_tokens, args.budget = "tiny", "48,96", 4, 16
    args.low, args.high = (int(x) for x in args.lengths.split(","))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.passthrough = [
        "--model", args.model, "--budget", str(args.budget), "--prompts", str(args.prompts), "--lengths", args.lengths,
        "--new-tokens", str(args.new_tokens), "--device", args.device, *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip
    if args.worker:
        print(json.dumps(worker(args)))
        return None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    baseline = measure(args, "baseline", "baseline")["peak_mib"]
    results = {m: {mode: measure(args, m, mode) for mode in MODES} for m in methods}
    table = []
    for method, by_mode in results.items():
        speed = {mode: r["tokens"] / r["seconds"] for mode, r in by_mode.items()}
        memory = {mode: r["peak_mib"] - baseline for mode, r in by_mode.items()}
        label = "full cache" if method == FULL else f"{method} @ {args.budget}"
        table.append([label, f"{speed['single']:.1f}", f"{speed['batched']:.1f}", f"{speed['batched'] / speed['single']:.2f}x", f"{memory['single']:.0f}", f"{memory['batched']:.0f}"])
    headers = ["method", "one at a time tok/s", "batched tok/s", "batched / one at a time", "peak MiB one at a time", "peak MiB batched"]
    print(f"{args.prompts} prompts of {args.low}-{args.high} tokens, {args.new_tokens} new tokens each, {args.model} on {args.device}; peak memory above the loaded model ({baseline:.0f} MiB)")
    print(markdown_table(headers, table))
    model, _ = bench_model(args.model)
    out = {"environment": environment(args.model, model), "settings": {k: v for k, v in vars(args).items() if k not in ("passthrough", "worker")}, "baseline_mib": baseline, "results": results, "table": table}
    write_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
