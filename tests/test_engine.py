"""The eviction engine: prefill -> scores -> per-head top-k -> physical gather -> decode.

* With a budget that covers the prompt, every policy reproduces plain Hugging Face greedy
  generation token for token.
* After eviction the cache holds exactly the budgeted entries, and its size is the arithmetic one.
* Exactness: decoding from the physically evicted cache equals decoding from the FULL cache with
  the evicted entries masked out per KV head (an eager reference attention written in the tests),
  at the tokens' true positions.
* Sampling, EOS, streaming, and input validation.
"""

from __future__ import annotations

import pytest
import torch

from helpers import (  # noqa: F401  (single_thread is an autouse fixture)
    ARCHS,
    clone_cache,
    evicted_masks,
    hf_prefill,
    kv,
    random_ids,
    randomize_lora_b,
    reference_mode,
    single_thread,
    tiny_for_tokenizer,
)
from lookaheadkv.engine.attention import hooked
from lookaheadkv.engine.decode import Sampling, decode
from lookaheadkv.engine.generate import compress, eos_ids, generate, generate_ids, run_prefill
from lookaheadkv.engine.prefill import prefill
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.models import tiny_model
from lookaheadkv.policies import LAQ, REGISTRY, LookaheadKV, Oracle, PyramidKV, SnapKV, SpecKV, make_policy

NEW_TOKENS = 16
HEAD_DIM = 16
LAYERS = 4
KV_HEADS = 2
FLOAT32 = 4


def build_policy(name: str, model, **kwargs):
    if name == "lookahead":
        modules = LookaheadModules.for_model(model, seed=1, n_lookahead=8)
        randomize_lora_b(modules, seed=1)
        kwargs["modules"] = modules
    return make_policy(name, **kwargs)


