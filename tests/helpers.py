"""Shared test utilities: prompts, plain Hugging Face references, and an eager reference attention.

Everything here is written independently of the library's engine so that tests can compare the
engine against it:

* :func:`reference_attention` is an eager ``softmax(Q K^T) V`` registered with
  ``transformers.AttentionInterface`` as :data:`REF_ATTN`. Inside :func:`reference_mode` it can
  (a) hide given prompt entries from given KV heads (a per-head additive -inf mask, the
  "evicted" entries) and (b) capture every layer's attention probabilities.
* :func:`masked_lora` adds lookahead modules' LoRA deltas only at positions ``>= start`` (the
  reference for "LoRA active only on the lookahead positions").
* :func:`hf_prefill` is a plain Hugging Face forward (no engine hook) returning its cache.

Import the ``single_thread`` fixture into a test module to run it on one intra-op thread: the
test machines have 2 cores shared by several jobs, and oversubscribed OpenMP threads make tiny
models 10x slower.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from transformers import AttentionInterface, DynamicCache

REF_ATTN = "ref_masked"
ARCHS = ("llama", "mistral", "qwen2", "qwen3")


# ----------------------------------------------------------------------------- environment


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- inputs


def random_ids(length: int, *, seed: int = 0, vocab: int = 256, low: int = 3) -> torch.Tensor:
    """(1, length) random token ids in [low, vocab) (ids below ``low`` are pad/bos/eos)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (1, length), generator=g)


def tiny_for_tokenizer(tokenizer, arch: str = "llama", *, seed: int = 0, **overrides):
    """A tiny random model whose vocabulary is ``tokenizer``'s (so real text can be fed to it)."""
    from lookaheadkv.models import tiny_model

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ids = {k: v for k, v in ids.items() if v is not None}
    return tiny_model(arch, seed=seed, vocab_size=len(tokenizer), **ids, **overrides)


# ----------------------------------------------------------------------------- caches


def kv(cache, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    return cache.layers[layer].keys, cache.layers[layer].values


def clone_cache(cache) -> DynamicCache:
    out = DynamicCache()
    for i in range(len(cache.layers)):
        k, v = kv(cache, i)
        out.update(k.clone(), v.clone(), i)
    return out


@torch.no_grad()
def hf_prefill(model, input_ids: torch.Tensor) -> tuple[DynamicCache, torch.Tensor]:
    """Plain Hugging Face forward over the prompt: (cache, logits at the last position (vocab,))."""
    out = model(input_ids=input_ids, use_cache=True)
    return out.cache, out.logits[0, -1]


@torch.no_grad()
def hf_greedy_tokens(model, input_ids: torch.Tensor, n: int) -> list[int]:
    """Plain Hugging Face greedy decoding of ``n`` tokens (its own attention and cache, no EOS stop)."""
    out = model(input_ids=input_ids, use_cache=True)
    cache, tokens = out.cache, [int(out.logits[0, -1].argmax())]
    for _ in range(n - 1):
        out = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
        cache = out.cache
        tokens.append(int(out.logits[0, -1].argmax()))
    return tokens


# ----------------------------------------------------------------------------- reference attention


class _State(threading.local):
    key_masks: dict[int, torch.Tensor] | None = None
    capture: dict[int, torch.Tensor] | None = None


_state = _State()


def reference_attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, **kwargs):
    """Eager attention, batch 1, no padding: the ``q`` queries are the last ``q`` of the ``k`` keys.

    With ``key_masks[layer]`` (kv_heads, m) boolean, key column ``j < m`` is visible to the query
    heads of KV head ``h`` only where ``key_masks[layer][h, j]``; columns ``>= m`` are always visible.
    """
    _, heads, q, dim = query.shape
    kv_heads, k = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scaling = dim**-0.5 if scaling is None else scaling
    keys = key.repeat_interleave(group, dim=1)  # query head h reads KV head h // group
    values = value.repeat_interleave(group, dim=1)
    logits = torch.matmul(query.float(), keys.float().transpose(-1, -2)) * scaling  # (1, H, q, k)
    bias = torch.zeros(heads, q, k)
    rows = torch.arange(q)[:, None] + (k - q)
    cols = torch.arange(k)[None, :]
    bias = bias.masked_fill((cols > rows)[None], float("-inf"))
    masks = _state.key_masks
    if masks is not None and module.layer_idx in masks:
        visible = torch.ones(kv_heads, k, dtype=torch.bool)
        given = masks[module.layer_idx]
        visible[:, : given.shape[1]] = given
        visible = visible.repeat_interleave(group, dim=0)  # (H, k)
        bias = bias.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(logits + bias[None].to(logits.device), dim=-1)
    if _state.capture is not None:
        _state.capture[module.layer_idx] = probs[0].detach().clone()
    out = torch.matmul(probs.to(value.dtype), values)
    return out.transpose(1, 2).contiguous(), probs


