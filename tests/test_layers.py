"""The package's layers import downward only.

The order is written once, in ``docs/architecture.md`` (section "Layers"): one layer per line,
lowest first; names on one line are siblings. A module may import from its own unit (the
top-level module or sub-package it belongs to) and from units of lower layers, never from a
higher layer nor from a sibling. Every import counts, also one inside a function: a lazy import
hides a dependency, it does not remove it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "lookaheadkv"
DOC = ROOT / "docs" / "architecture.md"


def layers() -> list[list[str]]:
    """The layer lines of the code block under '## Layers' in docs/architecture.md, lowest first."""
    text = DOC.read_text()
    section = text[text.index("\n## Layers") :]
    block = re.search(r"```text\n(.*?)```", section, re.S).group(1)
    out = []
    for line in block.splitlines():
        names = line.split("#")[0].replace("->", " ").split()
        if names:
            out.append(names)
    return out


def unit_of(module: str) -> str | None:
    """``lookaheadkv.engine.prefill`` -> ``engine``; the package root itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_units(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, unit) of every lookaheadkv unit that ``source`` (the module ``module``) imports, relative imports resolved."""
    package = module if is_package else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(source, module)):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from .. import tasks`` imports the unit ``tasks``; ``from ..tasks import x`` the unit of the module
            targets = [f"{target}.{a.name}" for a in node.names] if target == "lookaheadkv" else [target]
        else:
            continue
        for target in targets:
            if target == "lookaheadkv" or target.startswith("lookaheadkv."):
                unit = unit_of(target)
                if unit is not None:
                    found.append((node.lineno, unit))
    return found


def test_layer_order_is_written_and_covers_every_unit():
    order = layers()
    names = [n for layer in order for n in layer]
    assert len(names) == len(set(names)), f"a unit is listed twice in docs/architecture.md: {names}"
    units = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir() if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").is_file()}
    assert units <= set(names), f"units with no layer in docs/architecture.md: {sorted(units - set(names))}"


def test_imports_run_downward_only():
    rank = {name: i for i, layer in enumerate(layers()) for name in layer}
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = unit_of(module_name(path))
        if own is None:
            continue  # the package root names its public API lazily (PEP 562), above every layer
        for line, unit in imported_units(path.read_text(), module_name(path), path.name == "__init__.py"):
            if unit != own and rank[unit] >= rank[own]:
                kind = "a sibling" if rank[unit] == rank[own] else "a higher layer"
                bad.append(f"{path.relative_to(ROOT)}:{line}: {own} imports {unit} ({kind})")
    assert not bad, "imports that run upward or sideways:\n" + "\n".join(bad)


def test_the_checker_sees_every_kind_of_import():
    """Relative, absolute, package-level and lazy (in-function) imports are all resolved to their unit."""
    source = (
        "import torch\nimport lookaheadkv.models\nfrom .cache import gather\nfrom ..scoring import max_pool\n"
        "def f():\n    from ..policies import SnapKV\n    from .. import training, records\n    from lookaheadkv.bench.common import Clock\n"
    )
    units = [u for _, u in imported_units(source, "lookaheadkv.engine.generate")]
    assert units == ["models", "engine", "scoring", "policies", "training", "records", "bench"]
    assert [u for _, u in imported_units("from .modules import X\n", "lookaheadkv.lookahead", is_package=True)] == ["lookahead"]
