"""The linear layer of every projection: a float weight, or int8 with one scale per output row."""

from typing import Optional

import torch
from torch import nn

from mistral import kernels


class Linear(nn.Module):
    """y = x W^T, W: [out, in] (a Mixtral layer stacks its experts': [E, out, in]).

    Quantized (weight-only int8, `mistral quantize`): W = weight * scales[..., None], with
    weight int8 and one scale per output row, so a decode step reads 1 byte per weight.
    The scales are written in float32 and held in the model's dtype (a bfloat16 model
    rounds each row's scale by at most 2^-9, well below int8's own rounding).
    """

    def __init__(self, in_features: int, out_features: int, *, experts: int = 0, quantized: bool = False):
        super().__init__()
        shape = (experts, out_features, in_features) if experts else (out_features, in_features)
        if quantized:
            self.weight = nn.Parameter(torch.zeros(shape, dtype=torch.int8), requires_grad=False)
            self.scales = nn.Parameter(torch.ones(shape[:-1]))
        else:
            self.weight = nn.Parameter(torch.empty(shape).normal_(std=in_features**-0.5))
            self.register_parameter("scales", None)

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        """x W^T; of norm(x) when given (an RMSNorm)."""
        x, fused = self._norm(x, norm)
        rows = x.flatten(0, -2)
        if fused is not None:
            return kernels.linear(rows, self.weight, self.scales, fused.weight, fused.eps).view(*x.shape[:-1], -1)
        if kernels.linear_applies(rows, self.scales):
            return kernels.linear(rows, self.weight, self.scales).view(*x.shape[:-1], -1)
        return nn.functional.linear(x, self.weight)

    def _norm(self, x: torch.Tensor, norm: Optional[nn.Module]) -> tuple[torch.Tensor, Optional[nn.Module]]:
        """(x, the norm that the product takes in), or (norm(x), None) where it does not."""
        # The matrix-vector kernel (one half-precision row on CUDA) takes in the norm for int8
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
        return kernels.linear(rows, self.weight, self.scales, weight, eps, glu=True).view(*x.shape[:-1], -1)


def _unhooked(module: nn.Module) -> bool:
    """Whether calling the module is its forward alone: a fused norm must not skip someone's hook."""
    return not (module._forward_hooks or module._forward_pre_hooks)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q int8 [..., out, in], scales float32 [..., out]), w ~ q * scales[..., None].

    Symmetric, one scale per output row: s = max|W_row| / 127, q = round(W / s).
    """
    w = w.float()
    scales = w.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / scales[..., None]).clamp(-127, 127).to(torch.int8), scales