def hf_greedy(model, input_ids: torch.Tensor, max_new_tokens: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    return out[0, input_ids.shape[1] :].tolist()


# ----------------------------------------------------------------------------- 1. equals HF greedy


PROMPT_LEN = {"llama": 150, "mistral": 101, "qwen2": 177, "qwen3": 130}


@pytest.fixture(scope="module")
def hf_reference():
    """arch -> (model, prompt ids, Hugging Face greedy continuation), computed once."""
    out = {}
    for i, arch in enumerate(ARCHS):
        model = tiny_model(arch, seed=i)
        ids = random_ids(PROMPT_LEN[arch], seed=100 + i)
        out[arch] = (model, ids, hf_greedy(model, ids))
    return out


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("arch", ARCHS)
def test_full_budget_reproduces_hf_greedy(hf_reference, arch, name):
    model, ids, expected = hf_reference[arch]
    assert len(expected) == NEW_TOKENS, "the reference should not stop early (eos id 2 is never drawn)"
    policy = build_policy(name, model, budget=256)
    tokens, stats, kept = generate_ids(model, ids, policy, max_new_tokens=NEW_TOKENS, eos_token_ids=[2])
    assert tokens == expected
    assert stats.kept_per_layer == [ids.shape[1]] * LAYERS
    assert stats.kv_bytes_after == stats.kv_bytes_before
    assert stats.new_tokens == NEW_TOKENS


SMOL_TEXT = (
    "Here are the notes from the garden club meeting. The tomatoes were planted on the east side "
    "because they need the morning sun. Maria brought seven kinds of basil and gave a short talk about "
    "drying herbs. The treasurer reported that the club has 412 dollars, and that the new hose costs 35 "
    "dollars. Tom asked whether the compost bin could move closer to the shed; the group agreed to try "
    "it for one month. The next meeting is on Thursday at six in the library, and everyone should bring "
    "one seedling to swap. Question: where were the tomatoes planted, and why?"
)


@pytest.fixture(scope="module")
def smol_reference(smollm2):
    from lookaheadkv.engine.generate import encode_prompt

    model, tokenizer = smollm2
    ids = encode_prompt(tokenizer, SMOL_TEXT)
    return model, tokenizer, ids, hf_greedy(model, ids)


@pytest.mark.parametrize("name", ["snapkv", "lookahead"])
def test_smollm2_full_budget_reproduces_hf_greedy(smol_reference, name):
    model, tokenizer, ids, expected = smol_reference
    assert 100 < ids.shape[1] <= 1024
    policy = build_policy(name, model, budget=1024)
    tokens, stats, _ = generate_ids(
        model, ids, policy, max_new_tokens=NEW_TOKENS, eos_token_ids=eos_ids(model, tokenizer)
    )
    assert tokens == expected
    assert stats.kept_per_layer == [ids.shape[1]] * model.config.num_hidden_layers


# ----------------------------------------------------------------------------- 2. sizes after eviction


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_eviction_keeps_exactly_the_budget(name):
    model = tiny_model("qwen2", seed=2)
    length, budget = 100, 30
    ids = random_ids(length, seed=3)
    extra = {"window": 8} if name == "pyramidkv" else {}  # the default window (32) would flatten the pyramid
    policy = build_policy(name, model, budget=budget, **extra)
    observer = policy.observer()
    state = prefill(model, ids, [observer])
    full_keys = [kv(state.cache, i)[0].clone() for i in range(LAYERS)]
    done = compress(model, state, policy, observer)
    tokens, stats, kept = generate_ids(model, ids, build_policy(name, model, budget=budget, **extra), max_new_tokens=2)

    bytes_before = 2 * LAYERS * KV_HEADS * length * HEAD_DIM * FLOAT32
    assert stats.kv_bytes_before == bytes_before
    assert stats.prompt_tokens == length
    if name == "full":
        assert kept is None and done.kept is None
        assert stats.kept_per_layer == [length] * LAYERS
        assert stats.kv_bytes_after == bytes_before
        return

    expected = policy.layer_budgets(LAYERS, length)
    if name == "pyramidkv":
        assert sum(expected) == LAYERS * budget and len(set(expected)) > 1
    else:
        assert expected == [budget] * LAYERS
    assert stats.kept_per_layer == expected
    assert stats.kv_bytes_after == sum(2 * KV_HEADS * k * HEAD_DIM * FLOAT32 for k in expected)
    assert stats.kv_bytes_after < stats.kv_bytes_before
    for layer in range(LAYERS):
        keys, values = kv(done.cache, layer)
        assert keys.shape == values.shape == (1, KV_HEADS, expected[layer], HEAD_DIM)
        idx = done.kept[layer]
        assert idx.shape == (KV_HEADS, expected[layer])
        for head in range(KV_HEADS):
            row = idx[head].tolist()
            assert row == sorted(set(row)) and 0 <= row[0] and row[-1] < length
            # the compact cache holds exactly the kept entries of this head, in order
            assert torch.equal(keys[0, head], full_keys[layer][0, head, idx[head]])
    # compress() leaves the prompt's full cache untouched
    assert all(torch.equal(kv(state.cache, i)[0], full_keys[i]) for i in range(LAYERS))


@pytest.mark.parametrize("ratio,length", [(0.25, 100), (0.25, 97), (0.1, 120)])
def test_ratio_budget_keeps_a_share_of_the_prompt(ratio, length):
    model = tiny_model("llama", seed=1)
    _, stats, _ = generate_ids(model, random_ids(length, seed=4), SnapKV(budget=ratio, window=4), max_new_tokens=1)
    expected = round(ratio * length)
    assert stats.kept_per_layer == [expected] * LAYERS
    assert stats.kv_bytes_after == 2 * LAYERS * KV_HEADS * expected * HEAD_DIM * FLOAT32


def test_stats_line_reports_the_kept_range():
    model = tiny_model("llama", seed=1)
    _, stats, _ = generate_ids(model, random_ids(100, seed=4), PyramidKV(budget=30, window=4), max_new_tokens=1)
    low, high = min(stats.kept_per_layer), max(stats.kept_per_layer)
    assert low < high
    assert f"kept/layer {low}-{high}" in stats.line()
    assert "prompt 100 tok" in stats.line()


# ----------------------------------------------------------------------------- 3. exactness


def exactness_policy(kind: str, model):
    if kind == "snapkv":
        return SnapKV(budget=40, window=8)
    if kind == "pyramidkv":
        return PyramidKV(budget=40, window=8)
    if kind == "laq":
        return LAQ(budget=40, window=8, n_draft=6)
    if kind == "speckv":
        return SpecKV(budget=40, window=8, n_draft=6, draft=tiny_model(model.config.model_type, seed=11, num_hidden_layers=2))
    if kind == "oracle":
        return Oracle(budget=40, max_new_tokens=8)
    modules = LookaheadModules.for_model(model, seed=5, n_lookahead=8)
    randomize_lora_b(modules, seed=5)
    return LookaheadKV(budget=40, modules=modules)


@pytest.mark.parametrize("kind", ["snapkv", "pyramidkv", "lookahead", "laq", "speckv", "oracle"])
@pytest.mark.parametrize("arch", ARCHS)
def test_evicted_cache_decodes_like_masked_full_cache(arch, kind):
    steps = 6
    model = tiny_model(arch, seed=7)
    length = 120
    ids = random_ids(length, seed=8)
    policy = exactness_policy(kind, model)
    state, observer = run_prefill(model, ids, policy)  # LookaheadKV: its tokens inside the prefill (the default)
    done = compress(model, state, policy, observer)
    lengths = [kv(done.cache, i)[0].shape[2] for i in range(LAYERS)]
    assert lengths == policy.layer_budgets(LAYERS, length)
    if kind == "pyramidkv":
        assert len(set(lengths)) > 1, "PyramidKV should give the layers different lengths"
    assert any(not torch.equal(k[0], k[1]) for k in done.kept), "the KV heads should keep different entries"

    # Engine: decode from the compact cache; capture the logits of every step at the LM head.
    captured: list[torch.Tensor] = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: captured.append(out[0, -1].detach().clone()))
    try:
        tokens = decode(model, done.cache, state.logits, length, steps)
    finally:
        handle.remove()
    assert len(tokens) == steps and len(captured) == steps - 1

    # Reference: plain HF prefill of the whole prompt, then the same tokens over the FULL cache
    # with each KV head's evicted prompt entries masked out, at positions L, L+1, ...
    ref_cache, ref_first = hf_prefill(model, ids)
    torch.testing.assert_close(state.logits, ref_first, atol=1e-4, rtol=0)
    masks = evicted_masks(done.kept, length)
    unmasked_cache = clone_cache(ref_cache)
    ref_logits, unmasked_logits = [], []
    with torch.no_grad():
        with reference_mode(model, key_masks=masks):
            for step, token in enumerate(tokens[:-1]):
                out = model(input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[length + step]]), cache=ref_cache)
                ref_logits.append(out.logits[0, -1])
        with reference_mode(model):
            for step, token in enumerate(tokens[:-1]):
                out = model(
                    input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[length + step]]), cache=unmasked_cache
                )
                unmasked_logits.append(out.logits[0, -1])

    for step, (mine, ref) in enumerate(zip(captured, ref_logits)):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0, msg=lambda m: f"step {step + 1}: {m}")
        assert tokens[step + 1] == int(ref.argmax()), f"greedy token {step + 1} differs from the reference"
    # The mask matters (so the comparison above can fail): without it the logits move.
    assert max(float((m - u).abs().max()) for m, u in zip(captured, unmasked_logits)) > 1e-3
    # The whole pipeline (prefill, score, evict, decode at the true positions) gives the same steps.
    pipeline: list[torch.Tensor] = []
    handle = model.lm_head.register_forward_hook(lambda m, a, out: pipeline.append(out[0, -1].detach().clone()))
    try:
        assert generate_ids(model, ids, exactness_policy(kind, model), max_new_tokens=steps)[0] == tokens
    finally:
        handle.remove()
    for mine, ref in zip(pipeline[-(steps - 1) :], ref_logits):
        torch.testing.assert_close(mine, ref, atol=1e-4, rtol=0)


