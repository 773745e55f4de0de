"""Training: ground-truth labels, greedy targets, the data build, the dataset, the loss and the loop.

* Labels equal an independent reference: Hugging Face's own *eager* attention over the whole
  sequence [prompt ; response] in one forward (rows of the response, prompt columns, mean over
  rows, L1-normalised), for every architecture; chunking the rows changes nothing.
* ``make_target``'s response is Hugging Face greedy ``generate``; a produced EOS is kept in the
  response but dropped from the labelled rows.
* A short run on a tiny model with peaky attention lowers the loss; a resumed run (after a
  clean stop or a crash) is the same run as an uninterrupted one, weights and log alike.
* An interrupted data build (a kill after k samples, or a crash mid-write) keeps every finished
  sample, redoes none of them and loses none; a folder built with other settings is refused.
* ``kl_loss`` and ``attention_recall`` against hand-worked numbers.

The tiny models use ``initializer_range=0.2`` so their attention is far from uniform: with the
default 0.02 every row is nearly uniform, labels are trivially predictable and most of these
checks could not fail.
"""

from __future__ import annotations

import json
import math
import statistics
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from helpers import ARCHS, masked_lora, random_ids, randomize_lora_b, single_thread  # noqa: F401
from lookaheadkv.engine.prefill import prefill
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.models import tiny_model
from lookaheadkv.training import data as data_module
from lookaheadkv.training import train as train_module
from lookaheadkv.training.data import PromptRecord, TargetDataset, build, sample_path
from lookaheadkv.training.targets import ground_truth, make_target
from lookaheadkv.scoring import attention_recall
from lookaheadkv.training.train import (
    TrainConfig,
    kl_loss,
    learning_rate,
    sample_loss,
    sample_order,
    train,
)

PEAKY = 0.2  # initializer_range of the tiny models: non-uniform attention
MAX_NEW = 8
N_RECORDS = 16  # ids "id0".."id15": id0, id11 and id15 fall in the held-out split


def peaky_model(arch: str = "llama", seed: int = 0):
    return tiny_model(arch, seed=seed, initializer_range=PEAKY)


def make_records(n: int, *, seed: int = 0, prefix: str = "id") -> list[PromptRecord]:
    g = torch.Generator().manual_seed(seed)
    records = []
    for i in range(n):
        length = int(torch.randint(24, 40, (1,), generator=g))
        records.append(PromptRecord(f"{prefix}{i}", "synthetic", torch.randint(3, 256, (length,), generator=g).tolist()))
    return records


@pytest.fixture(scope="module")
def model():
    return peaky_model("llama")


@pytest.fixture(scope="module")
def records():
    return make_records(N_RECORDS)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, model, records):
    out = tmp_path_factory.mktemp("data")
    assert build(model, records, out, max_new_tokens=MAX_NEW, eos_token_ids=[2], model_name="tiny-llama") == N_RECORDS
    return out


@contextmanager
def eager(model):
    """Hugging Face's own eager attention (softmax probabilities returned as ``attentions``)."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            yield
    finally:
        model.config._attn_implementation = previous


def eager_reference(model, prompt: torch.Tensor, response: list[int]) -> torch.Tensor:
    """(layers, heads, L) from HF's eager attention over [prompt ; response] in one forward."""
    L = prompt.shape[1]
    ids = torch.cat([prompt, torch.tensor([response])], dim=1)
    with eager(model):
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    rows = []
    for probs in out.attentions:  # (1, heads, T, T), softmax over the full causal row
        mass = probs[0, :, L:, :L].double().mean(dim=1)  # response rows, prompt columns
        rows.append(mass / mass.sum(dim=-1, keepdim=True))
    return torch.stack(rows).float()


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("arch", ARCHS)
def test_ground_truth_matches_eager_attention(arch):
    model = peaky_model(arch, seed=3)
    prompt = random_ids(21, seed=4)
    response = random_ids(7, seed=5)[0].tolist()
    expected = eager_reference(model, prompt, response)
    state = prefill(model, prompt)
    got = ground_truth(model, state, response, chunk=128)
    assert got.shape == (4, 4, 21)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # the check has teeth: the labels are far from uniform and differ between heads
    assert expected.max() > 3 / 21  # uniform would be 1 / 21 everywhere
    assert not torch.allclose(expected[:, 0], expected[:, 1], atol=1e-2)
    # row chunks (3 does not divide 7) give the same labels, and the prompt's cache is left as it was
    torch.testing.assert_close(ground_truth(model, state, response, chunk=3), got, atol=1e-6, rtol=0)
    torch.testing.assert_close(ground_truth(model, state, response, chunk=1), got, atol=1e-6, rtol=0)
    assert all(layer.keys.shape[-2] == 21 for layer in state.cache.layers)


