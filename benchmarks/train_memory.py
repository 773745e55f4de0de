"""Peak memory of one training step against the prompt length: linear, never L x L.

One step is what :func:`lookaheadkv.training.train.sample_loss` does for one sample, plus the
backward and the optimizer step: a no-grad prefill of the prompt (the frozen model), the n
lookahead tokens with grad over its cache (their attention rows n x L, per layer), the KL loss
to (layers x heads x L) labels, ``backward()`` and ``Adam.step()``.

Every length runs in its own FRESH Python process (a process's peak RSS only grows), which
prints its own peak (``VmHWM``; ``ru_maxrss`` where there is no /proc). Each is reported above a baseline process that only
loads the model and runs an 8-token forward (that pages memory-mapped weights in and sets up
the kernels). Loading briefly needs more memory than holding the model, so where Linux allows
it each child resets its peak after that warm-up (``/proc/self/clear_refs``); otherwise the
load's transient could hide the step's peak at short prompts.

Linear growth shows as a flat "MiB per 1K tokens" column (increment between consecutive
lengths); materialising an L x L matrix anywhere would double that increment at every
doubling of L.

Usage::

    python benchmarks/train_memory.py                                   # SmolLM2-135M, 512..4096
    python benchmarks/train_memory.py --model tiny --lengths 512,1024 --out /tmp/mem.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from lookaheadkv.bench.memory import peak_mib, reset_peak

WARMUP_TOKENS = 8
LINEAR_TOLERANCE = 1.5  # last/first increment ratio accepted as linear (quadratic: ~2 per doubling)


# ----------------------------------------------------------------------------- child side


def load(model_name: str):
    if model_name == "smollm2":
        from lookaheadkv.models import load_model

        model, _ = load_model()
        return model
    from lookaheadkv.models import tiny_model

    return tiny_model("llama", max_position_embeddings=32768)


def child(args) -> dict:
    """One measurement in this (fresh) process: a training step at ``args.length`` tokens (0 = baseline)."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from lookaheadkv.engine.prefill import prefill
    from lookaheadkv.lookahead import LookaheadModules
    from lookaheadkv.training.train import sample_loss

    model = load(args.model)
    prefill(model, torch.randint(3, model.config.vocab_size, (1, WARMUP_TOKENS)))
    reset = reset_peak()
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv_bytes = c.num_hidden_layers * 2 * c.num_key_value_heads * head_dim * model.dtype.itemsize
    result = {"length": args.length, "reset": reset, "kv_cache_per_1k_mib": kv_bytes * 1024 / 2**20}
    if args.length > 0:
        config = model.config
        heads = config.num_attention_heads
        ids = torch.randint(3, config.vocab_size, (args.length,))
        labels = torch.rand(config.num_hidden_layers, heads, args.length)
        item = {"prompt_ids": ids, "labels": labels / labels.sum(-1, keepdim=True)}
        modules = LookaheadModules.for_model(model, seed=0, n_lookahead=args.n_lookahead, rank=args.rank)
        optimizer = torch.optim.Adam(modules.parameters(), lr=1e-3)
        start = time.perf_counter()
        loss = sample_loss(model, modules, item)
        loss.backward()
        optimizer.step()
        result.update(loss=loss.item(), seconds=time.perf_counter() - start)
    result["maxrss_mib"] = peak_mib()
    return result


# ----------------------------------------------------------------------------- parent side


