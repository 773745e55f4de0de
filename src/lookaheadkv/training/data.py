"""A training set on disk: one fp16 safetensors file per sample, built once, resumable.

Layout of a data folder::

    manifest.json                 model, settings, the prompt list's fingerprint
    samples/000123.safetensors    prompt_ids (int32), response_ids (int32), labels (fp16, layers x heads x L)

Each sample is written to a temporary name and renamed, so an interrupted build leaves
only whole samples; a rerun skips them and continues.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .targets import generate_responses, make_target

MANIFEST = "manifest.json"


@dataclass
class PromptRecord:
    """A prompt ready for the model: its id, its source name and its token ids."""

    id: str
    source: str
    token_ids: list[int]


def fingerprint(records: list[PromptRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(r.id.encode())
        h.update(bytes(str(r.token_ids), "ascii"))
    return h.hexdigest()[:16]


def _check_manifest(out: Path, manifest: dict) -> None:
    path = out / MANIFEST
    if not path.exists():
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        return
    old = json.loads(path.read_text())
    for key in ("model", "max_new_tokens", "prompts", "dtype"):
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
    pad_token_id: int = 0,
) -> int:
    """Generate targets for every record not yet on disk (or only those in ``only``); returns how many were built now.

    With ``batch_size`` > 1 the responses of that many prompts are generated together
    (a left-padded batch), which is much faster on any hardware; the labels are always
    computed one sample at a time. Batches are formed from runs of ``8 * batch_size``
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
        if sample_path(out, index).exists():
            if on_progress:
                on_progress(index, skipped=True)
        else:
            pending.append(index)
    built = 0
    for chunk in _length_batches(pending, records, batch_size):
        start = time.perf_counter()
        responses = [None] * len(chunk)
        if batch_size > 1:
            prompts = [records[i].token_ids for i in chunk]
            responses = generate_responses(model, prompts, max_new_tokens, eos_token_ids, pad_token_id)
        for index, response in zip(chunk, responses):
            _save_sample(out, index, records[index], model, max_new_tokens, eos_token_ids, response, start)
            built += 1
            if on_progress:
                on_progress(index, skipped=False)
    return built


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


def _save_sample(out: Path, index: int, record: PromptRecord, model, max_new_tokens, eos_token_ids, response, start) -> None:
    target = make_target(model, torch.tensor([record.token_ids]), max_new_tokens, eos_token_ids, response)
    tensors = {
        "prompt_ids": target["prompt_ids"].to(torch.int32),
        "response_ids": target["response_ids"].to(torch.int32),
        "labels": target["labels"].to(torch.float16).contiguous(),
    }
    meta = {"id": record.id, "source": record.source, "seconds": f"{time.perf_counter() - start:.2f}"}
    path = sample_path(out, index)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)


class TargetDataset:
    """Read a built data folder. ``split`` is "train", "heldout" or "all" (held out: 1 in ``heldout_every`` by id hash)."""

    def __init__(self, folder: str | Path, split: str = "all", heldout_every: int = 10):
        self.folder = Path(folder)
        if not (self.folder / MANIFEST).exists():
            raise FileNotFoundError(f"{self.folder} is not a data folder (no {MANIFEST}): build one with 'lookaheadkv data build'")
        self.manifest = json.loads((self.folder / MANIFEST).read_text())
        paths = sorted((self.folder / "samples").glob("*.safetensors"))
        if split != "all":
            want = split == "heldout"
            paths = [p for p in paths if (self._hash(self._id(p)) % heldout_every == 0) == want]
        self.paths = paths

    @staticmethod
    def _hash(text: str) -> int:
        return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)

    @staticmethod
    def _id(path: Path) -> str:
        with safe_open(str(path), "pt") as f:
            return f.metadata()["id"]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict:
        with safe_open(str(self.paths[i]), "pt") as f:
            item = {k: f.get_tensor(k) for k in f.keys()}
            item["id"] = f.metadata()["id"]
            item["source"] = f.metadata()["source"]
        item["labels"] = item["labels"].float()
        item["prompt_ids"] = item["prompt_ids"].long()
        return item
