"""Eviction cost on a GPU at the paper's scale, with random weights in Llama-3.1-8B's and Llama-3.2-1B's shapes.

Nothing is downloaded. Each model is built from a ``LlamaConfig`` with the real model's
shape, directly on the GPU, in bf16 with sdpa attention and small random normal weights
(std 0.02: garbage for quality, exact for timing). For each model and prompt length
(8K, 16K, 32K random tokens), with budget 128:

- methods: plain prefill, SnapKV, LookaheadKV (random modules, same cost as trained ones;
  its tokens in the prefill, and as a separate forward over the cache, "lookahead_separate"),
  LAQ (32 self-drafted tokens), SpecKV (the 1B-shaped model drafts 32 tokens for the
  8B-shaped target; the 1B-shaped target drafts for itself);
- time to first token (prefill + scoring + top-k + eviction + first token) timed with
  synchronised CUDA events, median over repetitions run in rotating order; the added
  time over the plain prefill is the median of per-repetition differences;
- peak memory: ``torch.cuda.max_memory_allocated`` during one run, above what was
  allocated before it (the weights);
- a markdown table with the date and the GPU's name, and ``results.json``.

A length that runs out of GPU memory is reported as OOM and the script goes on.
``--tiny`` runs the same code on the CPU with tiny shapes at 256 and 512 tokens, in fp32
(this is what the tests run). Usage::

    python benchmarks/gpu_cost.py --out runs/gpu-cost                 # on a GPU, about 2-4 min on an H100/H200
    python benchmarks/gpu_cost.py --models 8b --lengths 8192,32768 --reps 5
    python benchmarks/gpu_cost.py --tiny
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import platform
import sys
from pathlib import Path

import torch

from lookaheadkv.bench.common import PLAIN, Clock, command_line, first_token, make_method, markdown_table, median, paired_runs, parse_ints
from lookaheadkv.policies import SpecKV

ROPE = {"rope_type": "default", "rope_theta": 500000.0}
SHAPES = {
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               intermediate_size=14336, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
               intermediate_size=8192, vocab_size=128256, max_position_embeddings=131072, tie_word_embeddings=True),
}
TINY_SHAPES = {
    "8b": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
               intermediate_size=256, vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=False),
    "1b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
               intermediate_size=128, vocab_size=512, max_position_embeddings=4096, tie_word_embeddings=True),
}
NAMES = {"8b": "Llama-3.1-8B", "1b": "Llama-3.2-1B"}
DRAFT_FOR = {"8b": "1b"}  # SpecKV's draft model for each target; others draft for themselves
METHODS = (PLAIN, "snapkv", "lookahead", "lookahead_separate", "laq", "speckv")
PAPER = ("paper, Llama-3.1-8B, added TTFT: 8K: LookaheadKV 11 ms, SnapKV 20 ms, LAQ 509 ms, SpecKV 121 ms; "
         "32K: LookaheadKV 38 ms, LAQ 554 ms, SpecKV 503 ms")


def build_model(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random LlamaForCausalLM of ``shape``, created directly on ``device`` (no CPU copy of the weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**shape, rope_parameters=dict(ROPE), initializer_range=0.02)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = None  # random weights: no draft may stop early
    return model


def random_modules(model):
    """Random lookahead modules for ``model`` on its device.

    ``LookaheadModules.for_model`` mixes CPU random numbers with statistics of the
    embedding table on the model's device, which fails on a GPU; so the embedding table
    visits the CPU while the modules are drawn (tied output weights follow it there and back).
    """
    from lookaheadkv.lookahead import LookaheadModules

    device = model.device
    embedding = model.get_input_embeddings().to("cpu")
    try:
        modules = LookaheadModules.for_model(model)
    finally:
        embedding.to(device)
    return modules.to(device)


def policies(key: str, model, models: dict, budget: int) -> dict:
    """Name -> policy for every method but the plain prefill."""
    from lookaheadkv.policies import LookaheadKV

    out = {name: make_method(name, model, budget) for name in ("snapkv", "laq")}
    out["lookahead"] = LookaheadKV(budget=budget, modules=random_modules(model))  # tokens in the prefill (the paper's way)
    out["lookahead_separate"] = LookaheadKV(budget=budget, modules=out["lookahead"].modules, fused=False)  # a second forward
    out["speckv"] = SpecKV(budget=budget, draft=models.get(DRAFT_FOR.get(key)))
    return {name: out[name] for name in METHODS if name in out}


def peak_memory(model, input_ids: torch.Tensor, policy, clock: Clock) -> float | None:
    """GiB allocated at the peak of one run above what was allocated before it; None on the CPU."""
    if not clock.cuda:
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    first_token(model, input_ids, policy, clock)
    return (torch.cuda.max_memory_allocated() - before) / 2**30


def random_prompt(model, length: int) -> torch.Tensor:
    """(1, length) random token ids on the model's device, the same for every method."""
    g = torch.Generator().manual_seed(length)
    return torch.randint(0, model.config.vocab_size, (1, length), generator=g).to(model.device)


