"""The ``lookaheadkv`` command line: thin wrappers over the library.

Every user mistake (unknown method, bad budget, missing file, empty or too long prompt,
unsupported model) ends in one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help="KV-cache eviction at prefill, with LookaheadKV.")
data_app = typer.Typer(no_args_is_help=True, help="Build training data (responses and true importance), and derive mid-answer samples from it.")
app.add_typer(data_app, name="data")

USER_ERRORS = (ValueError, FileNotFoundError, NotImplementedError, ImportError, KeyError)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def os_error_line(err: OSError) -> str:
    """One line for an OS error, naming the path and what to do."""
    where = f": {err.filename}" if getattr(err, "filename", None) else ""
    what = err.strerror or str(err) or type(err).__name__
    hints = {
        PermissionError: "choose a place you can write to (or read, for inputs)",
        IsADirectoryError: "give a file there, not a folder",
        NotADirectoryError: "a part of that path is a file: give a folder",
        FileExistsError: "a file is in the way: give a folder (or remove the file)",
        FileNotFoundError: "check the path",
    }
    hint = next((h for cls, h in hints.items() if isinstance(err, cls)), "check the path and the disk")
    return f"{what}{where}: {hint}"


_INTERRUPT_SAID = []


def say_interrupted(once: bool = False) -> None:
    """The one line a Ctrl-C ends in; ``once``: only if no layer below has said it."""
    if not (once and _INTERRUPT_SAID):
        _INTERRUPT_SAID.append(True)
        print("interrupted (Ctrl-C); rerun the same command to resume where it applies", file=sys.stderr, flush=True)


def friendly(fn):
    """Turn library errors caused by the user's input into one line and exit code 2 (Ctrl-C: 130)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            say_interrupted()
            raise typer.Exit(130)
        except USER_ERRORS as err:
            if isinstance(err, OSError) and err.filename is not None:  # FileNotFoundError from the OS
                fail(os_error_line(err))
            text = str(err).strip().splitlines()
            fail(text[0] if text else type(err).__name__)
        except OSError as err:  # read-only place, a file where a folder should be, disk full, ...
            fail(os_error_line(err))
        except Exception as err:
            if type(err).__name__ == "SafetensorError":  # a truncated or damaged .safetensors file
                fail(f"a .safetensors file is truncated or damaged ({str(err).strip().splitlines()[0]}): re-download or re-create it")
            raise

    return wrapper


def check_out_folder(out: Path, option: str = "--out") -> None:
    """``out`` must be a folder that exists or can be made, and that we can write into."""
    if out.exists() and not out.is_dir():
        fail(f"{option} {out} is a file: give a folder")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        fail(f"{option} {out}: {parent} is a file, not a folder: give another place")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(f"{option} {out}: cannot write in {parent} (permission denied): choose a place you can write to")


def parse_budget(text: str) -> int | float:
    """A budget option (generate, eval): engine.evict.parse_budget, its error as one ``error:`` line."""
    from .engine.evict import parse_budget as parse

    try:
        return parse(text)
    except ValueError as err:
        fail(str(err))


def check_modules_arg(modules: str) -> str:
    """--modules must be an existing folder or a hub id 'org/name'."""
    if not Path(modules).expanduser().exists() and modules.count("/") != 1:
        fail(f"no lookahead modules at {modules}: give a folder written by save_pretrained or a hub id")
    return modules


def build_policy(method: str, budget: int | float, modules: Optional[str] = None, draft: Optional[str] = None, **extra):
    from .policies import make_policy, split_method

    try:
        base, _ = split_method(method)
    except ValueError as err:
        fail(str(err))
    kwargs = dict(budget=budget, **extra)
    if modules is not None:
        if base != "lookahead":
            fail("--modules only applies to --method lookahead")
        kwargs["modules"] = check_modules_arg(modules)
    if draft is not None:
        kwargs["draft"] = draft
    return make_policy(method, **kwargs)


