"""Offline text that ships on every machine, split once into training and held-out parts.

Three corpora, none downloaded:

- **Python source**: the standard library's ``.py`` files (``sysconfig``'s ``stdlib``), the
  paper's "The Stack" share. All of it is training material except :data:`RESERVED`.
- **Package prose**: the long descriptions (README text) inside the installed packages'
  ``*.dist-info/METADATA``. A package's prose is *held out* iff the first byte of
  ``sha256(name)`` is divisible by 3 (:func:`is_heldout_package`); the held-out part is the
  haystack of the generalisation set (:mod:`lookaheadkv.tasks.heldout`) and never
  enters training; the rest is training material.
- **Reserved**: Python's own documentation text (the ``pydoc_data`` package). It is kept for
  independent checks: nothing in this library reads it, and :func:`assert_not_reserved`
  guards every training path.

Everything is listed in sorted order so that a draw with a fixed seed picks the same file on
every machine with the same Python and the same pinned packages.
"""

from __future__ import annotations

import email.parser
import functools
import hashlib
import sysconfig
from pathlib import Path

RESERVED = ("pydoc_data",)
"""Top-level stdlib packages reserved for independent checks: never read here."""

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "lib2to3", "tests", "test", "idle_test"} | set(RESERVED)
_MIN_SOURCE_CHARS = 4_000  # shorter files make too little context
_MIN_PROSE_CHARS = 1_500


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_reserved(path: str | Path) -> bool:
    """True for any path inside a reserved package (``.../pydoc_data/...``)."""
    return any(part in RESERVED for part in Path(path).parts)


def assert_not_reserved(path: str | Path) -> None:
    if is_reserved(path):
        raise ValueError(f"{path} is reserved for independent checks (pydoc_data) and must never be trained on")


@functools.lru_cache(maxsize=1)
def stdlib_sources() -> tuple[Path, ...]:
    """The standard library's ``.py`` files of at least 4,000 characters, reserved ones excluded, sorted."""
    root = stdlib_root()
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS for part in rel.parts[:-1]):
            continue
        try:
            if path.stat().st_size >= _MIN_SOURCE_CHARS:
                found.append(path)
        except OSError:
            continue
    return tuple(sorted(found, key=lambda p: p.relative_to(root).as_posix()))


def read_source(path: Path) -> str:
    assert_not_reserved(path)
    return path.read_text(encoding="utf-8", errors="replace")


def _package_hash(name: str) -> int:
    return hashlib.sha256(name.lower().replace("_", "-").encode()).digest()[0]


def is_heldout_package(name: str) -> bool:
    """True when the package's prose belongs to the held-out generalisation corpus."""
    return _package_hash(name) % 3 == 0


@functools.lru_cache(maxsize=1)
def package_prose() -> tuple[tuple[str, str], ...]:
    """(package name, long description) of every installed distribution with enough prose, sorted by name."""
    import importlib.metadata

    seen = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata.get("Name")
        if not name or name.lower() in seen:
            continue
        text = dist.read_text("METADATA") or ""
        body = email.parser.Parser().parsestr(text).get_payload()
        body = body if isinstance(body, str) else ""
        if not body.strip():
            body = dist.metadata.get("Description") or ""
        body = _clean_prose(body)
        if len(body) >= _MIN_PROSE_CHARS:
            seen[name.lower()] = (name.lower(), body)
    return tuple(seen[k] for k in sorted(seen))


def _clean_prose(text: str) -> str:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").splitlines()]
    out, blank = [], False
    for line in lines:
        if not line.strip():
            if not blank and out:
                out.append("")
            blank = True
            continue
        out.append(line)
        blank = False
    return "\n".join(out).strip()


def training_prose() -> tuple[tuple[str, str], ...]:
    """Package prose that training may use (the held-out packages removed)."""
    return tuple((n, t) for n, t in package_prose() if not is_heldout_package(n))


def heldout_prose() -> tuple[tuple[str, str], ...]:
    """Package prose of the held-out generalisation corpus: never trained on."""
    return tuple((n, t) for n, t in package_prose() if is_heldout_package(n))


def paragraphs(text: str) -> list[str]:
    """Non-empty blocks of ``text`` separated by blank lines."""
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def fingerprint() -> str:
    """A short hash of what the corpora hold here (file names and sizes, package names): recorded in data manifests."""
    h = hashlib.sha256()
    root = stdlib_root()
    for path in stdlib_sources():
        h.update(f"{path.relative_to(root).as_posix()}:{path.stat().st_size}\n".encode())
    for name, text in package_prose():
        h.update(f"{name}:{len(text)}\n".encode())
    return h.hexdigest()[:16]
