"""Eviction during decoding (engine.rescore + policies.decoding), one shared matrix for every policy that has a decode-time scorer.

* With a decode budget at or above the final length, the output equals decoding without one, token for token.
* After every re-scoring the physical cache decodes like the FULL cache with the same entries masked per KV
  head (the eager reference attention of ``helpers``, masks updated step by step), at true positions.
* Positions stay true: every kept entry's key is the full cache's key at the position the engine says it holds.
* The cache never holds more than ``budget + interval`` entries per KV head, and reaches that peak.
* Each decode-time scorer's scores equal an eager reference over the same visible entries (LookaheadKV: its
  tokens at the next true positions; SnapKV/TOVA: the generated queries; H2O: the accumulated attention;
  StreamingLLM: sinks + the latest positions).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from helpers import (  # noqa: F401  (single_thread is an autouse fixture)
    ARCHS,
    attention_probs,
    hf_prefill,
    masked_lora,
    random_ids,
    randomize_lora_b,
    reference_mode,
    single_thread,
)
from lookaheadkv.engine.decode import decode
from test_cli import invoke, tiny_folder  # noqa: F401  (tiny_folder is a fixture)
from lookaheadkv.engine.generate import compress, generate_ids, run_prefill
from lookaheadkv.engine.rescore import BudgetedDecoding, DecodeBudget, decode_scorer
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.models import tiny_model
from lookaheadkv.policies import REGISTRY, make_policy

LENGTH, PREFILL_BUDGET, STEPS = 60, 24, 40
BUDGET = DecodeBudget(32, interval=5, recent=6)
N_LOOKAHEAD = 8
SUPPORTED = ["h2o", "lookahead", "pyramidkv", "random", "snapkv", "streamingllm", "tova"]
REFUSED = ["full", "laq", "oracle", "speckv"]


def build(name: str, model, **kwargs):
    if name == "lookahead":
        modules = LookaheadModules.for_model(model, seed=3, n_lookahead=N_LOOKAHEAD)
        randomize_lora_b(modules, seed=3)
        kwargs["modules"] = modules
    if name in ("snapkv", "pyramidkv"):
        kwargs.update(window=4, kernel=3)  # the window (4 queries) within an interval (5 tokens): see check_scores
    return make_policy(name, budget=PREFILL_BUDGET, **kwargs)


def test_the_matrix_covers_every_policy():
    model = tiny_model("llama", seed=0)
    assert sorted(REGISTRY) == sorted(SUPPORTED + REFUSED)
    assert [n for n in sorted(REGISTRY) if build(n, model).has_decode_scorer] == SUPPORTED


@pytest.mark.parametrize("name", REFUSED)
def test_policies_without_a_decode_scorer_refuse_in_one_line(name):
    model = tiny_model("llama", seed=0)
    policy = make_policy(name, budget=16)
    with pytest.raises(ValueError, match=f"{name} has no decode-time scorer") as err:
        generate_ids(model, random_ids(30), policy, max_new_tokens=4, decode_budget=DecodeBudget(20))
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="policy=None keeps the whole cache"):
        generate_ids(model, random_ids(30), None, max_new_tokens=4, decode_budget=DecodeBudget(20))


@pytest.mark.parametrize("kwargs", [dict(budget=0), dict(budget=8, interval=0), dict(budget=8, recent=-1), dict(budget=8.5), dict(budget=True)])
def test_bad_decode_budgets_are_rejected(kwargs):
    with pytest.raises(ValueError, match="decode"):
        DecodeBudget(**kwargs)


def test_recent_window_is_capped_at_half_the_budget():
    assert DecodeBudget(128).window == 32
    assert DecodeBudget(40, recent=32).window == 20
    assert DecodeBudget(8, recent=0).window == 0


# ----------------------------------------------------------------------------- 1. budget above the final length


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("arch", ARCHS)
def test_budget_at_the_final_length_changes_nothing(arch, name):
    model = tiny_model(arch, seed=1)
    ids = random_ids(LENGTH, seed=2)
    plain, plain_stats, _ = generate_ids(model, ids, build(name, model), max_new_tokens=STEPS, eos_token_ids=[2])
    final = max(plain_stats.kept_per_layer) + STEPS - 1  # entries per KV head in the longest layer after the last forward
    for budget in (final, final + 50):
        tokens, stats, _ = generate_ids(
            model, ids, build(name, model), max_new_tokens=STEPS, eos_token_ids=[2], decode_budget=DecodeBudget(budget, interval=5)
        )
        assert tokens == plain
        record = stats.decode_eviction
        assert record.rescorings == [] and record.peak == final
        assert "0 re-scorings" in stats.line()


# ----------------------------------------------------------------------------- 2-5. exactness, positions, peak, scores


class Recording:
    """Wraps a decode-time scorer: keeps what each re-scoring saw and returned."""

    def __init__(self, scorer):
        self.scorer, self.calls, self.scoring = scorer, [], False
        for name in ("observer", "start", "evicted"):
            if hasattr(scorer, name):
                setattr(self, name, getattr(scorer, name))

    def scores(self, model, view):
        self.scoring = True
        try:
            out = self.scorer.scores(model, view)
        finally:
            self.scoring = False
        self.calls.append((view.next_position, [p.clone() for p in view.positions], [s.clone().float() for s in out]))
        return out


def run_engine(model, ids, policy):
    """Decode under BUDGET; per step the visible positions before its forward, the logits after it."""
    state, observer = run_prefill(model, ids, policy)
    done = compress(model, state, policy, observer, cap=BUDGET.budget)
    scorer = Recording(decode_scorer(policy, model))
    run = BudgetedDecoding(model, done.cache, done.kept, LENGTH, BUDGET, scorer, prefill=state, observer=observer, keep_positions=True)
    visible = [[p.clone() for p in run.positions]]
    kept_keys = []  # after each re-scoring: (positions, keys) per layer

    def after_step(fed):
        count = len(run.record.rescorings)
        run.after_step(fed)
        visible.append([p.clone() for p in run.positions])
        if len(run.record.rescorings) > count:
            kept_keys.append([(p.clone(), layer.keys[0].clone()) for p, layer in zip(run.positions, run.cache.layers)])

    logits = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: None if scorer.scoring else logits.append(out[0, -1].detach().clone()))
    try:
        tokens = decode(model, done.cache, state.logits, LENGTH, STEPS, observers=run.observers(), after_step=after_step)
    finally:
        handle.remove()
    return tokens, logits, visible, kept_keys, run.record, scorer.calls


def masks_for(positions: list[torch.Tensor], length: int) -> dict[int, torch.Tensor]:
    out = {}
    for layer, pos in enumerate(positions):
        m = torch.zeros(pos.shape[0], length, dtype=torch.bool)
        m.scatter_(1, pos, True)
        out[layer] = m
    return out


def reference_decode(model, ids, tokens, visible, masked=True):
    """The full cache, each step's evicted entries masked per KV head; every step's logits and probabilities."""
    cache, first = hf_prefill(model, ids)
    masks, capture, logits, probs = {}, {}, [], []
    with torch.no_grad(), reference_mode(model, key_masks=masks if masked else None, capture=capture):
        for step, token in enumerate(tokens[:-1]):
            masks.clear()
            masks.update(masks_for(visible[step], LENGTH + step))
            out = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[LENGTH + step]]), cache=cache)
            logits.append(out.logits[0, -1])
            probs.append([capture[i][:, -1] for i in sorted(capture)])  # per layer (H, k)
    return cache, first, logits, probs


def gqa_mean(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    return x.view(kv_heads, x.shape[0] // kv_heads, *x.shape[1:]).mean(dim=1)


def at_positions(per_head: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(H, P) values by position -> (H, n): each query head read at its KV head's entries."""
    group = per_head.shape[0] // positions.shape[0]
    return per_head.gather(1, positions.repeat_interleave(group, dim=0))


