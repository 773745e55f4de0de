"""Half precision (bf16, fp16), sliding-window layers after eviction, and SpecKV's draft (issue 18).

Half precision: the fused tail's prompt K/V and first logits against a plain Hugging Face prefill
in the same dtype; eviction exactness against an eager full-cache reference with each KV head's
evicted entries masked; LookaheadKV's scores fused vs unfused. Tolerances are stated per test.
"""

from __future__ import annotations

import pytest
import torch

from helpers import clone_cache, evicted_masks, hf_greedy_tokens, hf_prefill, kv, random_ids, randomize_lora_b, reference_mode, single_thread  # noqa: F401
from lookaheadkv.engine.decode import decode
from lookaheadkv.engine.generate import compress, generate_ids, run_prefill
from lookaheadkv.engine.prefill import prefill
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.models import tiny_model
from lookaheadkv.policies import LookaheadKV, SnapKV, SpecKV
from lookaheadkv.policies.speckv import SELF_DRAFT_LABEL

HALF = [torch.bfloat16, torch.float16]
LAYERS = 4


def half_model(arch, dtype, seed=1):
    return tiny_model(arch, seed=seed).to(dtype)


def half_modules(model, dtype, seed=3):
    modules = LookaheadModules.for_model(model, seed=seed, n_lookahead=8)
    randomize_lora_b(modules, seed=seed)
    return modules.to(dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_tail_keeps_the_plain_half_precision_prompt(arch, dtype):
    """Prompt K/V and first logits of the fused prefill vs a plain HF prefill in the same dtype.

    Tolerance: one unit in the last place of the dtype, relative (bf16 2^-8, fp16 2^-11); on this
    project's CPU the values are bit-identical.
    """
    model = half_model(arch, dtype)
    ids = random_ids(90, seed=2)
    modules = half_modules(model, dtype)
    fused = prefill(model, ids, tail=modules.tail(model))
    ref_cache, ref_logits = hf_prefill(model, ids)
    ulp = {torch.bfloat16: 2**-8, torch.float16: 2**-11}[dtype]
    for layer in range(LAYERS):
        for mine, ref in zip(kv(fused.cache, layer), kv(ref_cache, layer)):
            assert mine.dtype == ref.dtype == dtype and mine.shape == ref.shape
            torch.testing.assert_close(mine, ref, rtol=ulp, atol=ulp * 1e-2)
    torch.testing.assert_close(fused.logits, ref_logits.float(), rtol=ulp, atol=ulp * float(ref_logits.abs().max()))
    assert int(fused.logits.argmax()) == int(ref_logits.argmax())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_lookahead_scores_fused_and_unfused_agree_in_half_precision(arch, dtype):
    """Scores of the tokens inside the prefill vs in a separate forward over the plain cache.

    In fp32 they agree to 1e-7 (test_lookahead); in half precision the two paths round the
    tokens' rows differently: bf16 within 2e-2, fp16 within 5e-3 (absolute, on scores that are
    attention probabilities averaged over the tokens, each in [0, 1]), and the kept sets at a
    quarter of the prompt overlap by at least 90%.
    """
    model = half_model(arch, dtype)
    ids = random_ids(120, seed=4)
    modules = half_modules(model, dtype)
    fused, separate = LookaheadKV(budget=30, modules=modules), LookaheadKV(budget=30, modules=modules, fused=False)
    state, _ = run_prefill(model, ids, fused)
    plain = prefill(model, ids)
    a, b = fused.scores(model, state, None), separate.scores(model, plain, None)
    tol = {torch.bfloat16: 2e-2, torch.float16: 5e-3}[dtype]
    for x, y in zip(a, b):
        assert torch.isfinite(x).all() and torch.isfinite(y).all()
        torch.testing.assert_close(x.float(), y.float(), atol=tol, rtol=0)
    kept_a = compress(model, state, fused).kept
    kept_b = compress(model, plain, separate).kept
    for x, y in zip(kept_a, kept_b):
        for head in range(x.shape[0]):
            overlap = len(set(x[head].tolist()) & set(y[head].tolist())) / x.shape[1]
            assert overlap >= 0.9


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("kind", ["snapkv", "lookahead"])
def test_evicted_half_precision_cache_decodes_like_the_masked_full_cache(kind, dtype):
    """Decoding on the compact cache vs an eager reference over the full cache with the evicted entries
    masked per KV head, both in the model's dtype. Logits within 0.05 absolute (bf16; 0.01 fp16):
    SDPA and the eager reference round differently; the mask itself moves them by more."""
    steps, length = 6, 120
    model = half_model("llama", dtype, seed=7)
    ids = random_ids(length, seed=8)
    policy = SnapKV(budget=40, window=8) if kind == "snapkv" else LookaheadKV(budget=40, modules=half_modules(model, dtype, seed=5))
    state, observer = run_prefill(model, ids, policy)
    done = compress(model, state, policy, observer)
    assert [kv(done.cache, i)[0].shape[2] for i in range(LAYERS)] == [40] * LAYERS
    captured = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: captured.append(out[0, -1].detach().float().clone()))
    try:
        tokens = decode(model, done.cache, state.logits, length, steps)
    finally:
        handle.remove()
    ref_cache, _ = hf_prefill(model, ids)
    unmasked = clone_cache(ref_cache)
    ref, free = [], []
    with torch.no_grad():
        with reference_mode(model, key_masks=evicted_masks(done.kept, length)):
            for step, token in enumerate(tokens[:-1]):
                ref.append(model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[length + step]]), cache=ref_cache).logits[0, -1].float())
        with reference_mode(model):
            for step, token in enumerate(tokens[:-1]):
                free.append(model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[length + step]]), cache=unmasked).logits[0, -1].float())
    tol = {torch.bfloat16: 5e-2, torch.float16: 1e-2}[dtype]
    for mine, r in zip(captured, ref):
        torch.testing.assert_close(mine, r, atol=tol, rtol=0)
    assert max(float((m - u).abs().max()) for m, u in zip(captured, free)) > 2 * tol  # the mask matters