def test_decoding_at_the_compressed_length_would_be_wrong():
    """Control for the exactness test: positions matter. Decoding the evicted cache with the
    compressed length as position differs from decoding it at the true position L."""
    model = tiny_model("llama", seed=7)
    length = 120
    ids = random_ids(length, seed=8)
    policy = SnapKV(budget=40, window=8)
    observer = policy.observer()
    state = prefill(model, ids, [observer])
    done = compress(model, state, policy, observer)
    token = int(state.logits.argmax())

    def step(position: int) -> torch.Tensor:
        with torch.no_grad(), hooked(model):
            out = model(
                input_ids=torch.tensor([[token]]), position_ids=torch.tensor([[position]]), cache=clone_cache(done.cache)
            )
        return out.logits[0, -1]

    assert float((step(length) - step(40)).abs().max()) > 1e-3


# ----------------------------------------------------------------------------- 5. sampling, eos, streaming


@pytest.fixture(scope="module")
def small():
    model = tiny_model("llama", seed=9)
    return model, random_ids(60, seed=10)


def run(small, sampling=Sampling(), **kwargs):
    model, ids = small
    return generate_ids(model, ids, SnapKV(budget=20, window=4), max_new_tokens=NEW_TOKENS, sampling=sampling, **kwargs)[0]


