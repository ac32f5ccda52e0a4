"""The experts of a decode step as matrix-vector products: y[p] = w[experts[p]] @ x[p].

At batch 1 Mixtral runs 2 of 8 experts per layer: 2 matrix-vector products that must
read ~700 MB of weights. A grouped matmul (torch._grouped_mm) computes whole tiles of
at least 64 rows for that one token, so on an H200 it is bound by that wasted tensor
work rather than by the reads. This Triton kernel is a plain matrix-vector product
that reads each chosen expert's rows once, with the expert index read on the device
(so shapes stay static for the CUDA graph). Elsewhere (the CPU, no Triton) the same
operator gathers the chosen weights and multiplies: the reference.
"""

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the reference below runs instead
    triton = None


@torch.library.custom_op("mistral::expert_matvec", mutates_args=())
def expert_matvec(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """x: [P, K], w: [E, N, K], experts: [P] -> [P, N], row p = w[experts[p]] @ x[p]."""
    if x.is_cuda and triton is not None:
        return _triton_expert_matvec(x, w, experts)
    return torch.einsum("pnk,pk->pn", w[experts], x)


@expert_matvec.register_fake
def _(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape[0], w.shape[1])


if triton is not None:

    @triton.autotune(
        configs=[
            triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4),
            triton.Config({"BLOCK_N": 8, "BLOCK_K": 512}, num_warps=4),
            triton.Config({"BLOCK_N": 32, "BLOCK_K": 128}, num_warps=4),
            triton.Config({"BLOCK_N": 16, "BLOCK_K": 512}, num_warps=8),
            triton.Config({"BLOCK_N": 4, "BLOCK_K": 1024}, num_warps=4),
        ],
        key=["N", "K"],
    )
    @triton.jit
    def _expert_matvec_kernel(x_ptr, w_ptr, e_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
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
        tl.store(y_ptr + p * N + rows, tl.sum(acc, axis=1).to(y_ptr.dtype.element_ty), mask=row_ok)

    def _triton_expert_matvec(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        x, w = x.contiguous(), w.contiguous()
        P, K = x.shape
        N = w.shape[1]
        y = x.new_empty(P, N)
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), P)  # noqa: E731
        _expert_matvec_kernel[grid](x, w, experts, y, N, K)
        return y