def run_child(args, length: int) -> dict:
    command = [
        sys.executable, str(Path(__file__).resolve()), "--child", "--model", args.model, "--length", str(length),
        "--n-lookahead", str(args.n_lookahead), "--rank", str(args.rank), "--threads", str(args.threads),
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    src = Path(__file__).resolve().parents[1] / "src"  # this checkout's lookaheadkv
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the run at {length} tokens failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def increments(rows: list[dict]) -> None:
    """Add ``per_1k_mib``: MiB per 1K tokens from the previous length (from 0 tokens for the first)."""
    prev_len, prev_mib = 0, 0.0
    for row in rows:
        row["per_1k_mib"] = (row["above_baseline_mib"] - prev_mib) * 1024 / (row["length"] - prev_len)
        prev_len, prev_mib = row["length"], row["above_baseline_mib"]


def verdict(rows: list[dict]) -> tuple[float | None, str]:
    """Ratio of the last increment per 1K tokens to the first one between measured lengths."""
    steps = [r["per_1k_mib"] for r in rows[1:]]
    if len(steps) < 2:
        if len(rows) == 2:
            first = rows[0]["above_baseline_mib"] * 1024 / rows[0]["length"]
            ratio = steps[0] / first if first > 0 else None
            if ratio is not None:
                kind = "linear" if ratio <= LINEAR_TOLERANCE else "super-linear"
                return ratio, f"{kind}: increment per 1K tokens {steps[0]:.1f} MiB vs {first:.1f} MiB below the first length (ratio {ratio:.2f}; few lengths, rough)"
        return None, "too few lengths to judge growth (give at least 3)"
    if steps[0] <= 0:
        return None, f"the first increment is {steps[0]:.1f} MiB: below measurement noise, use longer prompts"
    ratio = steps[-1] / steps[0]
    kind = "linear" if ratio <= LINEAR_TOLERANCE else "super-linear (an L x L term?)"
    return ratio, f"{kind}: last / first increment per 1K tokens = {ratio:.2f} (1 = linear; quadratic doubles it at each doubling of L)"


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--lengths", default="512,1024,2048,4096", help="prompt tokens, comma-separated")
    parser.add_argument("--n-lookahead", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads in each process")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per child process")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--length", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)), flush=True)
        return None

    command = shlex.join([Path(sys.executable).name, *sys.argv]) if argv is None else shlex.join(["train_memory.py", *argv])
    print(f"$ {command}", flush=True)
    lengths = sorted({int(x) for x in args.lengths.split(",") if x.strip()})
    if not lengths or lengths[0] <= 0:
        parser.error("--lengths must be positive integers")

    baseline = run_child(args, 0)
    print(f"baseline (model loaded, {WARMUP_TOKENS}-token forward): {baseline['maxrss_mib']:.1f} MiB peak RSS", flush=True)
    if not baseline["reset"]:
        print("warning: could not reset peak RSS after loading; the load transient may hide small peaks", flush=True)
    rows = []
    for length in lengths:
        r = run_child(args, length)
        rows.append({"length": length, "maxrss_mib": r["maxrss_mib"], "above_baseline_mib": r["maxrss_mib"] - baseline["maxrss_mib"], "seconds": r["seconds"], "loss": r["loss"], "reset": r["reset"]})
        print(f"  {length:>6} tokens: {r['maxrss_mib']:.1f} MiB peak ({r['seconds']:.1f} s step)", flush=True)
    increments(rows)
    ratio, judgement = verdict(rows)
    kv = baseline["kv_cache_per_1k_mib"]

    print()
    print(f"Peak memory of one training step on {args.model} (n_lookahead {args.n_lookahead}, LoRA rank {args.rank}, {args.threads} thread(s))")
    print()
    print("| prompt tokens | peak RSS MiB | above baseline MiB | MiB per 1K tokens (vs previous) | step s |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['length']} | {r['maxrss_mib']:.1f} | {r['above_baseline_mib']:.1f} | {r['per_1k_mib']:.1f} | {r['seconds']:.2f} |")
    print()
    print(f"baseline {baseline['maxrss_mib']:.1f} MiB; the prompt's KV cache alone is {kv:.1f} MiB per 1K tokens")
    print(f"growth: {judgement}")

    results = {
        "command": command,
        "model": args.model,
        "n_lookahead": args.n_lookahead,
        "lora_rank": args.rank,
        "threads": args.threads,
        "baseline_mib": baseline["maxrss_mib"],
        "kv_cache_per_1k_mib": kv,
        "rows": rows,
        "increment_ratio": ratio,
        "verdict": judgement,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