def test_greedy_is_deterministic(small):
    assert run(small) == run(small)
    assert run(small, Sampling(temperature=0.0, seed=1)) == run(small, Sampling(temperature=0.0, seed=2))


def test_seeded_sampling_is_reproducible_and_not_greedy(small):
    greedy = run(small)
    a = run(small, Sampling(temperature=1.5, seed=123))
    b = run(small, Sampling(temperature=1.5, seed=123))
    c = run(small, Sampling(temperature=1.5, seed=124))
    assert a == b
    assert len(a) == NEW_TOKENS
    assert a != greedy
    assert a != c


def test_tiny_top_p_is_greedy(small):
    greedy = run(small)
    assert run(small, Sampling(temperature=1.0, top_p=1e-6, seed=5)) == greedy
    assert run(small, Sampling(temperature=3.0, top_p=1e-6, seed=6)) == greedy


def test_sampling_follows_the_distribution_and_the_nucleus():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = probs.log()
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([Sampling(temperature=1.0).pick(logits, g) for _ in range(3000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)
    nucleus = Sampling(temperature=1.0, top_p=0.7)
    draws = torch.tensor([nucleus.pick(logits, g) for _ in range(1000)])
    assert set(draws.tolist()) == {0, 1}  # 0.6 < 0.7 <= 0.85: the two most likely tokens
    freq = (draws == 0).float().mean()
    assert abs(float(freq) - 0.6 / 0.85) < 0.05
    hot = torch.tensor([Sampling(temperature=100.0).pick(logits, g) for _ in range(2000)])
    assert torch.bincount(hot, minlength=4).min() > 350  # nearly uniform when very hot


def test_eos_stops_generation(small):
    greedy = run(small)
    assert run(small, eos_token_ids=[greedy[0]]) == [greedy[0]]
    # an eos that first appears later stops right after it (and the token is returned)
    later = next(i for i in range(1, len(greedy)) if greedy[i] not in greedy[:i])
    assert run(small, eos_token_ids=[greedy[later]]) == greedy[: later + 1]
    _, stats, _ = generate_ids(small[0], small[1], SnapKV(budget=20, window=4), max_new_tokens=8, eos_token_ids=[greedy[0]])
    assert stats.new_tokens == 1


def test_on_token_sees_every_token(small):
    seen: list[int] = []
    tokens = run(small, on_token=seen.append)
    assert seen == tokens


def test_streaming_callback_receives_the_text(smollm2):
    _, tokenizer = smollm2
    model = tiny_for_tokenizer(tokenizer, seed=11)
    chunks: list[str] = []
    out = generate(model, tokenizer, "Tell me about the sea.", SnapKV(budget=8, window=4), max_new_tokens=24, stream=chunks.append)
    plain = generate(model, tokenizer, "Tell me about the sea.", SnapKV(budget=8, window=4), max_new_tokens=24)
    assert out.token_ids == plain.token_ids
    assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
    assert len(chunks) >= 2
    assert "".join(chunks) == out.text


def test_streamed_text_is_complete_when_generation_stops_inside_a_character(smollm2, monkeypatch):
    """The streamer holds back a partial UTF-8 character; if generation ends there (token limit),
    what was held back must still reach the callback so that the stream equals ``Generation.text``."""
    import importlib

    _, tokenizer = smollm2
    module = importlib.import_module("lookaheadkv.engine.generate")
    ids = tokenizer("café ☃ 😀", add_special_tokens=False)["input_ids"][:-1]  # cut inside the emoji
    assert tokenizer.decode(ids).endswith("\ufffd")
    stats = module.Stats(prompt_tokens=1, kept_per_layer=[1], kv_bytes_before=0, kv_bytes_after=0, prefill_seconds=0, eviction_seconds=0)

    def scripted(model, input_ids, policy, *, on_token=None, **kwargs):
        for token in ids:
            on_token(token)
        return list(ids), stats, None

    monkeypatch.setattr(module, "generate_ids", scripted)
    chunks: list[str] = []
    out = module.generate(tiny_for_tokenizer(tokenizer), tokenizer, "hi", stream=chunks.append)
    assert out.token_ids == ids
    assert "".join(chunks) == out.text


def test_generate_wraps_the_chat_template(smollm2):
    """generate() prompts with the chat template: its first token equals a bare prefill of the templated ids."""
    _, tokenizer = smollm2
    model = tiny_for_tokenizer(tokenizer, seed=12)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello there"}], add_generation_prompt=True, tokenize=False
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    _, first = hf_prefill(model, ids)
    out = generate(model, tokenizer, "Hello there", max_new_tokens=3)
    assert out.stats.prompt_tokens == ids.shape[1]
    assert out.token_ids[0] == int(first.argmax())


# ----------------------------------------------------------------------------- 6. input validation


def test_batch_of_two_is_rejected():
    model = tiny_model("llama")
    ids = torch.cat([random_ids(20, seed=1), random_ids(20, seed=2)])
    with pytest.raises(ValueError, match="batch size must be 1, got 2"):
        generate_ids(model, ids, SnapKV(budget=8))


def test_empty_prompt_is_rejected(smollm2):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="empty"):
        generate_ids(model, torch.zeros(1, 0, dtype=torch.long), SnapKV(budget=8))
    _, tokenizer = smollm2
    for text in ("", "   \n"):
        with pytest.raises(ValueError, match="empty"):
            generate(tiny_for_tokenizer(tokenizer), tokenizer, text)


def test_prompt_longer_than_the_context_is_rejected():
    model = tiny_model("llama", max_position_embeddings=64)
    with pytest.raises(ValueError, match=r"100 tokens.*context of 64"):
        generate_ids(model, random_ids(100), SnapKV(budget=8))
    tokens, _, _ = generate_ids(model, random_ids(64), SnapKV(budget=8, window=4), max_new_tokens=1)
    assert len(tokens) == 1


def test_one_dimensional_ids_are_one_prompt():
    model = tiny_model("llama")
    ids = random_ids(30, seed=3)
    a = generate_ids(model, ids[0], SnapKV(budget=8, window=4), max_new_tokens=4)[0]
    b = generate_ids(model, ids, SnapKV(budget=8, window=4), max_new_tokens=4)[0]
    assert a == b


def test_bad_generation_settings_are_rejected():
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate_ids(tiny_model("llama"), random_ids(10), SnapKV(budget=8), max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-0.5)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)


