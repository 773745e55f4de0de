"""A training set on disk: one fp16 safetensors file per sample, built once, resumable.

Layout of a data folder::

    manifest.json                 model, settings, the prompt list's fingerprint
    samples/000123.safetensors    prompt_ids (int32), response_ids (int32), labels (fp16, layers x heads x L)

A folder made by ``lookaheadkv data cut`` (:mod:`.midanswer`) has the same layout; its samples'
ids are ``<source id>@cut0.50`` and its manifest names the folder it derives from.

Each sample is written to a temporary name and renamed, so an interrupted build leaves
only whole samples; a rerun skips them and continues. A sample that was damaged after it
was written (a truncated copy, a disk error) is found on the rerun, moved aside as
``*.bad`` and built again; reading a damaged sample raises :class:`DataError` naming it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..tasks.sample import ruler_match
from .targets import generate_responses, make_target

MANIFEST = "manifest.json"
KEYS = {"prompt_ids": torch.int32, "response_ids": torch.int32, "labels": torch.float16}


class DataError(ValueError):
    """A sample file that cannot be trained on (truncated, wrong shapes, non-finite labels)."""


def _ids_hash(ids) -> str:
    return hashlib.sha256(bytes(str([int(t) for t in ids]), "ascii")).hexdigest()[:16]


def read_sample(path: Path, full: bool = True) -> dict:
    """The tensors and metadata of one sample file, checked; raises :class:`DataError` naming the file.

    Checks: the file opens, holds the three tensors with their dtypes, ``labels`` is
    ``(layers, heads, len(prompt_ids))``; with ``full``, the labels are finite, non-negative
    and sum to about 1 per row, and the prompt matches the hash recorded when it was built.
    """
    fix = f"delete {path} and rerun the same 'lookaheadkv data build' (or 'data cut') command to rebuild it"
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            if set(f.keys()) != set(KEYS) or "id" not in meta:
                raise DataError(f"{path} is not a sample (tensors {sorted(f.keys())}): {fix}")
            shapes = {k: f.get_slice(k).get_shape() for k in KEYS}
            item = {k: f.get_tensor(k) for k in KEYS} if full else {}
    except DataError:
        raise
    except Exception as err:  # safetensors raises its own error types for a damaged file
        raise DataError(f"{path} is damaged ({type(err).__name__}: {str(err).strip()[:80]}): {fix}") from None
    labels, prompt = shapes["labels"], shapes["prompt_ids"]
    if len(labels) != 3 or len(prompt) != 1 or labels[2] != prompt[0] or len(shapes["response_ids"]) != 1:
        raise DataError(f"{path} has labels {labels} for a prompt of {prompt}: {fix}")
    if full:
        for key, dtype in KEYS.items():
            if item[key].dtype != dtype:
                raise DataError(f"{path}: {key} is {item[key].dtype}, expected {dtype}: {fix}")
        lab = item["labels"].float()
        if not torch.isfinite(lab).all() or (lab < 0).any():
            raise DataError(f"{path} holds non-finite or negative labels: {fix}")
        if (lab.sum(-1) - 1).abs().max() > 0.02:
            raise DataError(f"{path}: label rows do not sum to 1 (max error {(lab.sum(-1) - 1).abs().max():.3g}): {fix}")
        if "prompt_sha" in meta and _ids_hash(item["prompt_ids"].tolist()) != meta["prompt_sha"]:
            raise DataError(f"{path}: the prompt does not match the hash recorded when it was built: {fix}")
    item["id"], item["source"] = meta["id"], meta.get("source", "")
    item[ANSWER_SCORE] = float(meta[ANSWER_SCORE]) if ANSWER_SCORE in meta else None
    return item


@dataclass
class PromptRecord:
    """A prompt ready for the model: its id, its source name, its token ids and, when its answer
    can be checked, the values a right answer holds (``expect``, ``match``: see :class:`.sources.Prompt`)."""

    id: str
    source: str
    token_ids: list[int]
    expect: tuple[str, ...] = ()
    match: str = "all"


def fingerprint(records: list[PromptRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.id.encode())
        h.update(bytes(str(r.token_ids), "ascii"))
    return h.hexdigest()[:16]


def read_manifest(folder: str | Path) -> dict:
    """The manifest of a data folder; raises FileNotFoundError saying how to make one."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a data folder (no {MANIFEST}): build one with 'lookaheadkv data build'")
    try:
        return json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path} is not valid JSON: rerun the command that made {folder}, or restore the file") from None


