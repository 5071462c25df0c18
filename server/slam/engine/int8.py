"""Int8 weights with one scale per output channel, for CPU decoding, where weight bytes bound a step.

Decode steps multiply the activations by the int8 weights directly: a quarter of float32's bytes, and the
activations stay far more precise than with dynamic int8 quantization, which rounds them to 8 bits too. With
slam's CPU ops built (cache/cpu_linear.cpp) the float32 rows of a step share one pass over the weights; else
aten's weight-only int8 kernel takes them in bfloat16 and costs each row nearly a pass. Prefill chunks
dequantize the weights and use float32 matrix products, where those kernels are slower (they cost each row
about the same, while a matrix product gets cheaper per row). The choice follows the step, never the number of
rows: both kernels give a row the same result in any batch, so a request decodes the same tokens alone or batched.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from slam.cache import cpu_kernels

_step = threading.local()


@contextlib.contextmanager
def decode_step():
    """Int8Linear layers called inside use the int8 kernel (decode rows), outside dequantize (prefill)."""
    before = getattr(_step, "decode", False)
    _step.decode = True
    try:
        yield
    finally:
        _step.decode = before


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, kernel: bool = False):
        super().__init__()
        self.kernel = kernel  # decode rows through cpu_kernels.int8_linear (else aten's kernel)
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)  # [out]
        self.register_buffer("weight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.bfloat16())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] float32 -> [..., out] float32
        rows = x.reshape(-1, self.in_features)
        if getattr(_step, "decode", False):
            if self.kernel:
                out = cpu_kernels.int8_linear(rows, self.weight, self.scale).to(x.dtype)
            else:
                out = torch.ops.aten._weight_int8pack_mm(rows.bfloat16(), self.weight, self.scale_bf16).to(x.dtype)
            out = out if self.bias is None else out + self.bias
        else:
            out = nn.functional.linear(rows, self.weight.to(x.dtype) * self.scale[:, None].to(x.dtype), self.bias)
        return out.view(*x.shape[:-1], self.out_features)


def quantize(module: nn.Module, kernel: bool = False) -> nn.Module:
    """Every nn.Linear inside `module` (or `module` itself) replaced by an Int8Linear, in place; kernel: decode
    rows through slam's CPU op (cpu_kernels.available() first)."""
    if isinstance(module, nn.Linear):
        return Int8Linear(module, kernel)
    for name, child in module.named_children():
        setattr(module, name, quantize(child, kernel))
    return module
