"""Issue 20: eviction inside Hugging Face's model.generate, batched generation, the selection API, the pipeline.

* ``model.generate`` inside ``evicting(model, policy)`` gives our ``generate_ids`` tokens (greedy), for
  every registered policy, on the four tiny architectures and on SmolLM2; at a full budget the tokens
  of a plain ``model.generate``; after the block the model is as before (a plain generate equals one
  of a twin never wrapped; no attribute, hook or setting left behind).
* 4 prompts of different lengths at once (``generate_batch_ids`` / ``generate_batch``, and a
  left-padded batch inside ``evicting``) equal the 4 single runs token for token, kept indices equal.
* Bad batches (mixed-up shapes, a mask with holes, right padding) end in one line naming the fix.
"""

from __future__ import annotations

import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from helpers import ARCHS, random_ids, randomize_lora_b, single_thread, tiny_for_tokenizer  # noqa: F401
from lookaheadkv import evicting, generate_batch, generate_batch_ids, pipeline, select_kv
from lookaheadkv.engine.generate import eos_ids, generate, generate_ids
from lookaheadkv.engine.prefill import prefill
from lookaheadkv.lookahead import LookaheadModules
from lookaheadkv.models import tiny_model
from lookaheadkv.policies import REGISTRY, LookaheadKV, Oracle, SnapKV, make_policy

NEW = 12
EOS = 2  # the tiny models' eos id
LENGTHS = (61, 97, 40, 128)  # 4 prompts of different lengths


def build(name: str, model, budget):
    kwargs = {}
    if name == "lookahead":
        modules = LookaheadModules.for_model(model, seed=1, n_lookahead=8)
        randomize_lora_b(modules, seed=1)
        kwargs["modules"] = modules
    if name == "oracle":
        kwargs["max_new_tokens"] = NEW
    return make_policy(name, budget=budget, **kwargs)


def hf_generate(model, ids, mask=None, **kwargs):
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=kwargs.pop("max_new_tokens", NEW), do_sample=False, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1] :]


def until_eos(tokens: list[int], eos) -> list[int]:
    """A row of generate's output cut after its first EOS (generate pads the rows that finished)."""
    eos = {eos} if isinstance(eos, int) else set(eos)
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(p.shape[-1] for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.shape[-1] :], mask[i, width - p.shape[-1] :] = p[0], 1
    return ids, mask


def model_state(model) -> dict:
    """Everything a wrapper could leave behind: instance attributes, hooks, the attention setting."""
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    return {"dict": set(model.__dict__), "hooks": hooks, "attn": model.config._attn_implementation, "forward": type(model).forward is model.forward.__func__}


@pytest.fixture(scope="module")
def tiny_cases():
    """arch -> (model, prompt ids, plain HF greedy tokens)."""
    out = {}
    for i, arch in enumerate(ARCHS):
        model = tiny_model(arch, seed=10 + i)
        ids = random_ids(90 + 13 * i, seed=200 + i)
        out[arch] = (model, ids, hf_generate(model, ids)[0].tolist())
    return out


# ----------------------------------------------------------------------------- model.generate inside evicting()


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("arch", ARCHS)
def test_generate_inside_evicting_equals_generate_ids(tiny_cases, arch, name):
    model, ids, plain = tiny_cases[arch]
    before = model_state(model)
    for budget in (24, 4096):  # evicting, and a full budget
        policy = build(name, model, budget)
        expected, _, kept = generate_ids(model, ids, policy, max_new_tokens=NEW, eos_token_ids=[EOS])
        with evicting(model, policy) as ev:
            got = until_eos(hf_generate(model, ids)[0].tolist(), EOS)
        assert got == expected, (name, budget)
        if kept is not None:
            assert all(torch.equal(a, b) for a, b in zip(ev.kept[0], kept))
        if budget == 4096:  # nothing evicted: the tokens of a plain generate
            assert got == until_eos(plain, EOS)
        elif name != "full":
            assert ev.stats[0].kept_per_layer != [ids.shape[1]] * model.config.num_hidden_layers
    assert model_state(model) == before


@pytest.mark.parametrize("arch", ARCHS)
def test_model_after_the_block_equals_one_never_wrapped(arch):
    model, twin = tiny_model(arch, seed=3), tiny_model(arch, seed=3)
    ids = random_ids(70, seed=9)
    before = model_state(model)
    with evicting(model, SnapKV(budget=8)):
        hf_generate(model, ids)
    with pytest.raises(RuntimeError, match="boom"), evicting(model, SnapKV(budget=8)):  # also when the block fails
        raise RuntimeError("boom")
    assert model_state(model) == before
    assert torch.equal(hf_generate(model, ids), hf_generate(twin, ids))


