"""LAQ, SpecKV and Oracle against straightforward references on tiny models.

The references re-derive each method from its description (docs/method.md, "The other methods") with the
test's own eager attention (tests/helpers.py), not with the library's observers.
"""

from __future__ import annotations

import pytest
import torch

from helpers import ARCHS, random_ids, reference_mode, single_thread  # noqa: F401  (autouse fixture)
from lookaheadkv.engine.cache import copy_cache
from lookaheadkv.engine.evict import select
from lookaheadkv.engine.generate import compress
from lookaheadkv.engine.prefill import prefill
from lookaheadkv.models import tiny_model
from lookaheadkv.policies import LAQ, Oracle, SnapKV, SpecKV

LENGTH, BUDGET, WINDOW, N_DRAFT = 96, 24, 8, 5


def capture_queries(model):
    """Register a forward hook per attention layer that records its post-RoPE query via the observer API."""
    from lookaheadkv.engine.attention import hooked

    store: dict[int, list[torch.Tensor]] = {}

    def observe(layer, query, key, scaling):
        store.setdefault(layer, []).append(query[0].clone())

    return store, hooked(model, [observe])


@torch.no_grad()
def reference_greedy(model, cache, first_logits, start, steps):
    """Plain greedy decoding with Hugging Face forwards at true positions; returns tokens and each step's query."""
    store, ctx = capture_queries(model)
    tokens, logits = [], first_logits
    with ctx:
        for step in range(steps):
            token = int(logits.argmax())
            tokens.append(token)
            out = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[start + step]]), cache=cache)
            logits = out.logits[0, -1]
    return tokens, [torch.cat(store[i], dim=1) for i in sorted(store)]


@pytest.mark.parametrize("arch", ARCHS)
def test_laq_queries_equal_a_greedy_decode_on_the_snapkv_copy(arch):
    model = tiny_model(arch, seed=3)
    ids = random_ids(LENGTH, seed=4)
    laq = LAQ(budget=BUDGET, window=WINDOW, n_draft=N_DRAFT)
    observer = laq.observer()
    state = prefill(model, ids, [observer])
    queries, _ = laq.draft_queries(model, state, observer.observers[0].per_layer())

    # Reference: SnapKV at the same budget and window compresses a copy; greedy-decode N_DRAFT tokens on it.
    snap = SnapKV(budget=BUDGET, window=WINDOW, kernel=laq.kernel)
    snap_obs = snap.observer()
    snap_state = prefill(model, ids, [snap_obs])
    copy = compress(model, snap_state, snap, snap_obs).cache
    assert all(layer.keys.shape[2] == BUDGET for layer in copy.layers)
    _, ref_queries = reference_greedy(model, copy, snap_state.logits, LENGTH, N_DRAFT)

    assert len(queries) == len(ref_queries)
    for mine, ref in zip(queries, ref_queries):
        assert mine.shape == ref.shape == (model.config.num_attention_heads, N_DRAFT, model.config.head_dim)
        torch.testing.assert_close(mine, ref, atol=1e-5, rtol=0)


def test_laq_scores_the_full_prompt_not_the_copy():
    model = tiny_model("llama", seed=3)
    ids = random_ids(LENGTH, seed=4)
    laq = LAQ(budget=BUDGET, window=WINDOW, n_draft=N_DRAFT, prompt_rows=0, kernel=1)
    observer = laq.observer()
    state = prefill(model, ids, [observer])
    scores = laq.scores(model, state, observer)
    queries, scaling = laq.draft_queries(model, state, observer.observers[0].per_layer())
    for layer, (s, q) in enumerate(zip(scores, queries)):
        keys = state.cache.layers[layer].keys[0]  # (kv, L, d): the full prompt
        keys = keys.repeat_interleave(q.shape[0] // keys.shape[0], dim=0)
        ref = torch.softmax(q @ keys.transpose(-1, -2) * scaling, dim=-1).sum(dim=1)  # (H, L)
        ref = ref.view(model.config.num_key_value_heads, -1, LENGTH).mean(dim=1)
        assert s.shape == (model.config.num_key_value_heads, LENGTH)
        torch.testing.assert_close(s, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_speckv_scores_match_an_eager_prefill_of_prompt_plus_draft(arch):
    model = tiny_model(arch, seed=5)
    draft = tiny_model(arch, seed=9, num_hidden_layers=2)
    ids = random_ids(LENGTH, seed=6)
    spec = SpecKV(budget=BUDGET, window=WINDOW, n_draft=N_DRAFT, draft=draft, kernel=1)
    observer = spec.observer()
    state = prefill(model, ids, [observer])
    scores = spec.scores(model, state, observer)

    # Reference: the draft answers greedily; the target prefills [prompt ; draft] in eager mode;
    # window rows = last WINDOW prompt queries + the draft queries; max over rows and the GQA group.
    dstate = prefill(draft, ids)
    tokens, _ = reference_greedy(draft, dstate.cache, dstate.logits, LENGTH, N_DRAFT)
    full = torch.cat([ids, torch.tensor([tokens])], dim=1)
    capture: dict[int, torch.Tensor] = {}
    with torch.no_grad(), reference_mode(model, capture=capture):
        model(input_ids=full, use_cache=False)
    kv_heads = model.config.num_key_value_heads
    for layer, s in enumerate(scores):
        probs = capture[layer][:, LENGTH - WINDOW :, :LENGTH]  # (H, WINDOW + N_DRAFT, L)
        ref = probs.amax(dim=1).view(kv_heads, -1, LENGTH).amax(dim=1)
        torch.testing.assert_close(s, ref, atol=1e-5, rtol=0)
    assert state.cache.layers[0].keys.shape[2] == LENGTH, "the draft tokens' KV must be dropped"


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_oracle_scores_are_the_full_answers_attention(arch):
    model = tiny_model(arch, seed=2)
    ids = random_ids(LENGTH, seed=3)
    oracle = Oracle(budget=BUDGET, max_new_tokens=6)
    state = prefill(model, ids)
    scores = oracle.scores(model, state, None)

    answer, _ = reference_greedy(model, copy_cache(state.cache), state.logits, LENGTH, 6)
    full = torch.cat([ids, torch.tensor([answer])], dim=1)
    capture: dict[int, torch.Tensor] = {}
    with torch.no_grad(), reference_mode(model, capture=capture):
        model(input_ids=full, use_cache=False)
    kv_heads = model.config.num_key_value_heads
    for layer, s in enumerate(scores):
        rows = capture[layer][:, LENGTH:, :LENGTH].mean(dim=1)  # response queries -> prompt keys
        ref = (rows / rows.sum(dim=-1, keepdim=True)).view(kv_heads, -1, LENGTH).mean(dim=1)
        torch.testing.assert_close(s, ref, atol=1e-5, rtol=0)
    kept = select(scores, [BUDGET] * len(scores))
    assert all(k.shape == (kv_heads, BUDGET) for k in kept)


def test_speckv_keeps_the_draft_name_and_loads_it_once(monkeypatch):
    import lookaheadkv.models

    model = tiny_model("llama", seed=5)
    draft = tiny_model("llama", seed=9, num_hidden_layers=2)
    loads = []
    monkeypatch.setattr(lookaheadkv.models, "load_model", lambda name, device=None, **kw: (loads.append(name), (draft, None))[1])
    spec = SpecKV(budget=BUDGET, draft="org/small-draft")
    assert spec.draft_model(model) is draft and spec.draft_model(model) is draft
    assert loads == ["org/small-draft"]
    assert spec.draft == "org/small-draft" and spec.draft_name == "org/small-draft"
