"""Single-sequence decoding writes into reserved room (``engine.decode.decode`` + ``engine.cache.ReservedLayer``).

* ``decode`` gives the tokens of plain Hugging Face greedy decoding (the independent reference) and the
  tokens AND final cache contents of a plain loop over a ``DynamicCache`` that concatenates.
* ``decode`` extends the caller's cache object in place: the same ``cache.layers`` list, its plain layers
  turned into ``ReservedLayer``; sliding-window layers are left alone.
* What callers do to a cache after ``decode`` still works: ``crop`` then a second decode (as the evaluation
  runner does), a re-scoring's direct assignment of ``layer.keys`` / ``layer.values`` then more decoding.
* ``ReservedLayer``'s ``keys`` / ``values`` setters: a prefix view of its storage is a crop (no copy), any
  other tensor gets fresh storage, ``None`` (``DynamicLayer.__init__``, ``reset``) is accepted.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from helpers import ARCHS, clone_cache, hf_greedy_tokens, hf_prefill, random_ids, single_thread  # noqa: F401
from lookaheadkv.engine.attention import hooked
from lookaheadkv.engine.cache import ReservedLayer, copy_cache, crop, gather, reserve
from lookaheadkv.engine.decode import decode
from lookaheadkv.engine.generate import generate_ids, select_kv
from lookaheadkv.engine.prefill import prefill
from lookaheadkv.engine.rescore import BudgetedDecoding, DecodeBudget, decode_scorer
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.models import tiny_model
from lookaheadkv.policies import make_policy

LENGTH, NEW = 50, 24


@torch.no_grad()
def plain_decode(model, cache, logits, position, n):
    """What ``decode`` did before: greedy steps over the cache as given (a DynamicCache concatenates)."""
    tokens = [int(logits.argmax())]
    with hooked(model):
        for step in range(n - 1):
            out = model(input_ids=torch.tensor([[tokens[-1]]]), position_ids=torch.tensor([[position + step]]), cache=cache, use_cache=True)
            tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


def assert_same_cache(a, b):
    assert len(a.layers) == len(b.layers)
    for x, y in zip(a.layers, b.layers):
        assert torch.equal(x.keys, y.keys) and torch.equal(x.values, y.values)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_equals_hf_greedy_and_a_concatenating_cache(arch):
    model = tiny_model(arch, seed=11)
    ids = random_ids(LENGTH, seed=12)
    state = prefill(model, ids)
    reference = clone_cache(state.cache)
    layers = state.cache.layers
    tokens = decode(model, state.cache, state.logits, LENGTH, NEW)
    assert tokens == hf_greedy_tokens(model, ids, NEW)
    assert tokens == plain_decode(model, reference, state.logits, LENGTH, NEW)
    assert all(type(layer) is DynamicLayer for layer in reference.layers)
    # the caller's cache object, extended in place: same list, reserved layers, the same entries
    assert state.cache.layers is layers and all(type(layer) is ReservedLayer for layer in layers)
    assert_same_cache(state.cache, reference)
    assert all(layer.keys.shape[-2] == LENGTH + NEW - 1 == layer.capacity for layer in layers)  # the room was exactly enough


def test_crop_after_decode_then_decode_again_equals_a_fresh_copy():
    model = tiny_model("qwen2", seed=3)
    ids = random_ids(LENGTH, seed=4)
    state = prefill(model, ids)
    fresh = clone_cache(state.cache)
    first = decode(model, state.cache, state.logits, LENGTH, NEW)
    storage = state.cache.layers[0].keys.data_ptr()
    crop(state.cache, LENGTH)  # as evaluation/runner.py does after the full-cache decode
    assert state.cache.layers[0].keys.shape[-2] == LENGTH and state.cache.layers[0].keys.data_ptr() == storage  # a crop copies nothing
    assert_same_cache(state.cache, fresh)
    again = decode(model, state.cache, state.logits, LENGTH, NEW + 5)  # past the reserved room: the layers grow
    assert again == decode(model, copy_cache(fresh), state.logits, LENGTH, NEW + 5) and again[:NEW] == first
    ref = clone_cache(fresh)
    assert again == plain_decode(model, ref, state.logits, LENGTH, NEW + 5)
    assert_same_cache(state.cache, ref)
    # a policy scoring the cropped cache sees what it would see on a fresh prefill
    kept = [torch.stack([torch.randperm(LENGTH, generator=torch.Generator().manual_seed(h))[:16].sort().values for h in range(2)]) for _ in state.cache.layers]
    assert_same_cache(gather(state.cache, kept), gather(fresh, kept))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_a_rescoring_style_assignment_then_more_decoding(arch):
    model = tiny_model(arch, seed=5)
    ids = random_ids(LENGTH, seed=6)
    state = prefill(model, ids)
    ref = clone_cache(state.cache)
    tokens = decode(model, state.cache, state.logits, LENGTH, NEW)
    assert tokens == plain_decode(model, ref, state.logits, LENGTH, NEW)
    g = torch.Generator().manual_seed(0)
    n = LENGTH + NEW - 1
    kept = [torch.stack([torch.randperm(n, generator=g)[:30].sort().values for _ in range(2)]) for _ in state.cache.layers]
    for cache in (state.cache, ref):  # rescore.py's in-place replacement of every layer's keys and values
        compact = gather(cache, kept)
        for layer, new in zip(cache.layers, compact.layers):
            layer.keys, layer.values = new.keys, new.values
    assert all(type(layer) is ReservedLayer and layer.keys.shape[-2] == 30 and layer.capacity >= 30 + NEW - 1 for layer in state.cache.layers)
    assert_same_cache(state.cache, ref)
    last = torch.zeros(model.config.vocab_size)
    last[tokens[-1]] = 1
    more = decode(model, state.cache, last, LENGTH + NEW - 1, NEW)
    assert more == plain_decode(model, ref, last, LENGTH + NEW - 1, NEW)
    assert_same_cache(state.cache, ref)


def test_sliding_window_layers_are_left_alone():
    model = tiny_model("llama", seed=1)
    ids = random_ids(LENGTH, seed=2)
    cache, logits = hf_prefill(model, ids)
    sliding = DynamicSlidingWindowLayer(sliding_window=4096)
    sliding.update(cache.layers[1].keys, cache.layers[1].values)
    cache.layers[1] = sliding
    tokens = decode(model, cache, logits, LENGTH, 6)
    assert cache.layers[1] is sliding and [type(layer) for layer in cache.layers] == [ReservedLayer, DynamicSlidingWindowLayer, ReservedLayer, ReservedLayer]
    assert tokens == hf_greedy_tokens(model, ids, 6)


@pytest.mark.parametrize("name", ["snapkv", "lookahead"])
def test_a_decode_budget_reserves_the_peak_and_never_grows(name):
    """Under a decode budget the layers hold room for ``budget + interval`` (plus LookaheadKV's tokens), not the whole answer."""
    model = tiny_model("qwen2", seed=2)
    ids = random_ids(100, seed=3)
    budget = DecodeBudget(30, interval=4)
    kwargs = {}
    if name == "lookahead":
        kwargs["modules"] = LookaheadModules.for_model(model, seed=1, n_lookahead=8)
    policy = make_policy(name, budget=40, **kwargs)
    selection = select_kv(model, ids, policy, cap=budget.budget)
    run = BudgetedDecoding(model, selection.cache, selection.kept, 100, budget, decode_scorer(policy, model), observer=selection.observer)
    peak = 34 + (8 if name == "lookahead" else 0)
    assert [layer.capacity for layer in selection.cache.layers] == [peak] * model.config.num_hidden_layers
    before = [layer.keys for layer in selection.cache.layers]  # held: their storage cannot be freed and its address reused
    tokens = decode(model, selection.cache, selection.logits, 100, 3 * NEW, observers=run.observers(), after_step=run.after_step)
    assert len(run.record.rescorings) >= 10 and run.record.peak == 34
    assert [layer.capacity for layer in selection.cache.layers] == [peak] * model.config.num_hidden_layers  # no layer grew
    assert all(layer.keys.data_ptr() != old.data_ptr() for layer, old in zip(selection.cache.layers, before))  # re-scorings copied into fresh room
    assert tokens == generate_ids(model, ids, make_policy(name, budget=40, **kwargs), max_new_tokens=3 * NEW, decode_budget=budget)[0]


def test_reserved_layer_setters():
    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(1, 2, 5, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    layer = ReservedLayer(k, v, room=3)
    assert layer.capacity == 8 and layer.filled == 5 and torch.equal(layer.keys, k) and torch.equal(layer.values, v)
    storage = layer.keys.data_ptr()
    layer.keys, layer.values = layer.keys[..., :2, :], layer.values[..., :2, :]  # a crop: no copy
    assert layer.keys.data_ptr() == storage and layer.filled == 2 and layer.capacity == 8 and layer.get_seq_length() == 2
    nk, nv = torch.randn(1, 2, 1, 4, generator=g), torch.randn(1, 2, 1, 4, generator=g)
    keys, values = layer.update(nk, nv)  # written after the crop
    assert torch.equal(keys, torch.cat([k[..., :2, :], nk], dim=-2)) and torch.equal(values, torch.cat([v[..., :2, :], nv], dim=-2))
    other = torch.randn(1, 2, 4, 4, generator=g)
    layer.keys, layer.values = other, -other  # not a view of the storage: fresh storage, the same capacity
    assert layer.keys.data_ptr() != storage and torch.equal(layer.keys, other) and layer.capacity == 8
    other[0, 0, 0, 0] = 99.0  # copied, not aliased
    assert layer.keys[0, 0, 0, 0] != 99.0
    big = torch.randn(1, 2, 9, 4, generator=g)
    layer.keys, layer.values = big, big.clone()  # too long for the storage: room more
    assert layer.capacity == 12 and torch.equal(layer.keys, big)
    shifted = layer.keys[..., 1:, :]  # a view of the storage, but not a prefix: copied
    layer.keys = shifted
    assert torch.equal(layer.keys, big[..., 1:, :])
    layer.reorder_cache(torch.tensor([0]))  # generate's beam reordering assigns index_select results
    assert torch.equal(layer.values, big)
    layer.reset()  # DynamicLayer.reset assigns None
    assert layer.keys is None and not layer.is_initialized and layer.get_seq_length() == 0
    layer.update(nk, nv)
    assert torch.equal(layer.keys, nk) and layer.capacity == 1 + 3


def test_reserve_replaces_only_plain_layers_in_the_same_list():
    cache = DynamicCache()
    k = torch.randn(1, 2, 3, 4)
    cache.update(k, k, 0)
    cache.update(k, k, 1)
    layers, second = cache.layers, cache.layers[1]
    reserve(cache, [5, 7])
    assert cache.layers is layers and [layer.capacity for layer in layers] == [8, 10]
    first = cache.layers[0]
    reserve(cache, 2)  # already reserved: left alone
    assert cache.layers[0] is first and second is not cache.layers[1]