def test_labels_see_earlier_response_tokens(model):
    """Softmax runs over the whole causal row: a response token's query also attends to the
    response before it, so labels are NOT the per-row softmax over prompt columns only."""
    prompt, response = random_ids(15, seed=6), random_ids(6, seed=7)[0].tolist()
    got = ground_truth(model, prefill(model, prompt), response)
    # the wrong recipe: rows renormalised over the prompt before averaging
    ids = torch.cat([prompt, torch.tensor([response])], dim=1)
    with eager(model):
        attn = model(input_ids=ids, output_attentions=True, use_cache=False).attentions
    wrong = []
    for probs in attn:
        rows = probs[0, :, 15:, :15]
        wrong.append((rows / rows.sum(-1, keepdim=True)).mean(1))
    assert (got - torch.stack(wrong)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- targets


def hf_greedy(model, prompt: torch.Tensor, max_new_tokens: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, prompt.shape[1] :].tolist()


def test_make_target_response_is_hf_greedy_without_eos(model):
    prompt = random_ids(20, seed=11)
    # an id outside the vocabulary can never be produced: the response runs to max_new_tokens
    target = make_target(model, prompt, 10, eos_token_ids=[10_000])
    response = target["response_ids"].tolist()
    assert response == hf_greedy(model, prompt, 10, eos=10_000)
    assert len(response) == 10
    assert target["prompt_ids"].tolist() == prompt[0].tolist()
    torch.testing.assert_close(target["labels"], eager_reference(model, prompt, response), atol=1e-5, rtol=0)


def test_make_target_drops_a_produced_eos_from_the_labels(model):
    prompt = random_ids(20, seed=11)
    free = make_target(model, prompt, 10, eos_token_ids=[10_000])["response_ids"].tolist()
    # make the first token that was not produced before (at position >= 2) the EOS
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    eos = free[k]
    target = make_target(model, prompt, 10, eos_token_ids=[eos])
    response = target["response_ids"].tolist()
    assert response == hf_greedy(model, prompt, 10, eos=eos) == free[: k + 1]
    assert response[-1] == eos  # kept in the response ...
    labelled = response[:-1]  # ... but its query is not a labelled row
    torch.testing.assert_close(target["labels"], eager_reference(model, prompt, labelled), atol=1e-5, rtol=0)
    with_eos = eager_reference(model, prompt, response)
    assert (target["labels"] - with_eos).abs().max() > 1e-4


# ----------------------------------------------------------------------------- data build


def test_build_interrupted_by_a_kill_resumes_without_redoing_or_losing(tmp_path, model):
    records = make_records(7, seed=21)
    out = tmp_path / "data"
    k = 3

    class Killed(Exception):
        pass

    def kill_after_k(index, skipped):
        if not skipped and len(list((out / "samples").glob("*.safetensors"))) == k:
            raise Killed

    with pytest.raises(Killed):
        build(model, records, out, max_new_tokens=6, eos_token_ids=[2], model_name="tiny", on_progress=kill_after_k)
    done = sorted((out / "samples").glob("*.safetensors"))
    assert [p.name for p in done] == [sample_path(out, i).name for i in range(k)]
    assert not list(out.rglob("*.tmp"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in done}

    seen = []
    built = build(model, records, out, max_new_tokens=6, eos_token_ids=[2], model_name="tiny", on_progress=lambda i, skipped: seen.append((i, skipped)))
    assert built == len(records) - k
    assert seen == [(i, i < k) for i in range(len(records))]
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in done} == before
    assert not list(out.rglob("*.tmp"))

    dataset = TargetDataset(out)
    assert len(dataset) == len(records)
    for i, record in enumerate(records):
        item = dataset[i]
        assert item["id"] == record.id and item["source"] == "synthetic"
        assert item["prompt_ids"].tolist() == record.token_ids
    # a third run has nothing left to do
    assert build(model, records, out, max_new_tokens=6, eos_token_ids=[2], model_name="tiny") == 0


def test_build_crash_mid_write_leaves_no_partial_sample(tmp_path, model, monkeypatch):
    records = make_records(4, seed=22)
    out = tmp_path / "data"
    real_save = data_module.save_file
    calls = []

    def crash_on_third(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            Path(filename).write_bytes(b"\x00" * 17)  # half-written file, then the process dies
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(data_module, "save_file", crash_on_third)
    with pytest.raises(OSError):
        build(model, records, out, max_new_tokens=5, eos_token_ids=[2], model_name="tiny")
    assert sorted(p.name for p in (out / "samples").glob("*.safetensors")) == ["000000.safetensors", "000001.safetensors"]
    assert len(TargetDataset(out)) == 2  # the partial file is invisible to readers
    monkeypatch.setattr(data_module, "save_file", real_save)
    assert build(model, records, out, max_new_tokens=5, eos_token_ids=[2], model_name="tiny") == 2
    assert not list(out.rglob("*.tmp"))
    assert [TargetDataset(out)[i]["id"] for i in range(4)] == [r.id for r in records]


def test_batched_build_equals_one_at_a_time(tmp_path, model):
    """``batch_size`` > 1 generates the responses as one left-padded Hugging Face batch: the
    samples must be those of the one-prompt-at-a-time build, EOS trimming included."""
    records = make_records(5, seed=25)
    free = make_target(model, torch.tensor([records[0].token_ids]), 10, [10_000])["response_ids"].tolist()
    eos = next(t for i, t in enumerate(free) if i >= 2 and t not in free[:i])  # record 0 stops early
    one, batched = tmp_path / "one", tmp_path / "batched"
    for out, bs in ((one, 1), (batched, 3)):
        assert build(model, records, out, max_new_tokens=10, eos_token_ids=[eos], model_name="tiny", batch_size=bs) == 5
    a, b = TargetDataset(one), TargetDataset(batched)
    assert a[0]["response_ids"].tolist()[-1] == eos and len(a[0]["response_ids"]) < 10
    for i in range(5):
        assert b[i]["id"] == a[i]["id"]
        assert b[i]["response_ids"].tolist() == a[i]["response_ids"].tolist()
        torch.testing.assert_close(b[i]["labels"], a[i]["labels"], atol=1e-3, rtol=0)


def test_batched_responses_of_different_prompts_are_hf_greedy(model):
    """Prompts of different lengths decoded in one batch, each at its own true positions: each
    response equals Hugging Face's own greedy generate of that prompt alone."""
    from lookaheadkv.training.targets import generate_responses

    prompts = [random_ids(n, seed=40 + n)[0].tolist() for n in (17, 30, 23, 41)]
    responses, states = generate_responses(model, prompts, 9, [10_000])
    for prompt, response, state in zip(prompts, responses, states):
        assert response == hf_greedy(model, torch.tensor([prompt]), 9, None)
        assert state.length == len(prompt) and state.cache.get_seq_length() == len(prompt)  # left untouched


def test_build_refuses_a_folder_built_with_other_settings(tmp_path, model):
    records = make_records(2, seed=23)
    out = tmp_path / "data"
    build(model, records, out, max_new_tokens=4, eos_token_ids=[2], model_name="tiny")
    with pytest.raises(ValueError, match=r"max_new_tokens=4.*asks for 5.*new --out folder"):
        build(model, records, out, max_new_tokens=5, eos_token_ids=[2], model_name="tiny")
    with pytest.raises(ValueError, match="model="):
        build(model, records, out, max_new_tokens=4, eos_token_ids=[2], model_name="other")
    with pytest.raises(ValueError, match="prompts="):
        build(model, make_records(2, seed=24), out, max_new_tokens=4, eos_token_ids=[2], model_name="tiny")
    # nothing was built by the refused runs
    assert len(list((out / "samples").glob("*"))) == 2
    with pytest.raises(FileNotFoundError, match="data build"):
        TargetDataset(tmp_path)


# ----------------------------------------------------------------------------- dataset


def test_dataset_splits_are_disjoint_and_cover_all(data_dir, records):
    ids = lambda ds: [ds[i]["id"] for i in range(len(ds))]  # noqa: E731
    every, train_ids, held = ids(TargetDataset(data_dir)), ids(TargetDataset(data_dir, "train")), ids(TargetDataset(data_dir, "heldout"))
    assert every == [r.id for r in records]
    assert train_ids and held
    assert not set(train_ids) & set(held)
    assert sorted(train_ids + held) == sorted(every)
    # the split depends on the id only: stable across folders and record order
    assert set(held) == {"id0", "id11", "id15"}


def test_dataset_items_are_the_targets(data_dir, model, records):
    dataset = TargetDataset(data_dir)
    for i in (0, 5, 15):
        item = dataset[i]
        L = len(records[i].token_ids)
        assert item["labels"].dtype == torch.float32 and item["labels"].shape == (4, 4, L)
        torch.testing.assert_close(item["labels"].sum(-1), torch.ones(4, 4), atol=3e-3, rtol=0)
        assert 1 <= len(item["response_ids"]) <= MAX_NEW
        fresh = make_target(model, torch.tensor([records[i].token_ids]), MAX_NEW, [2])
        assert item["response_ids"].tolist() == fresh["response_ids"].tolist()
        torch.testing.assert_close(item["labels"], fresh["labels"], atol=1e-3, rtol=1e-2)  # stored as fp16
    with safe_open(str(sample_path(data_dir, 0)), "pt") as f:
        assert f.get_tensor("labels").dtype == torch.float16


# ----------------------------------------------------------------------------- loss and recall


def test_kl_loss_hand_worked():
    # layer 0: labels (1/2, 1/2), pred mass (1, 3) -> pred (1/4, 3/4)
    #   KL = 1/2 ln(0.5/0.25) + 1/2 ln(0.5/0.75) = 1/2 ln(4/3) = 0.1438410362
    # layer 1: labels (1, 0), pred mass (2, 2) -> pred (1/2, 1/2)
    #   KL = 1 ln(1/0.5) + 0 = ln 2 = 0.6931471806   (0 * log 0 counts as 0)
    # mean over the 2 (layer, head) pairs = 0.4184941084
    pred = torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]])
    labels = torch.tensor([[[0.5, 0.5]], [[1.0, 0.0]]])
    assert kl_loss(pred, labels).item() == pytest.approx(0.4184941084, abs=1e-6)
    assert kl_loss(pred[:1], labels[:1]).item() == pytest.approx(0.5 * math.log(4 / 3), abs=1e-6)
    # zero when the prediction is the labels, whatever its scale
    labels = torch.softmax(torch.randn(3, 4, 9), -1)
    assert kl_loss(labels * 7.0, labels).abs().item() < 1e-6
    assert kl_loss(torch.ones(3, 4, 9), labels).item() > 0


