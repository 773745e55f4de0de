"""Mid-answer samples (``lookaheadkv data cut``) and training on several data folders.

* A cut sample is the source prompt plus the first ``k = round(f * n)`` answer tokens as the
  prompt, the rest of the answer as the response, and labels equal to an independent
  reference: the eager attention (tests/helpers.py, not the engine) of the rest-of-answer
  rows over the new prompt's columns in one forward over [prompt ; answer], averaged over the
  rows and L1-normalised, a trailing EOS row left out (``scoring.ground_truth``'s definition).
* Prefix consistency, the reason no generation is needed: Hugging Face's own greedy decoding
  from the new prompt gives the rest of the answer, token for token, and so does the build's
  decoding (stopping at the same EOS).
* A cut interrupted after some samples, with a damaged sample and a stray temporary file,
  resumes to the same files as an uninterrupted cut, redoing only what is missing; cutting
  by ranges gives the same files; a rerun with other cuts is refused.
* The command line: ``data cut`` writes what the API writes; bad input (--from not a data
  folder, --at outside (0, 1)) is one ``error:`` line with exit code 2.
* ``train`` on two folders runs, records both manifests in every checkpoint's
  ``data-seen.json``, resumes on the same folders and refuses another set (API and CLI).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import attention_probs, hf_greedy_tokens, invoke, one_error_line, single_thread  # noqa: F401  (autouse fixture)
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.models import tiny_model
from lookaheadkv.training.data import PromptRecord, TargetDataset, build, read_sample, sample_path, source_id
from lookaheadkv.training.midanswer import cut
from lookaheadkv.training.targets import make_target
from lookaheadkv.training.train import TrainConfig, TrainingError, train

MAX_NEW = 14
CUTS = [0.25, 0.5]
MIN_REST = 4
N_RECORDS = 8  # ids "id0".."id7": id0 falls in the held-out split


def make_records(n: int, seed: int = 0) -> list[PromptRecord]:
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        length = int(torch.randint(20, 32, (1,), generator=g))
        records.append(PromptRecord(f"id{i}", "synthetic", torch.randint(3, 256, (length,), generator=g).tolist()))
    return records


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0, initializer_range=0.2)  # peaky attention: labels far from uniform


@pytest.fixture(scope="module")
def records():
    return make_records(N_RECORDS)


@pytest.fixture(scope="module")
def eos(model, records):
    """An EOS that record 0 produces at its 8th token: some answers stop early, some run to the cap."""
    free = make_target(model, torch.tensor([records[0].token_ids]), MAX_NEW, [10_000])["response_ids"].tolist()
    return next(t for i, t in enumerate(free) if i >= 7 and t not in free[:i])


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, model, eos):
    """The tiny model saved with a word-level tokenizer of its vocabulary, its EOS the one above."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model")
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(256)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", pad_token="t0").save_pretrained(folder)
    model.generation_config.eos_token_id = eos
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory, model, records, eos, model_folder):
    out = tmp_path_factory.mktemp("source")
    assert build(model, records, out, max_new_tokens=MAX_NEW, eos_token_ids=[eos], model_name=str(model_folder)) == N_RECORDS
    return out


@pytest.fixture(scope="module")
def cut_dir(tmp_path_factory, model, source, eos, model_folder):
    out = tmp_path_factory.mktemp("cut")
    cut(model, source, out, CUTS, eos_token_ids=[eos], model_name=str(model_folder), min_rest=MIN_REST)
    return out


def reference_labels(model, prompt: list[int], rest: list[int]) -> torch.Tensor:
    """(layers, heads, L): eager attention of the ``rest`` rows over the ``prompt`` columns, one forward."""
    L = len(prompt)
    probs = attention_probs(model, torch.tensor([prompt + rest]))  # per layer (heads, T, T)
    mass = torch.stack([p[:, L:, :L].double().mean(dim=1) for p in probs])
    return (mass / mass.sum(-1, keepdim=True)).float()


