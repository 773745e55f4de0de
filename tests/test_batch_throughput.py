"""benchmarks/batch_throughput.py at a tiny shape: it runs, every way answers every prompt, the table has its rows (no timing is judged)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_batch_throughput_runs_at_a_tiny_shape(tmp_path):
    out = tmp_path / "bt.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "batch_throughput.py"), "--tiny", "--threads", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"lookahead", "snapkv", "full"}
    for by_mode in result["results"].values():
        assert set(by_mode) == {"single", "batched"}
        assert all(r["tokens"] == 8 * 4 and r["seconds"] > 0 and r["peak_mib"] > 0 for r in by_mode.values())
    assert [row[0] for row in result["table"]] == ["lookahead @ 16", "snapkv @ 16", "full cache"]
    assert "batched / one at a time" in done.stdout and result["settings"]["prompts"] == 8