# ----------------------------------------------------------------------------- sliding windows


def sliding(window=16, seed=2):
    return tiny_model("mistral", seed=seed, sliding_window=window)


def test_eviction_on_sliding_window_layers_is_refused_past_the_window():
    model = sliding(16)
    with pytest.raises(NotImplementedError, match="sliding-window layers see only the last 16 positions"):
        generate_ids(model, random_ids(12, seed=1), SnapKV(budget=4, window=4), max_new_tokens=8)
    with pytest.raises(NotImplementedError, match="sliding-window"):  # LAQ's draft runs on an evicted copy too
        from lookaheadkv.policies import LAQ

        generate_ids(model, random_ids(12, seed=1), LAQ(budget=4, window=4, n_draft=8), max_new_tokens=2)


def test_eviction_within_the_window_matches_the_same_model_without_a_window():
    """Inside the window nothing is cut, so a sliding-window model evicts exactly like its full-attention twin."""
    ids = random_ids(10, seed=1)
    with_window = generate_ids(sliding(16), ids, SnapKV(budget=4, window=4), max_new_tokens=7)
    twin = tiny_model("mistral", seed=2)  # the same weights, no sliding window
    without = generate_ids(twin, ids, SnapKV(budget=4, window=4), max_new_tokens=7)
    assert with_window[0] == without[0]
    assert all(torch.equal(a, b) for a, b in zip(with_window[2], without[2]))