def read_prompt(prompt: Optional[str], prompt_file: Optional[Path]) -> str:
    if (prompt is None) == (prompt_file is None):
        fail("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt_file is not None:
        if not prompt_file.is_file():
            fail(f"prompt file not found: {prompt_file}")
        prompt = prompt_file.read_text(encoding="utf-8", errors="replace")
    if not prompt.strip():
        fail("the prompt is empty: give some text")
    return prompt


def read_prompts(prompt: Optional[str], prompt_files: list[Path]) -> list[tuple[str, str]]:
    """(label, text) of every prompt: --prompt, or each --prompt-file (a .jsonl file gives one prompt per line)."""
    import json

    if (prompt is None) == (not prompt_files):
        fail("give exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt is not None:
        return [("prompt", read_prompt(prompt, None))]
    texts = []
    for path in prompt_files:
        if path.suffix != ".jsonl":
            texts.append((str(path), read_prompt(None, path)))
            continue
        if not path.is_file():
            fail(f"prompt file not found: {path}")
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError:
                fail(f"{path}:{number} is not JSON: write one prompt per line, as a JSON string or {{\"prompt\": \"...\"}}")
            text = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(text, str) or not text.strip():
                fail(f"{path}:{number} holds no prompt: write a non-empty JSON string or {{\"prompt\": \"...\"}}")
            texts.append((f"{path}:{number}", text))
        if not any(label.startswith(f"{path}:") for label, _ in texts):
            fail(f"{path} holds no prompts: write one prompt per line")
    return texts


@app.command()
@friendly
def generate(
    method: str = typer.Option("snapkv", help="Eviction method (see 'lookaheadkv methods')."),
    budget: str = typer.Option("128", help="KV entries kept per KV head and layer (128), or a decimal ratio of the prompt in (0, 1] (0.1; 1.0 = the whole prompt)."),
    prompt: Optional[str] = typer.Option(None, help="The prompt text."),
    prompt_file: list[Path] = typer.Option([], help="Read the prompt from this file; give it several times, or a .jsonl file (one prompt per line: a JSON string or {\"prompt\": ...}), to answer several prompts at once (each evicted alone, decoded together)."),
    model: Optional[str] = typer.Option(None, help="Hub id or local folder; default: the bundled SmolLM2-135M-Instruct."),
    modules: Optional[str] = typer.Option(None, help="LookaheadKV modules folder or hub id (--method lookahead)."),
    draft: Optional[str] = typer.Option(None, help="SpecKV draft model, hub id or folder (--method speckv; default: the model itself)."),
    max_new_tokens: int = typer.Option(128, min=1),
    temperature: float = typer.Option(0.0, min=0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    seed: Optional[int] = typer.Option(None),
    no_chat: bool = typer.Option(False, "--no-chat", help="Do not wrap the prompt in the chat template."),
    decode_budget: Optional[int] = typer.Option(None, min=1, help="Also hold the whole cache (prompt and answer) at or under this many entries per KV head while decoding."),
    interval: int = typer.Option(32, min=1, help="With --decode-budget: re-score the cache every this many generated tokens (peak: budget + interval)."),
    recent: int = typer.Option(32, min=0, help="With --decode-budget: the most recent entries always kept (at most half the decode budget)."),
):
    """Answer a prompt with its KV cache compressed by one method; prints the answer and a stats line."""
    from .engine.generate import generate as run
    from .models import load_model

    texts = read_prompts(prompt, prompt_file)
    if draft is not None and method != "speckv":
        fail("--draft only applies to --method speckv")
    policy = build_policy(method, parse_budget(budget), modules, draft)
    if decode_budget is not None and not policy.has_decode_scorer:
        fail(f"{method} has no decode-time scorer: {policy.no_decode_scorer}")
    if len(texts) > 1:
        if decode_budget is not None:
            fail("--decode-budget answers one prompt at a time: give one --prompt-file (or --prompt)")
        from .engine.batch import generate_batch

        llm, tokenizer = load_model(model)
        outs = generate_batch(llm, tokenizer, [t for _, t in texts], policy, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, chat=not no_chat)
        for (label, _), out in zip(texts, outs):
            typer.echo(f"=== {label} ===\n{out.text}")
            typer.echo(f"[{method} budget={budget}] {label}: {out.stats.line()}", err=True)
        return
    text = texts[0][1]
    llm, tokenizer = load_model(model)
    out = run(llm, tokenizer, text, policy, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, chat=not no_chat, stream=lambda s: (sys.stdout.write(s), sys.stdout.flush()), decode_budget=decode_budget, interval=interval, recent=recent)
    typer.echo("")
    typer.echo(f"[{method} budget={budget}] {out.stats.line()}", err=True)


@app.command()
def methods():
    """List the eviction methods and their parameters."""
    import dataclasses

    from .policies import REGISTRY

    for name, cls in sorted(REGISTRY.items()):
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING)
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:13s} {doc}  [{fields}]")


def parse_sizes(text: str, option: str) -> dict[str, int]:
    """"essays=150,synthetic=100" -> {"essays": 150, "synthetic": 100}."""
    sizes = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.partition("=")
        if not count.strip().isdigit() or int(count) < 1:
            fail(f"{option} takes name=count pairs like essays=150,synthetic=100, got {part!r}")
        sizes[name.strip()] = int(count)
    if not sizes:
        fail(f"{option} is empty: give name=count pairs like essays=150")
    return sizes


def parse_range(text: str, option: str) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in text.split(","))
    except ValueError:
        fail(f"{option} takes two token counts like 1024,2048, got {text!r}")
    if not 0 < low <= high:
        fail(f"{option} needs 0 < low <= high, got {text}")
    return low, high


