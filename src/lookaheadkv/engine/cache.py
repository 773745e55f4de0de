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
    decoding step copies every layer of the cache (gigabytes per step for a batch of 32 prompts of
    4K tokens, tens of megabytes for one). This layer writes the new entries into the reserved
    slots and hands out views of the filled part; it grows by its room again (or to fit) if the
    room runs out.

    ``keys`` and ``values`` may be assigned as on a ``DynamicLayer`` (the engine's crops and
    re-scorings do): a prefix view of the layer's own storage (``layer.keys[..., :n, :]``) is a
    crop, which only shortens the filled part (the next entries then overwrite the cropped ones:
    a view taken before the crop and longer than it sees them); any other tensor is copied into
    fresh storage with the same capacity as before, or with ``room`` more slots if it does not fit.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int):
        self.room = room
        self._store = {"keys": None, "values": None}  # reserved storage, (..., capacity, head_dim)
        self._view = {"keys": None, "values": None}  # the filled part: a prefix view of the storage
        super().__init__()
        self.device, self.is_initialized = keys.device, True
        self.keys, self.values = keys, values

    @staticmethod
    def _reserve(t: torch.Tensor, capacity: int) -> torch.Tensor:
        out = t.new_empty(*t.shape[:-2], capacity, t.shape[-1])
        out[..., : t.shape[-2], :] = t
        return out

    @staticmethod
    def _is_prefix(t: torch.Tensor, store: torch.Tensor | None) -> bool:
        """Whether ``t`` is ``store[..., :n, :]`` for some ``n`` (a crop of the layer)."""
        return (
            store is not None
            and t.data_ptr() == store.data_ptr()
            and t.dtype == store.dtype
            and t.device == store.device
            and t.stride() == store.stride()
            and t.shape[:-2] == store.shape[:-2]
            and t.shape[-1] == store.shape[-1]
            and t.shape[-2] <= store.shape[-2]
        )

    def _set(self, part: str, t: torch.Tensor | None) -> None:
        store = self._store[part]
        if t is None:  # DynamicLayer.__init__ and reset() drop the tensors
            self._store[part] = self._view[part] = None
        elif self._is_prefix(t, store):  # a crop: only the filled length changes
            self._view[part] = t
        else:  # fresh storage: the same capacity as before, or room more slots than t if it does not fit
            capacity = 0 if store is None else store.shape[-2]
            if t.shape[-2] >= capacity:
                capacity = t.shape[-2] + max(self.room, 1)
            self._store[part] = self._reserve(t, capacity)
            self._view[part] = self._store[part][..., : t.shape[-2], :]

    @property
    def keys(self) -> torch.Tensor | None:
        """The filled part of the keys (a view of the reserved storage)."""
        return self._view["keys"]

    @keys.setter
    def keys(self, t: torch.Tensor | None) -> None:
        self._set("keys", t)

    @property
    def values(self) -> torch.Tensor | None:
        """The filled part of the values (a view of the reserved storage)."""
        return self._view["values"]

    @values.setter
    def values(self, t: torch.Tensor | None) -> None:
        self._set("values", t)

    @property
    def filled(self) -> int:
        """Entries the layer holds (its keys' length)."""
        return 0 if self._view["keys"] is None else self._view["keys"].shape[-2]

    @property
    def capacity(self) -> int:
        """Entries the layer can hold before it has to grow."""
        return 0 if self._store["keys"] is None else self._store["keys"].shape[-2]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._store["keys"] is None:  # after reset()
            self.device, self.is_initialized = key_states.device, True
            self.keys, self.values = key_states, value_states
            return self.keys, self.values
        for part, new in (("keys", key_states), ("values", value_states)):
            view, store, n = self._view[part], self._store[part], new.shape[-2]
            filled = view.shape[-2]
            if filled + n > store.shape[-2]:
                store = self._store[part] = self._reserve(view, filled + n + max(self.room, filled))
            store[..., filled : filled + n, :] = new
            self._view[part] = store[..., : filled + n, :]
        return self.keys, self.values

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep only the batch rows ``index`` (rows that finished decoding leave the batch)."""
        for part in ("keys", "values"):
            filled = self._view[part].shape[-2]
            self._store[part] = self._store[part].index_select(0, index)
            self._view[part] = self._store[part][..., :filled, :]


def reserve(cache: DynamicCache, room: int | list[int]) -> DynamicCache:
    """Turn every layer of ``cache`` that is exactly a ``DynamicLayer`` into a :class:`ReservedLayer`, in place.

    ``room``: the slots reserved after each layer's entries (one number, or one per layer). Layers
    of other types (sliding-window layers, layers that already reserve) are left alone, and so are
    layers that hold nothing yet. The layer objects in ``cache.layers`` are replaced, the list
    itself is kept (a cache that shares it sees the new layers). Returns ``cache``.
    """
    rooms = [room] * len(cache.layers) if isinstance(room, int) else list(room)
    for i, (layer, n) in enumerate(zip(cache.layers, rooms)):
        if type(layer) is DynamicLayer and layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:
            cache.layers[i] = ReservedLayer(layer.keys, layer.values, n)
    return cache


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