def _check_manifest(out: Path, manifest: dict, keys=("model", "max_new_tokens", "prompts", "dtype")) -> None:
    """Write ``manifest`` into a new folder, or refuse a folder whose manifest differs in one of ``keys``."""
    path = out / MANIFEST
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(tmp, path)
        return
    old = json.loads(path.read_text())
    for key in keys:
        if key == "dtype" and key not in old:
            continue  # folders built before the dtype was recorded were float32
        if old.get(key) != manifest.get(key):
            raise ValueError(
                f"{out} was built with {key}={old.get(key)!r}, this run asks for {manifest.get(key)!r}: "
                "use a new --out folder or the same settings"
            )


def sample_path(out: Path, index: int) -> Path:
    return out / "samples" / f"{index:06d}.safetensors"


def build(
    model,
    records: list[PromptRecord],
    out: str | Path,
    *,
    max_new_tokens: int,
    eos_token_ids,
    model_name: str,
    on_progress=None,
    only: set[int] | None = None,
    batch_size: int = 1,
    tokenizer=None,
) -> int:
    """Generate targets for every record not yet on disk (or only those in ``only``); returns how many were built now.

    With a ``tokenizer``, each sample of a record with ``expect`` also records ``answer_score``
    (RULER's string match of its decoded response, :func:`lookaheadkv.tasks.sample.ruler_match`) in its metadata; a sample already on disk
    that lacks it (built before answers were checked) gets it now, from its stored response.

    With ``batch_size`` > 1 the responses of that many prompts are decoded together (one
    batched step per token, ragged caches padded and masked), which is much faster on any
    hardware; prefills and labels run one sample at a time, and the labels reuse the prefill. Batches are formed from runs of ``8 * batch_size``
    pending prompts sorted by length, so little of a batch is padding; the order depends
    only on what is pending, so a resumed build forms the same kind of batches.
    """
    out = Path(out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    _check_manifest(out, {"model": model_name, "dtype": dtype, "max_new_tokens": max_new_tokens, "prompts": fingerprint(records), "count": len(records)})
    pending = []
    for index in range(len(records)):
        if only is not None and index not in only:
            continue
        path = sample_path(out, index)
        if path.exists() and _readable(path):
            if tokenizer is not None and records[index].expect:
                _add_answer_score(path, records[index], tokenizer)
            if on_progress:
                on_progress(index, skipped=True)
        else:
            pending.append(index)
    built = 0
    for chunk in _length_batches(pending, records, batch_size):
        start = time.perf_counter()
        responses, states = [None] * len(chunk), [None] * len(chunk)
        if batch_size > 1:
            responses, states = generate_responses(model, [records[i].token_ids for i in chunk], max_new_tokens, eos_token_ids)
        for k, index in enumerate(chunk):
            _save_sample(out, index, records[index], model, max_new_tokens, eos_token_ids, responses[k], states[k], start, tokenizer=tokenizer)
            states[k] = None  # free the prompt's cache once it is labelled
            built += 1
            if on_progress:
                on_progress(index, skipped=False)
    return built


def _readable(path: Path) -> bool:
    """True for a whole sample file; a damaged one is moved aside (``.bad``), said on stderr, and rebuilt."""
    try:
        read_sample(path, full=False)
        return True
    except DataError as err:
        os.replace(path, path.with_suffix(".bad"))
        print(f"warning: {str(err).split(': delete')[0]}; moved aside as {path.with_suffix('.bad').name} and rebuilt", file=sys.stderr)
        return False


def _length_batches(pending: list[int], records: list[PromptRecord], batch_size: int) -> list[list[int]]:
    """Batches of ``batch_size`` indices; within each run of ``8 * batch_size`` pending indices, by length."""
    if batch_size == 1:
        return [[i] for i in pending]
    batches = []
    run = 8 * batch_size
    for first in range(0, len(pending), run):
        group = sorted(pending[first : first + run], key=lambda i: (len(records[i].token_ids), i))
        batches += [group[k : k + batch_size] for k in range(0, len(group), batch_size)]
    return batches


def _save_sample(out: Path, index: int, record: PromptRecord, model, max_new_tokens, eos_token_ids, response, state, start, extra: dict | None = None, tokenizer=None) -> None:
    """Label ``record`` (its response generated now unless given) and write it atomically; ``extra``: more metadata."""
    target = make_target(model, torch.tensor([record.token_ids]), max_new_tokens, eos_token_ids, response, state)
    tensors = {
        "prompt_ids": target["prompt_ids"].to(torch.int32),
        "response_ids": target["response_ids"].to(torch.int32),
        "labels": target["labels"].to(torch.float16).contiguous(),
    }
    meta = {"id": record.id, "source": record.source, "seconds": f"{time.perf_counter() - start:.2f}", "prompt_sha": _ids_hash(record.token_ids), **(extra or {})}
    if tokenizer is not None and record.expect:
        meta[ANSWER_SCORE] = _score_text(tensors["response_ids"], record, tokenizer)
    _write(sample_path(out, index), tensors, meta)


ANSWER_SCORE = "answer_score"  # metadata key: how much of a checkable answer the response holds


def _score_text(response_ids: torch.Tensor, record: PromptRecord, tokenizer) -> str:
    text = tokenizer.decode(response_ids.tolist(), skip_special_tokens=True)
    return f"{ruler_match(text, record.expect, record.match):.4f}"


def answer_scores(out: str | Path, indices) -> list[float]:
    """The recorded ``answer_score`` of each built sample among ``indices`` that has one (in order)."""
    paths = [sample_path(Path(out), i) for i in sorted(indices)]
    scores = [read_sample(path, full=False)[ANSWER_SCORE] for path in paths if path.exists()]
    return [score for score in scores if score is not None]


def _answered(score: float | None) -> bool:
    return score is None or score >= 1.0


def _write(path: Path, tensors: dict, meta: dict) -> None:
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


def _add_answer_score(path: Path, record: PromptRecord, tokenizer) -> None:
    """Record ``answer_score`` in a sample built before answers were checked (atomic rewrite)."""
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        if ANSWER_SCORE in meta:
            return
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if tensors["prompt_ids"].tolist() != list(record.token_ids):
        raise DataError(f"{path} was built from another prompt than the one at its index: use a new --out folder")
    meta[ANSWER_SCORE] = _score_text(tensors["response_ids"], record, tokenizer)
    _write(path, tensors, meta)


CUT_SUFFIX = re.compile(r"(@cut[0-9]+\.[0-9]+)+$")  # what ``data cut`` appends to a sample's id


def source_id(sample_id: str) -> str:
    """The id of the sample ``sample_id`` derives from (``"a@cut0.50"`` -> ``"a"``); itself for a built sample."""
    return CUT_SUFFIX.sub("", sample_id)


class TargetDataset:
    """Read one built data folder, or the union of several (a list, read in the order given).

    ``split`` is "train", "heldout" or "all" (held out: 1 in ``heldout_every`` by the hash of
    the sample's id). A derived sample (``data cut``: id ``<source id>@cut0.50``) falls in the
    split of the sample it was cut from, so no held-out prompt is trained on through its cuts.

    ``answered_only`` drops every sample whose recorded ``answer_score`` is below 1: a checkable
    answer (needles, synthetic tasks) that missed a value the prompt asks for. Its labels say
    where a *wrong* answer looked, not where the needle is. Samples without a check stay.
    """

    def __init__(self, folder: str | Path | list, split: str = "all", heldout_every: int = 10, answered_only: bool = False):
        folders = [Path(folder)] if isinstance(folder, (str, Path)) else [Path(f) for f in folder]
        if not folders:
            raise ValueError("no data folder given: give at least one folder made by 'lookaheadkv data build'")
        seen = set()
        for f in folders:
            if f.resolve() in seen:
                raise ValueError(f"data folder {f} is given twice: give each folder once")
            seen.add(f.resolve())
        self.folders = folders
        self.folder = folders[0]
        self.manifests = [read_manifest(f) for f in folders]
        self.manifest = self.manifests[0]
        self.paths, self.counts = [], []
        for f in folders:
            paths = sorted((f / "samples").glob("*.safetensors"))
            if split != "all" or answered_only:
                metas = {p: read_sample(p, full=False) for p in paths}  # one header read per file
                if split != "all":
                    want = split == "heldout"
                    paths = [p for p in paths if (self._hash(source_id(metas[p]["id"])) % heldout_every == 0) == want]
                if answered_only:
                    paths = [p for p in paths if _answered(metas[p][ANSWER_SCORE])]
            self.paths += paths
            self.counts.append(len(paths))

    @staticmethod
    def _hash(text: str) -> int:
        return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)

    def spread(self, n: int) -> list[int]:
        """Indices of ``n`` samples taken from the folders in turn (one folder: ``0 .. n-1``)."""
        starts = [sum(self.counts[:k]) for k in range(len(self.counts))]
        picked = []
        for offset in range(max(self.counts, default=0)):
            picked += [start + offset for start, count in zip(starts, self.counts) if offset < count]
        return picked[:n]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        item = read_sample(self.paths[i])
        item["labels"] = item["labels"].float()
        item["prompt_ids"] = item["prompt_ids"].long()
        return item