@data_app.command("build")
@friendly
def data_build(
    out: Path = typer.Option(..., help="Data folder (created; rerun the same command to resume)."),
    model: Optional[str] = typer.Option(None, help="Hub id or local folder; default: the bundled SmolLM2."),
    source: str = typer.Option("essays=150,synthetic=100,fewshot=50", help="Offline sources: essays, synthetic, fewshot, code, docs, retrieval, chat, needles (name=count,...)."),
    hub: Optional[str] = typer.Option(None, help="The paper's hub sources instead (chatqa2, tulu3, stack, metamath, hellaswag, arc), name=count,..."),
    data_file: list[str] = typer.Option([], help="name=path: read a hub source from a local JSONL copy (repeatable)."),
    lengths: str = typer.Option("1024,2048", help="Prompt lengths in tokens, low,high (offline sources)."),
    max_prompt_tokens: int = typer.Option(4096, min=16, help="Longer prompts are truncated middle-out."),
    max_new_tokens: int = typer.Option(512, min=1, help="Cap of each self-generated response."),
    seed: int = typer.Option(0),
    shard: str = typer.Option("0/1", help="i/n: build only the samples whose index % n == i (run n processes in parallel)."),
    index_range: Optional[str] = typer.Option(None, "--range", help="Build only the samples with FIRST <= index < END, written FIRST-END (e.g. 0-800), so that a run over several machines builds a new range on each."),
    only: Optional[str] = typer.Option(None, help="Build only the prompts of these sources now (name,name,...); the prompt list, its order and every index stay the same, so a later run without --only builds the rest."),
    batch_size: int = typer.Option(1, min=1, help="Prompts whose responses are decoded together (one batched step per token, prompts of similar length)."),
    dtype: Optional[str] = typer.Option(None, help="Model dtype, e.g. bfloat16 (about 3x faster prefill on CPUs with AVX-512 BF16); labels are computed in float32 arithmetic either way. Default: the checkpoint's."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads."),
):
    """Generate each prompt's greedy response and its true importance labels, resumably."""
    import torch

    from .engine.generate import eos_ids
    from .models import load_model
    from .training import hub as hub_sources
    from .training import sources
    from .evaluation.runner import shard_from_text
    from .training.data import PromptRecord, answer_scores, build

    if threads:
        torch.set_num_threads(threads)
    index, count = shard_from_text(shard)
    sizes = parse_sizes(hub, "--hub") if hub else parse_sizes(source, "--source")
    wanted = None
    if only is not None:
        wanted = {name.strip() for name in only.split(",") if name.strip()}
        if not wanted or wanted - set(sizes):
            fail(f"--only takes names among the {'--hub' if hub else '--source'} ones ({', '.join(sorted(sizes))}), got {only!r}")
    llm, tokenizer = load_model(model, dtype=dtype)
    if hub:
        files = dict(item.split("=", 1) for item in data_file)
        for path in files.values():
            if not Path(path).is_file():
                fail(f"data file not found: {path}")
        prompts = hub_sources.hub_mixture(tokenizer, sizes, seed, files, None)
    else:
        prompts = sources.mixture(tokenizer, sizes, parse_range(lengths, "--lengths"), seed)
    records = [PromptRecord(p.id, p.source, sources.render(p, tokenizer, max_prompt_tokens), p.expect, p.match) for p in prompts]
    low, high = parse_index_range(index_range, len(records))
    mine = [i for i in range(low, min(high, len(records))) if i % count == index]
    if not mine:
        fail(f"--range {index_range} holds none of the {len(records)} prompts: choose a range below {len(records)}")
    if wanted is not None:
        mine = [i for i in mine if records[i].source in wanted]
        if not mine:
            fail(f"--only {only}: none of the selected prompts comes from those sources; check --source and --range")
    progress = _bar("data build", len(mine))

    def on_progress(i, skipped):
        progress.advance(progress.task_ids[0])

    name = model or "bundled:smollm2-135m-instruct"
    with progress:
        built = build(llm, records, out, max_new_tokens=max_new_tokens, eos_token_ids=eos_ids(llm, tokenizer), model_name=name, on_progress=on_progress, only=set(mine), batch_size=batch_size, tokenizer=tokenizer)
    typer.echo(f"{built} samples built now; {out} holds {len(list((out / 'samples').glob('*.safetensors')))} of {len(records)}")
    checked = answer_scores(out, mine)
    if checked:
        typer.echo(f"checkable answers: {sum(s >= 1.0 for s in checked)} of {len(checked)} hold every asked value (train --answered-only keeps those)")


@data_app.command("cut")
@friendly
def data_cut(
    source: Path = typer.Option(..., "--from", help="A data folder made by 'lookaheadkv data build'; the samples on disk are cut (rerun after it grows to cut the new ones)."),
    out: Path = typer.Option(..., help="The new data folder (created; rerun the same command to resume)."),
    at: list[str] = typer.Option(..., metavar="FRACTION", help="Cut fraction in (0, 1): the share of each answer (end-of-sequence token excluded, rounded) that joins the prompt; repeat it or give a list (--at 0.25 --at 0.5, or --at 0.25,0.5)."),
    min_rest: int = typer.Option(16, min=1, help="Skip a cut that leaves fewer answer tokens than this after it (end-of-sequence token excluded)."),
    model: Optional[str] = typer.Option(None, help="Hub id or local folder; default: the model the source folder was built with (its manifest)."),
    dtype: Optional[str] = typer.Option(None, help="Model dtype; default: the source folder's (its manifest), as the build ran. Labels are computed in float32 arithmetic either way."),
    index_range: Optional[str] = typer.Option(None, "--range", help="Cut only the source samples numbered FIRST <= n < END, written FIRST-END (e.g. 0-800), to spread a cut over several machines."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads."),
):
    """Derive mid-answer samples: each answer cut at --at, its first part joined to the prompt, the rest labelled; resumable.

    No generation is needed: greedy decoding is prefix-consistent, so the rest of a built answer is the model's own answer to the prompt plus the answer's first part (training/midanswer.py).
    """
    import torch

    from .engine.generate import eos_ids
    from .models import load_model
    from .training.midanswer import check_fractions, cut, read_source, source_numbers

    fractions = check_fractions([f for text in at for f in parse_list(text, "--at", float)])
    manifest = read_source(source)
    check_out_folder(out)
    if out.resolve() == source.resolve():
        fail(f"--out {out} is the --from folder: give a new folder for the cut samples")
    numbers = source_numbers(source)
    if not numbers:
        fail(f"{source} holds no samples yet: run 'lookaheadkv data build' first")
    low, high = parse_index_range(index_range, numbers[-1] + 1)
    mine = [n for n in numbers if low <= n < high]
    if not mine:
        fail(f"--range {index_range} holds none of the {len(numbers)} samples of {source} (numbered {numbers[0]} to {numbers[-1]}): choose another range")
    if threads:
        torch.set_num_threads(threads)
    built_with = manifest.get("model")
    name = model or built_with
    if model is not None and built_with is not None and model != built_with:
        typer.echo(f"warning: {source} was built with --model {built_with}; cutting with {model}: its answers are only that model's own if it is the same model", err=True)
    try:
        llm, tokenizer = load_model(name, dtype=dtype or manifest.get("dtype"))
    except FileNotFoundError as err:
        if model is not None:
            raise
        fail(f"{str(err).splitlines()[0]} (the model {source} was built with): give it with --model")
    progress = _bar("data cut", len(mine))
    with progress:
        done = cut(llm, source, out, fractions, eos_token_ids=eos_ids(llm, tokenizer), model_name=name, min_rest=min_rest, only=set(mine), on_progress=lambda n: progress.advance(progress.task_ids[0]))
    typer.echo(
        f"{done.built} samples cut now, {done.present} were there already, {done.short} cuts skipped (fewer than {min_rest} answer tokens after them); "
        f"{out} holds {len(list((out / 'samples').glob('*.safetensors')))} samples from {len(numbers)} source samples"
    )


def _bar(label: str, total: int):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
    progress.add_task(label, total=total)
    return progress


@app.command()
@friendly
def train(
    data: list[Path] = typer.Option(..., metavar="FOLDER", help="A folder made by 'lookaheadkv data build' (or 'data cut'); give --data several times to train on the union of the folders."),
    out: Path = typer.Option(..., help="Run folder: checkpoints, log.jsonl, final/ modules (rerun to resume)."),
    model: Optional[str] = typer.Option(None, help="Hub id or local folder; default: the bundled SmolLM2."),
    steps: int = typer.Option(200, min=1),
    batch: int = typer.Option(8, min=1, help="Samples per optimizer step (gradient accumulation, over all ranks)."),
    lr: float = typer.Option(1e-3),
    schedule: str = typer.Option("constant", help="constant or cosine."),
    warmup: int = typer.Option(0, min=0),
    clip: float = typer.Option(1.0),
    n_lookahead: int = typer.Option(32, min=1),
    rank: int = typer.Option(8, min=1),
    alpha: float = typer.Option(32.0),
    eval_every: int = typer.Option(25, min=0),
    eval_samples: int = typer.Option(16, min=0),
    save_every: int = typer.Option(25, min=1),
    seed: int = typer.Option(0),
    dtype: Optional[str] = typer.Option(None, help="Base model dtype: bfloat16 on GPUs and on CPUs with AVX-512 BF16 (the modules and Adam stay float32; the loss is float32); default: the checkpoint's dtype."),
    init: Optional[Path] = typer.Option(None, help="When --out holds no checkpoint: a checkpoint folder to carry on (another machine's run), or saved modules to start from (fresh optimizer, step 0)."),
    answered_only: bool = typer.Option(False, "--answered-only", help="Skip samples whose checkable answer (needles, retrieval, synthetic tasks) missed a value the prompt asks for: their labels say where a wrong answer looked."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads."),
):
    """Train lookahead modules on built data folders (runs under torchrun / accelerate launch too)."""
    import os

    import torch

    from .models import load_model
    from .training.train import TrainConfig
    from .training.train import train as run

    if threads:
        torch.set_num_threads(threads)
    for folder in data:
        if not folder.is_dir():
            fail(f"data folder not found: {folder}")
    if len({folder.resolve() for folder in data}) < len(data):
        fail(f"a data folder is given twice in --data {' --data '.join(map(str, data))}: give each folder once")
    cfg = TrainConfig(data=str(data[0]) if len(data) == 1 else [str(folder) for folder in data], out=str(out), steps=steps, batch=batch, lr=lr, schedule=schedule, warmup=warmup, clip=clip, seed=seed, n_lookahead=n_lookahead, rank=rank, alpha=alpha, eval_every=eval_every, eval_samples=eval_samples, save_every=save_every, init=str(init) if init else None, answered_only=answered_only)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    llm, _ = load_model(model, dtype=dtype, device=device)
    run(llm, cfg)
    typer.echo(f"modules saved to {out / 'final'}")


def parse_list(text: str, option: str, kind=str) -> list:
    try:
        items = [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{option} takes a comma-separated list, got {text!r}")
    if not items:
        fail(f"{option} is empty")
    return items


def resolve_tasks(text: str) -> list[str]:
    from .tasks import HELDOUT_TASKS, TASK_GROUPS, TASKS

    tasks = []
    for name in parse_list(text, "--tasks"):
        if name == "all":
            tasks += list(TASKS)
        elif name == "heldout":
            tasks += list(HELDOUT_TASKS)
        elif name in TASK_GROUPS:
            tasks += list(TASK_GROUPS[name])
        elif name in TASKS or name in HELDOUT_TASKS:
            tasks.append(name)
        else:
            fail(f"unknown task {name!r}; choose from: all, heldout, {', '.join(sorted(TASK_GROUPS))}, {', '.join(sorted(TASKS))}, {', '.join(sorted(HELDOUT_TASKS))}")
    return list(dict.fromkeys(tasks))


def run_eval(llm, tokenizer, samples, methods, budgets, out: Path, options: dict, report_only: bool = False, keep_errors: bool = False, plots: bool = True, shard: tuple[int, int] | None = None) -> list[dict]:
    """Run (unless report_only) and report: terminal tables, summary.md, and with ``plots`` score.png and recall.png; returns the reported rows.

    With ``shard`` (i, n) only that shard runs; the shards are merged into results.jsonl and the
    report is written once every shard's records are in (any shard, or --report-only, merges).
    """
    from .evaluation import report
    from .evaluation.runner import SHARDS, EvalConfig, Runner, latest_results, merge_shards, read_results

    config = EvalConfig(methods=methods, budgets=budgets, method_options=options)
    if not report_only:
        runner = Runner(llm, tokenizer, config, out, keep_errors=keep_errors, shard=shard)
        mine = len(samples) if shard is None else len(range(shard[0], len(samples), shard[1]))
        progress = _bar("eval" if shard is None else f"eval shard {shard[0]}/{shard[1]}", mine)
        with progress:
            runner.run(samples, on_sample=lambda i, n: progress.update(progress.task_ids[0], completed=i))
    if shard is not None or (out / SHARDS).is_dir():
        present, expected = merge_shards(out, samples, config)
        if shard is not None and present < expected:
            typer.echo(f"shard {shard[0]}/{shard[1]} done; {present} of {expected} records are in {out / 'results.jsonl'}: the report is written when every shard has finished (rerun any shard, or --report-only)")
            return []
    if report_only and not (out / "results.jsonl").exists():
        fail(f"{out} has no results.jsonl to report on")
    ids = {s.id for s in samples}
    keys = set(config.runs())
    rows = [r for r in latest_results(read_results(out / "results.jsonl")) if r["sample_id"] in ids and (r["method"], r["budget"]) in keys]
    if report_only:  # only the samples every method has finished, so the comparison stays paired
        have = {(r["sample_id"], r["method"], r["budget"]) for r in rows}
        finished = {s for s in ids if all((s, *k) in have for k in keys)}
        rows = [r for r in rows if r["sample_id"] in finished]
        typer.echo(f"reporting on {len(finished)} samples that every method finished")
    summary = report.summarise(rows)
    text = "\n\n".join(f"## {title}\n\n" + report.markdown(summary, metric) for metric, title in report.METRICS.items())
    (out / "summary.md").write_text(text + "\n")
    if plots:
        report.terminal(summary)
        report.plot(summary, out / "score.png")
        report.plot(summary, out / "recall.png", metric="recall")
        typer.echo(f"results: {out / 'results.jsonl'} | tables: {out / 'summary.md'} | plots: {out / 'score.png'}, {out / 'recall.png'}")
    failed = failed_methods(rows)
    if failed:
        method, count, first = failed[0]
        others = f" (also: {', '.join(m for m, _, _ in failed[1:])})" if len(failed) > 1 else ""
        fail(f"every record of {method} failed ({count}; first: {first}){others}: fix the cause and rerun (failed records are retried)")
    return rows


def failed_methods(rows: list[dict]) -> list[tuple[str, int, str]]:
    """(method, records, first error) for each method whose every record is an error row."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    return [(m, len(rs), rs[0]["error"].splitlines()[0]) for m, rs in sorted(by_method.items()) if all("error" in r for r in rs)]


def check_methods_usable(llm, methods: list[str], options: dict) -> None:
    """Load what a method needs before any sample runs (LookaheadKV's modules, SpecKV's draft)."""
    from .policies import make_policy, split_method

    bases = {split_method(m)[0] for m in methods}
    if "lookahead" in bases:
        policy = make_policy("lookahead", **options.get("lookahead", {}))
        policy.resolve(llm).check_fits(llm)
        options.setdefault("lookahead", {})["modules"] = policy.modules  # loaded once, shared by the run
    if "speckv" in bases and "draft" in options.get("speckv", {}):
        policy = make_policy("speckv", **options["speckv"])
        options["speckv"]["draft"] = policy.draft_model(llm)  # loaded once, shared by the run


def method_options(modules: Optional[str], draft: Optional[str]) -> dict:
    """Per-method policy options from the command line: LookaheadKV's --modules, SpecKV's --draft."""
    options = {}
    if modules is not None:
        options["lookahead"] = {"modules": check_modules_arg(modules)}
    if draft is not None:
        options["speckv"] = {"draft": draft}
    return options


@app.command("eval")
@friendly
def evaluate(
    out: Path = typer.Option(..., help="Run folder: results.jsonl (rerun to resume), summary.md, plots."),
    model: Optional[str] = typer.Option(None, help="Hub id or local folder; default: the bundled SmolLM2."),
    methods: str = typer.Option("full,snapkv,pyramidkv,streamingllm,h2o,tova,lookahead", help="Comma-separated methods; a variant takes options after colons (lookahead:kernel=7:window=16), recorded under that name."),
    budgets: str = typer.Option("64,128,256", help="Comma-separated KV budgets per head: entries (128) or ratios of the prompt (0.1; 1.0 = all)."),
    tasks: str = typer.Option("all", help="Task names or groups (niah, multi_niah, tracking, aggregation, qa), all (the suite), or heldout (the generalisation set)."),
    lengths: str = typer.Option("2048", help="Prompt lengths in tokens."),
    samples: int = typer.Option(5, min=1, help="Samples per task and length (per task group with --per-group)."),
    per_group: bool = typer.Option(False, "--per-group", help="--samples counts per task group, shared over its tasks, groups interleaved (a partial run covers every group equally)."),
    seed: int = typer.Option(0),
    modules: Optional[str] = typer.Option(None, help="LookaheadKV modules (default: shipped ones for the bundled model)."),
    draft: Optional[str] = typer.Option(None, help="SpecKV draft model (default: the target itself)."),
    longbench: Optional[str] = typer.Option(None, help="LongBench tasks instead of the offline suite (comma-separated)."),
    longbench_dir: Optional[Path] = typer.Option(None, help="Folder of LongBench {task}.jsonl files (default: the hub)."),
    max_length: int = typer.Option(7500, help="LongBench prompts are truncated middle-out to this many tokens."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads."),
    report_only: bool = typer.Option(False, "--report-only", help="Summarise what results.jsonl holds (samples every method finished); run nothing."),
    keep_errors: bool = typer.Option(False, "--keep-errors", help="On a rerun, keep the records that failed instead of retrying them."),
    shard: Optional[str] = typer.Option(None, help="i/n: run only the samples whose index % n == i, into OUT/shards/ (one process or machine per shard, same --out; under torchrun: RANK/WORLD_SIZE). Shards resume; the report is written once every shard is in."),
):
    """Compare methods x budgets x tasks x lengths on the same prompts; resumable."""
    import torch

    from .tasks import make_suite
    from .models import load_model

    if threads:
        torch.set_num_threads(threads)
    shard_pair = parse_shard(shard)
    method_list = parse_list(methods, "--methods")
    budget_list = parse_list(budgets, "--budgets", parse_budget)
    options = method_options(modules, draft)
    check_out_folder(out)
    if longbench_dir is not None and not longbench_dir.is_dir():
        fail(f"LongBench folder not found: {longbench_dir}")
    task_list = None if longbench else resolve_tasks(tasks)
    device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if shard_pair is not None and "LOCAL_RANK" in os.environ and torch.cuda.is_available() else None
    llm, tokenizer = load_model(model, **({"device": device} if device else {}))
    if longbench:
        from .evaluation.longbench import load_longbench

        suite = [s for t in parse_list(longbench, "--longbench") for s in load_longbench(t, data_dir=longbench_dir, tokenizer=tokenizer, max_length=max_length, limit=samples)]
    else:
        suite = make_suite(tokenizer, task_list, parse_list(lengths, "--lengths", int), samples, split="eval", seed=seed, per_group=per_group)
    if not report_only:
        check_methods_usable(llm, method_list, options)
    run_eval(llm, tokenizer, suite, method_list, budget_list, out, options, report_only, keep_errors, shard=shard_pair)


def parse_index_range(text: Optional[str], end: int) -> tuple[int, int]:
    """--range FIRST-END (0 <= FIRST < END) as (first, end); (0, end) when not given."""
    if text is None:
        return 0, end
    try:
        low, high = (int(x) for x in text.split("-"))
        assert 0 <= low < high
    except (ValueError, AssertionError):
        fail(f"--range takes FIRST-END with 0 <= FIRST < END, e.g. 0-800, got {text!r}")
    return low, high


def parse_shard(text: Optional[str]) -> tuple[int, int] | None:
    """--shard i/n, or under torchrun (WORLD_SIZE > 1) the process's RANK/WORLD_SIZE; None for a single run."""
    from .evaluation.runner import shard_from_text

    if text is None:
        world = int(os.environ.get("WORLD_SIZE", "1") or 1)
        return (int(os.environ.get("RANK", "0")), world) if world > 1 else None
    try:
        index, count = shard_from_text(text)
    except ValueError as err:
        fail(str(err))
    return (index, count) if count > 1 else None


DEMO_TASKS = "niah_single_number,niah_multikey,niah_multivalue,passage_qa"
DEMO_METHODS = ["full", "lookahead", "snapkv", "pyramidkv", "h2o", "tova", "streamingllm"]


@app.command()
@friendly
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Run folder (rerun to resume)."),
    samples: int = typer.Option(8, min=1, help="Samples per task."),
    length: int = typer.Option(1024, help="Prompt length in tokens."),
    budgets: str = typer.Option("64", help="Comma-separated KV budgets per head."),
    dtype: Optional[str] = typer.Option(None, help="Model dtype; default: the checkpoint's (float32). bfloat16 decodes one prompt at a time slower on CPUs here."),
    threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads."),
):
    """A short side-by-side evaluation on the bundled SmolLM2 (the README's first command): one dot plot, demo.png."""
    import torch

    from .evaluation import report
    from .lookahead import default_modules_path
    from .models import load_model
    from .tasks import make_suite

    if threads:
        torch.set_num_threads(threads)
    check_out_folder(out)
    llm, tokenizer = load_model(None, dtype=dtype)
    methods = [m for m in DEMO_METHODS if m != "lookahead" or default_modules_path(llm) is not None]
    task_list = DEMO_TASKS.split(",")
    typer.echo(f"lookaheadkv demo: {', '.join(methods)} at budget(s) {budgets} on {samples} samples each of {DEMO_TASKS} at {length} tokens")
    suite = make_suite(tokenizer, task_list, [length], samples, split="eval", seed=0)
    budget_list = parse_list(budgets, "--budgets", parse_budget)
    rows = run_eval(llm, tokenizer, suite, methods, budget_list, out, {}, plots=False)
    # One comparison: every prompt of the demo pooled (the per-task tables are in summary.md).
    summary = report.summarise([{**r, "group": "demo"} for r in rows], pooled=False)
    report.terminal(summary)
    picture = report.dots(
        summary, out / "demo.png", "demo",
        title=f"SmolLM2-135M-Instruct{f' ({dtype})' if dtype else ''}, {len(suite)} prompts of {length} tokens, KV budget {budgets} of {length} per head",
    )
    typer.echo(f"results: {out / 'results.jsonl'} | tables: {out / 'summary.md'} | picture: {picture}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def bench(ctx: typer.Context):
    """Eviction cost per method: time to first token, time added to a plain prefill, peak memory (see 'lookaheadkv bench --help')."""
    from .bench.cost import main as run

    run(ctx.args)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, raised by our own SIGINT handler.

    A subclass on purpose: CPython remembers a plain ``KeyboardInterrupt`` that leaves a code
    object run by ``exec`` (dataclasses and transformers build functions that way while they
    import) and then ends the process by SIGINT (exit -2) even after we handled it and asked
    for 130. It checks the exact type, so a subclass keeps the exit code ours.
    """


def _on_sigint(signum, frame):
    raise Interrupted


def main() -> None:
    import signal

    signal.signal(signal.SIGINT, _on_sigint)
    code = 0
    try:
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # keep the output to the answer, our bars and one-line errors
            app()
        except KeyboardInterrupt:  # outside a command's own handling (e.g. while importing)
            code = 130
        except SystemExit as done:
            code = done.code  # typer turns a Ctrl-C while it parses into a silent exit 130
        if code == 130:
            say_interrupted(once=True)
    finally:
        # The command has finished (or was interrupted and said so): a Ctrl-C while the
        # interpreter shuts down must not replace its exit code with a death by SIGINT.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code)


if __name__ == "__main__":
    main()
