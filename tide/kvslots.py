"""Preallocated KV caches for a batch of requests: one slot per request, per-row lengths.

A slot holds one request's keys and values for up to `capacity` positions. A batched pass writes
each row's new entries at that row's own positions and attends over the first T positions of
every slot (T: the longest row plus the pass), with a mask that hides what a row does not hold.
Rolling a row back is setting its length (what lies beyond is masked and later overwritten), so
nothing is concatenated per step and only the new entries are copied in; a kept tree path is
moved down in place.

    SlotKV       one attention layer's buffers (slots, kv_heads, capacity, head_dim)
    SlotCache    the target's: a transformers Cache whose update() writes a planned pass
    HeadSlots    the draft head's one layer, with a DraftCache-like view per row or per batch

Buffers start at zero and only ever hold finite values: a masked entry weighs 0 in attention,
and 0 * NaN would not be 0.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


class SlotKV:
    def __init__(self, slots: int, heads: int, capacity: int, head_dim: int, dtype, device="cpu"):
        self.k = torch.zeros(slots, heads, capacity, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def write(self, rows: list[int], starts: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v: (B, heads, n, d): row i's n entries go to slot rows[i] at starts[i] onwards. One
        slice copy per row (a scatter over the batch is ~20x slower on CPUs)."""
        n = k.shape[2]
        for i, (r, s) in enumerate(zip(rows, starts)):
            self.k[r, :, s : s + n] = k[i]
            self.v[r, :, s : s + n] = v[i]

    def write_packed(self, rows: list[int], starts: list[int], widths: list[int], k: torch.Tensor,
                     v: torch.Tensor) -> None:
        """k, v: (1, heads, N, d), the rows' segments in order: rows[i]'s widths[i] entries go
        to its slot at starts[i] onwards."""
        o = 0
        for r, s, w in zip(rows, starts, widths):
            self.k[r, :, s : s + w] = k[0, :, o : o + w]
            self.v[r, :, s : s + w] = v[0, :, o : o + w]
            o += w

    def read(self, rows: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` positions of slots `rows`: a view where they are contiguous."""
        if rows == list(range(rows[0], rows[0] + len(rows))):
            index = slice(rows[0], rows[0] + len(rows))
        else:
            index = torch.tensor(rows, dtype=torch.long, device=self.k.device)
        return self.k[index, :, :length], self.v[index, :, :length]

    def keep(self, slot: int, start: int, rows: list[int]) -> None:
        """Move entries start + rows[i] to start + i (a tree's accepted path)."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.k.device) + start
        end = start + len(rows)
        self.k[slot, :, start:end] = self.k[slot, :, idx]
        self.v[slot, :, start:end] = self.v[slot, :, idx]

    def move(self, src: int, dst: int, length: int) -> None:
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


class SlotCache(Cache):
    """The target's KV cache for a batch. `plan` says where the next forward writes; the model's
    attention layers then call update(), which writes there and returns every row's first
    `length` positions."""

    def __init__(self, layers: int, slots: int, heads: int, capacity: int, head_dim: int, dtype, device="cpu"):
        super().__init__(layers=[])
        self.kv = [SlotKV(slots, heads, capacity, head_dim, dtype, device) for _ in range(layers)]
        self.slots, self.capacity = slots, capacity
        self._rows, self._starts, self._length, self._widths = [], [], 0, None

    @classmethod
    def for_model(cls, config, slots: int, capacity: int, dtype, device="cpu") -> SlotCache:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(config.num_hidden_layers, slots, heads, capacity, head_dim, dtype, device)

    @staticmethod
    def slot_bytes(config, capacity: int, dtype) -> int:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return 2 * config.num_hidden_layers * heads * capacity * head_dim * torch.empty(0, dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(kv.nbytes for kv in self.kv)

    def plan(self, rows: list[int], starts: list[int], n: int, length: int) -> None:
        """The next forward writes its (B, n) inputs to slots `rows` from positions `starts`
        onwards and attends over positions < length."""
        if max(starts) + n > self.capacity:
            raise ValueError(f"position {max(starts) + n - 1} is past the cache's {self.capacity}")
        self._rows, self._starts, self._length, self._widths = rows, starts, length, None

    def plan_packed(self, rows: list[int], starts: list[int], widths: list[int], length: int) -> None:
        """The next forward is packed (tide.models.Packed): (1, sum(widths)) inputs, row i's
        segment written to slot rows[i] from starts[i]; attention reads slots 0..max(rows) up
        to `length`, each token its own row's."""
        if max(s + w for s, w in zip(starts, widths)) > self.capacity:
            raise ValueError(f"position {max(s + w for s, w in zip(starts, widths)) - 1} is past the cache's "
                             f"{self.capacity}")
        self._rows, self._starts, self._length, self._widths = rows, starts, length, widths

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        kv = self.kv[layer_idx]
        if self._widths is not None:
            kv.write_packed(self._rows, self._starts, self._widths, key_states, value_states)
            top = max(self._rows) + 1
            return kv.k[:top, :, : self._length], kv.v[:top, :, : self._length]
        kv.write(self._rows, self._starts, key_states, value_states)
        return kv.read(self._rows, self._length)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._length

    def keep(self, slot: int, start: int, rows: list[int]) -> None:
        for kv in self.kv:
            kv.keep(slot, start, rows)

    def move(self, src: int, dst: int, length: int) -> None:
        for kv in self.kv:
            kv.move(src, dst, length)


class HeadSlots:
    """The draft head's KV cache for a batch (its one layer) and each slot's length."""

    def __init__(self, slots: int, heads: int, capacity: int, head_dim: int, dtype, device="cpu"):
        self.kv = SlotKV(slots, heads, capacity, head_dim, dtype, device)
        self.lengths = [0] * slots

    @classmethod
    def for_head(cls, head, slots: int, capacity: int) -> HeadSlots:
        c = head.config
        return cls(slots, c.num_key_value_heads, capacity, c.head_dim, head.fc.weight.dtype, head.fc.weight.device)

    def batch(self, rows: list[int], starts: list[int], length: int) -> _HeadBatch:
        return _HeadBatch(self, rows, starts, length)

    def row(self, slot: int) -> _HeadRow:
        return _HeadRow(self, slot)

    def move(self, src: int, dst: int) -> None:
        self.kv.move(src, dst, self.lengths[src])
        self.lengths[dst] = self.lengths[src]


class _HeadBatch:
    """DraftCache's append() for one batched head call: rows write from starts, read < length.
    The slots' lengths are the caller's to set."""

    def __init__(self, slots: HeadSlots, rows: list[int], starts: list[int], length: int):
        self.slots, self.rows, self.starts, self.length = slots, rows, starts, length

    def append(self, k, v):
        self.slots.kv.write(self.rows, self.starts, k, v)
        return self.slots.kv.read(self.rows, self.length)


class _HeadRow:
    """One slot of the head's cache as a DraftCache (append at its end, crop), for the code
    that drafts for one request (tide.tree.propose_tree)."""

    def __init__(self, slots: HeadSlots, slot: int):
        self.slots, self.slot = slots, slot

    def __len__(self) -> int:
        return self.slots.lengths[self.slot]

    def append(self, k, v):
        n, T = len(self), k.shape[2]
        self.slots.kv.write([self.slot], [n], k, v)
        self.slots.lengths[self.slot] = n + T
        return self.slots.kv.read([self.slot], n + T)

    def crop(self, length: int) -> None:
        self.slots.lengths[self.slot] = min(self.slots.lengths[self.slot], length)
