"""What every benchmark shares: models, prompts, methods, one timed run, tables.

A *method* is a policy name from :data:`lookaheadkv.policies.REGISTRY`, or ``"plain"``: a
prefill with no observer and no eviction, the reference every added cost is measured
against. One run of a method is what a server does before it can stream the first token:
prefill (with the method's observer), scoring, top-k selection, the eviction gather, and
the first token from the prefill's logits (:func:`first_token`).

Because a cheap scorer's cost is far below the run-to-run noise of a whole prefill on a
CPU, :func:`added_work` also times a method's own work in isolation: its observer replayed
on attention inputs captured once from a real prefill (:class:`Capture`), then scoring,
selection and eviction. A method whose rows ride in the prefill itself (LookaheadKV's
lookahead tokens, an engine ``Tail``) cannot be replayed that way: its own work is what its
rows add to the prefill's last forward (:class:`LastChunk`), timed against the same forward
without them, plus scoring, selection and eviction.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..engine.cache import from_tensors
from ..engine.generate import compress, run_prefill
from ..engine.prefill import Prefill, forward_rows, prefill

PLAIN = "plain"
#: Every method the benchmarks know, in table order ("oracle" decodes a whole answer first).
METHODS = (PLAIN, "full", "streamingllm", "snapkv", "pyramidkv", "h2o", "tova", "lookahead", "laq", "speckv", "oracle")
MODELS = ("smollm2", "tiny")
TINY_CONTEXT = 32768


def bench_model(name: str):
    """``(model, tokenizer)``: the bundled SmolLM2-135M ("smollm2"), or a tiny random Llama ("tiny", no tokenizer).

    The tiny model never emits end-of-sequence, so every draft (LAQ, SpecKV) runs its full length.
    """
    if name == "smollm2":
        from ..models import load_model

        return load_model(None)
    if name == "tiny":
        from ..models import tiny_model

        model = tiny_model("llama", max_position_embeddings=TINY_CONTEXT)
        model.generation_config.eos_token_id = None
        return model, None
    raise ValueError(f"unknown benchmark model {name!r}; choose from: {', '.join(MODELS)}")


def prompt_ids(model, tokenizer, length: int, seed: int = 0) -> torch.Tensor:
    """(1, length) token ids: the bundled essays' text when there is a tokenizer, else seeded random ids."""
    if tokenizer is None:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(3, model.config.vocab_size, (1, length), generator=g)
    from ..models import load_essays

    text, ids = "", []
    for _, essay in load_essays():
        text += essay + "\n\n"
        if len(text) >= 6 * length:  # English text runs about 4 characters a token
            ids = tokenizer(text, add_special_tokens=False).input_ids
            if len(ids) >= length:
                return torch.tensor([ids[:length]])
    raise ValueError(f"the bundled essays hold {len(ids)} tokens, fewer than the {length} asked for")


def modules_label(model) -> str:
    """Which lookahead modules :func:`make_method` gives ``model``: the shipped ones, or random ones."""
    from ..lookahead import default_modules_path

    path = default_modules_path(model)
    return str(path) if path is not None else "random init (same cost as trained)"


