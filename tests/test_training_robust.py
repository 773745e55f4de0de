"""Training data and runs under damage: what is validated on read, refused on resume, and survives SIGKILL.

* A damaged sample (truncated, NaN labels, wrong dtype, a prompt that no longer matches its
  hash) raises ``DataError`` naming the file; ``data build`` finds a truncated one on the rerun,
  moves it aside and rebuilds it, so the folder is whole again.
* Training stops with ``TrainingError`` on a non-finite loss or gradient and saves nothing
  after its last good checkpoint; a resume that changes the modules' shape is refused and
  leaves the run's saved config alone. The CLI says both in one ``error:`` line, exit 2.
* Real SIGKILLs (a subprocess killed at a seeded random point: after a random number of samples or steps, plus a random delay) of a data build and of a
  training run, followed by a cut last line in ``log.jsonl``: the rerun ends with the same
  samples / the same modules and log as an uninterrupted run.
* bf16: a training step's loss on a bf16 base model is within 2% of the fp32 step's, and
  bf16 labels (float32 arithmetic) are within 0.05 in total variation of fp32 labels.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import single_thread  # noqa: F401
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.models import tiny_model
from lookaheadkv.training import train as train_module
from lookaheadkv.training.data import DataError, PromptRecord, TargetDataset, build, sample_path
from lookaheadkv.training.targets import make_target
from lookaheadkv.training.train import TrainConfig, TrainingError, sample_loss, train

ROOT = Path(__file__).resolve().parents[1]

# The worker builds the same records and model as make() below, in a process we can SIGKILL.
WORKER_SETUP = """
import sys, time, torch
from lookaheadkv.models import tiny_model
from lookaheadkv.training.data import PromptRecord
def make():
    g = torch.Generator().manual_seed(5)
    records = [PromptRecord(f"id{i}", "synthetic", torch.randint(3, 256, (int(torch.randint(24, 40, (1,), generator=g)),), generator=g).tolist()) for i in range(10)]
    return tiny_model("llama", seed=0, initializer_range=0.2), records
