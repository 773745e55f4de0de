"""A decode budget inside Hugging Face's ``model.generate`` (``evicting(..., decode_budget=...)``) and in ``pipeline``.

* Greedy ``model.generate`` inside ``evicting(model, policy, decode_budget=b)`` gives the tokens (and the
  re-scorings) of ``generate_ids(model, ids, policy, decode_budget=b)``, for every policy with a decode-time
  scorer, with re-scorings happening; the cache ``generate`` holds is the one the re-scorings cut.
* A decode budget at or above prompt + answer changes nothing: plain HF greedy (no eviction at all) is the
  independent reference.
* The cache never holds more than ``budget + interval`` entries per KV head.
* ``pipeline(..., decode_budget=...)``: the question's entries are positioned after the kept context; a
  StreamingLLM run is checked against the FULL cache with each step's evicted positions masked (eager
  reference attention of ``helpers``), at true positions.
* Bad values and what cannot be done are refused in one line, before any forward.
"""

from __future__ import annotations

import pytest
import torch

from helpers import ARCHS, decode_policy, hf_prefill, random_ids, reference_mode, single_thread  # noqa: F401
from lookaheadkv import evicting, pipeline
from lookaheadkv.engine.generate import generate_ids
from lookaheadkv.engine.rescore import DecodeBudget
from lookaheadkv.models import tiny_model
from lookaheadkv.policies import make_policy

LENGTH, PREFILL_BUDGET, NEW = 60, 24, 40
EOS = 2  # the tiny models' eos id
BUDGET = DecodeBudget(32, interval=5, recent=6)
SCORED = ["h2o", "lookahead", "snapkv", "streamingllm", "tova"]


def build(name: str, model, budget=PREFILL_BUDGET):
    return decode_policy(name, model, budget)


def hf_generate(model, ids, max_new_tokens=NEW, **kwargs):
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0, **kwargs)
    return out


def until_eos(tokens: list[int]) -> list[int]:
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


# ----------------------------------------------------------------------------- evicting(): equal to generate_ids


@pytest.mark.parametrize("name", SCORED)
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_inside_evicting_with_a_decode_budget_equals_generate_ids(arch, name):
    model = tiny_model(arch, seed=5)
    ids = random_ids(LENGTH, seed=6)
    expected, stats, _ = generate_ids(model, ids, build(name, model), max_new_tokens=NEW, eos_token_ids=[EOS], decode_budget=BUDGET)
    want = stats.decode_eviction
    assert len(expected) == NEW and len(want.rescorings) >= 5  # re-scorings happen, no early EOS

    with evicting(model, build(name, model), decode_budget=BUDGET) as ev:
        out = hf_generate(model, ids, return_dict_in_generate=True)
    got = until_eos(out.sequences[0, LENGTH:].tolist())
    assert got == expected
    record = ev.decode_eviction
    assert record is ev.stats[0].decode_eviction
    assert record.entries == want.entries and [r.fed for r in record.rescorings] == [r.fed for r in want.rescorings]
    assert [(r.before, r.after) for r in record.rescorings] == [(r.before, r.after) for r in want.rescorings]
    assert record.peak == BUDGET.budget + BUDGET.interval and all(r.after == BUDGET.budget for r in record.rescorings)

    # generate's cache is the one the re-scorings cut: same layer objects, one tracked position per entry
    cache = out.cache
    budgeted = cache.budgeted
    assert cache.layers is budgeted.cache.layers
    assert max(layer.keys.shape[-2] for layer in cache.layers) == record.entries[-1] <= BUDGET.budget + BUDGET.interval
    assert all(p.shape[1] == layer.keys.shape[-2] for p, layer in zip(budgeted.positions, cache.layers))
    assert cache.get_seq_length() == LENGTH + NEW - 1 and cache.positions.tolist() == [LENGTH + NEW - 1]


@pytest.mark.parametrize("budget", [DecodeBudget(20, interval=1, recent=0), DecodeBudget(20, interval=3, recent=4), DecodeBudget(28, interval=7)])
def test_the_peak_never_passes_budget_plus_interval(budget):
    model = tiny_model("llama", seed=5)
    ids = random_ids(LENGTH, seed=6)
    for name in ("snapkv", "h2o"):
        expected, stats, _ = generate_ids(model, ids, build(name, model), max_new_tokens=NEW, eos_token_ids=[EOS], decode_budget=budget)
        with evicting(model, build(name, model), decode_budget=budget) as ev:
            got = until_eos(hf_generate(model, ids)[0, LENGTH:].tolist())
        assert got == expected
        record = ev.decode_eviction
        assert max(record.entries) == record.peak <= budget.budget + budget.interval and record.rescorings
        assert record.entries == stats.decode_eviction.entries


def test_an_int_decode_budget_means_a_default_decode_budget():
    model = tiny_model("qwen2", seed=5)
    ids = random_ids(LENGTH, seed=6)
    expected, _, _ = generate_ids(model, ids, build("tova", model), max_new_tokens=NEW, eos_token_ids=[EOS], decode_budget=DecodeBudget(30))
    with evicting(model, build("tova", model), decode_budget=30) as ev:
        got = until_eos(hf_generate(model, ids)[0, LENGTH:].tolist())
    assert got == expected and ev.decode_eviction.budget == DecodeBudget(30)


