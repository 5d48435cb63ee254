"""A KV cache for continuous batching, written in place: one preallocated buffer per layer and tensor.

transformers' `DynamicLayer` concatenates every decode step (`torch.cat([keys, new])`), so each
step copies the whole cache into a fresh, one column longer block, and dropping a finished row
copies it again. On CPU the fresh blocks are first-touch page faults (a batch of 64 rows on the
2-core benchmark machine spent more time faulting than computing once the cache passed ~60
columns) and the copies alone were ~12 % of a `bench generate` run.

Here each layer owns buffers `[row_capacity, kv_heads, columns, head_dim]` (rows: what the batch
can still take, lowered as the engine's queue empties; columns: the window plus `slack`); every
row's cache is one contiguous block of it, all rows share the column geometry. The live rows are `[:rows]`, the
live columns the window `[lo, hi)`:

- a decode step writes column `hi` of the live rows (`update`, called by the model), then the
  window grows by one (`advance`);
- finished rows are removed by moving the last live rows into their slots (`keep_rows`), so
  only those rows are copied;
- new prompts' caches are written into the next rows, right-aligned with the window
  (`add_rows`); the shorter side's columns are hidden by the attention mask;
- leading columns that no live row uses any more leave the window (`trim_left`).

The attention runs over every column of the live rows (the model gets `[:rows]` of the buffers,
contiguous, which the CPU's bf16 batched matmul needs: on a strided window it copies
internally, ~2x slower) with a 4-D mask (`step_mask`) that shows each row its own columns only.
So the buffers are kept tight: when the window reaches the right edge it moves into a buffer
of its width plus `slack` columns. Buffers start zeroed and are only written with finite
values, so hidden columns never hold NaN.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicLayer

from potstill.errors import PotstillError

SLACK = 32  # free columns a new buffer gets to the right of the window


def sliding_window(model) -> int | None:
    """The window of a model's sliding-window attention layers (Gemma 3: 512), None when it has none."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        return getattr(config, "sliding_window", None)
    return None


