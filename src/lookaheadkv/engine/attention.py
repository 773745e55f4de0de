"""The one hook into a model's attention layers.

Every forward the engine runs goes through :func:`hooked`, which swaps the model's
attention implementation for :func:`_attention`, a thin wrapper over PyTorch's
``scaled_dot_product_attention``. The wrapper hands each layer's post-RoPE queries and
its whole key cache to the active *observers* (the scoring policies), then computes
attention exactly as the model would. Nothing of the model's code is copied: the layers
still project, rotate and cache; only the attention kernel call is ours.

Because the engine runs batch size 1 without padding, the mask is always the causal
"tail" pattern: the ``q`` new tokens are the last ``q`` of the ``k`` cached ones. We build
it here instead of letting Hugging Face build one from the cache length, which lets
layers hold different numbers of entries after eviction (PyramidKV). The one exception to
batch size 1 is :func:`engine.decode.decode_batch`: single-token steps over caches stacked
along the batch, without observers, where the only mask is the padding of ragged caches; and
:func:`engine.batch_rescore.decode_budgeted_batch`, the same steps with one observer marked
``batched`` that hands each row's own observer that row's query and real keys.

A prefill may carry a *tail*: extra rows after the prompt in the same forward (LookaheadKV's
lookahead tokens, :class:`engine.prefill.Tail`). The prompt's rows then go through the very
same ``scaled_dot_product_attention`` call on the prompt's own queries, keys and values as
in a plain prefill (the tail's keys are not even in it), and the tail's rows are computed as
explicit probability rows that the tail's observer takes.
"""

from __future__ import annotations

import functools
import threading
from contextlib import contextmanager
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_NAME = "lookaheadkv"
TAIL_ROWS = "lookaheadkv::tail_rows"  # profiler range around a tail's explicit attention rows

# observer(layer_idx, query, key, scaling); query (1, heads, q, d), key (1, kv_heads, k, d)
Observer = Callable[[int, torch.Tensor, torch.Tensor, float], None]

_state = threading.local()


def _observers() -> Sequence[Observer]:
    return getattr(_state, "observers", ())


def tail_causal_mask(q: int, k: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (q, k) letting query row i see keys ``0 .. k - q + i``; None when q == 1."""
    if q == 1:
        return None
    rows = torch.arange(q, device=device)[:, None]
    cols = torch.arange(k, device=device)[None, :]
    return cols <= rows + (k - q)


def _per_head_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` batched over the KV heads (dim 0): (kv_heads, m, x) @ (kv_heads, x, n).

    On the CPU one ``mm`` per head, each on every thread: one ``bmm`` over a batch of a few
    heads shares the heads out between the threads (3 heads on 2 threads: one thread idles a
    third of the time), measurably slower with SmolLM2's 3 KV heads on this project's 2-core
    machines (the same matmul per head, so the same result up to float rounding). Elsewhere, and
    when autograd records (training), one batched kernel.
    """
    if a.device.type != "cpu" or (torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)):
        return torch.matmul(a, b)
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2], dtype=torch.result_type(a, b), device=a.device)
    for h in range(a.shape[0]):
        torch.mm(a[h], b[h], out=out[h])
    return out