@pytest.mark.parametrize("name", SCORED)
def test_a_decode_budget_above_prompt_plus_answer_changes_nothing(name):
    model = tiny_model("qwen3", seed=8)
    ids = random_ids(LENGTH, seed=9)
    plain = hf_generate(model, ids)[0, LENGTH:].tolist()  # HF alone: no wrapper, no eviction
    large = DecodeBudget(LENGTH + NEW, interval=5)
    with evicting(model, build(name, model, budget=4096), decode_budget=large) as ev:
        everything = hf_generate(model, ids)[0, LENGTH:].tolist()
    assert everything == plain and ev.decode_eviction.rescorings == []
    assert ev.decode_eviction.peak == LENGTH + NEW - 1
    # with a prefill eviction: the same as evicting() without a decode budget
    with evicting(model, build(name, model)):
        evicted = hf_generate(model, ids)[0, LENGTH:].tolist()
    with evicting(model, build(name, model), decode_budget=large) as ev:
        assert hf_generate(model, ids)[0, LENGTH:].tolist() == evicted
    assert ev.decode_eviction.rescorings == []


def test_each_generate_call_gets_its_own_decoding_state():
    model = tiny_model("llama", seed=5)
    first, second = random_ids(LENGTH, seed=6), random_ids(LENGTH + 7, seed=7)
    policy = build("h2o", model)
    expected = [generate_ids(model, p, policy, max_new_tokens=NEW, eos_token_ids=[EOS], decode_budget=BUDGET)[0] for p in (first, second)]
    with evicting(model, policy, decode_budget=BUDGET) as ev:
        got = [until_eos(hf_generate(model, p)[0, p.shape[1] :].tolist()) for p in (first, second)]
        assert ev.stats[0].prompt_tokens == LENGTH + 7
    assert got == expected


# ----------------------------------------------------------------------------- evicting(): refusals


@pytest.mark.parametrize("bad", ["32", 32.0, True, [32], (32, 4)])
def test_a_decode_budget_of_the_wrong_type_is_refused_in_one_line(bad):
    model = tiny_model("llama", seed=1)
    with pytest.raises(TypeError, match=r"decode_budget must be a DecodeBudget \(e\.g\. DecodeBudget\(256, interval=32\)\)") as err:
        with evicting(model, build("snapkv", model), decode_budget=bad):
            pytest.fail("the block was entered")
    assert "\n" not in str(err.value) and "forward" not in model.__dict__
    with pytest.raises(TypeError, match="decode_budget must be a DecodeBudget"):
        pipeline(model, object(), build("snapkv", model), decode_budget=bad)


def test_a_decode_budget_below_one_is_refused():
    model = tiny_model("llama", seed=1)
    with pytest.raises(ValueError, match="decode budget must be a whole number >= 1"):
        with evicting(model, build("snapkv", model), decode_budget=0):
            pytest.fail("the block was entered")


def test_policies_without_a_decode_scorer_are_refused_on_entering_the_block():
    model = tiny_model("llama", seed=1)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for policy, needle in ((None, "policy=None keeps the whole cache"), (make_policy("full", budget=16), "full has no decode-time scorer")):
            with pytest.raises(ValueError, match=needle) as err:
                with evicting(model, policy, decode_budget=BUDGET):
                    pytest.fail("the block was entered")
            assert "\n" not in str(err.value)
            with pytest.raises(ValueError, match=needle):
                pipeline(model, object(), policy, decode_budget=BUDGET)
    finally:
        handle.remove()
    assert calls == [] and "forward" not in model.__dict__


def test_a_batch_beams_or_several_tokens_per_step_are_refused_in_one_line():
    model = tiny_model("llama", seed=1)
    ids = random_ids(30, seed=1)
    with evicting(model, build("snapkv", model), decode_budget=BUDGET):
        with pytest.raises(NotImplementedError, match="one prompt at a time, got a batch of 2: call generate once per prompt") as err:
            hf_generate(model, torch.cat([ids, ids]), max_new_tokens=3)
        assert "\n" not in str(err.value)
        with pytest.raises(NotImplementedError, match="one prompt at a time"):
            hf_generate(model, ids, max_new_tokens=3, num_beams=2)
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
            with pytest.raises(NotImplementedError, match="2 new tokens in one step under a decode budget.*one token per step") as err:
                model(input_ids=torch.tensor([[5, 6]]), cache=out.cache)
        assert "\n" not in str(err.value)
        # after the refusals the block still works
        assert len(hf_generate(model, ids, max_new_tokens=3)[0, 30:]) == 3


# ----------------------------------------------------------------------------- pipeline()


class CharTokenizer:
    """One id per character (no chat template): enough for the pipeline on a tiny model."""

    eos_token_id = EOS
    chat_template = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": ([1] if add_special_tokens else []) + [3 + ord(c) % 250 for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(32 + i % 90) for i in ids)