def budget_arg(text: str) -> int | float:
    """argparse type of ``--budget``: the one budget rule of generate and eval (engine.evict.parse_budget)."""
    from ..engine.evict import parse_budget

    try:
        return parse_budget(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def make_method(name: str, model, budget: int | float):
    """The policy that runs method ``name`` at ``budget`` on ``model``; None for ``"plain"``.

    LookaheadKV uses the modules shipped for the model when there are some, else randomly
    initialised ones (same shapes, same cost). SpecKV drafts with the target itself: the
    bundled SmolLM2 has no smaller sibling, so its draft costs what a target decode costs.
    """
    from ..policies import LookaheadKV, make_policy
    from ..lookahead import default_modules_path

    if name == PLAIN:
        return None
    if name == "lookahead" and default_modules_path(model) is None:
        from ..lookahead import LookaheadModules

        return LookaheadKV(budget=budget, modules=LookaheadModules.for_model(model))
    return make_policy(name, budget=budget)


class Clock:
    """Wall-clock seconds between marks: ``perf_counter`` on the CPU, synchronised CUDA events on a GPU."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.cuda = torch.device(device).type == "cuda"

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self, start, end) -> float:
        if not self.cuda:
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000


@dataclass
class Timing:
    """One run to the first token, in seconds."""

    prefill: float  # the prompt's forward, with the method's observer
    post: float  # after the prefill: scoring, selection, eviction, first token
    total: float  # time to first token


def first_token(model, input_ids: torch.Tensor, policy, clock: Clock) -> Timing:
    """Time one run of ``policy`` (None = plain prefill) up to its first token."""
    start = clock.mark()
    if policy is None:
        state = prefill(model, input_ids)
        prefilled = clock.mark()
    else:
        state, observer = run_prefill(model, input_ids, policy)
        prefilled = clock.mark()
        compress(model, state, policy, observer)
    int(state.logits.argmax())  # the first token (greedy), from the prefill's logits
    end = clock.mark()
    return Timing(clock.seconds(start, prefilled), clock.seconds(prefilled, end), clock.seconds(start, end))


def paired_runs(model, input_ids: torch.Tensor, methods: dict, reps: int, clock: Clock, on_run: Callable[[str], None] | None = None) -> dict[str, list[Timing]]:
    """``reps`` repetitions of every method on the same prompt, the order rotating each repetition.

    Repetition ``r`` starts at method ``r % len(methods)``, so no method always runs first
    (cold) or right after the most expensive one. ``methods`` maps names to policies.
    """
    names = list(methods)
    runs: dict[str, list[Timing]] = {name: [] for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(first_token(model, input_ids, methods[name], clock))
            if on_run is not None:
                on_run(name)
    return runs


class Capture:
    """Observer that keeps every layer's attention inputs of one prefill, to replay them later."""

    def __init__(self):
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor, float]] = []

    def __call__(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        self.calls.append((layer_idx, query, key, scaling))

    def replay(self, observer) -> None:
        for call in self.calls:
            observer(*call)


def capture_prefill(model, input_ids: torch.Tensor) -> tuple[Prefill, Capture]:
    """A plain prefill of ``input_ids`` and the attention inputs of all its layers."""
    capture = Capture()
    return prefill(model, input_ids, [capture]), capture


class LastChunk:
    """A prompt prefilled but for its last ``size`` tokens, whose final forward can be run again and again.

    Running that forward with a method's tail and without it isolates what the tail adds to
    a prefill: the tail's rows through every linear, its attention rows, its adapters (what
    a server that prefills in chunks pays on its last chunk). Each variant writes into its
    own preallocated cache holding the head's entries (a Hugging Face ``StaticCache`` of
    exactly the prompt's length, plus the tail's), so no run allocates or copies the whole
    cache: that copy is an artefact of chunking (a one-shot prefill makes no copy) and its
    page faults are most of the run-to-run noise on a CPU.
    """

    def __init__(self, model, input_ids: torch.Tensor, size: int = 256):
        self.size = max(1, min(size, input_ids.shape[1] - 1))
        self.input_ids = input_ids
        self.head = prefill(model, input_ids[:, : -self.size])
        self._caches: dict[int, object] = {}

    def _cache(self, model, rows: int):
        """The preallocated cache for a run with ``rows`` tail rows, rewound to the head's end."""
        from transformers import StaticCache

        cache = self._caches.get(rows)
        if cache is None:
            cache = StaticCache(config=model.config, max_cache_len=self.input_ids.shape[1] + rows)
            for i, layer in enumerate(self.head.cache.layers):
                cache.update(layer.keys, layer.values, i)
            self._caches[rows] = cache
        for layer in cache.layers:
            layer.cumulative_length.fill_(self.head.length)
        return cache

    def run(self, model, tail=None) -> Prefill:
        """The last forward, with ``tail`` (an engine Tail) or without; the Prefill's cache views the prompt's entries."""
        length = self.input_ids.shape[1]
        cache = self._cache(model, 0 if tail is None else tail.rows)
        logits = forward_rows(model, self.input_ids[:, self.head.length :], cache, self.head.length, tail=tail)
        prompt = from_tensors([(layer.keys[..., :length, :], layer.values[..., :length, :]) for layer in cache.layers])
        return Prefill(self.input_ids, prompt, logits, tail_mass=tail.observer.per_layer() if tail is not None else None)


def run_tail(model, last: LastChunk, policy) -> None:
    """The last forward with ``policy``'s tail, then its scoring, selection and eviction."""
    compress(model, last.run(model, policy.tail(model)), policy, None)


def tail_work(model, last: LastChunk, policy, clock: Clock, rep: int = 0) -> float:
    """Seconds a tail method adds: its last forward with the tail plus scoring, selection and eviction, minus the same forward without.

    The two runs alternate which goes first with ``rep``.
    """
    times = {}
    for with_tail in ((False, True) if rep % 2 == 0 else (True, False)):
        start = clock.mark()
        if with_tail:
            run_tail(model, last, policy)
        else:
            last.run(model)
        times[with_tail] = clock.seconds(start, clock.mark())
    return times[True] - times[False]


def added_work(model, state: Prefill, capture: Capture, policy, clock: Clock) -> float:
    """Seconds of a method's own work: its observer on the captured inputs, then scoring, selection, eviction.

    For a method with a prefill tail this is its separate-pass equivalent (the prefill
    above has no tail): use :func:`tail_work` for the tail itself.
    """
    start = clock.mark()
    observer = policy.observer()
    if observer is not None:
        with torch.no_grad():  # as inside the prefill
            capture.replay(observer)
    compress(model, state, policy, observer)
    return clock.seconds(start, clock.mark())


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def parse_ints(text: str) -> list[int]:
    """"1024,2048" -> [1024, 2048] (argparse ``type``)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return values


def command_line() -> str:
    """The command that is running, as a user would type it."""
    args = list(sys.argv)
    name = Path(args[0]).name if args else ""
    if name in ("lookaheadkv", "cli.py"):  # the console script, or python -m lookaheadkv.cli
        args[0] = "lookaheadkv"
    elif name.endswith(".py"):
        args.insert(0, "python")
    return shlex.join(args)


def write_json(path: str | Path | None, results: dict) -> None:
    """Write a benchmark's results as indented JSON to ``path`` and say so on stderr; nothing when ``path`` is None."""
    if path is None:
        return
    Path(path).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]], labels: int = 1) -> str:
    """A GitHub markdown table: the first ``labels`` columns left-aligned, the rest right-aligned; None prints "-"."""
    align = ["---"] * labels + ["---:"] * (len(headers) - labels)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join("-" if v is None else str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """The CPU a timing ran on: architecture, model name and the SIMD level torch uses (e.g. ``x86_64 AMD EPYC, AVX512``).

    Timings of the same code differ between hosts of one cloud kind (a host with AVX-512 runs
    the matmuls and softmax faster, a memory-bound decode step hardly), so every result names it.
    """
    name = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    capability = torch.backends.cpu.get_cpu_capability()
    return ", ".join(part for part in (f"{platform.machine()} {name}".strip(), capability) if part)


def environment(model_name: str, model) -> dict:
    """What a result depends on besides the code: versions, threads, machine, date, lookahead modules."""
    import datetime

    import transformers

    return {
        "model": model_name,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "machine": machine(),
        "python": platform.python_version(),
        "command": command_line(),
        "commit": commit(),
        "lookahead_modules": modules_label(model),
    }


def commit() -> str | None:
    """The checkout's commit (with "+changes" when tracked files differ from it), or None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parents[3]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")