def test_runner_refuses_sequences_past_the_sliding_window(smollm2, tmp_path):
    from helpers import tiny_for_tokenizer
    from lookaheadkv.evaluation.runner import EvalConfig, Runner
    from lookaheadkv.tasks import make_suite

    _, tokenizer = smollm2
    model = tiny_for_tokenizer(tokenizer, "mistral", seed=1, sliding_window=300)
    suite = make_suite(tokenizer, ["niah_single_number"], [256], 1, split="eval", seed=0)
    suite[0].max_new_tokens = 100  # 256 + 100 positions > 300: the full-cache reference is refused first
    with pytest.raises(NotImplementedError, match="sliding-window"):
        Runner(model, tokenizer, EvalConfig(["snapkv"], [32]), tmp_path).run(suite)
    # and an evicted method is refused on its own (the engine's entry count no longer tells the window)
    from lookaheadkv.engine.attention import check_eviction_window

    with pytest.raises(NotImplementedError, match="sliding-window layers see only the last 300 positions"):
        check_eviction_window(model, 301)
    check_eviction_window(model, 300)
    check_eviction_window(tiny_model("mistral"), 10**6)  # no window: nothing to refuse


# ----------------------------------------------------------------------------- SpecKV


def test_speckv_drafts_with_the_distinct_draft_model():
    target = tiny_model("llama", seed=1)
    draft = tiny_model("llama", seed=9, num_hidden_layers=2)
    ids = random_ids(60, seed=3)
    policy = SpecKV(budget=16, draft=draft, n_draft=6)
    state = prefill(target, ids, [policy.observer()])
    drafted = policy.draft_tokens(target, state)
    assert drafted == hf_greedy_tokens(draft, ids, 6)  # the draft model's own answer...
    assert drafted != hf_greedy_tokens(target, ids, 6)  # ...not the target's (the self-draft)
    assert SpecKV(budget=16, draft=None, n_draft=6).draft_tokens(target, state) == hf_greedy_tokens(target, ids, 6)
    assert policy.label.startswith("SpecKV (draft: ") and SpecKV(budget=8).label == SELF_DRAFT_LABEL
    tokens, stats, kept = generate_ids(target, ids, policy, max_new_tokens=3)
    assert stats.kept_per_layer == [16] * LAYERS
    with pytest.raises(ValueError, match="same tokenizer"):
        SpecKV(budget=8, draft=tiny_model("llama", seed=1, vocab_size=128)).draft_model(target)
    with pytest.raises(TypeError, match="draft must be"):
        SpecKV(budget=8, draft=SpecKV)


def test_speckv_without_a_draft_is_labelled_an_upper_bound_everywhere(tmp_path):
    from typer.testing import CliRunner

    from lookaheadkv.cli import app
    from lookaheadkv.evaluation import report

    line = next(x for x in CliRunner().invoke(app, ["methods"]).stdout.splitlines() if x.startswith("speckv "))
    assert SELF_DRAFT_LABEL in line
    rows = []
    for i in range(4):  # rows as the runner writes them: none (old files) or None = self-draft
        rows += [
            {"sample_id": f"s{i}", "group": "g", "method": "full", "budget": 0, "score": 1.0},
            {"sample_id": f"s{i}", "group": "g", "method": "snapkv", "budget": 8, "score": 0.0},
            {"sample_id": f"s{i}", "group": "g", "method": "speckv", "budget": 8, "score": 1.0, **({"draft": None} if i % 2 else {})},
        ]
    summary = report.summarise(rows, n_boot=50)
    assert f"| {SELF_DRAFT_LABEL} |" in report.markdown(summary)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = []
    original = plt.Axes.legend

    def legend(self, *args, **kwargs):
        seen.extend(t for t in self.get_legend_handles_labels()[1])
        return original(self, *args, **kwargs)

    plt.Axes.legend = legend
    try:
        report.plot(summary, tmp_path / "p.png")
    finally:
        plt.Axes.legend = original
    assert SELF_DRAFT_LABEL in seen
    drafted = [dict(r, draft="org/small") if r["method"] == "speckv" else r for r in rows]
    assert "| SpecKV (draft: org/small) |" in report.markdown(report.summarise(drafted, n_boot=50))
