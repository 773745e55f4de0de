"""LookaheadKV inference: the modules never touch the prompt, their scores, and their files.

* Bit-identity: scoring with the modules leaves the prompt's K, V and first-token logits exactly
  as a plain prefill makes them, and removes its LoRA hooks; the LoRA does change the lookahead
  tokens' own computation (so the identity is not vacuous).
* Fused (the lookahead tokens inside the prompt's prefill, the inference default): the same
  prompt cache and logits as a plain prefill, the same scores as the separate pass and as the
  eager reference, adapters on the tail only, hooks removed even after an error.
* Scores: equal to a reference built from ONE eager forward over [prompt ; lookahead embeddings]
  with a LoRA that the test applies only at the lookahead positions.
* save_pretrained / from_pretrained round trip and every way loading can go wrong.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from helpers import (  # noqa: F401  (single_thread is an autouse fixture)
    ARCHS,
    attention_probs,
    hf_prefill,
    kv,
    masked_lora,
    random_ids,
    randomize_lora_b,
    single_thread,
)
from lookaheadkv.engine.generate import generate_ids, run_prefill
from lookaheadkv.engine.prefill import Tail, extend, prefill
from lookaheadkv.lookahead import LookaheadModules, ModulesError
from lookaheadkv.models import tiny_model
from lookaheadkv.policies import LookaheadKV

N = 8


def make_modules(model, *, seed: int = 0, n: int = N, **settings) -> LookaheadModules:
    modules = LookaheadModules.for_model(model, seed=seed, n_lookahead=n, **settings)
    randomize_lora_b(modules, seed=seed)
    return modules


def snapshot(state) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    return [tuple(t.clone() for t in kv(state.cache, i)) for i in range(len(state.cache.layers))], state.logits.clone()


def assert_bit_identical(a, b) -> None:
    (kv_a, logits_a), (kv_b, logits_b) = a, b
    assert len(kv_a) == len(kv_b)
    for layer, ((ka, va), (kb, vb)) in enumerate(zip(kv_a, kv_b)):
        assert ka.shape == kb.shape, f"layer {layer}: {tuple(ka.shape)} != {tuple(kb.shape)}"
        assert torch.equal(ka, kb), f"layer {layer}: keys differ"
        assert torch.equal(va, vb), f"layer {layer}: values differ"
    assert torch.equal(logits_a, logits_b), "first-token logits differ"


def linear_hook_count(model) -> int:
    return sum(len(m._forward_hooks) for m in model.modules() if isinstance(m, torch.nn.Linear))


def check_prompt_untouched(model, ids, modules, *, full_pipeline: bool = True) -> None:
    plain = snapshot(prefill(model, ids))
    hooks = linear_hook_count(model)
    policy = LookaheadKV(budget=16, modules=modules)
    state = prefill(model, ids, [policy.observer()])
    scores = policy.scores(model, state, None)
    assert len(scores) == model.config.num_hidden_layers
    assert scores[0].shape == (model.config.num_key_value_heads, ids.shape[1])
    # the prompt's cache after scoring (the lookahead tokens ran over it and were cropped off)
    assert_bit_identical(snapshot(state), plain)
    # the model is left as it was: no LoRA hook stays behind, a new prefill is the same
    assert linear_hook_count(model) == hooks
    assert_bit_identical(snapshot(prefill(model, ids)), plain)
    if full_pipeline:  # ... and the whole pipeline's first token is the base model's greedy token
        tokens, _, _ = generate_ids(model, ids, LookaheadKV(budget=16, modules=modules), max_new_tokens=1)
        assert tokens == [int(plain[1].argmax())]
    # The identity is not vacuous: running the PROMPT under the adapters would change its K and logits.
    with modules.applied(model):
        adapted = snapshot(prefill(model, ids))
    assert not torch.equal(adapted[0][0][0], plain[0][0][0])
    assert not torch.equal(adapted[1], plain[1])


@pytest.mark.parametrize("arch", ARCHS)
def test_scoring_leaves_the_prompt_bit_identical(arch):
    model = tiny_model(arch, seed=1)
    ids = random_ids(90, seed=2)
    check_prompt_untouched(model, ids, make_modules(model, seed=3))
    # the engine's prefill is the model's own forward: same K, V as plain Hugging Face
    cache, logits = hf_prefill(model, ids)
    state = prefill(model, ids)
    for layer in range(4):
        torch.testing.assert_close(kv(state.cache, layer)[0], kv(cache, layer)[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(kv(state.cache, layer)[1], kv(cache, layer)[1], atol=1e-6, rtol=0)
    torch.testing.assert_close(state.logits, logits, atol=1e-5, rtol=0)


def test_smollm2_scoring_leaves_the_prompt_bit_identical(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt")["input_ids"]
    assert 60 < ids.shape[1] < 200
    modules = make_modules(model, seed=4, n=32)
    check_prompt_untouched(model, ids, modules, full_pipeline=False)


def assert_same_prompt(a, b, atol: float = 1e-6) -> None:
    """Prompt caches and first-token logits equal up to float rounding (a fused prefill's matmuls hold more rows)."""
    assert len(a.cache.layers) == len(b.cache.layers)
    for layer in range(len(a.cache.layers)):
        for x, y in zip(kv(a.cache, layer), kv(b.cache, layer)):
            assert x.shape == y.shape
            torch.testing.assert_close(x, y, atol=atol, rtol=0, msg=lambda m: f"layer {layer}: {m}")
    torch.testing.assert_close(a.logits, b.logits, atol=10 * atol, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_prefill_gives_the_plain_prompt_and_the_separate_scores(arch):
    model = tiny_model(arch, seed=1)
    ids = random_ids(90, seed=2)
    modules = make_modules(model, seed=3)
    plain = prefill(model, ids)
    fused = prefill(model, ids, tail=modules.tail(model))
    assert linear_hook_count(model) == 0
    assert_same_prompt(fused, plain)  # the tail's own entries are cropped off, the logits are the prompt's last
    separate = modules.attention_mass(model, plain.cache, 90)
    assert len(fused.tail_mass) == len(separate) == 4
    for a, b in zip(fused.tail_mass, separate):
        assert a.shape == (4, 90)
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    # the adapters act on the tail: the same tokens without them (B = 0) give other scores
    bare = prefill(model, ids, tail=LookaheadModules.for_model(model, seed=3, n_lookahead=N).tail(model))
    assert max(float((a - b).abs().max()) for a, b in zip(bare.tail_mass, fused.tail_mass)) > 1e-4
    assert_same_prompt(bare, plain)
    # the policy: fused by default, and the same selection as the separate pass
    policy, separate_policy = LookaheadKV(budget=20, modules=modules), LookaheadKV(budget=20, modules=modules, fused=False)
    assert policy.tail(model) is not None and separate_policy.tail(model) is None
    state, _ = run_prefill(model, ids, policy)
    assert state.tail_mass is not None
    for a, b in zip(policy.scores(model, state, None), separate_policy.scores(model, plain, None)):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    fused_tokens, _, fused_kept = generate_ids(model, ids, policy, max_new_tokens=5)
    separate_tokens, _, separate_kept = generate_ids(model, ids, separate_policy, max_new_tokens=5)
    assert fused_tokens == separate_tokens
    assert all(torch.equal(a, b) for a, b in zip(fused_kept, separate_kept))


def test_smollm2_fused_prefill_gives_the_plain_prompt(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 8, return_tensors="pt")["input_ids"]
    modules = make_modules(model, seed=4, n=32)
    plain = prefill(model, ids)
    fused = prefill(model, ids, tail=modules.tail(model))
    assert_same_prompt(fused, plain, atol=1e-5)
    for a, b in zip(fused.tail_mass, modules.attention_mass(model, plain.cache, ids.shape[1])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_fused_prefill_cleans_up_after_an_error():
    model = tiny_model("llama", seed=1)
    ids = random_ids(30, seed=3)
    modules = make_modules(model, seed=4)

    class Broken:
        def take_probs(self, probs, q, k):
            raise RuntimeError("boom")

    impl = model.config._attn_implementation
    with pytest.raises(RuntimeError, match="boom"):
        prefill(model, ids, tail=Tail(modules.tokens[None].detach(), Broken(), lambda: modules.applied(model, last=N)))
    assert linear_hook_count(model) == 0 and model.config._attn_implementation == impl
    assert_same_prompt(prefill(model, ids), prefill(model, ids))  # the engine works as before
    with pytest.raises(RuntimeError, match="inference"):  # adapters on the last rows only: no training through them
        with modules.applied(model, last=N):
            model(inputs_embeds=torch.cat([model.get_input_embeddings()(ids), modules.tokens[None]], dim=1))


def test_applied_hooks_are_removed_even_after_an_error():
    model = tiny_model("qwen3", seed=1)
    ids = random_ids(40, seed=5)
    modules = make_modules(model, seed=6)
    with torch.no_grad():
        before = model(ids).logits
    assert linear_hook_count(model) == 0
    with modules.applied(model):
        assert linear_hook_count(model) == 4 * 7
        with torch.no_grad():
            inside = model(ids).logits
    with pytest.raises(RuntimeError, match="boom"):
        with modules.applied(model):
            raise RuntimeError("boom")
    assert linear_hook_count(model) == 0
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(after, before)
    assert not torch.allclose(inside, before, atol=1e-4)


def test_adapter_weights_updated_in_place_reach_the_next_prefill():
    model = tiny_model("llama", seed=1)
    ids = random_ids(60, seed=40)
    modules = make_modules(model, seed=41)
    before = prefill(model, ids, tail=modules.tail(model)).tail_mass
    again = prefill(model, ids, tail=modules.tail(model)).tail_mass
    assert all(torch.equal(a, b) for a, b in zip(before, again))
    # an in-place update (as an optimizer step or load_state_dict makes) must reach the next prefill
    randomize_lora_b(modules, seed=42)
    with torch.no_grad():
        modules.lora_A["1_up_proj"].mul_(2.0)
    after = prefill(model, ids, tail=modules.tail(model)).tail_mass
    fresh = LookaheadModules(modules.config)
    fresh.load_state_dict(modules.state_dict())
    reference = prefill(model, ids, tail=fresh.tail(model)).tail_mass
    assert all(torch.equal(a, b) for a, b in zip(after, reference))
    assert max(float((a - b).abs().max()) for a, b in zip(after, before)) > 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_changes_the_lookahead_tokens_only_when_b_is_nonzero(arch):
    model = tiny_model(arch, seed=1)
    ids = random_ids(50, seed=7)
    state = prefill(model, ids)
    fresh = LookaheadModules.for_model(model, seed=8, n_lookahead=N)  # B = 0: the adapters are a no-op
    embeds = fresh.tokens[None]
    base = extend(model, state.cache, 50, inputs_embeds=embeds, logits=True)
    with fresh.applied(model):
        zero_b = extend(model, state.cache, 50, inputs_embeds=embeds, logits=True)
    assert torch.equal(zero_b, base)
    randomize_lora_b(fresh, seed=8)
    with fresh.applied(model):
        adapted = extend(model, state.cache, 50, inputs_embeds=embeds, logits=True)
    assert adapted.shape == (1, N, 256)
    assert float((adapted - base).abs().max().detach()) > 1e-3
    # extend() cropped the lookahead entries off again every time
    assert kv(state.cache, 0)[0].shape[2] == 50


def test_policy_scoring_builds_no_graph_but_attention_mass_is_differentiable():
    model = tiny_model("llama", seed=1)
    ids = random_ids(40, seed=30)
    modules = make_modules(model, seed=31)
    state = prefill(model, ids)
    scores = LookaheadKV(budget=8, modules=modules).scores(model, state, None)
    assert not any(s.requires_grad for s in scores), "inference scoring must not keep an autograd graph"
    # training differentiates attention_mass itself: gradients reach the tokens and the adapters
    mass = modules.attention_mass(model, state.cache, 40)
    sum(m[:, :5].sum() for m in mass).backward()
    assert float(modules.tokens.grad.abs().max()) > 0
    assert float(modules.lora_B["0_q_proj"].grad.abs().max()) > 0
    assert float(modules.lora_A["2_down_proj"].grad.abs().max()) > 0
    assert kv(state.cache, 0)[0].shape[2] == 40


def test_lookahead_tokens_start_in_the_embedding_distribution():
    model = tiny_model("llama", seed=1)
    modules = LookaheadModules.for_model(model, seed=0, n_lookahead=64)
    embed = model.get_input_embeddings().weight
    assert modules.tokens.shape == (64, 64)
    assert not torch.allclose(modules.tokens[0], modules.tokens[1])
    ratio = modules.tokens.detach().std() / embed.std()
    assert 0.7 < float(ratio) < 1.3
    assert all(float(b.detach().abs().max()) == 0 for b in modules.lora_B.values())
    assert all(float(a.detach().abs().max()) > 0 for a in modules.lora_A.values())
    other = LookaheadModules.for_model(model, seed=1, n_lookahead=64)
    assert not torch.equal(other.tokens, modules.tokens)
    again = LookaheadModules.for_model(model, seed=0, n_lookahead=64)
    assert torch.equal(again.tokens, modules.tokens)


# ----------------------------------------------------------------------------- 8. scores vs eager reference


@pytest.mark.parametrize("arch", ARCHS)
def test_lookahead_scores_match_an_eager_reference(arch):
    model = tiny_model(arch, seed=2)
    length = 70
    ids = random_ids(length, seed=9)
    modules = make_modules(model, seed=10)

    # Reference: one eager forward over [prompt ; lookahead embeddings], LoRA only at positions >= L.
    embeds = torch.cat([model.get_input_embeddings()(ids), modules.tokens[None]], dim=1)
    with masked_lora(model, modules, start=length):
        probs = attention_probs(model, inputs_embeds=embeds)  # per layer (H, L + n, L + n)
    reference = [p[:, length:, :length].mean(dim=1) for p in probs]  # (H, L): mean over the n rows
    plain_probs = attention_probs(model, inputs_embeds=embeds)  # the same without any LoRA

    state = prefill(model, ids)
    mass = modules.attention_mass(model, state.cache, length)
    assert len(mass) == 4
    for layer, (m, ref, plain) in enumerate(zip(mass, reference, plain_probs)):
        assert m.shape == (4, length)
        torch.testing.assert_close(m / N, ref, atol=1e-5, rtol=0, msg=lambda s: f"layer {layer}: {s}")
        # the adapters matter for the scores (so the comparison can fail)
        assert float((plain[:, length:, :length].mean(dim=1) - ref).abs().max()) > 1e-4
    # the cache is left as it was
    assert kv(state.cache, 0)[0].shape[2] == length

    # The policy's scores: GQA mean of the per-head reference (no pooling, no window by default).
    scores = LookaheadKV(budget=10, modules=modules).scores(model, state, None)
    for layer, ref in enumerate(reference):
        grouped = ref.view(2, 2, length).mean(dim=1)
        torch.testing.assert_close(scores[layer], grouped, atol=1e-5, rtol=0)

    # The fused path (lookahead tokens inside the prompt's prefill) against the same reference.
    fused = prefill(model, ids, tail=modules.tail(model))
    for layer, ref in enumerate(reference):
        torch.testing.assert_close(fused.tail_mass[layer] / N, ref, atol=1e-5, rtol=0)

    # Hybrid with the last prompt window (SnapKV-style): (lookahead rows + last 8 prompt rows) / (n + 8),
    # the lookahead rows in a separate pass and inside the prefill.
    window = 8
    for fused_pass in (False, True):
        policy = LookaheadKV(budget=10, modules=modules, window=window, fused=fused_pass)
        hybrid_state, observer = run_prefill(model, ids, policy)
        assert (hybrid_state.tail_mass is not None) == fused_pass
        hybrid = policy.scores(model, hybrid_state, observer)
        for layer, p in enumerate(probs):
            votes = p[:, length:, :length].sum(dim=1) + p[:, length - window : length, :length].sum(dim=1)
            expected = (votes / (N + window)).view(2, 2, length).mean(dim=1)
            torch.testing.assert_close(hybrid[layer], expected, atol=1e-5, rtol=0)


def test_lookahead_max_pooling_option():
    model = tiny_model("mistral", seed=2)
    ids = random_ids(60, seed=11)
    modules = make_modules(model, seed=12)
    state = prefill(model, ids)
    flat = LookaheadKV(budget=10, modules=modules).scores(model, state, None)
    pooled = LookaheadKV(budget=10, modules=modules, kernel=7).scores(model, state, None)
    for f, p in zip(flat, pooled):
        expected = torch.stack([f[:, max(0, j - 3) : j + 4].amax(dim=-1) for j in range(60)], dim=-1)
        torch.testing.assert_close(p, expected, atol=0, rtol=0)


def test_lookahead_selection_is_top_budget_of_the_scores():
    model = tiny_model("qwen2", seed=3)
    ids = random_ids(80, seed=13)
    modules = make_modules(model, seed=14)
    policy = LookaheadKV(budget=12, modules=modules)
    state = prefill(model, ids)
    scores = policy.scores(model, state, None)
    _, stats, kept = generate_ids(model, ids, LookaheadKV(budget=12, modules=modules), max_new_tokens=1)
    assert stats.kept_per_layer == [12] * 4
    for s, k in zip(scores, kept):
        for head in range(2):
            chosen = s[head, k[head]]
            rest = torch.ones(80, dtype=torch.bool)
            rest[k[head]] = False
            assert float(chosen.min()) >= float(s[head, rest].max())


# ----------------------------------------------------------------------------- 9. save / load


def test_save_load_round_trip(tmp_path):
    model = tiny_model("llama", seed=4)
    modules = make_modules(model, seed=15)
    folder = modules.save_pretrained(tmp_path / "mods")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert len(config["weights_sha256"]) == 64
    assert config["n_lookahead"] == N and config["rank"] == 8 and config["alpha"] == 32
    assert config["base_shape"]["hidden_size"] == 64 and config["base_shape"]["num_hidden_layers"] == 4

    loaded = LookaheadModules.from_pretrained(folder)
    assert asdict(loaded.config) == asdict(modules.config)
    mine, theirs = modules.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert len(mine) == 1 + 2 * 4 * 7
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key

    ids = random_ids(60, seed=16)
    state = prefill(model, ids)
    a = LookaheadKV(budget=10, modules=modules).scores(model, state, None)
    b = LookaheadKV(budget=10, modules=str(folder)).scores(model, state, None)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_subset_of_layers_and_targets_round_trips(tmp_path):
    model = tiny_model("qwen3", seed=4)
    modules = make_modules(model, seed=17, target_modules=["q_proj", "v_proj"], layers=[1, 3], rank=4)
    assert sorted(modules.lora_A.keys()) == ["1_q_proj", "1_v_proj", "3_q_proj", "3_v_proj"]
    loaded = LookaheadModules.from_pretrained(modules.save_pretrained(tmp_path / "m"))
    ids = random_ids(40, seed=18)
    state = prefill(model, ids)
    a = modules.attention_mass(model, state.cache, 40)
    b = loaded.attention_mass(model, state.cache, 40)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize(
    "overrides,field,mine,theirs",
    [
        (dict(hidden_size=96), "hidden_size", 64, 96),
        (dict(num_hidden_layers=2), "num_hidden_layers", 4, 2),
        (dict(num_key_value_heads=4), "num_key_value_heads", 2, 4),
    ],
)
def test_modules_for_another_model_are_refused(tmp_path, overrides, field, mine, theirs):
    model = tiny_model("llama", seed=4)
    folder = make_modules(model, seed=19).save_pretrained(tmp_path / "m")
    other = tiny_model("llama", seed=4, **overrides)
    loaded = LookaheadModules.from_pretrained(folder)
    with pytest.raises(ModulesError) as err:
        loaded.check_fits(other)
    message = str(err.value)
    assert f"{field}={mine}" in message and f"{field}={theirs}" in message
    # through the policy, as a user meets it
    ids = random_ids(30, seed=20)
    with pytest.raises(ModulesError, match=f"{field}={mine}.*{field}={theirs}"):
        generate_ids(other, ids, LookaheadKV(budget=8, modules=str(folder)), max_new_tokens=1)


def test_mismatched_linear_shapes_are_refused():
    model = tiny_model("llama", seed=4)
    modules = make_modules(model, seed=21)
    other = tiny_model("llama", seed=4, intermediate_size=96)
    with pytest.raises(ModulesError, match=r"0\.gate_proj.*64x128.*64x96"):
        modules.check_fits(other)


def corrupt(path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif how == "truncate_header":
        path.write_bytes(bytes(data[:5]))
    else:  # flip one byte in the middle of the tensor data
        data[len(data) - 100] ^= 0xFF
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "flip", "truncate_header"])
def test_corrupted_weights_are_refused(tmp_path, how):
    model = tiny_model("llama", seed=4)
    folder = make_modules(model, seed=22).save_pretrained(tmp_path / "m")
    corrupt(folder / "model.safetensors", how)
    with pytest.raises(ModulesError, match="model.safetensors is (corrupted|truncated)") as err:
        LookaheadModules.from_pretrained(folder)
    assert "re-download or re-train" in str(err.value)


@pytest.mark.parametrize("how", ["truncate", "truncate_header"])
def test_truncated_weights_without_a_checksum_are_refused(tmp_path, how):
    model = tiny_model("llama", seed=4)
    folder = make_modules(model, seed=23).save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["weights_sha256"] = ""
    (folder / "config.json").write_text(json.dumps(config))
    corrupt(folder / "model.safetensors", how)
    with pytest.raises(ModulesError, match="truncated or corrupted"):
        LookaheadModules.from_pretrained(folder)


def test_missing_and_broken_folders_are_refused(tmp_path):
    with pytest.raises(ModulesError, match="no lookahead modules at"):
        LookaheadModules.from_pretrained(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModulesError, match="has no config.json"):
        LookaheadModules.from_pretrained(empty)
    model = tiny_model("llama", seed=4)
    folder = make_modules(model, seed=24).save_pretrained(tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModulesError, match="has no model.safetensors"):
        LookaheadModules.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModulesError, match="not valid JSON"):
        LookaheadModules.from_pretrained(folder)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(ModulesError, match="is a file"):
        LookaheadModules.from_pretrained(a_file)


def test_weights_that_do_not_match_their_config_are_refused(tmp_path):
    model = tiny_model("llama", seed=4)
    folder = make_modules(model, seed=25).save_pretrained(tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["rank"] = 4
    config["weights_sha256"] = ""
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModulesError, match="does not match its config.json"):
        LookaheadModules.from_pretrained(folder)


def test_lookahead_without_modules_says_how_to_get_them():
    model = tiny_model("llama", seed=4)
    with pytest.raises(ModulesError, match="needs trained modules"):
        generate_ids(model, random_ids(20), LookaheadKV(budget=8), max_new_tokens=1)


def test_a_policy_keeps_its_modules_setting_and_loads_a_folder_once(tmp_path, monkeypatch):
    """``modules`` stays what the user gave (a folder), so records and reprs name it; the
    folder is read once (copies at other budgets included), and a new folder assigned later is the one used."""
    model = tiny_model("llama", seed=4)
    first = make_modules(model, seed=31).save_pretrained(tmp_path / "a")
    second = make_modules(model, seed=32).save_pretrained(tmp_path / "b")
    ids = random_ids(50, seed=33)
    state = prefill(model, ids)
    policy = LookaheadKV(budget=10, modules=str(first))
    loads = []
    real = LookaheadModules.from_pretrained
    monkeypatch.setattr(LookaheadModules, "from_pretrained", classmethod(lambda cls, *a, **k: (loads.append(a[0]), real(*a, **k))[1]))
    a1 = policy.scores(model, state, None)
    a2 = policy.scores(model, state, None)
    assert policy.modules == str(first) and loads == [str(first)]
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    policy.with_budget(20).scores(model, state, None)  # a copy at another budget (as an evaluation makes) shares them
    assert loads == [str(first)]
    policy.modules = str(second)
    b = policy.scores(model, state, None)
    reference = LookaheadKV(budget=10, modules=real(second)).scores(model, state, None)
    assert all(torch.equal(x, y) for x, y in zip(b, reference))
    assert not all(torch.equal(x, y) for x, y in zip(a1, b)), "two module sets should score differently"