def check_scores(name, model, ids, policy, calls, ref_cache, step_probs):
    """Each re-scoring's scores against an eager reference over the same visible entries."""
    kv_heads = model.config.num_key_value_heads
    prefill_probs = attention_probs(model, ids) if name == "h2o" else None
    for next_position, positions, scores in calls:
        fed = next_position - LENGTH
        for layer, (pos, got) in enumerate(zip(positions, scores)):
            if name in ("snapkv", "pyramidkv"):  # the last 4 generated queries, over the entries seen then (no eviction since)
                mass = sum(F.pad(step_probs[s][layer], (0, next_position - step_probs[s][layer].shape[1])) for s in range(fed - 4, fed))
                pooled = F.max_pool1d(at_positions(mass, pos)[None], 3, stride=1, padding=1)[0]
                want = gqa_mean(pooled, kv_heads)
            elif name == "tova":  # the last token's attention to each position, mean over all heads
                last = step_probs[fed - 1][layer]
                want = last.mean(dim=0)[pos]
            elif name == "h2o":  # every query's attention so far: the prompt's (unmasked) and each step's (masked)
                total = F.pad(prefill_probs[layer].sum(dim=1), (0, next_position - LENGTH))
                for s in range(fed):
                    total = total + F.pad(step_probs[s][layer], (0, next_position - step_probs[s][layer].shape[1]))
                want = gqa_mean(at_positions(total, pos), kv_heads)
            elif name == "streamingllm":
                want = pos.float().masked_fill(pos < 4, float("inf"))
            elif name == "lookahead":
                want = lookahead_reference(model, policy.modules, ref_cache, next_position, positions)[layer]
                want = gqa_mean(at_positions(want, pos), kv_heads)
            else:  # random: fresh uniform draws
                assert ((got >= 0) & (got < 1)).all()
                continue
            torch.testing.assert_close(got, want, atol=2e-5, rtol=0, msg=lambda m: f"{name} at position {next_position}, layer {layer}: {m}")


