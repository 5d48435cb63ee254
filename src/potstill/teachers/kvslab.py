"""A KV cache for continuous batching that reuses its memory: two preallocated buffers per layer.

transformers' `DynamicLayer` concatenates every decode step (`torch.cat([keys, new])`), so each
step allocates a new, one column longer copy of the whole cache, and dropping a finished row
copies it again. The copy is cheap; the allocation is not: on CPU each fresh block is
first-touch page faults, and a batch of 64 rows on the 2-core benchmark machine spent more
time faulting (~40k faults a step) than computing once the cache passed ~60 columns.

Here every layer owns two flat buffers and its keys/values are a contiguous view of one of
them. Each operation writes its result into the other buffer (`torch.cat(..., out=)`,
`index_select(..., out=)`) and the two swap, so memory is allocated only when the cache
outgrows the buffers (by half again each time). Keys and values stay contiguous, which the
CPU's bf16 batched matmul needs: on a strided view of a larger buffer it copies internally
and the decode attention ran ~2x slower (measured: 0.47 vs 0.21 ms a layer at batch 64, 120
columns).

The engine's operations: a decode step appends one column (`update`, called by the model);
finished rows are dropped (`keep_rows`); new prompts' caches are appended as rows,
right-aligned, the shorter side left-padded with zeros that the attention mask hides
(`add_rows`); leading columns that no live row uses any more are dropped (`trim_left`).
"""

from __future__ import annotations

import math

import torch
from transformers.cache_utils import DynamicLayer

from potstill.errors import PotstillError


class SlabLayer(DynamicLayer):
    """One layer's keys and values, alternating between two reusable buffers per tensor."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, reserve: int):
        super().__init__()
        self.device = keys.device
        self.is_initialized = True
        self._spare: dict[str, torch.Tensor] = {}
        self._live: dict[str, torch.Tensor] = {}
        for name, t in (("keys", keys), ("values", values)):
            self._live[name] = t.new_empty(max(reserve, t.numel()))
            self._spare[name] = t.new_empty(max(reserve, t.numel()))
            self._target(name, t.shape).copy_(t)
            self._swap(name, t.shape)

    def _target(self, name: str, shape) -> torch.Tensor:
        """A contiguous tensor of `shape` in the spare buffer (grown by half again when too small)."""
        numel = math.prod(shape)
        if self._spare[name].numel() < numel:
            self._spare[name] = self._spare[name].new_empty(numel + numel // 2)
        return self._spare[name][:numel].view(shape)

    def _swap(self, name: str, shape) -> None:
        self._live[name], self._spare[name] = self._spare[name], self._live[name]
        setattr(self, name, self._live[name][: math.prod(shape)].view(shape))

    def _apply(self, fn) -> None:
        """Write `fn(current, target_shape_fn)` results for keys and values into the spares and swap."""
        for name in ("keys", "values"):
            shape = fn(name, getattr(self, name))
            self._swap(name, shape)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if key_states.shape[0] != self.keys.shape[0]:
            raise PotstillError(f"KV cache: {key_states.shape[0]} rows written into a batch of {self.keys.shape[0]}")
        new = {"keys": key_states, "values": value_states}

        def append(name, cur):
            shape = (*cur.shape[:2], cur.shape[2] + new[name].shape[2], cur.shape[3])
            torch.cat([cur, new[name]], dim=2, out=self._target(name, shape))
            return shape

        self._apply(append)
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        def select(name, cur):
            shape = (len(indices), *cur.shape[1:])
            torch.index_select(cur, 0, indices, out=self._target(name, shape))
            return shape

        self._apply(select)

    def add_rows(self, new: dict[str, torch.Tensor]) -> None:
        def merge(name, cur):
            extra = new[name]
            width = max(cur.shape[2], extra.shape[2])
            shape = (cur.shape[0] + extra.shape[0], cur.shape[1], width, cur.shape[3])
            out = self._target(name, shape)
            for rows, part in ((slice(0, cur.shape[0]), cur), (slice(cur.shape[0], shape[0]), extra)):
                pad = width - part.shape[2]
                out[rows, :, :pad] = 0
                out[rows, :, pad:] = part
            return shape

        self._apply(merge)

    def trim_left(self, cut: int) -> None:
        def trim(name, cur):
            shape = (*cur.shape[:2], cur.shape[2] - cut, cur.shape[3])
            self._target(name, shape).copy_(cur[:, :, cut:])
            return shape

        self._apply(trim)


class SlabCache:
    """The engine's handle on a model cache whose layers are `SlabLayer`s (`.cache` goes to the model)."""

    def __init__(self, prefill_cache, row_capacity: int, columns: int):
        layers = prefill_cache.layers
        if any(type(layer) is not DynamicLayer for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers})
            raise PotstillError(f"batched decoding supports full-attention KV caches only (this model uses {kinds})")
        self.cache = prefill_cache
        self.cache.layers = [
            SlabLayer(layer.keys, layer.values, row_capacity * layer.keys.shape[1] * columns * layer.keys.shape[3])
            for layer in layers
        ]

    def keep_rows(self, keep: list[int]) -> None:
        idx = torch.tensor(keep, device=self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            layer.batch_select_indices(idx)

    def add_rows(self, new_cache, attn: torch.Tensor, new_attn: torch.Tensor) -> torch.Tensor:
        """Append a prefilled cache's rows after the live ones, right-aligned; returns the merged mask."""
        for layer, new_layer in zip(self.cache.layers, new_cache.layers, strict=True):
            layer.add_rows({"keys": new_layer.keys, "values": new_layer.values})
        full = max(attn.shape[1], new_attn.shape[1])
        return torch.cat([_pad_left(attn, full - attn.shape[1]), _pad_left(new_attn, full - new_attn.shape[1])])

    def trim_left(self, attn: torch.Tensor) -> torch.Tensor:
        """Drop leading columns that are padding for every live row (they only cost time)."""
        used = attn.any(0).nonzero()
        cut = int(used[0]) if len(used) else 0
        if cut:
            for layer in self.cache.layers:
                layer.trim_left(cut)
            attn = attn[:, cut:]
        return attn


def _pad_left(t: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([t.new_zeros((t.shape[0], extra)), t], dim=1) if extra else t


_heap_tuned = False


def keep_freed_memory() -> None:
    """glibc only, once per process: serve allocations under 32 MiB from the heap and keep up to
    1 GiB of freed memory at its top, instead of returning it to the kernel and faulting it back in.

    Decoding frees and reallocates activations of similar sizes at every step; with glibc's
    defaults (a dynamic mmap threshold, heap trimming) the prefills of `bench generate`'s run
    (126 prompts) took ~800k page faults, with this ~50k (measured on the benchmark machine).
    The process keeps its peak heap instead of shrinking between batches.
    """
    global _heap_tuned
    if _heap_tuned:
        return
    _heap_tuned = True
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    libc.mallopt(m_mmap_threshold, 32 << 20)
    libc.mallopt(m_trim_threshold, 1 << 30)  # a C int: 2 GiB and over would wrap
