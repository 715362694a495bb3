"""QLoRA's base: the frozen matrices of every block held in 4 bits while adapters train on top (Dettmers et al. 2023).

Each bias-free projection of the blocks (adapted or not; the MoE router and expert stacks excepted) is quantized
with infer/quantize.py's int4 quantizer (asymmetric, per group of input features) and kept packed, two values a
byte, with bf16 scales and zero points: about 0.56 bytes per weight against fp32's 4. Its forward dequantizes the
weight for the one matmul and lets it go; backward dequantizes again and returns the gradient for the input only
(the base is frozen), so no float copy of a frozen matrix outlives its use. The adapters and everything else stay
as they were (fp32).

Quantization belongs to training here: a QLoRA checkpoint references its float base, and loading merges the
adapters into that float base (as PEFT's merge_and_unload after loading the base in 16 bits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fermion.infer.quantize import dequantize_int4, int4_group_size, quantize_int4
from fermion.model.lora import LoRALinear
from fermion.model.transformer import Transformer

QLORA_GROUP = 64  # QLoRA's block size


def group_size_for(in_features: int) -> int:
    """The inference quantizer's choice up to QLoRA's 64 (64, else 32); below the kernels' sizes, which QLoRA's own
    matmul does not need, 16, else one group a row."""
    return int4_group_size(in_features, QLORA_GROUP) or (16 if in_features % 16 == 0 else in_features)


class _FrozenMatmul(torch.autograd.Function):
    """y = x W^T for a packed 4-bit W; the gradient reaches x only."""

    @staticmethod
    def forward(ctx, x, packed, scales, zeros, group_size):
        ctx.save_for_backward(packed, scales, zeros)
        ctx.group_size, ctx.x_dtype = group_size, x.dtype
        return F.linear(x, unpacked(packed, scales, zeros, group_size).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight = unpacked(*ctx.saved_tensors, ctx.group_size).to(grad.dtype)
        return (grad @ weight).to(ctx.x_dtype), None, None, None, None


def unpacked(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 weight [N, K] from two 4-bit values a byte (even columns in the high nibble)."""
    q = torch.stack([packed >> 4, packed & 15], dim=-1).view(packed.shape[0], -1)[:, :scales.shape[1] * group_size]
    return dequantize_int4(q, scales.float(), zeros.float(), group_size)


class Int4Frozen(nn.Module):
    """A frozen bias-free projection stored in 4 bits (see the module docstring)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size_for(self.in_features)
        q, scales, zeros = quantize_int4(weight.detach(), self.group_size)
        if self.in_features % 2:  # an odd row gets one unused nibble
            q = F.pad(q, (0, 1))
        self.register_buffer("packed", (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8))
        self.register_buffer("scales", scales.to(torch.bfloat16))
        self.register_buffer("zeros", zeros.to(torch.bfloat16))

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (a new fp32 tensor each time)."""
        return unpacked(self.packed, self.scales, self.zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FrozenMatmul.apply(x, self.packed, self.scales, self.zeros, self.group_size)


def quantize_frozen(model: Transformer) -> Transformer:
    """Swap every frozen bias-free projection of the blocks (an adapter's base included) for its 4-bit form, in
    place; the float weights are released."""
    for module in list(model.blocks.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear) and type(child.base) is nn.Linear:
                child.base = Int4Frozen(child.base.weight)
            elif type(child) is nn.Linear and child.bias is None and name != "router":
                setattr(module, name, Int4Frozen(child.weight))
    return model
