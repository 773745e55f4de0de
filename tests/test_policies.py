"""Scoring policies: their selections against hand-written references on eager attention weights.

The references read the full ``softmax(Q K^T)`` of a tiny model, captured by an eager attention
registered in ``helpers`` (a test-only device: the library never builds L x L attention), and
apply each method's rule as the papers describe it (docs/method.md, "The other methods").
"""

from __future__ import annotations

import pytest
import torch

from helpers import ARCHS, attention_probs, random_ids, single_thread  # noqa: F401  (autouse fixture)
from lookaheadkv.engine.evict import resolve_budget
from lookaheadkv.engine.generate import compress
from lookaheadkv.engine.prefill import prefill
from lookaheadkv.models import tiny_model
from lookaheadkv.policies import (
    H2O,
    REGISTRY,
    TOVA,
    FullKV,
    LookaheadKV,
    PyramidKV,
    RandomPolicy,
    SnapKV,
    StreamingLLM,
    make_policy,
)
from lookaheadkv.scoring import max_pool, reduce_gqa

L = 128
KV_HEADS = 2


def engine_kept(model, ids, policy) -> list[torch.Tensor]:
    observer = policy.observer()
    state = prefill(model, ids, [observer])
    return compress(model, state, policy, observer).kept


def assert_same_selection(kept: torch.Tensor, ref_scores: torch.Tensor, budget: int, tol: float = 1e-6) -> None:
    """``kept`` (kv_heads, budget) must be the reference's top-``budget`` of ``ref_scores`` (kv_heads, L).

    Entries whose reference scores tie at the selection boundary (max-pooling makes exact ties)
    may go either way; every other index must agree exactly.
    """
    assert kept.shape == (ref_scores.shape[0], budget)
    for head in range(ref_scores.shape[0]):
        scores = ref_scores[head].double()
        mine = set(kept[head].tolist())
        ref = set(scores.topk(budget).indices.tolist())
        assert len(mine) == budget
        if mine == ref:
            continue
        boundary = scores.topk(budget).values[-1]
        if torch.isinf(boundary):
            raise AssertionError(f"head {head}: forced entries differ: {sorted(mine ^ ref)}")
        for j in mine ^ ref:
            assert abs(float(scores[j] - boundary)) <= tol * max(1.0, abs(float(boundary))), (
                f"head {head}: index {j} (score {float(scores[j]):.8g}) is selected differently from the "
                f"reference, and is not tied with the boundary score {float(boundary):.8g}"
            )


