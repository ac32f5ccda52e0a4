"""Attention executors: one xformers bias, several ways to run it.

On CUDA, xformers' memory_efficient_attention runs the bias without ever building
it. Elsewhere, the same bias object is materialized into a dense [T, S] matrix of
0 / -inf and added to the scores of a plain PyTorch attention. Both see the same
mask, so the CPU tests check the very definition the GPU kernels run.

Backend "auto" on CUDA also reads two special cases off the bias, each for a kernel
that runs it faster than xformers does:
- a decode step (mask 3): kernels.decode_attention, see `decode_kernel_applies`;
- a first prefill of prompts that no window cuts (mask 1): plain causal attention of
  a [B, L] batch per length L, which PyTorch's cuDNN kernel runs at about twice the rate
  of the flash-attention 2 kernel behind xformers on an H100 (scripts/kernel_bench.py),
  once a shape recurs (`prefill_backends`: PyTorch's flash-attention the first time).
  A single prompt is the common case. Prompts of different lengths take one batch per
  length, so a one-shot run of prompts within the window never imports the rest of
  xformers (its import and first call took 4-6 s of a fresh process on an H200).
"""

import functools
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mistral import kernels
from mistral.masks import AttentionBias, BlockDiagonalCausalLocalAttentionMask, BlockDiagonalCausalMask, register_with_dynamo


@functools.cache
def _memory_efficient_attention() -> Callable[..., torch.Tensor]:
    """xformers' attention, imported at its first use: the package's import takes 1.5 s,
    which a run on the CPU (the reference attention) never needs."""
    import xformers.ops.fmha.common
    import xformers.ops.fmha.flash
    from xformers.ops import memory_efficient_attention_forward

    register_with_dynamo()
    # When xformers' own C++ extension does not load (a wheel built for another torch),
    # its dispatcher refuses every CUDA operator, although its flash operator runs on
    # PyTorch's flash-attention kernels and needs nothing from that extension. Let that
    # operator through; the tests compare it with the reference on every mask.
    if xformers.ops.fmha.flash._USE_PT_FLASH_ATTN:
        xformers.ops.fmha.common._built_with_cuda = True
    return memory_efficient_attention_forward


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
    return decode_kernel_runs(xq.device, xq.dtype, xq.shape[-1], backend)


def decode_kernel_runs(device: torch.device, dtype: torch.dtype, head_dim: int, backend: Backend) -> bool:
    """decode_kernel_applies for queries of this device, dtype and head size."""
    half_on_cuda = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    return backend == "auto" and half_on_cuda and kernels.triton is not None and head_dim in (16, 32, 64, 128, 256)


def attend(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: AttentionBias, backend: Backend) -> torch.Tensor:
    """xq: [T, H, D] queries; keys, values: [S, H_kv, D]. Returns [T, H, D]."""
    if backend == "auto":
        blocks = causal_blocks(mask) if _dense_kernels_run(xq) else None
        if blocks is not None:
            return causal_attention(xq, keys, values, blocks)
        backend = "xformers" if _half_on_cuda(xq) else "reference"
    if backend == "xformers":
        return _xformers(xq, keys, values, mask)
    return _reference(xq, keys, values, mask)


def causal_blocks(mask: AttentionBias) -> Optional[dict[int, list[int]]]:
    """{L: the starts of the sequences of L tokens} when the mask is that of each sequence
    attending causally to itself and no window is shorter than a sequence, else None.

    Such a mask is that of a batch of prompts per length, each attending causally to itself.
    """
    if type(mask) not in (BlockDiagonalCausalMask, BlockDiagonalCausalLocalAttentionMask):
        return None
    starts = mask.q_seqinfo.seqstart_py
    if starts != mask.k_seqinfo.seqstart_py:
        return None
    blocks: dict[int, list[int]] = {}
    for start, end in zip(starts, starts[1:]):
        if end > start:  # the model never packs an empty sequence; it would attend to nothing
            blocks.setdefault(end - start, []).append(start)
    window = getattr(mask, "_window_size", None)  # query i sees keys i - window + 1 .. i
    return blocks if blocks and (window is None or window >= max(blocks)) else None