def measure_length(model, methods: dict, length: int, reps: int, clock: Clock) -> list[dict]:
    """Rows for every method at one prompt length."""
    input_ids = random_prompt(model, length)
    runs = paired_runs(model, input_ids, methods, reps, clock)
    plain = runs[PLAIN]
    rows = []
    for name, policy in methods.items():
        timings = runs[name]
        rows.append({
            "method": name,
            "length": length,
            "ttft_ms": 1000 * median([t.total for t in timings]),
            "prefill_ms": 1000 * median([t.prefill for t in timings]),
            "post_ms": 1000 * median([t.post for t in timings]),
            "added_ms": 1000 * median([t.total - p.total for t, p in zip(timings, plain)]),
            "peak_gib": peak_memory(model, input_ids, policy, clock),
        })
    return rows


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()} {platform.processor()})".strip()


def fmt(value: float | None, digits: int = 1) -> str | None:
    return None if value is None else f"{value:.{digits}f}"


def report(results: dict) -> str:
    """The markdown report: setup, one table, the LAQ / LookaheadKV ratios."""
    table_rows, ratio_lines = [], []
    for entry in results["runs"]:
        if "error" in entry:
            table_rows.append([entry["model"], entry["length"], entry["error"], None, None, None, None, None])
            continue
        by = {r["method"]: r for r in entry["rows"]}
        for r in entry["rows"]:
            added = None if r["method"] == PLAIN else fmt(r["added_ms"])
            table_rows.append([entry["model"], r["length"], r["method"], fmt(r["ttft_ms"]), fmt(r["prefill_ms"]), added, fmt(r["post_ms"]), fmt(r["peak_gib"], 2)])
        if "laq" in by and "lookahead" in by and by["lookahead"]["added_ms"] > 0:
            ratio_lines.append(f"- {entry['model']}, {entry['length']} tokens: {by['laq']['added_ms'] / by['lookahead']['added_ms']:.1f}x")
    env = results["environment"]
    lines = [
        f"# Eviction cost on {env['device']}, random weights (budget {results['budget']})",
        "",
        f"`{env['command']}`",
        "",
        f"{env['date']} | torch {env['torch']} | {env['dtype']} | sdpa | medians of {results['reps']} repetitions in rotating order | "
        f"SpecKV drafts: {', '.join(f'{t} <- {d}' for t, d in results['speckv_drafts'].items())}",
        "",
        markdown_table(["model", "tokens", "method", "TTFT ms", "prefill ms", "added ms", "after-prefill ms", "peak GiB"], table_rows, labels=3),
        "",
        "added: TTFT minus the plain prefill's in the same repetition. after-prefill: scoring, top-k, eviction and "
        "first token (SnapKV's scoring runs inside the prefill). peak GiB: above the memory allocated before the run.",
    ]
    if ratio_lines:
        lines += ["", "LAQ added / LookaheadKV added:", *ratio_lines]
    lines += ["", f"Reference ({PAPER})."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    """Build the models, measure, print the table and write ``--out``; returns the results."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes on the CPU at 256 and 512 tokens (a test of the code path)")
    parser.add_argument("--models", default="8b,1b", help="targets, comma-separated: 8b, 1b")
    parser.add_argument("--lengths", type=parse_ints, default=None, help="prompt tokens (default 8192,16384,32768; --tiny: 256,512)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions per length")
    parser.add_argument("--budget", type=int, default=128, help="KV entries kept per head and layer")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json and table.md")
    args = parser.parse_args(argv)
    targets = [t for t in args.models.split(",") if t]
    if not targets or set(targets) - set(SHAPES):
        parser.error(f"--models takes a comma-separated subset of {', '.join(SHAPES)}, got {args.models!r}")
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device; run with --tiny to exercise the code on the CPU")
    device = torch.device("cpu" if args.tiny else "cuda")
    shapes = TINY_SHAPES if args.tiny else SHAPES
    lengths = args.lengths or ([256, 512] if args.tiny else [8192, 16384, 32768])
    dtype = torch.float32 if args.tiny else torch.bfloat16  # CPU bf16 matmuls at tiny shapes are ~10x slower than fp32
    clock = Clock(device)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731

    needed = sorted(set(targets) | {DRAFT_FOR[t] for t in targets if t in DRAFT_FOR}, key=list(SHAPES).index)[::-1]
    models = {}
    for key in needed:  # drafts first: the smaller model is built before the larger target
        log(f"building {NAMES[key]}-shaped model on {device}")
        models[key] = build_model(shapes[key], device, dtype)
    runs = []
    for key in targets:
        model = models[key]
        methods = {PLAIN: None} | policies(key, model, models, args.budget)
        log(f"{NAMES[key]}: warm-up at {min(lengths)} tokens")
        try:
            paired_runs(model, random_prompt(model, min(lengths)), methods, 1, clock)
        except torch.OutOfMemoryError:
            pass  # reported per length below
        for length in lengths:
            log(f"{NAMES[key]}: {length} tokens, {args.reps} repetitions")
            try:
                runs.append({"model": NAMES[key], "length": length, "rows": measure_length(model, methods, length, args.reps, clock)})
            except torch.OutOfMemoryError:
                runs.append({"model": NAMES[key], "length": length, "error": "OOM"})
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results = {
        "environment": {
            "device": device_name(device),
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."),
            "command": command_line(),
            "shapes": {NAMES[k]: shapes[k] for k in models},
        },
        "budget": args.budget,
        "reps": args.reps,
        "speckv_drafts": {NAMES[t]: NAMES[DRAFT_FOR[t]] if t in DRAFT_FOR else "self" for t in targets},
        "runs": runs,
    }
    text = report(results)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (args.out / "table.md").write_text(text)
    return results


if __name__ == "__main__":
    main()