def test_sampling_streaming_stopping_and_max_new_tokens_work_unchanged():
    model = tiny_model("llama", seed=4)
    ids = random_ids(80, seed=5)
    policy = SnapKV(budget=16)

    class Collect(BaseStreamer):
        def __init__(self):
            self.seen = []

        def put(self, value):
            self.seen.append(value.reshape(-1).tolist())

        def end(self):
            self.seen.append("end")

    class StopAt(StoppingCriteria):
        def __init__(self, token):
            self.token = token

        def __call__(self, input_ids, scores, **kwargs):
            return input_ids[:, -1] == self.token

    with evicting(model, policy):
        greedy = hf_generate(model, ids, max_new_tokens=10)[0].tolist()
        streamer = Collect()
        streamed = hf_generate(model, ids, max_new_tokens=10, streamer=streamer)[0].tolist()
        stopped = hf_generate(model, ids, max_new_tokens=10, stopping_criteria=StoppingCriteriaList([StopAt(greedy[3])]))[0].tolist()
        samples = []
        for _ in range(2):
            torch.manual_seed(0)
            samples.append(model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=10, do_sample=True, top_k=0, temperature=1.5, pad_token_id=0)[0, ids.shape[1] :].tolist())
    assert len(greedy) == 10 and streamed == greedy
    assert streamer.seen[0] == ids[0].tolist() and [s[0] for s in streamer.seen[1:-1]] == greedy and streamer.seen[-1] == "end"
    assert stopped == greedy[: greedy.index(greedy[3]) + 1]
    assert samples[0] == samples[1] and len(samples[0]) == 10 and samples[0] != greedy  # seeded sampling, not greedy


def test_the_cache_reports_generates_length_and_keeps_true_positions():
    model = tiny_model("qwen2", seed=1)
    ids = random_ids(50, seed=2)
    with evicting(model, SnapKV(budget=8)):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, return_dict_in_generate=True, pad_token_id=0)
    cache = out.cache
    assert cache.layers[0].keys.shape[-2] == 8 + 4  # kept entries + the 4 tokens fed back
    assert cache.get_seq_length() == 50 + 4 and cache.positions.tolist() == [50 + 4]


@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_inside_evicting_equals_each_prompt_alone(arch):
    model = tiny_model(arch, seed=20)
    prompts = [random_ids(n, seed=30 + n) for n in LENGTHS]
    ids, mask = left_padded(prompts)
    for name in ("snapkv", "lookahead", "pyramidkv"):
        policy = build(name, model, 16)
        with evicting(model, policy) as ev:
            batch = hf_generate(model, ids, mask)
        for i, p in enumerate(prompts):
            alone, _, kept = generate_ids(model, p, policy, max_new_tokens=NEW, eos_token_ids=[EOS])
            assert until_eos(batch[i].tolist(), EOS) == alone, (name, i)
            assert all(torch.equal(a, b) for a, b in zip(ev.kept[i], kept))
            assert all(k.shape[-1] == min(16, p.shape[1]) for k in ev.kept[i]) or name == "pyramidkv"


def test_evicting_refuses_what_it_cannot_do_in_one_line():
    model = tiny_model("llama", seed=1)
    ids = random_ids(30, seed=1)
    with evicting(model, SnapKV(budget=8)):
        with pytest.raises(ValueError, match="use_cache=False"):
            model.generate(ids, max_new_tokens=3, use_cache=False)
        with pytest.raises(ValueError, match="needs input_ids"):
            model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=3)
        holes = torch.ones(2, 30, dtype=torch.long)
        holes[1, 10] = 0
        with pytest.raises(ValueError, match=r"row 1 has holes.*padding_side = 'left'"):
            model.generate(torch.cat([ids, ids]), attention_mask=holes, max_new_tokens=3, pad_token_id=0)
        with pytest.raises(RuntimeError, match="do not nest"), evicting(model, SnapKV(budget=8)):
            pass
    with pytest.raises(TypeError, match="Policy instance"), evicting(model, "snapkv"):
        pass


# ----------------------------------------------------------------------------- batched generation (our API)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_batch_of_four_prompts_equals_four_single_runs(name):
    model = tiny_model("llama", seed=21)
    prompts = [random_ids(n, seed=40 + n) for n in LENGTHS]
    ids, mask = left_padded(prompts)
    policy = build(name, model, 20)
    batch = generate_batch_ids(model, ids, policy, attention_mask=mask, max_new_tokens=NEW, eos_token_ids=[EOS])
    listed = generate_batch_ids(model, [p[0] for p in prompts], policy, max_new_tokens=NEW, eos_token_ids=[EOS])
    for p, (tokens, stats, kept), (tokens2, _, _) in zip(prompts, batch, listed):
        alone, alone_stats, alone_kept = generate_ids(model, p, policy, max_new_tokens=NEW, eos_token_ids=[EOS])
        assert tokens == alone == tokens2
        assert stats.prompt_tokens == p.shape[1] and stats.kept_per_layer == alone_stats.kept_per_layer  # no padding kept
        assert (kept is None) == (alone_kept is None)
        if kept is not None:
            assert all(torch.equal(a, b) for a, b in zip(kept, alone_kept))
            assert all(int(k.max()) < p.shape[1] for k in kept)