def test_attention_recall_hand_worked():
    """The held-out metric of the training log (``attention_recall(list(labels), kept)``)."""
    # 1 layer, 2 query heads sharing 1 KV head, 4 prompt tokens; the KV head keeps tokens 0 and 3
    labels = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.7, 0.1, 0.1, 0.1]]])
    kept = [torch.tensor([[0, 3]])]
    # head 0: 0.1 + 0.4 = 0.5; head 1: 0.7 + 0.1 = 0.8; mean 0.65
    assert attention_recall(list(labels), kept) == pytest.approx(0.65)
    assert attention_recall(list(labels), [torch.tensor([[0, 1, 2, 3]])]) == pytest.approx(1.0)
    # GQA mapping: 4 query heads, 2 KV heads -> heads 0,1 read KV head 0 and heads 2,3 KV head 1
    labels = torch.tensor([[[1.0, 0, 0], [0.5, 0.5, 0], [0, 0, 1.0], [0, 0.25, 0.75]]])
    kept = [torch.tensor([[0], [2]])]
    # 1.0 + 0.5 + 1.0 + 0.75 = 3.25 over 4 heads
    assert attention_recall(list(labels), kept) == pytest.approx(3.25 / 4)


def test_sample_loss_matches_an_eager_reference(model, data_dir):
    """The training loss: lookahead tokens (LoRA on their positions only) after the prompt,
    their attention summed over rows on the prompt columns, L1-normalised, KL to the labels."""
    modules = LookaheadModules.for_model(model, seed=2, n_lookahead=5, rank=4)
    randomize_lora_b(modules, seed=2, std=0.05)
    item = TargetDataset(data_dir)[3]
    loss = sample_loss(model, modules, item)
    loss.backward()
    assert modules.tokens.grad is not None and modules.tokens.grad.abs().sum() > 0
    # adapters that feed a layer's queries or keys get gradients (the last layer's MLP, say, cannot)
    assert all(modules.lora_B[f"{layer}_{name}"].grad.abs().sum() > 0 for layer in range(4) for name in ("q_proj", "k_proj"))

    prompt = item["prompt_ids"][None]
    L = prompt.shape[1]
    with eager(model), masked_lora(model, modules, start=L):
        embeds = torch.cat([model.get_input_embeddings()(prompt), modules.tokens[None]], dim=1)
        attn = model(inputs_embeds=embeds, output_attentions=True, use_cache=False).attentions
    pred = torch.stack([a[0, :, L:, :L].sum(1) for a in attn])
    pred = pred / pred.sum(-1, keepdim=True)
    labels = item["labels"]
    expected = (labels * (torch.log(labels + 1e-10) - torch.log(pred + 1e-10))).sum(-1).mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_schedule_and_sample_order():
    cfg = TrainConfig(data="d", out="o", steps=10, lr=1.0, warmup=2, schedule="cosine")
    assert [learning_rate(cfg, s) for s in (0, 1)] == [0.5, 1.0]
    assert learning_rate(cfg, 2) == pytest.approx(1.0)
    assert learning_rate(cfg, 6) == pytest.approx(0.5)  # half way through the cosine
    assert learning_rate(cfg, 10) == pytest.approx(0.0, abs=1e-12)
    # every epoch visits each sample exactly once, in a new order
    first = [sample_order(7, 0, i) for i in range(7)]
    second = [sample_order(7, 0, i) for i in range(7, 14)]
    assert sorted(first) == sorted(second) == list(range(7)) and first != second
    with pytest.raises(ValueError):
        TrainConfig(data="d", out="o", schedule="linear")