def expected_cuts(source: Path, eos: int):
    """(source item, fraction, k, output number) for every cut that should exist, computed by hand."""
    for path in sorted((source / "samples").glob("*.safetensors")):
        item = read_sample(path)
        response = item["response_ids"].tolist()
        n = len(response) - 1 if response[-1] == eos else len(response)
        for j, f in enumerate(CUTS):
            k = int(f * n + 0.5)
            if k >= 1 and n - k >= MIN_REST:
                yield item, f, k, int(path.stem) * len(CUTS) + j


def same_files(a: Path, b: Path) -> None:
    """The same sample files, tensors bit for bit and the same ids (build times differ)."""
    names = sorted(p.name for p in (a / "samples").glob("*.safetensors"))
    assert names == sorted(p.name for p in (b / "samples").glob("*.safetensors"))
    for name in names:
        x, y = read_sample(a / "samples" / name), read_sample(b / "samples" / name)
        assert x["id"] == y["id"]
        for key in ("prompt_ids", "response_ids", "labels"):
            assert torch.equal(x[key], y[key]), (name, key)


# ----------------------------------------------------------------------------- the samples


def test_cut_samples_and_labels_equal_an_independent_reference(source, cut_dir, model, eos):
    wanted = list(expected_cuts(source, eos))
    got = sorted(p.name for p in (cut_dir / "samples").glob("*.safetensors"))
    assert got == sorted(sample_path(cut_dir, number).name for *_, number in wanted)
    # the check has teeth: some cuts were skipped as too short, some answers end with the EOS
    assert 0 < len(wanted) < N_RECORDS * len(CUTS)
    assert any(item["response_ids"][-1] == eos for item, *_ in wanted)
    assert any(item["response_ids"][-1] != eos for item, *_ in wanted)
    for item, f, k, number in wanted:
        sample = read_sample(sample_path(cut_dir, number))
        prompt, response = item["prompt_ids"].tolist(), item["response_ids"].tolist()
        assert sample["id"] == f"{item['id']}@cut{f:.2f}" and sample["source"] == item["source"]
        assert sample["prompt_ids"].tolist() == prompt + response[:k]
        assert sample["response_ids"].tolist() == response[k:]
        rest = response[k:-1] if response[-1] == eos else response[k:]  # the EOS row is never labelled
        expected = reference_labels(model, prompt + response[:k], rest)
        assert sample["labels"].shape == expected.shape == (4, 4, len(prompt) + k)
        torch.testing.assert_close(sample["labels"].float(), expected, atol=1e-3, rtol=1e-2)  # stored as fp16
        assert expected.max() > 3 / (len(prompt) + k)  # far from uniform
    manifest = json.loads((cut_dir / "manifest.json").read_text())
    assert manifest["cuts"] == CUTS and manifest["min_rest"] == MIN_REST and manifest["derived_from"] == str(source)
    assert manifest["source_manifest"] == json.loads((source / "manifest.json").read_text())
    assert manifest["source_prompts"] == manifest["source_manifest"]["prompts"]


