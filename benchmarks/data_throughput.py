"""Samples per hour of the training data build and of training, before and after bf16 + batching, in one run.

"Before" is how the shipped modules' data were built and trained: a float32 model, one prompt
at a time. "After" is a bfloat16 model (AVX-512 BF16 on these CPUs), each prompt prefilled alone and the
responses decoded in batches of prompts of similar length (ragged caches, padding masked); labels are computed in float32 arithmetic in
both. The same prompts (the training mixture's sources, 1K-4K tokens, answers up to 256 tokens)
go through both, in that order, in one process, with nothing else running.

It also says what bf16 changes in the data: how many greedy answers are the same token for
token, and the labels' total-variation distance to the float32 ones on the answers both share.

Usage::

    python benchmarks/data_throughput.py --prompts 16 --batch-size 16 --out docs/results/data-throughput.json
    python benchmarks/data_throughput.py --tiny     # the CPU check of the script itself (seconds)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lookaheadkv.bench.common import command_line, environment, markdown_table, write_json
from lookaheadkv.engine.generate import eos_ids
from lookaheadkv.models import load_model, tiny_model
from lookaheadkv.training import sources
from lookaheadkv.training.data import PromptRecord, TargetDataset, build
from lookaheadkv.training.train import sample_loss
from lookaheadkv.lookahead import LookaheadModules

MIX = ("essays", "synthetic", "fewshot", "code", "docs", "retrieval", "chat")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=16, help="prompts built by each configuration")
    p.add_argument("--lengths", default="1024,4096")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--train-samples", type=int, default=8, help="samples of one training pass timed per dtype")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=7, help="mixture seed (not the training build's 0)")
    p.add_argument("--tiny", action="store_true", help="a tiny random model and short prompts: checks the script, times nothing real")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


def records_for(tokenizer, n: int, lengths: tuple[int, int], seed: int, max_tokens: int) -> list[PromptRecord]:
    per = -(-n // len(MIX))
    prompts = sources.mixture(tokenizer, {s: per for s in MIX}, lengths, seed)[:n]
    return [PromptRecord(p.id, p.source, sources.render(p, tokenizer, max_tokens)) for p in prompts]


def timed_build(model, records, folder: Path, args, batch_size: int, eos) -> float:
    start = time.perf_counter()
    build(model, records, folder, max_new_tokens=args.max_new_tokens, eos_token_ids=eos, model_name="throughput", batch_size=batch_size)
    return time.perf_counter() - start


def timed_training(model, items: list[dict]) -> float:
    """Seconds for one sample_loss + backward per item (the work of a training step, per sample)."""
    modules = LookaheadModules.for_model(model, seed=0)
    sample_loss(model, modules, items[0]).backward()  # warm-up
    start = time.perf_counter()
    for item in items:
        sample_loss(model, modules, item).backward()
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    lengths = tuple(int(x) for x in args.lengths.split(","))
    if args.tiny:
        _, tokenizer = load_model()
        fp32 = tiny_model("llama", seed=0, vocab_size=len(tokenizer))
        lengths, args.max_new_tokens, args.prompts, args.train_samples = (400, 512), 8, 4, 2
        name = "tiny-llama"
    else:
        fp32, tokenizer = load_model()
        name = "bundled:smollm2-135m-instruct"
    bf16 = load_model(dtype="bfloat16")[0] if not args.tiny else tiny_model("llama", seed=0, vocab_size=len(tokenizer)).to(torch.bfloat16)
    eos = eos_ids(fp32, tokenizer)
    records = records_for(tokenizer, args.prompts, lengths, args.seed, max(lengths))
    tokens = [len(r.token_ids) for r in records]
    print(f"{len(records)} prompts, {min(tokens)}-{max(tokens)} tokens (mean {statistics.mean(tokens):.0f})", file=sys.stderr)

    with tempfile.TemporaryDirectory() as tmp:
        before_s = timed_build(fp32, records, Path(tmp) / "before", args, 1, eos)
        after_s = timed_build(bf16, records, Path(tmp) / "after", args, args.batch_size, eos)
        a, b = TargetDataset(Path(tmp) / "before"), TargetDataset(Path(tmp) / "after")
        same, tvs, answer_tokens = 0, [], []
        for i in range(len(a)):
            ra, rb = a[i]["response_ids"].tolist(), b[i]["response_ids"].tolist()
            answer_tokens.append(len(ra))
            same += ra == rb
            if ra == rb:
                tvs.append(float(0.5 * (a[i]["labels"] - b[i]["labels"]).abs().sum(-1).mean()))
        items = [b[i] for i in range(min(args.train_samples, len(b)))]
        train_before = timed_training(fp32, items)
        train_after = timed_training(bf16, items)

    n = len(records)
    rows = [
        ["data build", f"float32, one prompt at a time", f"{3600 * n / before_s:.0f}", f"bfloat16, batches of {args.batch_size}", f"{3600 * n / after_s:.0f}", f"{before_s / after_s:.1f}x"],
        ["training (loss + backward per sample)", "float32", f"{3600 * len(items) / train_before:.0f}", "bfloat16 base model", f"{3600 * len(items) / train_after:.0f}", f"{train_before / train_after:.1f}x"],
    ]
    table = markdown_table(["work", "before", "samples/h", "after", "samples/h", "speed-up"], rows)
    agree = f"bf16 answers equal to float32's: {same}/{n}; labels' mean total variation on those: {statistics.mean(tvs) if tvs else float('nan'):.4f}"
    print(table)
    print(agree)
    write_json(args.out, {
        "command": command_line(),
        "environment": environment(name, fp32),
        "prompts": n, "prompt_tokens": tokens, "answer_tokens_fp32": answer_tokens,
        "data_build_seconds": {"before": before_s, "after": after_s},
        "training_seconds": {"before": train_before, "after": train_after, "samples": len(items)},
        "same_answers": same, "label_tv_mean": statistics.mean(tvs) if tvs else None,
        "table": table, "agreement": agree,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
