"""Chunk bounds of the slam reserve (two-stage selection): per `chunk` reserve tokens, the element-wise
minimum and maximum of their scoring keys, kept on the compute device in step with the reserve. A mixin of
the slot pool (engine/pool.py), which owns the buffers (smin, smax, sscale) and the reserve they summarize.

Bounds are int8 with one scale per chunk and KV head, rounded outward (minimum down, maximum up), so they
still bound every key of their chunk: a quarter of the bytes of bfloat16 bounds, which otherwise are the
largest part of a long request's device memory when the reserve lives in host memory.
"""

from __future__ import annotations

import torch

OUTWARD = 1 + 2**-10  # the scale's margin: |x| / scale stays below 127 after rounding the division


def quantize_bounds(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float bounds lo <= hi [..., head_dim] -> int8 (lo_q, hi_q) and scale [...] with lo_q * scale <= lo and
    hi_q * scale >= hi."""
    scale = _scale(torch.maximum(lo.abs().amax(dim=-1), hi.abs().amax(dim=-1)))
    s = scale.unsqueeze(-1)
    return _int8((lo.float() / s).floor()), _int8((hi.float() / s).ceil()), scale


def _scale(largest: torch.Tensor) -> torch.Tensor:
    """The scale of bounds whose largest magnitude is `largest`, with the outward margin."""
    return largest.float().clamp_min(1e-30) * (OUTWARD / 127)


def _int8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-127, 127).to(torch.int8)  # the margin keeps values inside; the clamp guards the cast


class ChunkBounds:
    def bounds_of(self, layer: int, slots: slice, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Chunks [0, chunks) of `slots`: (smin, smax) [slots, kv_heads, chunks, head_dim] int8 and their
        scales [slots, kv_heads, chunks] (selection.dequantize_bounds turns them into float bounds)."""
        part = (slots, slice(None), slice(0, chunks))
        return self.smin[layer][part], self.smax[layer][part], self.sscale[layer][part]

    def summarize_append(self, layer: int, at: torch.Tensor, keys: torch.Tensor) -> None:
        """Fold one new scoring key of each of slots [0, b) into its chunk's bounds; at: [b] reserve index
        (the scratch index for slots that append nothing), keys: [b, kv_heads, head_dim]."""
        if self.cpu_kernels:  # the same arithmetic in one C++ op (cache/cpu_writes.cpp)
            torch.ops.slam_cpu.summarize_append(self.smin[layer], self.smax[layer], self.sscale[layer], at, keys,
                                                self.chunk, OUTWARD / 127)
            return
        b = keys.shape[0]
        c = (at // self.chunk).view(b, 1, 1).expand(b, self.kv_heads, 1)
        cd = c.unsqueeze(-1).expand(b, self.kv_heads, 1, self.head_dim)
        first = (at % self.chunk == 0).view(b, 1, 1)  # a chunk's first token replaces what was there
        keys = keys.float()
        kmax = _scale(keys.abs().amax(dim=-1, keepdim=True))  # [b, kv_heads, 1]
        # One gather and one scatter per buffer: advanced indexing would launch several kernels each.
        old_s = self.sscale[layer][:b].gather(2, c)
        scale = torch.where(first, kmax, torch.maximum(old_s, kmax))
        keep = (~first & (scale == old_s)).unsqueeze(-1)  # same scale: the stored integers stay exact
        s = scale.unsqueeze(-1)
        k = keys.unsqueeze(2)  # [b, kv_heads, 1, head_dim]
        for buf, fold, rnd in ((self.smin, torch.minimum, torch.floor), (self.smax, torch.maximum, torch.ceil)):
            old = buf[layer][:b].gather(2, cd)
            new_q = rnd(k / s)
            grown = rnd(fold(old * old_s.unsqueeze(-1), k) / s)  # the scale grew: requantize, outward
            q = torch.where(first.unsqueeze(-1), new_q, torch.where(keep, fold(old.float(), new_q), grown))
            buf[layer][:b].scatter_(2, cd, _int8(q))
        self.sscale[layer][:b].scatter_(2, c, scale)

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
        lo = torch.where(some, keys.masked_fill(~stored, float("inf")).amin(dim=3), 0)
        hi = torch.where(some, keys.masked_fill(~stored, float("-inf")).amax(dim=3), 0)
        self.smin[layer][chunks], self.smax[layer][chunks], self.sscale[layer][chunks] = quantize_bounds(lo, hi)