@pytest.mark.parametrize("arch", ARCHS)
def test_batch_with_sampling_draws_what_each_row_draws_alone(arch):
    from lookaheadkv.engine.decode import Sampling

    model = tiny_model(arch, seed=22)
    prompts = [random_ids(n, seed=50 + n) for n in LENGTHS]
    sampling = Sampling(temperature=1.3, top_p=0.9, seed=7)
    batch = generate_batch_ids(model, [p[0] for p in prompts], SnapKV(budget=16), max_new_tokens=NEW, sampling=sampling)
    for p, (tokens, _, _) in zip(prompts, batch):
        assert tokens == generate_ids(model, p, SnapKV(budget=16), max_new_tokens=NEW, sampling=sampling)[0]


def test_bad_batches_get_one_line_naming_the_fix():
    model = tiny_model("llama", seed=1)
    ids = torch.cat([random_ids(20, seed=1), random_ids(20, seed=2)])
    cases = [
        (dict(input_ids=ids, attention_mask=torch.ones(2, 19, dtype=torch.long)), r"attention_mask has shape \(2, 19\) but input_ids \(2, 20\)"),
        (dict(input_ids=ids, attention_mask=torch.tensor([[1] * 20, [1] * 5 + [0] + [1] * 14])), r"row 1 has holes.*padding_side = 'left'"),
        (dict(input_ids=ids, attention_mask=torch.tensor([[1] * 20, [1] * 15 + [0] * 5])), r"row 1 ends in padding \(right padding\).*padding_side = 'left'"),
        (dict(input_ids=ids, attention_mask=torch.tensor([[1] * 20, [0] * 20])), "row 1 of the batch is all padding: drop it"),
        (dict(input_ids=ids, attention_mask=torch.full((2, 20), 2)), "only 0 .padding. and 1"),
        (dict(input_ids=ids[None]), r"shape \(batch, L\), got \(1, 2, 20\)"),
        (dict(input_ids=[ids[0], ids]), r"prompt 1 of the list has shape \(2, 20\)"),
        (dict(input_ids=[]), "the batch is empty"),
        (dict(input_ids=[ids[0]], attention_mask=torch.ones(1, 20)), "attention_mask is only for a padded"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            generate_batch_ids(model, policy=SnapKV(budget=8), max_new_tokens=2, **kwargs)
        assert "\n" not in str(err.value)


# ----------------------------------------------------------------------------- the selection API


def test_select_kv_returns_the_kept_positions_and_their_keys_and_values():
    model = tiny_model("qwen3", seed=5)
    ids = random_ids(64, seed=6)
    full = prefill(model, ids)
    sel = select_kv(model, ids, SnapKV(budget=10))
    assert sel.length == 64 and torch.allclose(sel.logits, full.logits, atol=1e-5)
    for layer, (pos, keys, values) in enumerate(zip(sel.positions(), sel.keys, sel.values)):
        assert pos.shape == (model.config.num_key_value_heads, 10) and bool((pos.diff(dim=-1) > 0).all())
        for h in range(pos.shape[0]):
            torch.testing.assert_close(keys[h], full.cache.layers[layer].keys[0, h, pos[h]], rtol=0, atol=1e-5)
            torch.testing.assert_close(values[h], full.cache.layers[layer].values[0, h, pos[h]], rtol=0, atol=1e-5)
    everything = select_kv(model, ids, None)
    assert everything.kept is None and [p.shape[-1] for p in everything.positions()] == [64] * model.config.num_hidden_layers


# ----------------------------------------------------------------------------- the pipeline


def test_pipeline_answers_questions_after_one_compressed_context(smollm2):
    _, tokenizer = smollm2
    model = tiny_for_tokenizer(tokenizer, seed=2)
    context = "The river runs past the mill and the old school. " * 12
    pipe = pipeline(model, tokenizer, SnapKV(budget=32))
    one = pipe(context, question="Where does the river run?", max_new_tokens=8)
    two = pipe(context, question=["Where does the river run?", "What is old?"], max_new_tokens=8)
    assert one["answer"] == two[0]["answer"] and one["generation"].token_ids == two[0]["generation"].token_ids
    assert one["generation"].stats.kept_per_layer == [32] * model.config.num_hidden_layers
    # at a full budget: the tokens of decoding the context and question over the whole cache
    ctx, q = pipeline(model, tokenizer).split(context, "Where does the river run?")
    full = pipeline(model, tokenizer)(context, question="Where does the river run?", max_new_tokens=8)
    assert full["generation"].token_ids == generate_ids(model, torch.tensor([ctx + q]), None, max_new_tokens=8, eos_token_ids=eos_ids(model, tokenizer))[0]


# ----------------------------------------------------------------------------- SmolLM2


SMOL_PROMPTS = [
    "The lighthouse keeper wrote in the log that the storm began at nine and the supply boat was late. " * n + "Question: when did the storm begin?"
    for n in (3, 5, 2, 7)
]


@pytest.fixture(scope="module")
def smol(smollm2):
    from lookaheadkv.engine.generate import encode_prompt

    model, tokenizer = smollm2
    return model, tokenizer, [encode_prompt(tokenizer, p) for p in SMOL_PROMPTS]


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_smollm2_generate_inside_evicting_equals_generate_ids(smol, name):
    model, tokenizer, prompts = smol
    ids = prompts[3]
    eos = eos_ids(model, tokenizer)
    kwargs = {"max_new_tokens": 8} if name == "oracle" else {}
    if name in ("laq", "speckv"):
        kwargs["n_draft"] = 8
    policy = make_policy(name, budget=32, **kwargs)
    expected, _, _ = generate_ids(model, ids, policy, max_new_tokens=8, eos_token_ids=eos)
    with evicting(model, policy):
        got = until_eos(hf_generate(model, ids, max_new_tokens=8)[0].tolist(), eos)
    assert got == expected
    if name in ("snapkv", "lookahead"):
        with evicting(model, policy.with_budget(1.0)):
            full = hf_generate(model, ids, max_new_tokens=8)[0].tolist()
        assert full == hf_generate(model, ids, max_new_tokens=8)[0].tolist()


def test_smollm2_batch_of_four_equals_four_single_runs(smol):
    model, tokenizer, prompts = smol
    assert len({p.shape[1] for p in prompts}) == 4
    policy = LookaheadKV(budget=32)
    outs = generate_batch(model, tokenizer, SMOL_PROMPTS, policy, max_new_tokens=8)
    ids, mask = left_padded(prompts)
    with evicting(model, policy) as ev:
        padded = hf_generate(model, ids, mask, max_new_tokens=8)
    eos = eos_ids(model, tokenizer)
    for i, (prompt, out) in enumerate(zip(SMOL_PROMPTS, outs)):
        alone = generate(model, tokenizer, prompt, policy, max_new_tokens=8)
        assert out.token_ids == alone.token_ids == until_eos(padded[i].tolist(), eos) and out.text == alone.text
        assert all(torch.equal(a, b) for a, b in zip(out.kept, alone.kept))
        assert all(torch.equal(a, b) for a, b in zip(ev.kept[i], alone.kept))


# ----------------------------------------------------------------------------- the command line


def test_cli_answers_several_prompt_files_and_a_jsonl_at_once(smollm2, tmp_path):
    import json

    from typer.testing import CliRunner

    from lookaheadkv.cli import app

    _, tokenizer = smollm2
    folder = tmp_path / "model"
    tiny_for_tokenizer(tokenizer, seed=6).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    texts = ["The mill stands by the river. " * n + "What stands by the river?" for n in (3, 6, 4)]
    files = []
    for i, text in enumerate(texts[:2]):
        files.append(tmp_path / f"p{i}.txt")
        files[-1].write_text(text)
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text(json.dumps({"prompt": texts[2]}) + "\n\n" + json.dumps(texts[0]) + "\n")
    common = ["generate", "--model", str(folder), "--method", "snapkv", "--budget", "16", "--max-new-tokens", "6"]
    result = CliRunner().invoke(app, [*common, "--prompt-file", str(files[0]), "--prompt-file", str(files[1]), "--prompt-file", str(jsonl)])
    assert result.exit_code == 0, (result.output, result.exception)
    answers = [block.split(" ===\n", 1)[1].strip() for block in result.stdout.split("=== ")[1:]]
    singles = [CliRunner().invoke(app, [*common, "--prompt", t]).stdout.strip() for t in (texts[0], texts[1], texts[2], texts[0])]
    assert answers == singles and len(result.stderr.strip().splitlines()) >= 4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\nnot json\n')
    out = CliRunner().invoke(app, [*common, "--prompt-file", str(bad)])
    assert out.exit_code == 2 and "bad.jsonl:2 is not JSON" in out.stderr