# ----------------------------------------------------------------------------- 7. batched decoding


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_batch_equals_decoding_each_cache(arch):
    """Several evictions of one prompt decoded as one batch give each one's own greedy tokens."""
    from lookaheadkv.engine.cache import copy_cache
    from lookaheadkv.engine.decode import decode_batch

    model = tiny_model(arch, seed=3)
    ids = random_ids(120, seed=7)
    names = ["snapkv", "h2o", "tova", "streamingllm", "random"]
    caches, state = [], None
    for name in names:
        state, observer = run_prefill(model, ids, make_policy(name, budget=24))
        caches.append(compress(model, state, make_policy(name, budget=24), observer).cache)
    singles = [decode(model, copy_cache(c), state.logits, state.length, NEW_TOKENS) for c in caches]  # decode grows its cache
    assert len({tuple(s) for s in singles}) > 1  # the evictions really differ, else the test proves little
    # an EOS that one row emits early: that row must stop there and the others go on
    eos = singles[0][3]
    expected = [s[: s.index(eos) + 1] if eos in s else s for s in singles]
    before = [c.layers[0].keys.clone() for c in caches]
    assert decode_batch(model, caches, state.logits, state.length, NEW_TOKENS, eos_token_ids=[eos]) == expected
    assert all(torch.equal(b, c.layers[0].keys) for b, c in zip(before, caches))  # caches untouched


