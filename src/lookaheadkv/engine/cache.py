"""Key/value cache helpers: size, copy, crop and the physical gather that evicts."""

from __future__ import annotations

import torch
from transformers import DynamicCache


def new_cache() -> DynamicCache:
    return DynamicCache()


def layer_kv(cache: DynamicCache, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of one layer, each (1, kv_heads, length, head_dim)."""
    layer = cache.layers[layer_idx]
    return layer.keys, layer.values


def from_tensors(kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    cache = DynamicCache()
    for layer_idx, (k, v) in enumerate(kv):
        cache.update(k, v, layer_idx)
    return cache


def copy_cache(cache: DynamicCache) -> DynamicCache:
    """A cache that can grow without touching ``cache`` (updates concatenate into new tensors)."""
    return from_tensors([layer_kv(cache, i) for i in range(len(cache.layers))])


def lengths(cache: DynamicCache) -> list[int]:
    return [layer.keys.shape[-2] for layer in cache.layers]


def kv_bytes(cache: DynamicCache) -> int:
    return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size() for l in cache.layers)


def crop(cache: DynamicCache, length: int) -> None:
    """Cut every layer back to its first ``length`` entries, in place."""
    for layer in cache.layers:
        layer.keys = layer.keys[..., :length, :]
        layer.values = layer.values[..., :length, :]


def gather(cache: DynamicCache, indices: list[torch.Tensor]) -> DynamicCache:
    """A new, compact cache holding, per layer and KV head, the entries at ``indices``.

    ``indices[l]`` is (kv_heads, kept) sorted ascending; the result owns fresh storage so the
    evicted entries are really freed once the full cache is dropped.
    """
    kv, heads = [], None
    for layer_idx, idx in enumerate(indices):
        keys, values = layer_kv(cache, layer_idx)
        if heads is None:  # every layer has the same KV heads on the same device
            heads = torch.arange(keys.shape[1], device=keys.device)[:, None]
        idx = idx.to(keys.device)
        # advanced indexing copies one row of head_dim values per kept entry: faster on a CPU
        # than ``gather`` with the index expanded over head_dim (one index read per element)
        kv.append((keys[:, heads, idx], values[:, heads, idx]))
    return from_tensors(kv)