# ----------------------------------------------------------------------------- the loop


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def state_of(folder: Path) -> dict[str, torch.Tensor]:
    return LookaheadModules.from_pretrained(folder).state_dict()


def config(data_dir, out, **kw) -> TrainConfig:
    settings = dict(steps=6, batch=2, lr=1e-2, n_lookahead=4, rank=4, eval_every=0, save_every=1000, seed=0)
    settings.update(kw)
    return TrainConfig(data=str(data_dir), out=str(out), **settings)


def test_loss_falls(model, data_dir, tmp_path):
    out = tmp_path / "run"
    modules = train(model, config(data_dir, out, steps=30, batch=4), progress=False)
    curve = losses(out)
    assert len(curve) == 30 and all(math.isfinite(x) for x in curve)
    first, last = statistics.mean(curve[:5]), statistics.mean(curve[-5:])
    assert first > 0.3  # a real target, not one that is already matched
    assert last < 0.8 * first, curve
    # the returned modules are the saved final ones
    final = state_of(out / "final")
    for k, v in modules.state_dict().items():
        torch.testing.assert_close(final[k], v, atol=0, rtol=0)


def assert_same_run(a: Path, b: Path):
    sa, sb = state_of(a / "final"), state_of(b / "final")
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-6, rtol=0)
    la = [json.loads(l) for l in (a / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (b / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lb] == [r["step"] for r in la] == list(range(1, len(la) + 1))
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], abs=1e-6)
        assert rb["lr"] == ra["lr"]
        if "heldout" in ra:
            assert rb["heldout"] == pytest.approx(ra["heldout"], abs=1e-6)