def test_decode_batch_equals_decoding_each_cache_on_smollm2(smol_reference):
    """The same on the real model the evaluation runs, with its trained modules among the methods."""
    from lookaheadkv.engine.cache import copy_cache
    from lookaheadkv.engine.decode import decode_batch

    model, tokenizer, ids, _ = smol_reference
    caches, state = [], None
    for name in ["snapkv", "tova", "streamingllm", "lookahead", "h2o"]:
        policy = make_policy(name, budget=48)
        state, observer = run_prefill(model, ids, policy)
        caches.append(compress(model, state, policy, observer).cache)
    eos = eos_ids(model, tokenizer)
    singles = [decode(model, copy_cache(c), state.logits, state.length, 24, eos_token_ids=eos) for c in caches]
    assert len({tuple(s) for s in singles}) > 1
    assert decode_batch(model, caches, state.logits, state.length, 24, eos_token_ids=eos) == singles


def test_decode_batch_pads_caches_of_different_sizes():
    """Other budgets and PyramidKV's per-layer sizes in one batch: padded, masked, same tokens."""
    from lookaheadkv.engine.cache import copy_cache, lengths
    from lookaheadkv.engine.decode import decode_batch

    model = tiny_model("qwen2", seed=2)
    ids = random_ids(140, seed=4)
    caches = []
    for policy in [SnapKV(budget=8), SnapKV(budget=40), PyramidKV(budget=48), make_policy("tova", budget=24)]:
        state, observer = run_prefill(model, ids, policy)
        caches.append(compress(model, state, policy, observer).cache)
    assert len({tuple(lengths(c)) for c in caches}) == 4 and len(set(lengths(caches[2]))) > 1  # really ragged
    singles = [decode(model, copy_cache(c), state.logits, state.length, NEW_TOKENS) for c in caches]
    eos = singles[1][5]  # one row stops early: its padding mask must leave with it
    expected = [s[: s.index(eos) + 1] if eos in s else s for s in singles]
    assert decode_batch(model, caches, state.logits, state.length, NEW_TOKENS, eos_token_ids=[eos]) == expected
    # without the mask the padded zeros would be attended to: the control must differ
    from lookaheadkv.engine import attention

    original = attention._attention

    def unmasked(module, query, key, value, *args, **kwargs):
        saved = attention._state.padding
        attention._state.padding = None
        try:
            return original(module, query, key, value, *args, **kwargs)
        finally:
            attention._state.padding = saved

    from transformers import AttentionInterface

    AttentionInterface.register(attention.ATTN_NAME, unmasked)
    try:
        assert decode_batch(model, caches, state.logits, state.length, NEW_TOKENS, eos_token_ids=[eos]) != expected
    finally:
        AttentionInterface.register(attention.ATTN_NAME, original)


