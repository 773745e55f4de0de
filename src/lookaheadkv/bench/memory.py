"""Peak resident memory of one run, each measured in a fresh process.

A process's peak RSS only ever grows, so every measurement gets its own interpreter::

    python -m lookaheadkv.bench.memory --model smollm2 --method snapkv --length 4096

loads the model, runs a 64-token forward (this pages the memory-mapped weights in and
initialises the kernels, so they are not counted as the method's memory), runs the method
once on those 64 tokens (its own one-time allocations: kernel workspaces and caches for the
shapes it uses, which a server pays once, not per request), then once on the prompt to its
first token (:func:`~lookaheadkv.bench.common.first_token`) and prints one JSON line
``{"peak_mib": ...}``. ``--method baseline`` stops after the 64-token forward: the process
that only holds the model, which every other peak is reported above.

The peak is the process's own high-water mark, ``VmHWM`` in ``/proc/self/status``
(``ru_maxrss`` where there is no ``/proc``). On Linux, ``ru_maxrss`` is not usable here: a
child's ``ru_maxrss`` also holds the parent's RSS at the moment it was started (``execve``
folds the replaced memory map's high-water mark into it), so a worker started by a
benchmark that holds a model would report the benchmark's size.

Loading a model briefly needs more memory than holding it. Where Linux allows it, the peak
is reset after the warm-up (``/proc/self/clear_refs``), so that transient cannot
hide a run's smaller peak; the JSON line says whether it was (``"reset"``).

Each process runs with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at 128 KiB: every tensor
buffer is then its own mapping, returned to the system when freed, so the peak follows the
live tensors. With glibc's adaptive default, how much freed memory the heap retains varies
from process to process (about +-30 MiB on SmolLM2 at 2K tokens, against +-3 MiB fixed).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .common import budget_arg

BASELINE = "baseline"
WARMUP_TOKENS = 64
MMAP_THRESHOLD = 128 * 1024  # bytes; see the module docstring


def peak_mib() -> float:
    """This process's own peak resident set size so far, in MiB (see the module docstring)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB elsewhere


def reset_peak() -> bool:
    """Lower this process's peak RSS to its current RSS (Linux ``clear_refs``); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure_here(model_name: str, method: str, length: int, budget: int) -> dict:
    """Run one measurement in this process (it must be fresh): ``{"peak_mib": ..., "reset": ...}``."""
    from ..engine.prefill import prefill
    from .common import Clock, bench_model, first_token, make_method, prompt_ids

    model, tokenizer = bench_model(model_name)
    input_ids = prompt_ids(model, tokenizer, length)
    policy = make_method(method, model, budget) if method != BASELINE else None
    prefill(model, input_ids[:, :WARMUP_TOKENS])
    if policy is not None:  # the method's one-time allocations, on a prompt short enough to keep whole
        first_token(model, input_ids[:, :WARMUP_TOKENS], policy, Clock())
    reset = reset_peak()
    if method != BASELINE:
        first_token(model, input_ids, policy, Clock())
    return {"peak_mib": peak_mib(), "reset": reset}


def peak_rss(model_name: str, method: str, length: int, budget: int, threads: int | None = None) -> float:
    """Peak RSS (MiB) of one run of ``method`` at ``length`` tokens, in a fresh Python process."""
    command = [sys.executable, "-m", __name__, "--model", model_name, "--method", method, "--length", str(length), "--budget", str(budget)]
    if threads:
        command += ["--threads", str(threads)]
    env = dict(os.environ)
    package_root = str(Path(__file__).resolve().parents[2])  # so the child imports this very copy of lookaheadkv
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit code {done.returncode}"])[-1]
        raise RuntimeError(f"memory run {method} at {length} tokens failed: {last}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["reset"]:
        print("warning: could not reset the peak RSS after loading; the load's transient may hide small peaks", file=sys.stderr)
    return result["peak_mib"]


def peaks_above_baseline(
    model_name: str, runs: list[tuple[str, int]], budget: int, threads: int | None = None, jobs: int = 1
) -> tuple[float, dict[tuple[str, int], float | None]]:
    """``(baseline MiB, {(method, length): MiB above the baseline})``, every number from its own process.

    The baseline process loads the model and the longest prompt and runs the 64-token
    forward. A run that fails (e.g. killed for memory) is reported on stderr and gets None.
    ``jobs`` processes run at once: peak RSS is per process, so this changes no number.
    """
    longest = max(length for _, length in runs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        baseline = pool.submit(peak_rss, model_name, BASELINE, longest, budget, threads)
        futures = {run: pool.submit(peak_rss, model_name, *run, budget, threads) for run in runs}
        base = baseline.result()
        above = {}
        for run, future in futures.items():
            try:
                above[run] = future.result() - base
            except RuntimeError as err:
                print(f"warning: {err}", file=sys.stderr)
                above[run] = None
    return base, above


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 or tiny")
    parser.add_argument("--method", required=True, help="a method name, 'plain', or 'baseline'")
    parser.add_argument("--length", type=int, required=True, help="prompt tokens")
    parser.add_argument("--budget", type=budget_arg, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(json.dumps(measure_here(args.model, args.method, args.length, args.budget)))


if __name__ == "__main__":
    main()