def test_prefix_consistency_the_rest_of_the_answer_is_the_greedy_continuation(source, cut_dir, model, eos):
    """Why no generation is needed: greedy decoding from prompt + y[:k] gives y[k:]."""
    checked = 0
    for path in sorted((cut_dir / "samples").glob("*.safetensors")):
        sample = read_sample(path)
        prompt, rest = sample["prompt_ids"][None].long(), sample["response_ids"].tolist()
        # Hugging Face's own greedy decoding (no EOS stop), independent of the engine
        assert hf_greedy_tokens(model, prompt, len(rest)) == rest, sample["id"]
        # and the build's own decoding stops at the same EOS, or runs to the same cap
        k = len(prompt[0]) - len(read_sample(sample_path(source, int(path.stem) // len(CUTS)))["prompt_ids"])
        assert make_target(model, prompt, MAX_NEW - k, [eos])["response_ids"].tolist() == rest, sample["id"]
        checked += 1
    assert checked >= 6


def test_cut_samples_fall_in_their_source_samples_split(source, cut_dir):
    held = {TargetDataset(source, "heldout")[i]["id"] for i in range(len(TargetDataset(source, "heldout")))}
    assert held == {"id0"}
    cut_held = TargetDataset(cut_dir, "heldout")
    cut_train = TargetDataset(cut_dir, "train")
    assert len(cut_held) > 0 and len(cut_train) > 0
    assert {source_id(cut_held[i]["id"]) for i in range(len(cut_held))} == held
    assert not {source_id(cut_train[i]["id"]) for i in range(len(cut_train))} & held
    assert source_id("a:b:0:1@cut0.50") == "a:b:0:1" and source_id("x@y") == "x@y"


# ----------------------------------------------------------------------------- resumable


def test_interrupted_cut_resumes_to_the_same_files(tmp_path, source, cut_dir, model, eos, model_folder, capsys):
    out = tmp_path / "cut"
    kw = dict(eos_token_ids=[eos], model_name=str(model_folder), min_rest=MIN_REST)

    class Killed(Exception):
        pass

    def kill_after_3(number):
        if number == 2:
            raise Killed

    # a first run over a range, then one killed after the source's third sample
    first = cut(model, source, out, CUTS, only=range(0, 2), **kw)
    assert first.built > 0 and first.present == 0
    with pytest.raises(Killed):
        cut(model, source, out, CUTS, on_progress=kill_after_3, **kw)
    done = sorted((out / "samples").glob("*.safetensors"))
    assert 0 < len(done) < len(list((cut_dir / "samples").glob("*.safetensors")))
    # what a kill can leave: a damaged sample and a temporary file
    done[-1].write_bytes(done[-1].read_bytes()[:-40])
    (out / "samples" / "999999.tmp").write_bytes(b"\x00" * 8)
    before = {p: p.stat().st_mtime_ns for p in done[:-1]}

    again = cut(model, source, out, CUTS, **kw)
    assert "moved aside" in capsys.readouterr().err
    assert done[-1].with_suffix(".bad").exists()
    assert again.present == len(done) - 1
    assert again.built == len(list((cut_dir / "samples").glob("*.safetensors"))) - again.present
    assert {p: p.stat().st_mtime_ns for p in done[:-1]} == before  # nothing finished was redone
    same_files(out, cut_dir)
    # a third run has nothing left to do
    third = cut(model, source, out, CUTS, **kw)
    assert third.built == 0 and third.short == again.short
    # other cuts into the same folder are refused, before anything is written
    with pytest.raises(ValueError, match=r"cuts=\[0.25, 0.5\].*asks for \[0.5\].*new --out folder"):
        cut(model, source, out, [0.5], **kw)
    with pytest.raises(ValueError, match="min_rest=4"):
        cut(model, source, out, CUTS, eos_token_ids=[eos], model_name=str(model_folder), min_rest=5)


# ----------------------------------------------------------------------------- command line


def test_cli_cut_writes_what_the_api_writes(tmp_path, source, cut_dir):
    out = tmp_path / "cli-cut"
    result = invoke("data", "cut", "--from", str(source), "--out", str(out), "--at", "0.5", "--at", "0.25", "--min-rest", str(MIN_REST), "--threads", "1")
    assert result.exit_code == 0, (result.output, result.exception)
    same_files(out, cut_dir)
    # a list in one --at, and the rerun has nothing to do
    result = invoke("data", "cut", "--from", str(source), "--out", str(out), "--at", "0.25,0.5", "--min-rest", str(MIN_REST))
    assert result.exit_code == 0 and "0 samples cut now" in result.output, result.output
    one_error_line(invoke("data", "cut", "--from", str(source), "--out", str(out), "--at", "0.5", "--min-rest", str(MIN_REST)), "cuts=", "new --out folder")


def test_cli_cut_bad_input_is_one_error_line(tmp_path, source, cut_dir):
    args = lambda src, *at: ("data", "cut", "--from", str(src), "--out", str(tmp_path / "o"), *[x for a in at for x in ("--at", a)])  # noqa: E731
    (tmp_path / "empty").mkdir()
    one_error_line(invoke(*args(tmp_path / "empty", "0.5")), "not a data folder", "data build")
    one_error_line(invoke(*args(tmp_path / "missing", "0.5")), "not a data folder")
    one_error_line(invoke(*args(cut_dir, "0.5")), "itself a cut folder")
    for bad in ("0", "1", "1.5", "-0.2"):
        one_error_line(invoke(*args(source, "0.5", bad)), "not in (0, 1)")
    one_error_line(invoke(*args(source, "half")), "--at takes a comma-separated list")
    one_error_line(invoke(*args(source, "0.5", "0.501")), "same sample id")
    one_error_line(invoke(*args(source, "0.5"), "--range", "900-950"), "holds none of the")
    one_error_line(invoke("data", "cut", "--from", str(source), "--out", str(source), "--at", "0.5"), "is the --from folder")
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- training on several folders


def config(data, out, **kw) -> TrainConfig:
    settings = dict(steps=2, batch=2, lr=1e-2, n_lookahead=4, rank=4, eval_every=2, eval_samples=3, budgets=[8], save_every=1, seed=0)
    settings.update(kw)
    return TrainConfig(data=data, out=str(out), **settings)


def test_train_on_two_folders_records_both_and_refuses_another_set(tmp_path, model, source, cut_dir):
    both = [str(source), str(cut_dir)]
    union = TargetDataset(both, "train")
    assert len(union) == len(TargetDataset(source, "train")) + len(TargetDataset(cut_dir, "train"))
    held = TargetDataset(both, "heldout")
    assert [held[i]["id"] for i in held.spread(3)] == ["id0", "id0@cut0.25"]  # id0@cut0.50 is too short
    assert [union.paths[i].parents[1] for i in union.spread(5)] == [source, cut_dir, source, cut_dir, source]  # the folders in turn
    assert TargetDataset(source, "train").spread(4) == [0, 1, 2, 3]  # one folder: the first samples, as before
    out = tmp_path / "run"
    train(model, config(both, out), progress=False)
    for folder in (out / "checkpoint", out / "final"):
        seen = json.loads((folder / "data-seen.json").read_text())["folders"]
        assert [f["folder"] for f in seen] == both
        assert [f["manifest"] for f in seen] == [json.loads((Path(d) / "manifest.json").read_text()) for d in both]
        assert [f["train_samples"] for f in seen] == [len(TargetDataset(d, "train")) for d in both]
    assert json.loads((out / "train_config.json").read_text())["data"] == both
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and "heldout" in log[-1]
    saved = (out / "train_config.json").read_text()
    for other in ([str(source)], [str(cut_dir), str(source)]):
        with pytest.raises(TrainingError, match=r"was trained on --data .* same data folders .* new --out folder"):
            train(model, config(other, out, steps=4), progress=False)
    assert (out / "train_config.json").read_text() == saved
    # the same folders resume
    train(model, config(both, out, steps=3), progress=False)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    # one folder as before: its config records a plain path, its checkpoint that folder alone
    single = tmp_path / "single"
    train(model, config(str(source), single), progress=False)
    assert json.loads((single / "train_config.json").read_text())["data"] == str(source)
    assert [f["folder"] for f in json.loads((single / "checkpoint" / "data-seen.json").read_text())["folders"]] == [str(source)]
    with pytest.raises(ValueError, match="given twice"):
        TargetDataset([source, source])


def test_cli_train_on_two_folders_and_a_refused_resume(tmp_path, source, cut_dir, model_folder):
    out = tmp_path / "run"
    base = ["train", "--data", str(source), "--data", str(cut_dir), "--out", str(out), "--model", str(model_folder), "--batch", "2", "--n-lookahead", "4", "--rank", "4", "--save-every", "1", "--eval-every", "0", "--threads", "1"]
    ok = invoke(*base, "--steps", "2")
    assert ok.exit_code == 0, (ok.output, ok.exception)
    seen = json.loads((out / "checkpoint" / "data-seen.json").read_text())["folders"]
    assert [f["folder"] for f in seen] == [str(source), str(cut_dir)]
    one = ["train", "--data", str(source), *base[5:], "--steps", "3"]
    one_error_line(invoke(*one), "was trained on --data", "new --out folder")
    one_error_line(invoke(*base, "--data", str(source), "--steps", "3"), "given twice")
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert LookaheadModules.from_pretrained(out / "final").config.rank == 4