class SlabLayer(DynamicLayer):
    """One layer's keys and values in preallocated buffers; geometry (rows, lo, hi) kept by SlabCache."""

    def __init__(self, slab: SlabCache, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.slab = slab
        self.device = keys.device
        self.is_initialized = True
        self.kbuf = keys.new_zeros((slab.row_capacity, keys.shape[1], slab.columns, keys.shape[3]))
        self.vbuf = values.new_zeros((slab.row_capacity, values.shape[1], slab.columns, values.shape[3]))
        self._views()

    def _views(self) -> None:
        self.keys = self.kbuf[: self.slab.rows]
        self.values = self.vbuf[: self.slab.rows]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        slab = self.slab
        if key_states.shape[0] != slab.rows or key_states.shape[2] != 1:
            raise PotstillError(f"KV slab: a decode step writes one column of {slab.rows} rows, "
                                f"got {tuple(key_states.shape)}")
        self.kbuf[: slab.rows, :, slab.hi : slab.hi + 1] = key_states
        self.vbuf[: slab.rows, :, slab.hi : slab.hi + 1] = value_states
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.slab.hi - self.slab.lo

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise PotstillError("KV slab: rows are removed with SlabCache.keep_rows")


class SlabCache:
    """The engine's handle on a model cache whose layers are `SlabLayer`s (`.cache` goes to the model)."""

    def __init__(self, prefill_cache, attn: torch.Tensor, row_capacity: int, max_len: int, slack: int = SLACK,
                 window: int | None = None):
        layers = prefill_cache.layers
        for layer in layers:  # sliding-window layers are full attention while every sequence fits the window
            own = getattr(layer, "sliding_window", None)
            if type(layer) is DynamicLayer or (isinstance(layer, DynamicLayer) and own and max_len <= own):
                continue
            raise PotstillError(f"batched decoding needs full-attention KV caches: {type(layer).__name__}"
                                + (f" with a {own}-token window < prompt + new tokens ({max_len})" if own else ""))
        self.slack = slack
        self.window = window  # the model's sliding-window layers (full caches here): masked in `step_mask`
        self.row_capacity = max(row_capacity, attn.shape[0])
        width = attn.shape[1]
        self.rows, self.lo, self.hi, self.columns = 0, width, width, width + slack  # empty window
        self.cache = prefill_cache
        self.cache.layers = [SlabLayer(self, layer.keys, layer.values) for layer in layers]
        self.add_rows(_Cache(layers), attn.new_zeros((0, 0)), attn)  # the prefill's rows come in like any others

    @property
    def layers(self) -> list[SlabLayer]:
        return self.cache.layers

    def _rebuffer(self, columns: int, start: int) -> None:
        """Move the live window into fresh buffers of `columns` columns, starting at column `start`, and
        `row_capacity` rows (the engine lowers it as its queue empties)."""
        width = self.hi - self.lo
        rows = max(self.rows, self.row_capacity)
        for layer in self.layers:
            for name in ("kbuf", "vbuf"):
                old = getattr(layer, name)
                new = old.new_zeros((rows, old.shape[1], columns, old.shape[3]))
                new[: self.rows, :, start : start + width] = old[: self.rows, :, self.lo : self.hi]
                setattr(layer, name, new)
        self.columns, self.lo, self.hi = columns, start, start + width
        self._views()

    def _views(self) -> None:
        for layer in self.layers:
            layer._views()

    def step_mask(self, attn: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """Make room for one more column; the 4-D boolean mask over all buffer columns for a decode
        step, from the window-aligned 2-D mask `attn` (live rows x window + 1, new column included).

        With a sliding `window` (Gemma 3's local layers), a mask per layer type: those layers see
        each row's last `window` visible columns, the new one included (transformers' sliding mask)."""
        if self.hi + 1 > self.columns:
            self._rebuffer(self.hi - self.lo + self.slack, 0)
        mask = torch.zeros((self.rows, 1, 1, self.columns), dtype=torch.bool, device=attn.device)
        mask[:, 0, 0, self.lo : self.hi + 1] = attn.bool()
        if self.window is None:
            return mask
        local = mask
        if int(attn.sum(-1).max()) > self.window:
            local = mask & (mask.flip(-1).cumsum(-1).flip(-1) <= self.window)
        return {"full_attention": mask, "sliding_attention": local}

    def advance(self) -> None:
        """The decode step wrote column `hi`: it joins the window."""
        self.hi += 1

    def keep_rows(self, keep: list[int]) -> list[int]:
        """Keep the rows at positions `keep` (ascending); returns the new row order (old positions).

        Kept rows below the new row count stay where they are; the free slots among them are
        filled with the kept rows from above, so only those rows are copied.
        """
        n = len(keep)
        kept = set(keep)
        holes = [p for p in range(n) if p not in kept]
        movers = [p for p in keep if p >= n]
        order = list(range(n))
        for dst, src in zip(holes, movers, strict=True):
            order[dst] = src
        if holes:
            dev = self.layers[0].kbuf.device
            dst_t, src_t = torch.tensor(holes, device=dev), torch.tensor(movers, device=dev)
            for layer in self.layers:
                for buf in (layer.kbuf, layer.vbuf):
                    buf[dst_t, :, self.lo : self.hi] = buf[src_t, :, self.lo : self.hi]
        self.rows = n
        self._views()
        return order

    def add_rows(self, new_cache, attn: torch.Tensor, new_attn: torch.Tensor) -> torch.Tensor:
        """Write a prefilled cache's rows after the live ones, right-aligned; returns the merged mask."""
        m, new_width = new_attn.shape
        if new_width > self.hi or self.rows + m > self.layers[0].kbuf.shape[0]:  # no room on the left / below
            self.row_capacity = max(self.row_capacity, self.rows + m)
            width = max(self.hi - self.lo, new_width)
            self._rebuffer(width + self.slack, width - (self.hi - self.lo))
        start = self.hi - new_width
        for layer, new_layer in zip(self.layers, new_cache.layers, strict=True):
            layer.kbuf[self.rows : self.rows + m, :, start : self.hi] = new_layer.keys
            layer.vbuf[self.rows : self.rows + m, :, start : self.hi] = new_layer.values
        self.lo = min(self.lo, start)
        self.rows += m
        self._views()
        width = self.hi - self.lo
        return torch.cat([_pad_left(attn, width - attn.shape[1]), _pad_left(new_attn, width - new_width)])

    def trim_left(self, attn: torch.Tensor) -> torch.Tensor:
        """Drop leading window columns that are padding for every live row (they only cost time)."""
        used = attn.any(0).nonzero()
        cut = int(used[0]) if len(used) else 0
        if cut:
            self.lo += cut
            attn = attn[:, cut:]
        return attn


class _Cache:
    """A stand-in for a prefill cache whose layers were taken over (keys/values still readable)."""

    def __init__(self, layers):
        self.layers = layers


def _pad_left(t: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([t.new_zeros((t.shape[0], extra)), t], dim=1) if extra else t


def available_memory(device: torch.device) -> int | None:
    """Bytes still free for this process on `device`: a GPU's free memory, or Linux's MemAvailable
    for the CPU; None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def kv_bytes_per_token(cache) -> int:
    """Bytes one token of one row takes in a model cache: keys and values of every layer."""
    return sum(t[0, :, :1].numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def rows_that_fit(rows: int, max_len: int, token_bytes: int, available: int, prefill_tokens: int,
                  slack: int = SLACK, share: float = 0.8) -> int:
    """The most rows, at most `rows` and at least one, whose KV slab fits in `share` of `available`
    bytes: buffers of `max_len + slack` columns, held twice while the window moves into a new
    buffer, next to one prefill group's cache of `prefill_tokens` tokens."""
    budget = share * available - prefill_tokens * token_bytes
    per_row = 2 * (max_len + slack) * token_bytes
    return max(1, min(rows, int(budget // per_row)))


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
