"""Mid-answer training samples: a built sample's answer cut in two, its first part joined to the prompt.

Decode-time eviction (:mod:`lookaheadkv.engine.rescore`) re-scores the cache while the answer
is being written; LookaheadKV then runs its lookahead tokens over [prompt ; answer so far]. A
sample of ``lookaheadkv data build`` only ever has them right after the prompt. ``lookaheadkv
data cut`` derives, from each built sample (prompt ``x``, greedy answer ``y`` of ``n`` tokens
without its end-of-sequence token) and each cut fraction ``f`` in (0, 1), the sample::

    prompt_ids   = x + y[:k]        k = round(f * n), halves rounded up
    response_ids = y[k:]            (with y's end-of-sequence token, if it had one)
    labels       = the ground truth of y[k:] over x + y[:k]

The labels are computed exactly as the build computes them, by
:func:`~lookaheadkv.training.targets.make_target` with the response given: a prefill of the new
prompt, then :func:`~lookaheadkv.scoring.ground_truth` of the rest of the answer (float32
arithmetic, a trailing end-of-sequence token not labelled), stored as fp16.

No generation is needed: greedy decoding is prefix-consistent. After ``x + y[:k]`` the greedy
token is ``argmax p(. | x, y[:k])``, which is ``y[k]`` because that is how ``y`` was made;
by induction the model's greedy answer to the new prompt is ``y[k:]``, ending at the same
end-of-sequence token (or the same cap: ``max_new_tokens - k`` more tokens). This is exact
in exact arithmetic; a numerically different path (``y[:k]`` prefilled in one forward rather
than decoded token by token, bf16, a batched build) can flip a near-tie, after which the
model's own continuation would differ. The labels are still the attention that the rest of
the answer the model really gave pays to the new prompt.

The output is a data folder like a built one (:mod:`.data`), read by
:class:`~lookaheadkv.training.data.TargetDataset` and ``lookaheadkv train`` unchanged. Sample
ids are ``<source id>@cut0.50``; the source sample numbered ``i`` gives the samples numbered
``i * len(cuts) + j`` (``j``: the cut's place in the sorted fractions), so the numbers do not
depend on what was cut before, and a cut that is skipped (fewer than ``min_rest`` answer
tokens after it, or ``k = 0``: the source sample itself) leaves a gap. Like the build, a cut
is resumable and kill-safe: each sample is written to a temporary name and renamed, a rerun
skips the samples on disk, and a damaged one is moved aside (``*.bad``) and cut again.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from .data import PromptRecord, _check_manifest, _readable, _save_sample, read_manifest, read_sample, sample_path

CUT_KEYS = ("model", "dtype", "source_prompts", "cuts", "min_rest")  # a rerun into the same folder must keep these


@dataclass
class CutCount:
    """What a :func:`cut` run found: samples written now, already on disk, and cuts skipped as too short."""

    built: int = 0
    present: int = 0
    short: int = 0


def check_fractions(fractions) -> list[float]:
    """The cut fractions, sorted; raises ValueError unless each is in (0, 1) and their ids (two decimals) differ."""
    fractions = sorted(float(f) for f in fractions)
    if not fractions:
        raise ValueError("no cut fraction given: give --at 0.5 (or several: --at 0.25 --at 0.5)")
    for f in fractions:
        if not 0 < f < 1:
            raise ValueError(f"--at {f:g} is not in (0, 1): give the share of the answer that joins the prompt, e.g. --at 0.5")
    labels = [cut_label(f) for f in fractions]
    if len(set(labels)) != len(labels):
        raise ValueError(f"--at values {', '.join(f'{f:g}' for f in fractions)} give the same sample id at two decimals: give distinct fractions like 0.25,0.5")
    return fractions


def cut_label(fraction: float) -> str:
    """The suffix of a cut sample's id: ``@cut0.50``."""
    return f"@cut{fraction:.2f}"


def cut_point(fraction: float, answered: int) -> int:
    """``k``: how many of the ``answered`` tokens (end-of-sequence token excluded) join the prompt, ``round(f * n)`` with halves up."""
    return int(math.floor(fraction * answered + 0.5))


def answered_tokens(response: list[int], eos_token_ids) -> int:
    """Tokens of a response without its trailing end-of-sequence token (the labelled rows, as in ``make_target``)."""
    return len(response) - 1 if len(response) > 1 and response[-1] in set(eos_token_ids) else len(response)


