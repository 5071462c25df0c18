"""Chunk bounds of the slam reserve (two-stage selection): per `chunk` reserve tokens, the element-wise
minimum and maximum of their scoring keys, kept on the compute device in step with the reserve. A mixin of
the slot pool (engine/pool.py), which owns the buffers (smin, smax) and the reserve they summarize."""

from __future__ import annotations

import torch


class ChunkBounds:
    def summarize_append(self, layer: int, at: torch.Tensor, keys: torch.Tensor) -> None:
        """Fold one new scoring key of each of slots [0, b) into its chunk's bounds; at: [b] reserve index
        (the scratch index for slots that append nothing), keys: [b, kv_heads, head_dim]."""
        b = keys.shape[0]
        c = (at // self.chunk).view(b, 1, 1, 1).expand(b, self.kv_heads, 1, self.head_dim)
        first = (at % self.chunk == 0).view(b, 1, 1, 1)  # a chunk's first token replaces what was there
        keys = keys.unsqueeze(2)  # [b, kv_heads, 1, head_dim]
        for bounds, fold in ((self.smin, torch.minimum), (self.smax, torch.maximum)):
            # One gather and one scatter per bound: advanced indexing would launch several kernels each.
            old = bounds[layer][:b].gather(2, c)
            bounds[layer][:b].scatter_(2, c, torch.where(first, keys, fold(old, keys)))

    @torch.inference_mode()
    def summarize(self, layer: int, slot: int, lo: int, hi: int) -> None:
        """Recompute the bounds of the chunks holding reserve tokens [lo, hi) of `slot` (tokens below hi
        are stored, none from hi on)."""
        if not self.two_stage or hi <= lo:
            return
        c0, c1 = lo // self.chunk, -(-hi // self.chunk)
        part = (slice(slot, slot + 1), slice(None), slice(c0 * self.chunk, c1 * self.chunk))
        stored = torch.arange(c0 * self.chunk, c1 * self.chunk, device=self.device) < hi
        self._set_bounds(layer, part, stored.view(1, -1))

    def _rebuild_bounds(self, n: int) -> None:
        """Bounds of every slot's chunks over reserve indices [0, n), n a multiple of the chunk."""
        part = (slice(None), slice(None), slice(0, n))
        for layer in range(self.layers):
            self._set_bounds(layer, part, self.rpos[:, :n] >= 0)

    def _set_bounds(self, layer: int, part: tuple, stored: torch.Tensor) -> None:
        """Bounds of the chunks that reserve rows `part` (slots, all heads, a chunk-aligned range) cover,
        over the rows `stored` [slots, rows] marks; a chunk with none stored gets zero bounds, not infinities."""
        keys = self.rks[layer][part].to(self.device) if self.cache_positions else self.reserve_keys_at(layer, part)
        keys = keys.unflatten(2, (-1, self.chunk))  # [slots, kv_heads, chunks, chunk, head_dim]
        stored = stored.view(stored.shape[0], 1, -1, self.chunk, 1)
        some = stored.any(dim=3)
        chunks = (part[0], part[1], slice(part[2].start // self.chunk, part[2].stop // self.chunk))
        for bounds, fill, reduce in ((self.smin, float("inf"), torch.amin), (self.smax, float("-inf"), torch.amax)):
            bounds[layer][chunks] = torch.where(some, reduce(keys.masked_fill(~stored, fill), dim=3), 0)