CONTEXT = "The river runs past the mill and the old school, then under the bridge. " * 2
QUESTION = "Where does the river run?"


@pytest.mark.parametrize("name", SCORED)
def test_pipeline_with_a_large_decode_budget_changes_nothing(name):
    model, tok = tiny_model("llama", seed=2), CharTokenizer()
    pipe = pipeline(model, tok, build(name, model), chat=False)
    plain = pipe(CONTEXT, question=QUESTION, max_new_tokens=NEW)["generation"]
    ctx, q = pipe.split(CONTEXT, QUESTION)
    large = DecodeBudget(len(ctx) + len(q) + NEW, interval=5)
    budgeted = pipeline(model, tok, build(name, model), chat=False, decode_budget=large)(CONTEXT, question=QUESTION, max_new_tokens=NEW)["generation"]
    assert budgeted.token_ids == plain.token_ids and budgeted.stats.decode_eviction.rescorings == []
    assert plain.stats.decode_eviction is None


@pytest.mark.parametrize("name", SCORED)
def test_pipeline_holds_context_question_and_answer_within_the_budget(name):
    model, tok = tiny_model("qwen2", seed=2), CharTokenizer()
    budget = DecodeBudget(40, interval=4, recent=4)
    pipe = pipeline(model, tok, build(name, model, budget=4096), chat=False, decode_budget=budget)
    _, q = pipe.split(CONTEXT, QUESTION)
    out = pipe(CONTEXT, question=QUESTION, max_new_tokens=NEW)["generation"]
    record = out.stats.decode_eviction
    assert out.stats.kept_per_layer == [budget.budget - len(q)] * model.config.num_hidden_layers  # room left for the question
    assert record.entries[0] == budget.budget and record.peak <= budget.budget + budget.interval
    assert len(out.token_ids) == NEW and len(record.rescorings) >= 5
    # several questions at once: each as alone, each with its own record
    two = pipe(CONTEXT, question=[QUESTION, QUESTION], max_new_tokens=NEW)
    assert [a["generation"].token_ids for a in two] == [out.token_ids] * 2
    assert two[0]["generation"].stats.decode_eviction is not two[1]["generation"].stats.decode_eviction


def test_pipeline_refuses_a_question_that_fills_the_budget():
    model, tok = tiny_model("llama", seed=2), CharTokenizer()
    with pytest.raises(ValueError, match=r"the question has 27 tokens, as many as the decode budget of 20 entries or more: raise decode_budget") as err:
        pipeline(model, tok, build("snapkv", model), chat=False, decode_budget=20)(CONTEXT, question=QUESTION, max_new_tokens=4)
    assert "\n" not in str(err.value)


def test_pipeline_streamingllm_decodes_like_the_masked_full_cache():
    """Sinks + latest positions, context, question and answer alike: each step against the full cache with the rest masked."""
    model, tok = tiny_model("mistral", seed=5), CharTokenizer()
    budget, sinks = DecodeBudget(48, interval=3, recent=5), 4
    pipe = pipeline(model, tok, make_policy("streamingllm", budget=30, n_sink=sinks), chat=False, decode_budget=budget)
    ctx, q = pipe.split(CONTEXT, QUESTION)
    L, Q = len(ctx), len(q)
    gen = pipe(CONTEXT, question=QUESTION, max_new_tokens=NEW)["generation"]
    tokens = gen.token_ids
    assert len(tokens) == NEW and len(gen.stats.decode_eviction.rescorings) >= 5

    keep = min(30, budget.budget - Q)  # the context keeps the sinks and its latest positions
    visible = set(range(sinks)) | set(range(L - (keep - sinks), L))
    assert all(k.tolist() == [sorted(visible)] * k.shape[0] for k in gen.kept)
    visible |= set(range(L, L + Q))  # the question's entries follow

    heads, layers = model.config.num_key_value_heads, model.config.num_hidden_layers
    masks: dict[int, torch.Tensor] = {}

    def show(width: int) -> None:
        m = torch.zeros(heads, width, dtype=torch.bool)
        m[:, sorted(p for p in visible if p < width)] = True
        masks.clear()
        masks.update({layer: m for layer in range(layers)})

    cache, _ = hf_prefill(model, torch.tensor([ctx]))  # the whole context, nothing masked
    want = []
    with torch.no_grad(), reference_mode(model, key_masks=masks):
        show(L)  # the question sees the kept context (and itself)
        out = model(input_ids=torch.tensor([q]), position_ids=torch.arange(L, L + Q)[None], cache=cache)
        want.append(int(out.logits[0, -1].argmax()))
        for fed in range(1, NEW):
            position = L + Q + fed - 1
            visible.add(position)
            show(position)  # the step's own entry (column ``position``) is always visible
            out = model(input_ids=torch.tensor([[want[-1]]]), position_ids=torch.tensor([[position]]), cache=cache)
            want.append(int(out.logits[0, -1].argmax()))
            if fed % budget.interval == 0 and len(visible) > budget.budget:  # sinks + the latest positions
                visible = set(range(sinks)) | set(sorted(visible)[-(budget.budget - sinks) :])
    assert tokens == want
