"""One decoder layer of the model, rebuilt for the engine: fused projections and a fused RMSNorm on GPUs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def fused_linear(*parts: nn.Linear) -> nn.Linear:
    """One Linear computing several projections of the same input (one matrix product instead of three)."""
    w = torch.cat([p.weight for p in parts])
    bias = None if parts[0].bias is None else torch.cat([p.bias for p in parts])
    out = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    out.weight.data.copy_(w)
    if bias is not None:
        out.bias.data.copy_(bias)
    return out


class RMSNorm(nn.Module):
    """The model's RMSNorm as one fused kernel (on CUDA; the CPU keeps the model's own, bit for bit)."""

    def __init__(self, hf_norm: nn.Module):
        super().__init__()
        self.hf_norm, self.weight = hf_norm, hf_norm.weight
        self.eps = getattr(hf_norm, "variance_epsilon", getattr(hf_norm, "eps", 1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda":
            return self.hf_norm(x)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Layer(nn.Module):
    def __init__(self, hf_layer: nn.Module):
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.input_norm, self.post_norm = RMSNorm(hf_layer.input_layernorm), RMSNorm(hf_layer.post_attention_layernorm)
        self.qkv = fused_linear(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o = attn.o_proj
        self.gate_up = fused_linear(mlp.gate_proj, mlp.up_proj)
        self.down = mlp.down_proj
        self.act = mlp.act_fn
        self.silu = getattr(getattr(mlp, "config", None), "hidden_act", None) in ("silu", "swish")
        self.q_norm = getattr(attn, "q_norm", None)  # Qwen3 normalizes queries and keys per head
        self.k_norm = getattr(attn, "k_norm", None)

    def qkv_heads(self, x: torch.Tensor, q_heads: int, kv_heads: int, d: int):
        # x: [n, hidden] -> q [n, q_heads, d], k and v [n, kv_heads, d]
        q, k, v = self.qkv(self.input_norm(x)).split([q_heads * d, kv_heads * d, kv_heads * d], dim=-1)
        q, k, v = q.unflatten(-1, (q_heads, d)), k.unflatten(-1, (kv_heads, d)), v.unflatten(-1, (kv_heads, d))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(self.post_norm(x)).chunk(2, dim=-1)
        return self.down(self.act(gate) * up)