def pool_by_hand(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """Max over the window [j - kernel//2, j + kernel//2] clipped to the sequence, per row."""
    r = kernel // 2
    n = scores.shape[-1]
    return torch.stack([scores[:, max(0, j - r) : j + r + 1].amax(dim=-1) for j in range(n)], dim=-1)


def group_mean(scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(H, n) -> (kv_heads, n): mean over the query heads h with h // (H / kv_heads) == kv head."""
    heads = scores.shape[0]
    group = heads // kv_heads
    return torch.stack([scores[g * group : (g + 1) * group].mean(dim=0) for g in range(kv_heads)])


# ----------------------------------------------------------------------------- SnapKV


def snapkv_reference(probs: torch.Tensor, window: int, kernel: int) -> torch.Tensor:
    """SnapKV scores (kv_heads, L): window rows' attention to the prefix, max-pool, GQA mean; window = +inf.

    Each query head is pooled BEFORE the GQA mean (docs/method.md's order). Averaging first and
    pooling after selects a clearly different set (max does not commute with the mean), so
    this reference pins the order down.
    """
    length = probs.shape[-1]
    votes = probs[:, length - window :, : length - window].sum(dim=1)  # (H, L - w)
    prefix = group_mean(pool_by_hand(votes, kernel), KV_HEADS)
    forced = torch.full((KV_HEADS, window), float("inf"))
    return torch.cat([prefix, forced], dim=-1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("window,kernel,budget", [(32, 7, 48), (8, 7, 24), (8, 1, 40)])
def test_snapkv_selection_matches_eager_reference(arch, window, kernel, budget):
    model = tiny_model(arch, seed=3)
    ids = random_ids(L, seed=11)
    probs = attention_probs(model, ids)
    kept = engine_kept(model, ids, SnapKV(budget=budget, window=window, kernel=kernel))
    assert len(kept) == len(probs) == 4
    for layer, p in enumerate(probs):
        ref = snapkv_reference(p, window, kernel)
        assert_same_selection(kept[layer], ref, budget)
        # the window is always kept, whatever the scores
        for head in range(KV_HEADS):
            assert set(range(L - window, L)) <= set(kept[layer][head].tolist())


def test_reference_attention_is_causal_and_normalised():
    """The eager reference the selections are checked against: rows sum to 1, nothing above the diagonal."""
    model = tiny_model("llama", seed=3)
    ids = random_ids(L, seed=11)
    probs = attention_probs(model, ids)
    assert torch.allclose(probs[0].sum(-1), torch.ones(4, L), atol=1e-5)
    upper = torch.triu(torch.ones(L, L, dtype=torch.bool), diagonal=1)
    assert float(probs[0][:, upper].abs().max()) == 0.0


# ----------------------------------------------------------------------------- PyramidKV


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_pyramidkv_uses_snapkv_scores_with_per_layer_budgets(arch):
    model = tiny_model(arch, seed=4)
    ids = random_ids(L, seed=12)
    policy = PyramidKV(budget=40, window=8, kernel=7)
    budgets = policy.layer_budgets(4, L)
    probs = attention_probs(model, ids)
    kept = engine_kept(model, ids, policy)
    for layer, p in enumerate(probs):
        assert_same_selection(kept[layer], snapkv_reference(p, 8, 7), budgets[layer])


@pytest.mark.parametrize(
    "budget,length,layers",
    [(40, 128, 4), (33, 100, 4), (60, 100, 4), (90, 100, 4), (99, 100, 4), (128, 1000, 30), (10, 40, 6), (0.25, 200, 4)],
)
def test_pyramidkv_budgets_fall_and_keep_the_total(budget, length, layers):
    policy = PyramidKV(budget=budget)
    budgets = policy.layer_budgets(layers, length)
    flat = resolve_budget(budget, length)
    assert len(budgets) == layers
    assert sum(budgets) == layers * flat, f"{budgets} should sum to {layers} x {flat}"
    assert all(1 <= b <= length for b in budgets), budgets
    assert all(a >= b for a, b in zip(budgets, budgets[1:])), f"budgets should fall with depth: {budgets}"
    if flat > policy.window and flat < length:
        assert budgets[0] > budgets[-1], f"a pyramid, not a flat budget: {budgets}"


def test_pyramidkv_keeps_everything_when_the_budget_covers_the_prompt():
    assert PyramidKV(budget=64).layer_budgets(4, 50) == [50] * 4
    assert PyramidKV(budget=50).layer_budgets(4, 50) == [50] * 4


# ----------------------------------------------------------------------------- H2O


def h2o_reference(probs: torch.Tensor, window: int) -> torch.Tensor:
    """H2O scores (kv_heads, L): attention summed over ALL prompt queries, GQA mean; recent window = +inf."""
    length = probs.shape[-1]
    scores = group_mean(probs.sum(dim=1), KV_HEADS)
    scores[:, length - window :] = float("inf")
    return scores


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("window,budget,chunk", [(32, 48, 256), (4, 20, 256), (4, 20, 7)])
def test_h2o_selection_matches_eager_reference(arch, window, budget, chunk):
    model = tiny_model(arch, seed=5)
    ids = random_ids(L, seed=13)
    probs = attention_probs(model, ids)
    kept = engine_kept(model, ids, H2O(budget=budget, window=window, chunk=chunk))
    for layer, p in enumerate(probs):
        assert_same_selection(kept[layer], h2o_reference(p, window), budget)


# ----------------------------------------------------------------------------- TOVA


@pytest.mark.parametrize("arch", ARCHS)
def test_tova_selection_matches_eager_reference(arch):
    model = tiny_model(arch, seed=6)
    ids = random_ids(L, seed=14)
    probs = attention_probs(model, ids)
    budget = 30
    kept = engine_kept(model, ids, TOVA(budget=budget))
    for layer, p in enumerate(probs):
        last_row = p[:, -1, :].mean(dim=0)  # averaged over ALL query heads
        ref = last_row.expand(KV_HEADS, -1)
        assert_same_selection(kept[layer], ref, budget)
        assert torch.equal(kept[layer][0], kept[layer][1]), "TOVA keeps one set for all heads"


# ----------------------------------------------------------------------------- StreamingLLM, Random


@pytest.mark.parametrize("budget", [4, 5, 20, 100])
def test_streamingllm_keeps_sinks_and_the_most_recent(budget):
    model = tiny_model("mistral")
    ids = random_ids(L, seed=15)
    kept = engine_kept(model, ids, StreamingLLM(budget=budget))
    expected = list(range(4)) + list(range(L - (budget - 4), L))
    for layer_kept in kept:
        for head in range(KV_HEADS):
            assert layer_kept[head].tolist() == expected


def test_streamingllm_custom_sinks():
    model = tiny_model("llama")
    ids = random_ids(50, seed=16)
    kept = engine_kept(model, ids, StreamingLLM(budget=10, n_sink=2))
    assert kept[0][0].tolist() == [0, 1] + list(range(42, 50))


def test_random_policy_is_seeded_and_differs_per_head():
    model = tiny_model("qwen2")
    ids = random_ids(80, seed=17)
    a = engine_kept(model, ids, RandomPolicy(budget=20, seed=1))
    b = engine_kept(model, ids, RandomPolicy(budget=20, seed=1))
    c = engine_kept(model, ids, RandomPolicy(budget=20, seed=2))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    assert not torch.equal(a[0][0], a[0][1])
    assert not torch.equal(a[0], a[1])


# ----------------------------------------------------------------------------- shared math


def test_reduce_gqa_groups_consecutive_heads():
    scores = torch.tensor([[1.0, 0.0], [3.0, 2.0], [10.0, 20.0], [30.0, 0.0]])
    assert torch.equal(reduce_gqa(scores, 2), torch.tensor([[2.0, 1.0], [20.0, 10.0]]))
    assert torch.equal(reduce_gqa(scores, 2, "max"), torch.tensor([[3.0, 2.0], [30.0, 20.0]]))
    assert torch.equal(reduce_gqa(scores, 4), scores)


def test_max_pool_matches_hand_pooling():
    scores = torch.rand(3, 41, generator=torch.Generator().manual_seed(0))
    for kernel in (1, 3, 7):
        assert torch.equal(max_pool(scores, kernel), pool_by_hand(scores, kernel))


def test_gqa_max_reduction_changes_selection_rule():
    model = tiny_model("llama", seed=3)
    ids = random_ids(L, seed=11)
    probs = attention_probs(model, ids)
    kept = engine_kept(model, ids, SnapKV(budget=24, window=8, kernel=1, gqa_reduce="max"))
    for layer, p in enumerate(probs):
        votes = p[:, L - 8 :, : L - 8].sum(dim=1).view(KV_HEADS, 2, -1).amax(dim=1)
        ref = torch.cat([votes, torch.full((KV_HEADS, 8), float("inf"))], dim=-1)
        assert_same_selection(kept[layer], ref, 24)


# ----------------------------------------------------------------------------- registry


def test_registry_lists_every_method():
    assert {"full", "random", "streamingllm", "snapkv", "pyramidkv", "h2o", "tova", "lookahead"} <= set(REGISTRY)
    assert all(cls.name == name for name, cls in REGISTRY.items())
    assert REGISTRY["snapkv"] is SnapKV and REGISTRY["lookahead"] is LookaheadKV and REGISTRY["full"] is FullKV
    policy = make_policy("h2o", budget=12, window=3)
    assert isinstance(policy, H2O) and policy.budget == 12 and policy.window == 3


def test_make_policy_unknown_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown method 'snapk'.*snapkv"):
        make_policy("snapk")


@pytest.mark.parametrize("budget", [0, -3, 1.5, 0.0, "12", None, True])
def test_bad_budgets_are_rejected(budget):
    with pytest.raises(ValueError, match="budget"):
        SnapKV(budget=budget)


@pytest.mark.parametrize(
    "kwargs", [dict(window=0), dict(kernel=0), dict(gqa_reduce="median")]
)
def test_bad_snapkv_settings_are_rejected(kwargs):
    with pytest.raises(ValueError):
        SnapKV(**kwargs)


@pytest.mark.parametrize("ratio,length", [(0.25, 100), (0.25, 97), (0.1, 333), (0.5, 3), (1e-9, 50)])
def test_ratio_budget_resolves_against_the_prompt(ratio, length):
    assert resolve_budget(ratio, length) == max(1, round(ratio * length))
    assert SnapKV(budget=ratio).layer_budgets(4, length) == [max(1, round(ratio * length))] * 4