@pytest.mark.parametrize("rows,keys,offset", [(5, 12, 7), (4, 9, 2), (1, 6, 5), (3, 3, 0)])
def test_attention_rows_equal_a_causal_softmax_over_repeated_keys(rows, keys, offset):
    """The explicit rows (one matmul per KV head on the CPU) against softmax(QK^T) with the GQA keys repeated and the causal mask built here."""
    from lookaheadkv.engine.attention import attention_rows

    g = torch.Generator().manual_seed(rows * 100 + keys)
    heads, kv_heads, dim = 6, 2, 8
    query, key = torch.randn(heads, rows, dim, generator=g), torch.randn(kv_heads, keys, dim, generator=g)
    logits = query @ key.repeat_interleave(heads // kv_heads, dim=0).transpose(-1, -2) * dim**-0.5
    visible = torch.arange(keys)[None, :] <= torch.arange(rows)[:, None] + offset  # row i at position offset + i
    expected = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    got = attention_rows(query, key, dim**-0.5, row_offset=offset)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # with autograd recording (training: the batched path), the same rows, and gradients reach the queries
    query.requires_grad_(True)
    with_grad = attention_rows(query, key, dim**-0.5, row_offset=offset)
    torch.testing.assert_close(with_grad.detach(), expected, rtol=1e-5, atol=1e-6)
    with_grad[..., 0].sum().backward()
    assert query.grad.abs().sum() > 0


def test_gather_keeps_each_heads_own_entries_in_order():
    from lookaheadkv.engine.cache import from_tensors, gather, layer_kv

    keys = torch.arange(3 * 7 * 4, dtype=torch.float32).view(1, 3, 7, 4)
    values = -keys
    kept = torch.tensor([[0, 2, 6], [1, 3, 4], [5, 6, 6]])
    out_k, out_v = layer_kv(gather(from_tensors([(keys, values)]), [kept]), 0)
    for h in range(3):
        assert torch.equal(out_k[0, h], keys[0, h, kept[h]]) and torch.equal(out_v[0, h], values[0, h, kept[h]])
    assert out_k.shape == (1, 3, 3, 4) and out_k.is_contiguous() and out_k.data_ptr() != keys.data_ptr()


def test_reserved_layer_grows_like_a_dynamic_layer():
    """ReservedLayer (decode_batch's cache) holds what DynamicLayer's concatenation holds, past its room too."""
    from transformers.cache_utils import DynamicLayer

    from lookaheadkv.engine.cache import ReservedLayer

    g = torch.Generator().manual_seed(0)
    k, v = torch.randn(3, 2, 5, 4, generator=g), torch.randn(3, 2, 5, 4, generator=g)
    reserved, plain = ReservedLayer(k, v, room=2), DynamicLayer()
    plain.update(k, v)
    for step in range(4):  # the third and fourth entries overflow the room
        nk, nv = torch.randn(3, 2, 1, 4, generator=g), torch.randn(3, 2, 1, 4, generator=g)
        a, b = reserved.update(nk, nv), plain.update(nk, nv)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    keep = torch.tensor([2, 0])
    reserved.select_rows(keep)
    assert torch.equal(reserved.keys, plain.keys.index_select(0, keep)) and reserved.get_seq_length() == 9
