"""Key/value cache helpers: size, copy, crop and the physical gather that evicts."""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


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


class ReservedLayer(DynamicLayer):
    """A cache layer with room reserved for ``room`` more entries.

    A ``DynamicLayer`` concatenates every new entry onto a fresh copy of the whole layer, so a
    decoding step over a batch of long caches copies all of them (gigabytes per step for 32
    prompts of 4K tokens). This layer writes the new entries into the reserved slots and hands
    out views of the filled part; it grows by doubling only if the room runs out.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        super().__init__()
        self.device, self.is_initialized, self.filled = keys.device, True, keys.shape[-2]
        self._keys, self._values = (self._reserve(t, room) for t in (keys, values))
        self._expose()

    @staticmethod
    def _reserve(t: torch.Tensor, room: int) -> torch.Tensor:
        out = t.new_empty(*t.shape[:-2], t.shape[-2] + room, t.shape[-1])
        out[..., : t.shape[-2], :] = t
        return out

    def _expose(self) -> None:
        self.keys, self.values = self._keys[..., : self.filled, :], self._values[..., : self.filled, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        n = key_states.shape[-2]
        if self.filled + n > self._keys.shape[-2]:
            self._keys, self._values = (self._reserve(t[..., : self.filled, :], self.filled + n) for t in (self._keys, self._values))
        self._keys[..., self.filled : self.filled + n, :] = key_states
        self._values[..., self.filled : self.filled + n, :] = value_states
        self.filled += n
        self._expose()
        return self.keys, self.values

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows ``index`` (rows that finished decoding leave the batch)."""
        self._keys, self._values = self._keys.index_select(0, index), self._values.index_select(0, index)
        self._expose()


def reserved_cache(kv: list[tuple[torch.Tensor, torch.Tensor]], room: int) -> DynamicCache:
    """A cache of the given (keys, values) per layer, each with room for ``room`` more entries."""
    cache = DynamicCache()
    cache.layers = [ReservedLayer(k, v, room) for k, v in kv]
    return cache


def stack_caches(caches: list[DynamicCache], room: int = 0) -> tuple[DynamicCache, list[torch.Tensor]]:
    """Caches of batch 1 (evictions of one prompt, or different prompts) stacked along the batch.

    Each layer is padded to its longest row. Returns the stacked cache (with room for ``room`` more
    entries per layer, :class:`ReservedLayer`; DynamicLayers when 0) and the padding: per layer a
    (batch, 1, 1, longest) boolean mask, True where a row has a real entry ([] when no layer is
    ragged), for :func:`engine.attention.hooked`'s ``padding``. The caches are left untouched.
    """
    n_layers = len(caches[0].layers)
    if any(len(c.layers) != n_layers for c in caches):
        raise ValueError("caches of different models (different numbers of layers) cannot be stacked")
    sizes = torch.tensor([[layer.keys.shape[-2] for layer in c.layers] for c in caches])  # (batch, layers)
    ragged = bool((sizes != sizes[0]).any())
    kv, padding = [], []
    for i in range(n_layers):
        longest = int(sizes[:, i].max())
        kv.append(
            tuple(
                torch.cat([torch.nn.functional.pad(getattr(c.layers[i], part), (0, 0, 0, longest - int(n))) for c, n in zip(caches, sizes[:, i])])
                for part in ("keys", "values")
            )
        )
        if ragged:
            padding.append((torch.arange(longest)[None, :] < sizes[:, i, None])[:, None, None, :].to(kv[-1][0].device))
    return (reserved_cache(kv, room) if room else from_tensors(kv)), padding


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
