"""Attention executors: one xformers bias, two ways to run it.

On CUDA, xformers' memory_efficient_attention runs the bias without ever building
it. Elsewhere, the same bias object is materialized into a dense [T, S] matrix of
0 / -inf and added to the scores of a plain PyTorch attention. Both see the same
mask, so the CPU tests check the very definition the GPU kernels run.
"""

from typing import Literal

import torch
import xformers.ops.fmha.common
import xformers.ops.fmha.flash
from xformers.ops import memory_efficient_attention_forward

from mistral import kernels
from mistral.masks import AttentionBias

# When xformers' own C++ extension does not load (a wheel built for another torch),
# its dispatcher refuses every CUDA operator, although its flash operator runs on
# PyTorch's flash-attention kernels and needs nothing from that extension. Let that
# operator through; the tests compare it with the reference on every mask.
if xformers.ops.fmha.flash._USE_PT_FLASH_ATTN:
    xformers.ops.fmha.common._built_with_cuda = True

Backend = Literal["auto", "xformers", "reference"]
BACKENDS = ("auto", "xformers", "reference")


def _half_on_cuda(xq: torch.Tensor) -> bool:
    # xformers' flash kernels take half precision only; float32 on a GPU runs the reference.
    return xq.is_cuda and xq.dtype in (torch.float16, torch.bfloat16)


def decode_kernel_applies(xq: torch.Tensor, backend: Backend) -> bool:
    """Whether a decode step writes the cache and attends in one kernel (kernels.decode_attention).

    Only for backend "auto", on CUDA in half precision with Triton: xformers' decode takes
    two index copies and two flash-decoding kernels per layer where this takes one. The
    kernel reads the key lengths from the decode mask itself (mask 3), and "xformers" keeps
    xformers' kernel for every mask, to compare the two.
    """
    head_dim = xq.shape[-1]
    return backend == "auto" and _half_on_cuda(xq) and kernels.triton is not None and head_dim in (16, 32, 64, 128, 256)


def attend(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: AttentionBias, backend: Backend) -> torch.Tensor:
    """xq: [T, H, D] queries; keys, values: [S, H_kv, D]. Returns [T, H, D]."""
    if backend == "auto":
        backend = "xformers" if _half_on_cuda(xq) else "reference"
    if backend == "xformers":
        return _xformers(xq, keys, values, mask)
    return _reference(xq, keys, values, mask)


def _xformers(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: AttentionBias) -> torch.Tensor:
    # Grouped-query attention in xformers' [batch, seq, group, head, dim] layout: each of
    # the H_kv key heads is a group shared by H / H_kv query heads. The expand has
    # stride 0, so no key is copied.
    T, H, D = xq.shape
    S, H_kv, _ = keys.shape
    q = xq.view(1, T, H_kv, H // H_kv, D)
    k = keys.view(1, S, H_kv, 1, D).expand(1, S, H_kv, H // H_kv, D)
    v = values.view(1, S, H_kv, 1, D).expand(1, S, H_kv, H // H_kv, D)
    # The forward-only entry point: inference needs no backward operator, and xformers
    # has none for the decode mask, so the autograd entry point would refuse it.
    return memory_efficient_attention_forward(q, k, v, attn_bias=mask).view(T, H, D)


def _reference(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: AttentionBias) -> torch.Tensor:
    T, H, D = xq.shape
    S, H_kv, _ = keys.shape
    keys = keys.repeat_interleave(H // H_kv, dim=1)  # [S, H, D]
    values = values.repeat_interleave(H // H_kv, dim=1)
    scores = torch.einsum("thd,shd->hts", xq.float(), keys.float()) * D**-0.5
    scores = scores + mask.materialize((T, S), dtype=torch.float32, device=xq.device)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hts,shd->thd", probs, values.float()).to(xq.dtype)