@functools.lru_cache(maxsize=16)
def _hidden_block(rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """(rows, cols) boolean, True where j >= i: row i cannot see column j of the columns after its offset."""
    return torch.ones(rows, cols, dtype=torch.bool, device=device).triu()


def attention_rows(query: torch.Tensor, key: torch.Tensor, scaling: float, row_offset: int) -> torch.Tensor:
    """Softmax attention of query rows over all keys, causal: (heads, rows, k).

    ``query`` (heads, rows, d) holds rows at absolute positions ``row_offset ..`` and ``key``
    (kv_heads, k, d) the keys (not repeated over the GQA group: each group's query rows are
    multiplied against their KV head, so no copy of the cache is made).
    Row i sees keys ``0 .. row_offset + i``; only the columns after ``row_offset`` can be masked.
    """
    heads, rows, dim = query.shape
    kv_heads, k = key.shape[0], key.shape[1]
    grouped = (query * scaling).reshape(kv_heads, (heads // kv_heads) * rows, dim)  # scale the rows, not rows x k logits
    logits = _per_head_matmul(grouped, key.transpose(-1, -2)).view(heads, rows, k).float()
    first = row_offset + 1  # the first column that some row cannot see: row i sees column first + j iff j < i
    if first < k:
        logits[..., first:].masked_fill_(_hidden_block(rows, k - first, key.device), float("-inf"))
    return logits.softmax(dim=-1)


def _explicit(query, key, value, scaling, observers):
    """Attention computed once as explicit rows, shared with observers that take them.

    Used for short calls over a cache (lookahead tokens, drafts) and for a prefill's tail:
    the observers get the very probabilities the layer uses instead of recomputing ``QK^T``
    and the softmax.
    """
    q, k = query.shape[2], key.shape[2]
    probs = attention_rows(query[0], key[0], scaling, row_offset=k - q)  # (heads, q, k)
    for observe in observers:
        observe.take_probs(probs, q, k)
    kv_heads = key.shape[1]
    grouped = probs.to(value.dtype).reshape(kv_heads, -1, k)  # (kv_heads, group * q, k)
    out = _per_head_matmul(grouped, value[0]).view(query.shape[1], q, -1)  # (heads, q, d)
    return out.transpose(0, 1)[None].contiguous()


def _attention(module, query, key, value, attention_mask=None, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    q, k = query.shape[2], key.shape[2]
    observers = _observers()
    if query.shape[0] != 1 and (q != 1 or not all(getattr(o, "batched", False) for o in observers)):
        # batched rows only for single-token decoding (engine.decode.decode_batch), whose observers, if
        # any, split the batch into its rows themselves (engine.batch_rescore)
        raise ValueError(f"lookaheadkv runs batch size 1, got a batch of {query.shape[0]}")
    if sliding_window is not None and k > sliding_window:
        raise NotImplementedError(
            f"layer {module.layer_idx} uses sliding-window attention ({sliding_window} tokens) and the sequence "
            f"has {k}; sliding-window layers are not supported: use a model or config without them"
        )
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    tail = getattr(_state, "tail", None)
    if tail is not None:  # a prefill whose last rows are the tail (see engine.prefill.Tail)
        return _prefill_with_tail(module, query, key, value, scaling, observers, tail), None
    takers = [o for o in observers if getattr(o, "takes_probs", lambda q, k: False)(q, k)]
    if takers and len(takers) == len(observers):
        for observe in takers:
            observe.layer = module.layer_idx
        return _explicit(query, key, value, scaling, takers), None
    for observe in observers:
        observe(module.layer_idx, query, key, scaling)
    mask = None
    padding = getattr(_state, "padding", None)
    if padding is not None:  # decode_batch over ragged caches: (batch, 1, 1, k) real entries
        mask = padding[module.layer_idx]
        if mask.shape[-1] < k:  # the entries appended since (the new tokens) are real
            mask = torch.cat([mask, mask.new_ones(*mask.shape[:-1], k - mask.shape[-1])], dim=-1)
            padding[module.layer_idx] = mask
    return _kernel(query, key, value, scaling, mask).transpose(1, 2).contiguous(), None


def _kernel(query, key, value, scaling, mask=None):
    """The fused attention kernel over all of ``key`` (1, H, q, d); causal unless ``mask`` is given.

    The one call every non-explicit attention goes through, so a prefill with a tail gives
    its prompt rows exactly what a plain prefill does.
    """
    q, k = query.shape[2], key.shape[2]
    if mask is None and q != k:
        mask = tail_causal_mask(q, k, query.device)
    return F.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=mask,
        is_causal=q == k and q > 1,
        scale=scaling,
        enable_gqa=query.shape[1] != key.shape[1],
    )


def _prefill_with_tail(module, query, key, value, scaling, observers, tail):
    """Prompt rows exactly as a plain prefill computes them; the tail's rows explicit, for its observer.

    The call's last ``tail.rows`` queries and keys are the tail's. The prompt's rows get the
    same kernel call, on the prompt's own queries, keys and values, as without the tail (also
    when this call continues a cache, as a prefill's last chunk does).
    """
    n = tail.rows
    q, k = query.shape[2] - n, key.shape[2] - n  # the prompt's rows and keys
    prompt = tuple(t[:, :, :k] for t in (key, value))
    for observe in observers:
        observe(module.layer_idx, query[:, :, :q], prompt[0], scaling)
    head = _kernel(query[:, :, :q], *prompt, scaling)
    tail.observer.layer = module.layer_idx
    with torch.profiler.record_function(TAIL_ROWS):  # a named range for benchmarks/profile_tail.py
        rows = _explicit(query[:, :, q:], key, value, scaling, [tail.observer])  # (1, n, heads, d)
    return torch.cat([head.transpose(1, 2), rows], dim=1)


AttentionInterface.register(ATTN_NAME, _attention)


def sliding_window(model: torch.nn.Module) -> int | None:
    """The window of the model's sliding-window layers, or None when it has none."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    types = getattr(config, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def check_eviction_window(model: torch.nn.Module, positions: int) -> None:
    """Refuse eviction on sliding-window layers once a query's true position passes the window.

    The engine's attention sees cache entries, not their positions: after eviction a layer holds
    fewer entries than positions, so its entry count no longer tells whether a kept entry lies
    outside the layer's window. ``positions`` is the number of positions the longest forward
    spans (prompt + new tokens - 1). Within the window nothing is cut, so eviction is exact.
    """
    window = sliding_window(model)
    if window is not None and positions > window:
        raise NotImplementedError(
            f"this model's sliding-window layers see only the last {window} positions, and after eviction they would "
            f"attend to kept entries outside that window ({positions} positions): use --method full, a prompt plus "
            f"answer within {window} tokens, or a model without sliding windows"
        )


@contextmanager
def hooked(
    model: torch.nn.Module,
    observers: Sequence[Observer | None] = (),
    padding: list[torch.Tensor] | None = None,
    tail=None,
) -> Iterator[None]:
    """Run ``model`` through the engine's attention, calling ``observers`` in every layer.

    ``padding`` (decode_batch only): per layer a (batch, 1, 1, k) boolean mask of the real
    cache entries of each row; entries appended later count as real. ``tail`` (prefill only):
    the :class:`engine.prefill.Tail` whose rows end the sequence.
    """
    config = model.config
    previous_impl = config._attn_implementation
    previous = _observers(), getattr(_state, "padding", None), getattr(_state, "tail", None)
    config._attn_implementation = ATTN_NAME
    _state.observers = tuple(o for o in observers if o is not None)
    _state.padding = padding
    _state.tail = tail
    try:
        yield
    finally:
        config._attn_implementation = previous_impl
        _state.observers, _state.padding, _state.tail = previous