"""
exec(WORKER_SETUP)  # defines make() here too: the test and the worker share one definition


def run_and_kill(code: str, ready, extra: float) -> int:
    """Run ``code`` in a fresh Python; once ``ready()`` holds, wait ``extra`` seconds and SIGKILL it.

    Waiting for progress (not a fixed delay) makes the kill land mid-run however slow the
    machine is; ``extra`` (drawn by the caller) moves it to a random point inside a step.
    """
    proc = subprocess.Popen([sys.executable, "-c", WORKER_SETUP + textwrap.dedent(code)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(extra)
    proc.send_signal(signal.SIGKILL)
    return proc.wait()


def cut_last_line(path: Path) -> None:
    """Append half a record without its newline: what a kill inside a write leaves."""
    with open(path, "ab") as f:
        f.write(b'{"step": 99, "loss": 0.12')


@pytest.fixture(scope="module")
def model_and_records():
    return make()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, model_and_records):
    model, records = model_and_records
    out = tmp_path_factory.mktemp("data")
    build(model, records, out, max_new_tokens=6, eos_token_ids=[2], model_name="tiny")
    return out


def cfg(data, out, **kw) -> TrainConfig:
    settings = dict(steps=6, batch=2, lr=1e-2, n_lookahead=4, rank=4, eval_every=0, save_every=1, seed=0)
    settings.update(kw)
    return TrainConfig(data=str(data), out=str(out), **settings)


def assert_same_sample(a: Path, b: Path) -> None:
    """Same tensors, bit for bit, and the same id (the build time in the metadata differs)."""
    from lookaheadkv.training.data import read_sample

    x, y = read_sample(a), read_sample(b)
    assert x["id"] == y["id"]
    for k in ("prompt_ids", "response_ids", "labels"):
        assert torch.equal(x[k], y[k]), k


def copy_data(src: Path, dst: Path) -> Path:
    (dst / "samples").mkdir(parents=True)
    (dst / "manifest.json").write_bytes((src / "manifest.json").read_bytes())
    for p in (src / "samples").glob("*.safetensors"):
        (dst / "samples" / p.name).write_bytes(p.read_bytes())
    return dst


# --------------------------------------------------------------------------- validation on read


def test_damaged_samples_are_named_on_read(data_dir, tmp_path):
    data = copy_data(data_dir, tmp_path / "d")
    good = TargetDataset(data)[3]
    cases = {
        "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
        "nan": lambda p: save_file({"prompt_ids": good["prompt_ids"].int(), "response_ids": good["response_ids"].int(), "labels": torch.full_like(good["labels"], float("nan")).half()}, str(p), metadata={"id": "x", "source": "s"}),
        "dtype": lambda p: save_file({"prompt_ids": good["prompt_ids"].int(), "response_ids": good["response_ids"].int(), "labels": good["labels"].float()}, str(p), metadata={"id": "x", "source": "s"}),
        "shape": lambda p: save_file({"prompt_ids": good["prompt_ids"][:-1].int(), "response_ids": good["response_ids"].int(), "labels": good["labels"].half()}, str(p), metadata={"id": "x", "source": "s"}),
        "prompt hash": lambda p: save_file({"prompt_ids": (good["prompt_ids"] + 1).int(), "response_ids": good["response_ids"].int(), "labels": good["labels"].half()}, str(p), metadata={"id": "x", "source": "s", "prompt_sha": "0" * 16}),
    }
    path = sample_path(data, 3)
    original = path.read_bytes()
    for name, damage in cases.items():
        damage(path)
        with pytest.raises(DataError, match=rf"{path.name}.*rerun the same 'lookaheadkv data build'"):
            TargetDataset(data)[3]
        path.write_bytes(original)
    assert TargetDataset(data)[3]["id"] == good["id"]


def test_build_rebuilds_a_truncated_sample(data_dir, tmp_path, model_and_records, capsys):
    model, records = model_and_records
    data = copy_data(data_dir, tmp_path / "d")
    path = sample_path(data, 4)
    path.write_bytes(path.read_bytes()[:100])
    assert build(model, records, data, max_new_tokens=6, eos_token_ids=[2], model_name="tiny") == 1
    assert "moved aside" in capsys.readouterr().err
    assert path.with_suffix(".bad").exists()
    assert_same_sample(path, sample_path(data_dir, 4))


# --------------------------------------------------------------------------- training refuses


def test_nan_loss_stops_training_and_keeps_the_last_checkpoint(data_dir, tmp_path, model_and_records, monkeypatch):
    model, _ = model_and_records
    out = tmp_path / "run"
    train(model, cfg(data_dir, out, steps=2), progress=False)
    saved = (out / "checkpoint" / "model.safetensors").read_bytes()
    final = (out / "final" / "model.safetensors").read_bytes()
    real = train_module.sample_loss
    monkeypatch.setattr(train_module, "sample_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(TrainingError, match=r"non-finite loss .* step 3 .* nothing was saved after step 2"):
        train(model, cfg(data_dir, out, steps=4), progress=False)
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == saved
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert (out / "final" / "model.safetensors").read_bytes() == final  # no NaN modules saved


def test_nan_gradient_stops_training(data_dir, tmp_path, model_and_records, monkeypatch):
    model, _ = model_and_records
    real = train_module.sample_loss
    monkeypatch.setattr(train_module, "sample_loss", lambda m, mods, item: real(m, mods, item) + _nan_grad(mods))
    with pytest.raises(TrainingError, match="non-finite gradient"):
        train(model, cfg(data_dir, tmp_path / "run", steps=2), progress=False)


def _nan_grad(modules):
    """Zero in value, NaN in gradient: sqrt at 0 has an infinite derivative, times 0."""
    return torch.sqrt(modules.tokens[0, 0] * 0) * 1.0


def test_resume_with_another_rank_is_refused(data_dir, tmp_path, model_and_records):
    model, _ = model_and_records
    out = tmp_path / "run"
    train(model, cfg(data_dir, out, steps=2), progress=False)
    before = (out / "train_config.json").read_text()
    with pytest.raises(TrainingError, match=r"rank=4 \(asked: 8\).*same settings or use a new --out"):
        train(model, cfg(data_dir, out, steps=4, rank=8), progress=False)
    assert (out / "train_config.json").read_text() == before


def test_cli_train_errors_are_one_line(data_dir, tmp_path, model_and_records, smollm2):
    model, _ = model_and_records
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    smollm2[1].save_pretrained(folder)  # any tokenizer: training reads token ids only
    out = tmp_path / "run"
    base = [sys.executable, "-m", "lookaheadkv.cli", "train", "--data", str(data_dir), "--out", str(out), "--model", str(folder), "--batch", "2", "--n-lookahead", "4", "--save-every", "1", "--eval-every", "0", "--threads", "1"]
    ok = subprocess.run(base + ["--steps", "1", "--rank", "4"], capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(base + ["--steps", "2", "--rank", "8"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2
    lines = [l for l in bad.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "rank=4" in lines[0]


# --------------------------------------------------------------------------- SIGKILL


def test_data_build_killed_and_rerun_equals_an_uninterrupted_build(tmp_path, data_dir, model_and_records):
    model, records = model_and_records
    out = tmp_path / "killed"
    code = f"""
    from lookaheadkv.training.data import build
    model, records = make()
    build(model, records, {str(out)!r}, max_new_tokens=6, eos_token_ids=[2], model_name="tiny", on_progress=lambda i, skipped: time.sleep(0.3))
    """
    rng = random.Random(17)
    k = rng.randint(2, len(records) - 4)
    rc = run_and_kill(code, lambda: len(list((out / "samples").glob("*.safetensors"))) >= k, rng.uniform(0.0, 0.3))
    assert rc == -signal.SIGKILL
    done = sorted((out / "samples").glob("*.safetensors"))
    assert 0 < len(done) < len(records), "the kill should land mid-build: adjust the delay"
    done[-1].write_bytes(done[-1].read_bytes()[:-50])  # and a damaged last file, as a kill during a copy leaves
    build(model, records, out, max_new_tokens=6, eos_token_ids=[2], model_name="tiny")
    for i in range(len(records)):
        assert_same_sample(sample_path(out, i), sample_path(data_dir, i))


def test_training_killed_with_a_cut_log_line_resumes_as_the_same_run(tmp_path, data_dir, model_and_records):
    model, _ = model_and_records
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    train(model, cfg(data_dir, straight, steps=8), progress=False)
    code = f"""
    from lookaheadkv.training import train as t
    from lookaheadkv.training.train import TrainConfig
    real = t.sample_loss
    t.sample_loss = lambda *a: (time.sleep(0.25), real(*a))[1]
    model, _ = make()
    t.train(model, TrainConfig(data={str(data_dir)!r}, out={str(killed)!r}, steps=8, batch=2, lr=1e-2, n_lookahead=4, rank=4, eval_every=0, save_every=1, seed=0), progress=False)
    """
    rng = random.Random(3)
    k = rng.randint(2, 5)

    def reached() -> bool:
        try:
            return json.loads((killed / "checkpoint" / "state.json").read_text())["step"] >= k
        except (OSError, ValueError):
            return False

    assert run_and_kill(code, reached, rng.uniform(0.0, 0.5)) == -signal.SIGKILL
    step = json.loads((killed / "checkpoint" / "state.json").read_text())["step"]
    assert 0 < step < 8, "the kill should land mid-run: adjust the delay"
    cut_last_line(killed / "log.jsonl")
    train(model, cfg(data_dir, killed, steps=8), progress=False)
    a, b = LookaheadModules.from_pretrained(straight / "final").state_dict(), LookaheadModules.from_pretrained(killed / "final").state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0)
    la = [json.loads(l) for l in (straight / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (killed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == list(range(1, 9))
    assert [r["loss"] for r in lb] == pytest.approx([r["loss"] for r in la], abs=1e-6)


# --------------------------------------------------------------------------- bf16


def test_bf16_labels_and_loss_are_close_to_fp32(model_and_records):
    """Stated tolerances: labels within 0.05 total variation per row; a step's loss within 2%."""
    fp32 = tiny_model("llama", seed=0, initializer_range=0.2)
    bf16 = tiny_model("llama", seed=0, initializer_range=0.2).to(torch.bfloat16)
    _, records = model_and_records
    prompt = torch.tensor([records[0].token_ids])
    response = make_target(fp32, prompt, 6, [10_000])["response_ids"].tolist()
    a = make_target(fp32, prompt, 6, [10_000], response)
    b = make_target(bf16, prompt, 6, [10_000], response)
    assert b["labels"].dtype == torch.float32
    tv = 0.5 * (a["labels"] - b["labels"]).abs().sum(-1)
    assert tv.max() < 0.05, tv.max()
    assert tv.max() > 0  # bf16 really ran
    modules = LookaheadModules.for_model(fp32, seed=0, n_lookahead=4, rank=4)
    item = {"prompt_ids": prompt[0], "labels": a["labels"]}
    la, lb = sample_loss(fp32, modules, item), sample_loss(bf16, modules, item)
    assert lb.dtype == torch.float32 and math.isfinite(lb.item())
    assert abs(lb.item() - la.item()) <= 0.02 * la.item(), (la.item(), lb.item())
    lb.backward()
    assert modules.tokens.grad.dtype == torch.float32 and torch.isfinite(modules.tokens.grad).all()


def test_init_from_saved_modules_starts_there_with_a_fresh_optimizer(data_dir, tmp_path, model_and_records):
    model, _ = model_and_records
    first = train(model, cfg(data_dir, tmp_path / "a", steps=2), progress=False)
    second = tmp_path / "b"
    calls = []
    real = train_module.sample_loss

    def spy(m, mods, item):
        if not calls:  # the first loss is computed with the modules given to --init
            for k, v in first.state_dict().items():
                assert torch.equal(mods.state_dict()[k], v), k
        calls.append(1)
        return real(m, mods, item)

    train_module.sample_loss = spy
    try:
        train(model, cfg(data_dir, second, steps=2, init=str(tmp_path / "a" / "final")), progress=False)
    finally:
        train_module.sample_loss = real
    assert len(calls) == 4  # steps 1 and 2 of a new run, batch 2
    with pytest.raises(FileNotFoundError, match="neither a training checkpoint"):
        train(model, cfg(data_dir, tmp_path / "c", steps=1, init=str(tmp_path)), progress=False)