def read_source(source: str | Path) -> dict:
    """The manifest of a folder to cut; raises unless it is a folder made by ``data build``."""
    manifest = read_manifest(source)
    if "derived_from" in manifest:
        raise ValueError(f"{source} is itself a cut folder (of {manifest['derived_from']}): cut the folder made by 'lookaheadkv data build'")
    return manifest


def source_numbers(source: str | Path) -> list[int]:
    """The numbers of the source folder's samples (``samples/000123.safetensors`` -> 123), sorted."""
    return sorted(int(p.stem) for p in (Path(source) / "samples").glob("*.safetensors") if p.stem.isdigit())


def cut(
    model,
    source: str | Path,
    out: str | Path,
    fractions,
    *,
    eos_token_ids,
    model_name: str,
    min_rest: int = 16,
    only: range | set[int] | None = None,
    on_progress=None,
) -> CutCount:
    """Write the mid-answer samples of every source sample (or those numbered in ``only``) not yet in ``out``.

    Parameters
    ----------
    model
        The model that built ``source`` (its greedy answers are the samples' responses).
    source
        A data folder made by ``lookaheadkv data build``; only the samples on disk are cut, so a
        rerun after more were built cuts those too.
    out
        The new data folder (created; a rerun resumes it).
    fractions
        Cut fractions in (0, 1), see the module docstring.
    eos_token_ids
        The model's end-of-sequence ids: a response's trailing one is not counted in ``n`` nor labelled.
    model_name
        Recorded in the manifest (a rerun must give the same).
    min_rest
        A cut is skipped when fewer than this many answer tokens (end-of-sequence token
        excluded) remain after it.
    only
        Source sample numbers to cut (``--range``); all by default.
    on_progress
        Called as ``on_progress(number)`` after each source sample.

    Returns
    -------
    CutCount
        Samples written now, already present, and cuts skipped as too short.
    """
    source, out = Path(source), Path(out)
    fractions = check_fractions(fractions)
    if min_rest < 1:
        raise ValueError(f"--min-rest must be >= 1, got {min_rest}")
    src = read_source(source)
    if out.resolve() == source.resolve():
        raise ValueError(f"--out {out} is the source folder: give a new folder for the cut samples")
    (out / "samples").mkdir(parents=True, exist_ok=True)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    manifest = {
        "model": model_name,
        "dtype": dtype,
        "max_new_tokens": src.get("max_new_tokens"),
        "derived_from": str(source),
        "note": "mid-answer cuts (lookaheadkv data cut): prompt = the source prompt + the first round(cut * n) answer tokens, response and labels = the rest of the answer",
        "source_prompts": src.get("prompts"),
        "source_manifest": src,
        "cuts": fractions,
        "min_rest": min_rest,
        "count": src.get("count", 0) * len(fractions),
    }
    _check_manifest(out, manifest, keys=CUT_KEYS)
    eos = set(eos_token_ids)
    done = CutCount()
    for number in source_numbers(source):
        if only is not None and number not in only:
            continue
        pending = [j for j in range(len(fractions)) if not _on_disk(sample_path(out, number * len(fractions) + j))]
        done.present += len(fractions) - len(pending)
        if pending:
            item = read_sample(sample_path(source, number))
            prompt, response = item["prompt_ids"].tolist(), item["response_ids"].tolist()
            answered = answered_tokens(response, eos)
            for j in pending:
                start = time.perf_counter()
                k = cut_point(fractions[j], answered)
                if k == 0 or answered - k < min_rest:
                    done.short += 1
                    continue
                record = PromptRecord(item["id"] + cut_label(fractions[j]), item["source"], prompt + response[:k])
                extra = {"cut": f"{fractions[j]:g}", "cut_tokens": str(k), "source_id": item["id"], "source_sample": sample_path(source, number).name}
                _save_sample(out, number * len(fractions) + j, record, model, None, eos, response[k:], None, start, extra)
                done.built += 1
        if on_progress:
            on_progress(number)
    return done


def _on_disk(path: Path) -> bool:
    """A whole sample is at ``path`` (a damaged one is moved aside and said on stderr, as the build does)."""
    return path.exists() and _readable(path)

