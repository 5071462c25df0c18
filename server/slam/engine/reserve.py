"""Reads of the slam reserve (engine/pool.py's reserve tier): its keys and values whole, by slot and index
range, or by rows, dequantized where the reserve is int8 and on the compute device wherever it lives; and
the int8 scoring keys CPUs score. A mixin of the slot pool, which owns the buffers (rk, rv and their scales,
rks, rq and rq_scale) and writes them.
"""

from __future__ import annotations

import torch


class ReserveReads:
    def int8_keys(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's int8 scoring keys and their scales: an int8 reserve's own keys, else the copies."""
        return (self.rk[layer], self.rk_scale[layer]) if self.reserve_int8 else (self.rq[layer], self.rq_scale[layer])

    def scoring_int8(self, layer: int, b: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Int8 scoring keys of slots [0, b) at reserve indices [0, span) and their scales (CPUs)."""
        keys, scales = self.int8_keys(layer)
        return keys[:b, :, :span], scales[:b, :, :span]

    def scoring_int8_rows(self, layer: int, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 scoring keys [b, kv_heads, m, head_dim] and scales [b, kv_heads, m] of reserve indices idx
        [b, kv_heads, m] of slots [0, b) (CPUs)."""
        keys, scales = self.int8_keys(layer)
        rows = self.reserve_rows(idx)
        k = keys.view(-1, self.head_dim).index_select(0, rows).view(*idx.shape, -1)
        return k, scales.view(-1).index_select(0, rows).view(idx.shape)

    def reserve_keys_store(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The layer's scoring keys as stored, [slots, kv_heads, cap + 1, head_dim] on the compute device
        (a pinned host reserve through its alias), and their float32 scales [slots, kv_heads, cap + 1] where
        they are int8 (else None): what cache/fused_dots.py reads."""
        if self.cache_positions:
            return self.rks[layer], None
        return self.rk[layer], self.rk_scale[layer] if self.reserve_int8 else None

    def reserve_keys(self, layer: int, scoring: bool = False) -> torch.Tensor:
        """Reserve keys [slots, kv_heads, cap + 1, head_dim] in the compute dtype, on the compute device."""
        if scoring and self.cache_positions:
            return self.rks[layer].to(self.device, non_blocking=True)
        return self._dequant(self.rk, self.rk_scale, layer)

    def reserve_rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Flat row numbers of reserve indices `idx` [b, kv_heads, m] of slots [0, b) -> [b * kv_heads * m]."""
        return (self.heads_base[: idx.shape[0]] * (self.cap + 1) + idx).view(-1)

    def reserve_gather(self, layer: int, idx: torch.Tensor, which: str,
                       rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `idx` [b, kv_heads, m] of slots [0, b) of the reserve's keys ("k"), values ("v") or
        scoring keys ("ks") -> [b, kv_heads, m, head_dim] in the compute dtype. Only these rows are read
        (and dequantized), wherever the reserve lives; `rows`: reserve_rows(idx) when already known."""
        if which == "ks" and not self.cache_positions:
            which = "k"
        store, scale = {"k": (self.rk, self.rk_scale), "v": (self.rv, self.rv_scale), "ks": (self.rks, [])}[which]
        rows = (self.reserve_rows(idx) if rows is None else rows).to(store[layer].device)
        x = store[layer].view(-1, self.head_dim).index_select(0, rows).to(self.device).view(*idx.shape, -1)
        if scale and self.reserve_int8:
            return self._scaled(x, scale[layer].view(-1).index_select(0, rows).to(self.device).view(idx.shape))
        return x

    def reserve_values(self, layer: int) -> torch.Tensor:
        return self._dequant(self.rv, self.rv_scale, layer)

    def reserve_keys_at(self, layer: int, part: tuple) -> torch.Tensor:
        return self._dequant(self.rk, self.rk_scale, layer, part)

    def reserve_values_at(self, layer: int, part: tuple) -> torch.Tensor:
        return self._dequant(self.rv, self.rv_scale, layer, part)

    def _dequant(self, store, scale, layer: int, part: tuple = (slice(None),)) -> torch.Tensor:
        x = store[layer][part].to(self.device, non_blocking=True)
        if self.reserve_int8:
            return self._scaled(x, scale[layer][part].to(self.device, non_blocking=True))
        return x

    def _scaled(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """int8 rows [..., head_dim] times their scales [...]: float32 products, then the compute dtype (the
        placement kernel of cache/fused.py dequantizes alike)."""
        return (x.float() * s.unsqueeze(-1)).to(self.dtype)