AttentionInterface.register(REF_ATTN, reference_attention)


@contextmanager
def reference_mode(model, *, key_masks: dict[int, torch.Tensor] | None = None, capture: dict | None = None) -> Iterator[None]:
    """Run ``model`` with :func:`reference_attention` for the duration of the block."""
    previous = model.config._attn_implementation
    model.config._attn_implementation = REF_ATTN
    _state.key_masks, _state.capture = key_masks, capture
    try:
        yield
    finally:
        model.config._attn_implementation = previous
        _state.key_masks, _state.capture = None, None


@torch.no_grad()
def attention_probs(model, input_ids=None, *, inputs_embeds=None) -> list[torch.Tensor]:
    """Every layer's full causal attention probabilities (H, T, T) from one eager forward."""
    capture: dict[int, torch.Tensor] = {}
    with reference_mode(model, capture=capture):
        model(input_ids=input_ids, inputs_embeds=inputs_embeds, use_cache=False)
    return [capture[i] for i in sorted(capture)]


def evicted_masks(kept: list[torch.Tensor], prompt_len: int) -> dict[int, torch.Tensor]:
    """Per layer (kv_heads, prompt_len) boolean: True for the prompt entries a KV head kept."""
    masks = {}
    for layer, idx in enumerate(kept):
        visible = torch.zeros(idx.shape[0], prompt_len, dtype=torch.bool)
        visible.scatter_(1, idx.cpu(), True)
        masks[layer] = visible
    return masks


# ----------------------------------------------------------------------------- reference LoRA


def target_linears(model, targets) -> dict[tuple[int, str], torch.nn.Linear]:
    """(layer, name) -> linear for the attention and MLP projections named in ``targets``."""
    found = {}
    for i, layer in enumerate(model.model.layers):
        for name in targets:
            parent = layer.self_attn if hasattr(layer.self_attn, name) else layer.mlp
            found[(i, name)] = getattr(parent, name)
    return found


@contextmanager
def masked_lora(model, modules, start: int) -> Iterator[None]:
    """Add ``modules``' LoRA delta ``x A^T B^T * alpha / r`` only at sequence positions ``>= start``."""
    scaling = modules.config.alpha / modules.config.rank
    handles = []
    for (layer, name), linear in target_linears(model, modules.config.target_modules).items():
        a, b = modules.lora_A[f"{layer}_{name}"], modules.lora_B[f"{layer}_{name}"]

        def hook(module, args, output, a=a, b=b):
            x = args[0]
            delta = (x @ a.T) @ b.T * scaling
            positions = torch.arange(x.shape[1], device=x.device)
            return output + delta * (positions >= start)[None, :, None].to(delta.dtype)

        handles.append(linear.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def randomize_lora_b(modules, *, seed: int = 0, std: float = 0.05) -> None:
    """Give every LoRA ``B`` nonzero random values (``for_model`` starts them at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in modules.lora_B.values():
            b.copy_(torch.randn(b.shape, generator=g) * std)


def decode_policy(name: str, model, budget):
    """A policy with a decode-time scorer, as the decode-budget tests build them: LookaheadKV with
    tiny random modules (LoRA B randomised, so the adapters act), SnapKV with a small window."""
    from lookaheadkv.lookahead import LookaheadModules
    from lookaheadkv.policies import make_policy

    kwargs = {}
    if name == "lookahead":
        modules = LookaheadModules.for_model(model, seed=3, n_lookahead=8)
        randomize_lora_b(modules, seed=3)
        kwargs["modules"] = modules
    if name == "snapkv":
        kwargs.update(window=4, kernel=3)
    return make_policy(name, budget=budget, **kwargs)


def invoke(*args: str):
    """The CLI run in-process (typer's CliRunner)."""
    from typer.testing import CliRunner

    from lookaheadkv.cli import app

    return CliRunner().invoke(app, list(args))


def one_error_line(result, *needles: str, code: int = 2) -> str:
    """A CLI result that failed with exactly one ``error:`` line holding every needle, and no traceback."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, lines
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]