def lookahead_reference(model, modules, ref_cache, next_position, positions):
    """The lookahead tokens at positions P.. over the full cache's first P entries, the evicted ones masked: (H, P) mean over the tokens."""
    cache = DynamicCache()
    for i, layer in enumerate(ref_cache.layers):
        cache.update(layer.keys[:, :, :next_position].clone(), layer.values[:, :, :next_position].clone(), i)
    capture = {}
    with torch.no_grad(), masked_lora(model, modules, start=0), reference_mode(model, key_masks=masks_for(positions, next_position), capture=capture):
        model(inputs_embeds=modules.tokens[None], position_ids=torch.arange(next_position, next_position + N_LOOKAHEAD)[None], cache=cache)
    return [capture[i][:, :, :next_position].mean(dim=1) for i in sorted(capture)]


@pytest.mark.parametrize("name", SUPPORTED)
@pytest.mark.parametrize("arch", ARCHS)
def test_rescored_cache_decodes_like_masked_full_cache(arch, name):
    model = tiny_model(arch, seed=7)
    ids = random_ids(LENGTH, seed=8)
    policy = build(name, model)
    tokens, logits, visible, kept_keys, record, calls = run_engine(model, ids, policy)
    assert len(tokens) == STEPS and len(logits) == STEPS - 1

    # peak: never above budget + interval, and reached; each re-scoring cuts back to the budget
    assert record.peak == BUDGET.budget + BUDGET.interval
    assert len(record.rescorings) >= 5 and all(r.after == BUDGET.budget for r in record.rescorings)
    assert all(r.fed % BUDGET.interval == 0 for r in record.rescorings)
    # generated entries were evicted too (40 generated > 32 kept), and the recent window always stayed
    final = visible[-1]
    assert any(len(set(range(LENGTH, LENGTH + STEPS - 1)) - set(p[h].tolist())) > 0 for p in final for h in range(p.shape[0]))
    for r in record.rescorings:
        newest = set(range(LENGTH + r.fed - BUDGET.window, LENGTH + r.fed))
        assert all(newest <= set(p[h].tolist()) for p in r.positions for h in range(p.shape[0]))

    # exactness: the masked full cache gives the same logits at every step
    ref_cache, first, ref_logits, step_probs = reference_decode(model, ids, tokens, visible)
    for step, (mine, ref) in enumerate(zip(logits, ref_logits)):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0, msg=lambda m: f"step {step + 1}: {m}")
        assert tokens[step + 1] == int(ref.argmax()), f"greedy token {step + 1} differs from the reference"
    _, _, unmasked, _ = reference_decode(model, ids, tokens, visible, masked=False)
    assert max(float((m - u).abs().max()) for m, u in zip(logits, unmasked)) > 1e-3, "the masks should matter"

    # positions stay true: each kept key is the full cache's key at the position recorded for it
    assert len(kept_keys) == len(record.rescorings)
    for snapshot in kept_keys:
        for layer, (pos, keys) in enumerate(snapshot):
            full = ref_cache.layers[layer].keys[0]
            for h in range(pos.shape[0]):
                assert pos[h].tolist() == sorted(set(pos[h].tolist()))
                torch.testing.assert_close(keys[h], full[h, pos[h]], atol=1e-5, rtol=0)

    check_scores(name, model, ids, policy, calls, ref_cache, step_probs)

    # the public pipeline does the same
    again, stats, _ = generate_ids(model, ids, build(name, model), max_new_tokens=STEPS, decode_budget=BUDGET)
    assert again == tokens and stats.decode_eviction.peak == record.peak