def test_resume_continues_the_same_run(model, data_dir, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(model, config(data_dir, straight, steps=6, save_every=1), progress=False)
    train(model, config(data_dir, resumed, steps=3, save_every=1), progress=False)
    assert json.loads((resumed / "checkpoint" / "state.json").read_text())["step"] == 3
    train(model, config(data_dir, resumed, steps=6, save_every=1), progress=False)
    assert len(losses(resumed)) == 6
    assert_same_run(straight, resumed)
    # the runs really moved: the final modules are not the initial ones
    init = LookaheadModules.for_model(model, seed=0, n_lookahead=4, rank=4).state_dict()
    assert not torch.allclose(state_of(resumed / "final")["tokens"], init["tokens"])


def test_resume_after_a_crash_between_checkpoints(model, data_dir, tmp_path, monkeypatch):
    """Cosine schedule with warmup and held-out evaluation; the crash comes two steps after the
    last checkpoint, so the log holds lines the checkpoint does not: they must be replaced."""
    kw = dict(steps=8, save_every=3, schedule="cosine", warmup=2, eval_every=4, eval_samples=2, budgets=[8, 16])
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(model, config(data_dir, straight, **kw), progress=False)

    real, calls = train_module.sample_loss, []

    def dies_in_step_6(*args):
        calls.append(1)
        if len(calls) > 5 * 2:  # batch 2: steps 1-5 complete, step 6 dies
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(train_module, "sample_loss", dies_in_step_6)
    with pytest.raises(KeyboardInterrupt):
        train(model, config(data_dir, crashed, **kw), progress=False)
    assert len(losses(crashed)) == 5
    assert json.loads((crashed / "checkpoint" / "state.json").read_text())["step"] == 3
    monkeypatch.setattr(train_module, "sample_loss", real)
    train(model, config(data_dir, crashed, **kw), progress=False)
    assert_same_run(straight, crashed)
    log = [json.loads(l) for l in (crashed / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if "heldout" in r] == [4, 8]
    assert not (crashed / "checkpoint.tmp").exists() and not (crashed / "checkpoint.old").exists()


def test_resume_after_a_crash_inside_the_checkpoint_swap(model, data_dir, tmp_path, monkeypatch):
    """A kill between save_checkpoint's renames leaves the previous checkpoint as "checkpoint.old"
    and a half-written "checkpoint.tmp": the rerun resumes from the old one (losing no more than
    save_every steps), is still the same run, and can save checkpoints again."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(model, config(data_dir, straight, steps=6, save_every=2), progress=False)
    train(model, config(data_dir, crashed, steps=4, save_every=2), progress=False)
    (crashed / "checkpoint").rename(crashed / "checkpoint.old")  # step 4's state, as the swap left it
    (crashed / "checkpoint.tmp").mkdir()
    (crashed / "checkpoint.tmp" / "model.safetensors").write_bytes(b"\x00" * 10)  # the next save, cut short

    real, calls = train_module.sample_loss, []
    monkeypatch.setattr(train_module, "sample_loss", lambda *a: calls.append(1) or real(*a))
    train(model, config(data_dir, crashed, steps=6, save_every=2), progress=False)
    assert len(calls) == (6 - 4) * 2  # resumed at step 4, not from scratch
    assert_same_run(straight, crashed)
    assert json.loads((crashed / "checkpoint" / "state.json").read_text())["step"] == 6
    assert sorted(p.name for p in crashed.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
