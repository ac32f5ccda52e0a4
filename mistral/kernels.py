"""Matrix products that read each weight once, for decoding (Triton on CUDA).

- `expert_matvec`: the experts of a decode step, y[p] = w[experts[p]] @ x[p]. At batch 1
  Mixtral runs 2 of 8 experts per layer: 2 matrix-vector products that must read ~700 MB
  of weights. A grouped matmul computes whole tiles of at least 64 rows for that one
  token, so on an H200 it is bound by that wasted tensor work rather than by the reads.
  This is a plain matrix-vector product that reads each chosen expert's rows once, with
  the expert index read on the device (so shapes stay static for the CUDA graph).
- `int8_linear`: x @ (q * scales)^T for int8 weights q (weight-only quantization), the
  int8 rows turned into x's dtype in registers: a decode step reads 1 byte per weight.

Both take int8 weights with one scale per output row, or weights in x's dtype. Elsewhere
(the CPU, no Triton) the same operators run in plain PyTorch: the reference.
"""

from typing import Callable, Optional

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the references below run instead
    triton = None

# Rows of x up to which int8_linear runs the Triton kernel on CUDA; past it, the weight is
# turned into x's dtype whole and multiplied by cuBLAS (prefill: compute-bound anyway).
INT8_KERNEL_MAX_ROWS = 64


@torch.library.custom_op("mistral::expert_matvec", mutates_args=())
def expert_matvec(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x: [P, K], w: [E, N, K], experts: [P], scales: [E, N] for int8 w -> [P, N], row p = w[experts[p]] @ x[p]."""
    if x.is_cuda and triton is not None:
        return _triton_expert_matvec(x, w, experts, scales)
    y = torch.einsum("pnk,pk->pn", w[experts].to(x.dtype), x)
    return y if scales is None else y * scales[experts]


@expert_matvec.register_fake
def _(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor, scales: Optional[torch.Tensor] = None) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


@torch.library.custom_op("mistral::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x: [M, K], q: [N, K] int8, scales: [N] -> [M, N] = x @ (q * scales[:, None])^T."""
    # float32 stays in PyTorch: tl.dot would round it to tf32.
    if x.is_cuda and triton is not None and x.dtype != torch.float32 and x.shape[0] <= INT8_KERNEL_MAX_ROWS:
        if x.shape[0] == 1:  # one row: the matrix-vector kernel keeps more programs reading at once than 16-row tiles
            return _triton_expert_matvec(x, q[None], torch.zeros(1, dtype=torch.long, device=x.device), scales[None])
        return _triton_int8_linear(x, q, scales)
    return nn.functional.linear(x, q.to(x.dtype)) * scales


@int8_linear.register_fake
def _(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], q.shape[0])


if triton is not None:

    def _tuned(key: list[str], *blocks: tuple[int, int, int]) -> Callable:
        """A Triton kernel, autotuned (per distinct `key` arguments) over candidates (BLOCK_N, BLOCK_K, warps)."""
        configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in blocks]
        return lambda kernel: triton.autotune(configs=configs, key=key)(triton.jit(kernel))

    @_tuned(["N", "K", "HAS_SCALES"], (16, 256, 4), (8, 512, 4), (32, 128, 4), (16, 512, 8), (4, 1024, 4))
    def _expert_matvec_kernel(
        x_ptr, w_ptr, e_ptr, s_ptr, y_ptr, N, K, HAS_SCALES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        # Program (n, p): rows n*BLOCK_N .. of pair p's expert. A [BLOCK_N, BLOCK_K] float32
        # accumulator is reduced once at the end, so the loop only loads and multiplies.
        pid_n = tl.program_id(0)
        p = tl.program_id(1)
        e = tl.load(e_ptr + p).to(tl.int64)
        rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        w_rows = w_ptr + e * N * K + rows.to(tl.int64)[:, None] * K
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            xk = tl.load(x_ptr + p * K + cols, mask=col_ok, other=0.0).to(tl.float32)
            wk = tl.load(w_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            acc += wk.to(tl.float32) * xk[None, :]
        y = tl.sum(acc, axis=1)
        if HAS_SCALES:
            y *= tl.load(s_ptr + e * N + rows, mask=row_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + p * N + rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    def _triton_expert_matvec(
        x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor, scales: Optional[torch.Tensor]
    ) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        P, K = x.shape
        N = w.shape[1]
        y = x.new_empty(P, N)
        s = w if scales is None else scales.contiguous()  # an unused pointer without scales
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), P)  # noqa: E731
        _expert_matvec_kernel[grid](x, w, experts, s, y, N, K, HAS_SCALES=scales is not None)
        return y

    @_tuned(["N", "K", "BLOCK_M"], (32, 256, 4), (64, 128, 4), (16, 512, 4), (64, 256, 8), (128, 128, 8))
    def _int8_linear_kernel(
        x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
    ):
        # Program n: output columns n*BLOCK_N .. for all M rows of x (M <= BLOCK_M). Each int8
        # weight tile is read once and turned into x's dtype for the tensor cores; rows of
        # x past M are zeros (tl.dot needs at least 16), which costs no extra weight reads.
        pid_n = tl.program_id(0)
        rows_m = tl.arange(0, BLOCK_M)
        cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_ok, n_ok = rows_m < M, cols_n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < K
            xt = tl.load(x_ptr + rows_m[:, None] * K + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            qt = tl.load(q_ptr + cols_n.to(tl.int64)[None, :] * K + ks[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0)
            acc = tl.dot(xt, qt.to(xt.dtype), acc)
        acc *= tl.load(s_ptr + cols_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows_m[:, None] * N + cols_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    def _triton_int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        x, q, scales = x.contiguous(), q.contiguous(), scales.contiguous()
        M, K = x.shape
        N = q.shape[0]
        y = x.new_empty(M, N)
        block_m = max(16, triton.next_power_of_2(M))
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
        _int8_linear_kernel[grid](x, q, scales, y, M, N, K, BLOCK_M=block_m)
        return y
