"""The weights' matrix products: as stored, prepacked for oneDNN (float32 on the CPU), or int8.

In float32 on the CPU a matrix reordered once at load into oneDNN's blocked layout and multiplied
by its prepacked kernel is 14% faster at batch 1, 23% at 16 and 20% in prefill than `F.linear`
on SmolLM2 (its LM head alone twice as fast), and keeps a row's reduction order whatever the
number of rows (the plain kernels switch to a matrix-vector product at one row).

An int8 matrix keeps one float scale per output row (weight-only, symmetric) and is multiplied by
torch's `_weight_int8pack_mm`, which reads the int8 weights directly. Its fast kernels take
bfloat16 activations, so float32 activations are cast to bfloat16 for those products (and back).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Int8Weight:
    """A [out, in] matrix as int8 rows and one bfloat16 scale per row."""

    values: torch.Tensor
    scales: torch.Tensor

    @staticmethod
    def of(weight: torch.Tensor) -> Int8Weight:
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        values = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8).contiguous()
        return Int8Weight(values, scales.to(torch.bfloat16))

    def numel(self) -> int:
        return self.values.numel() + self.scales.numel()


@dataclass(frozen=True)
class PackedWeight:
    """A [out, in] float32 matrix reordered once into oneDNN's blocked layout for its matmul
    (the layout inductor's CPU weight prepacking uses)."""

    packed: torch.Tensor

    @staticmethod
    def of(weight: torch.Tensor) -> PackedWeight:
        return PackedWeight(torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 16))

    def numel(self) -> int:
        return self.packed.numel()


def packs_weights(device: torch.device, dtype: torch.dtype) -> bool:
    """Float32 on the CPU multiplies by oneDNN's prepacked weights."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


Weight = torch.Tensor | Int8Weight | PackedWeight


def linear(x: torch.Tensor, weight: Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    if isinstance(weight, PackedWeight):
        out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight.packed, bias, "none", [], "")
        return out.view(*x.shape[:-1], out.shape[-1])
    if isinstance(weight, Int8Weight):
        rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        out = torch._weight_int8pack_mm(rows, weight.values, weight.scales).to(x.dtype)
        out = out.view(*x.shape[:-1], out.shape[-1])
        return out if bias is None else out + bias
    return F.linear(x, weight, bias)


def prepare(weight: torch.Tensor, quantize: str, device: torch.device, dtype: torch.dtype) -> Weight:
    """`weight` as the engine multiplies it: int8 when asked, else prepacked where that pays."""
    if quantize == "int8":
        return Int8Weight.of(weight)
    if packs_weights(device, dtype):
        return PackedWeight.of(weight)
    return weight


def tensors_of(weight: Weight | None) -> tuple[torch.Tensor, ...]:
    """The tensors holding `weight`'s memory."""
    if isinstance(weight, Int8Weight):
        return weight.values, weight.scales
    if isinstance(weight, PackedWeight):
        return (weight.packed,)
    return () if weight is None else (weight,)


def unique_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of `tensors`, each counted once however often it appears."""
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())