def _dense_kernels_run(xq: torch.Tensor) -> bool:
    """Whether PyTorch's flash-attention kernel (and, on Hopper, cuDNN's) runs attention of these heads here."""
    head_dim = xq.shape[-1]
    return _half_on_cuda(xq) and torch.cuda.get_device_capability(xq.device) >= (8, 0) and head_dim % 8 == 0 and head_dim <= 256


def causal_attention(
    xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, blocks: dict[int, list[int]], remember: bool = True
) -> torch.Tensor:
    """Attention under the mask of `causal_blocks`: one batched causal product per length of sequence.
    remember: count the call's shapes as met (`prefill_backends`; not a warm-up's)."""
    T, H, D = xq.shape
    out = None if len(blocks) == 1 else torch.empty_like(xq)
    for L, starts in blocks.items():
        B = len(starts)
        if starts == list(range(starts[0], starts[0] + B * L, L)):  # back to back: views, no copies
            q, k, v = (t[starts[0] : starts[0] + B * L] for t in (xq, keys, values))
        else:
            q, k, v = (torch.cat([t[s : s + L] for s in starts]) for t in (xq, keys, values))
        q, k, v = (t.view(B, L, -1, D).transpose(1, 2) for t in (q, k, v))  # [B, heads, L, D]
        # The CPU (the tests) runs its own kernels; CUDA never the plain product, whose
        # [B, H, L, L] scores would not fit a long prompt.
        backends = prefill_backends((B, L, q.shape[1], k.shape[1], D, q.dtype, q.device), remember) if xq.is_cuda else [SDPBackend.MATH]
        with sdpa_kernel(backends, set_priority=True):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(B * L, H, D)
        if out is None:  # one length: these are all the tokens
            return o
        out.index_copy_(0, _rows(starts, L, xq.device), o)
    assert out is not None
    return out


# The shapes of causal_attention's calls so far in this process.
_shapes_seen: set[tuple] = set()


def prefill_backends(shape: tuple, remember: bool = True) -> list[SDPBackend]:
    """PyTorch's attention kernels for a causal product of this shape, the first that runs it taken.

    cuDNN's runs a prefill at about twice flash-attention's rate on an H100, but builds an
    execution plan for each new shape first (0.1-0.4 s; PyTorch keeps it for the process),
    where flash-attention has none to build. A one-shot run meets a new prompt length,
    whose first token would wait longer for the plan than for the whole prefill (in fresh
    processes on an H100 a short prompt's prefill took 0.34-0.41 s, a 4096-token one
    1.2-1.3 s, where the products take milliseconds: plans, by other projects' measurements
    of them, are the likely bulk; not yet measured apart here). So a shape's first call runs on
    flash-attention, and its later ones on cuDNN: a shape that recurs (fixed-size prompts,
    a benchmark) earns its plan back. The two round bfloat16 apart, so in one process the
    same prompt's second run may part from its first where two logits nearly tie.
    """
    if shape in _shapes_seen:
        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    if remember:
        _shapes_seen.add(shape)
    return [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]  # cuDNN where flash-attention does not run


def _rows(starts: list[int], L: int, device: torch.device) -> torch.Tensor:
    """The token rows of the sequences of L tokens that begin at `starts`, in order."""
    return (torch.tensor(starts, device=device)[:, None] + torch.arange(L, device=device)[None, :]).flatten()


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
    return _memory_efficient_attention()(q, k, v, attn_bias=mask).view(T, H, D)


def _reference(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: AttentionBias) -> torch.Tensor:
    T, H, D = xq.shape
    S, H_kv, _ = keys.shape
    keys = keys.repeat_interleave(H // H_kv, dim=1)  # [S, H, D]
    values = values.repeat_interleave(H // H_kv, dim=1)
    scores = torch.einsum("thd,shd->hts", xq.float(), keys.float()) * D**-0.5
    scores = scores + mask.materialize((T, S), dtype=torch.float32, device=xq.device)
    probs = torch.softmax(scores, dim=-1)
    return torch.einsum("hts,shd->thd", probs, values.float()).to(xq.dtype)
