"""Append-only JSON-lines record files that a kill cannot corrupt.

A run that appends one JSON object per line (``eval``'s ``results.jsonl``, training's
``log.jsonl``) can be killed in the middle of a write, leaving a last line without its
newline. Appending after it would glue the next record onto the half line and lose both.
Here every append first checks the file's last byte: a cut last line is repaired (it parses:
only its newline was lost) or dropped (it does not), with a one-line warning on stderr; then
the record goes out in one ``write`` of ``json + "\\n"`` and is flushed to disk. Reading skips
(and reports) a cut last line without touching the file.

This module depends on nothing else in the package, so any layer can use it.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

__all__ = ["append_record", "read_records", "repair"]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _cut_tail(path: Path) -> tuple[int, bytes] | None:
    """(offset, bytes) of a last line that lacks its newline, or None when the file ends cleanly."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return None
    if size == 0:
        return None
    with open(path, "rb") as f:
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return None
        # walk back to the previous newline, a block at a time
        end, block, start = size, 1 << 16, 0
        while end > 0:
            begin = max(0, end - block)
            f.seek(begin)
            chunk = f.read(end - begin)
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                start = begin + cut + 1
                break
            end = begin
        f.seek(start)
        return start, f.read()


def _parses(data: bytes) -> bool:
    try:
        return isinstance(json.loads(data.decode("utf-8")), dict)
    except (UnicodeDecodeError, ValueError):
        return False


def repair(path: str | os.PathLike) -> str | None:
    """Make ``path`` end with a complete line: "repaired", "dropped" or None (nothing to do).

    A last line that lacks its newline but holds a whole record gets its newline; one that was
    cut inside the record is removed (its run will be redone). Either is said on stderr.
    """
    path = Path(path)
    tail = _cut_tail(path)
    if tail is None:
        return None
    start, data = tail
    if data.strip() and _parses(data):
        with open(path, "ab") as f:
            f.write(b"\n")
        _warn(f"{path}: the last record had lost its newline (a killed write); added it")
        return "repaired"
    with open(path, "r+b") as f:
        f.truncate(start)
    _warn(f"{path}: dropped a cut last line ({len(data)} bytes, a killed write); its record will be redone")
    return "dropped"


def append_record(path: str | os.PathLike, record: dict, *, sync: bool = True) -> None:
    """Append ``record`` as one JSON line to ``path`` (created if missing), after :func:`repair`."""
    path = Path(path)
    repair(path)
    line = (json.dumps(record) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        written = os.write(fd, line)
        while written < len(line):  # a short write (rare): finish it
            written += os.write(fd, line[written:])
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str | os.PathLike) -> list[dict]:
    """Every complete record of ``path`` ([] when it does not exist), in file order.

    Lines that do not parse are skipped with a one-line warning (a cut last line is the
    expected case: the run that wrote it was killed); the file is left as it is.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    rows, bad = [], 0
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        _warn(f"{path}: skipped {bad} unreadable line(s) (a killed write cuts the last one); their records will be redone")
    return rows
