"""The linear layer of every projection: a float weight, or weight-only quantized (int8, int4)."""

from typing import Optional

import torch
from torch import nn

from mistral import kernels
from mistral.args import QuantArgs


class Linear(nn.Module):
    """y = x W^T, W: [out, in] (a Mixtral layer stacks its experts': [E, out, in]).

    Quantized (`mistral quantize`), so that a decode step, which reads every weight once, reads fewer bytes:
    - int8: weight int8 [out, in] and one scale per output row, scales [out]: W = weight * scales[..., None].
    - int4: weight uint8 [out, in / 2], two 4-bit codes q in 0..15 a byte, column 2j in its low nibble
      and column 2j + 1 in its high nibble; per group of group_size consecutive input columns a scale
      and a minimum, scales and mins [out, in / group_size]: W[:, k] = q[:, k] * scale + min of k's group.
    The scales (and mins) are written in float32 and held in the model's dtype (a bfloat16 model
    rounds each by at most 2^-9 of itself, well below a step of the codes).
    """

    def __init__(self, in_features: int, out_features: int, *, experts: int = 0, quantization: Optional[QuantArgs] = None):
        super().__init__()
        rows = (experts, out_features) if experts else (out_features,)
        self.register_parameter("scales", None)
        self.register_parameter("mins", None)
        if quantization is None:
            self.weight = nn.Parameter(torch.empty(*rows, in_features).normal_(std=in_features**-0.5))
        elif quantization.method == "int8":
            self.weight = nn.Parameter(torch.zeros(*rows, in_features, dtype=torch.int8), requires_grad=False)
            self.scales = nn.Parameter(torch.ones(rows))
        else:
            group = quantization.group_size
            assert group is not None and in_features % group == 0  # ModelArgs and check_tensor_split see to it
            self.weight = nn.Parameter(torch.zeros(*rows, in_features // 2, dtype=torch.uint8), requires_grad=False)
            self.scales = nn.Parameter(torch.ones(*rows, in_features // group))
            self.mins = nn.Parameter(torch.zeros(*rows, in_features // group))

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        """x W^T; of norm(x) when given (an RMSNorm)."""
        x, fused = self._norm(x, norm)
        rows = x.flatten(0, -2)
        if fused is not None:
            return kernels.linear(rows, self.weight, self.scales, self.mins, fused.weight, fused.eps).view(*x.shape[:-1], -1)
        if kernels.linear_applies(rows, self.scales):
            return kernels.linear(rows, self.weight, self.scales, self.mins).view(*x.shape[:-1], -1)
        return nn.functional.linear(x, self.weight)

    def _norm(self, x: torch.Tensor, norm: Optional[nn.Module]) -> tuple[torch.Tensor, Optional[nn.Module]]:
        """(x, the norm that the product takes in), or (norm(x), None) where it does not."""
        # The matrix-vector kernel (one half-precision row on CUDA) takes in the norm for quantized
        # weights only. On an H100 (scripts/bench.py, batch 1) that cut Mistral int8's step
        # from 3.69 to 3.59 ms, but a bfloat16 step, whose products already read at the copy
        # rate, went from 5.39 to 5.45 ms: there the norm's own small kernel costs less than
        # the extra reads and sums it puts in every program of the product.
        if norm is None:
            return x, None
        if self.scales is not None and kernels.linear_fuses(x.flatten(0, -2)) and _unhooked(norm):
            return x, norm
        return norm(x), None


class GatedLinear(Linear):
    """SwiGLU's gate: silu(x W1^T) * (x W3^T), with W = W1 | W3 one matrix [2F, D] (w1 | w3).

    Where kernels.linear_fuses (one half-precision row on CUDA) the product and the gate are
    one matrix-vector kernel, which reads a row of W1 and its row of W3 together.
    """

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        """silu(norm(x) W1^T) * (norm(x) W3^T) (of x without a norm): [..., F]."""
        x, fused = self._norm(x, norm)
        rows = x.flatten(0, -2)
        if not kernels.linear_fuses(rows):
            return kernels.swiglu(super().forward(x))
        weight, eps = (None, 0.0) if fused is None else (fused.weight, fused.eps)
        return kernels.linear(rows, self.weight, self.scales, self.mins, weight, eps, glu=True).view(*x.shape[:-1], -1)


def _unhooked(module: nn.Module) -> bool:
    """Whether calling the module is its forward alone: a fused norm must not skip someone's hook."""
    return not (module._forward_hooks or module._forward_pre_hooks)


def quantize(w: torch.Tensor, quantization: QuantArgs) -> dict[str, torch.Tensor]:
    """A float weight [..., out, in] as its quantized Linear's tensors: weight and scales (and int4's mins)."""
    if quantization.method == "int8":
        return dict(zip(("weight", "scales"), quantize_int8(w)))
    assert quantization.group_size is not None
    return dict(zip(("weight", "scales", "mins"), quantize_int4(w, quantization.group_size)))


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q int8 [..., out, in], scales float32 [..., out]), w ~ q * scales[..., None].

    Symmetric, one scale per output row: s = max|W_row| / 127, q = round(W / s).
    """
    w = w.float()
    scales = w.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / scales[..., None]).clamp(-127, 127).to(torch.int8), scales


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (packed uint8 [..., out, in / 2], scales, mins float32 [..., out, in / group_size]).

    Asymmetric, per group of group_size consecutive input columns: its range [min, max] in 16
    levels, s = (max - min) / 15, q = round((W - min) / s) in 0..15, W ~ q * s + min, each
    weight within s / 2. Asymmetric (a minimum per group, as gpt-fast's int4 has a zero per
    group) rather than symmetric (codes -7..7, s = max|W| / 7): its step is at most 14/15 of
    the symmetric one, and half of it for a group that lies on one side of zero, for a
    second number per group (held in bfloat16 on the GPU: 2 bytes beside a group of 128's 64).
    """
    groups = w.float().unflatten(-1, (-1, group_size))  # [..., out, in / G, G]
    mins, maxs = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((maxs - mins) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((groups - mins[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).flatten(-2)
    return q[..., 0::2] | (q[..., 1::2] << 4), scales, mins