def test_prefill_eviction_is_capped_at_the_decode_budget():
    model = tiny_model("qwen2", seed=2)
    ids = random_ids(100, seed=3)
    _, stats, kept = generate_ids(model, ids, make_policy("pyramidkv", budget=40, window=4), max_new_tokens=3, decode_budget=DecodeBudget(30, interval=4))
    assert max(stats.kept_per_layer) == 30 and stats.decode_eviction.peak <= 30 + 4
    assert all(k.shape[1] <= 30 for k in kept)


# ----------------------------------------------------------------------------- the command line and generate()


def test_cli_generate_with_a_decode_budget(tiny_folder):

    result = invoke(
        "generate", "--model", str(tiny_folder), "--method", "h2o", "--budget", "16", "--decode-budget", "20",
        "--interval", "4", "--recent", "4", "--prompt", "Name three rivers of Europe, please.", "--max-new-tokens", "30",
    )  # fmt: skip
    assert result.exit_code == 0, (result.output, result.exception)
    stats = result.stderr.strip().splitlines()[-1]
    assert "decode budget 20 (every 4 tok, last 4 kept)" in stats and "peak 24/head" in stats


@pytest.mark.parametrize(
    "args,needle",
    [
        (("--method", "laq", "--decode-budget", "20"), "laq has no decode-time scorer"),
        (("--method", "full", "--decode-budget", "20"), "full has no decode-time scorer"),
        (("--decode-budget", "0"), "--decode-budget"),
        (("--decode-budget", "20", "--interval", "0"), "--interval"),
    ],
)
def test_cli_decode_budget_errors(args, needle):
    result = invoke("generate", "--prompt", "hi", *args)
    assert result.exit_code == 2 and needle in result.output + result.stderr


def test_generate_text_api_takes_a_decode_budget(smollm2):
    from lookaheadkv import SnapKV, generate

    model, tokenizer = smollm2
    model_small = model  # the bundled model: a real chat template and tokenizer
    out = generate(model_small, tokenizer, "Count from one to forty in words.", SnapKV(budget=16), max_new_tokens=24, decode_budget=20, interval=4)
    record = out.stats.decode_eviction
    assert record.peak <= 24 and len(record.rescorings) >= 1
    with pytest.raises(ValueError, match="decode interval"):
        generate(model_small, tokenizer, "hi", SnapKV(budget=16), decode_budget=20, interval=0)
