"""Matrix products that read each weight once, for decoding (Triton on CUDA).

- `expert_matvec`: the experts of a decode step, y[p] = w[experts[p]] @ x[p]. At batch 1
  Mixtral runs 2 of 8 experts per layer: 2 matrix-vector products that must read ~700 MB
  of weights. A grouped matmul computes whole tiles of at least 64 rows for that one
  token, so on an H200 it is bound by that wasted tensor work rather than by the reads.
  This is a plain matrix-vector product that reads each chosen expert's rows once, with
  the expert index read on the device (so shapes stay static for the CUDA graph), and
  SwiGLU taken in after w1|w3 as in `linear`.
- `linear`: x @ (w * scales)^T. One row of x (a batch-1 decode step): the same
  matrix-vector kernel, which reads the weights faster than cuBLAS does (measured per
  shape by scripts/kernel_bench.py), and which also takes in what comes just before
  and just after the product, each a kernel of its own otherwise: the RMSNorm of x
  (every program reads all of x anyway, so each sums its squares too) and SwiGLU's
  silu(y1) * y3 (a program reads rows of w1 and the same rows of w3). int8 weights w
  (weight-only quantization) with up to 64 rows: their rows are turned into x's dtype
  in registers, so a decode step reads 1 byte per weight. int4 weights (packed codes, a
  scale and a minimum per group of columns) at one row: the same kernel unpacks each
  byte's two codes and applies their group's scale and minimum in registers, half a byte
  per weight read. 2 to 64 rows (a decode step of a batch), int8 and int4: a small matmul
  whose tiles of codes are turned into x's dtype for the tensor cores; more rows (a
  prefill): the weight is turned into x's dtype whole for cuBLAS.
- `expert_linear`: quantized experts on rows sorted by expert (a decode step of a batch of
  Mixtral): the small matmul with a program per expert, which reads each expert's weights
  once for all its rows.

All take weights in x's dtype, int8 weights with one scale per output row, or int4 ones
(linear.Linear has the formats). Elsewhere (the CPU, no Triton) the same operators run in
plain PyTorch: the reference, in float32 on the CPU.
"""

import functools
import json
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the references below run instead
    triton = None

# Rows of x up to which `linear` of int8 or int4 weights runs the Triton kernel on CUDA; past it, the
# weight is turned into x's dtype whole and multiplied by cuBLAS (prefill: compute-bound anyway). (int4
# turned whole for each call of a decode step of 32 rows made the step 106 ms on an H100, bf16's 7.)
QUANT_KERNEL_MAX_ROWS = 64


def _op(name: str, mutates_args: Sequence[str] = ()) -> Callable[[Callable], Any]:
    """An operator that torch.compile sees as one opaque call (torch.library.custom_op), and
    that otherwise runs as the plain function: the custom op's first call imports
    torch._dynamo (1.3 s), which an uncompiled run need not wait for."""

    def wrap(fn: Callable) -> Any:
        op = torch.library.custom_op(f"mistral::{name}", mutates_args=tuple(mutates_args))(fn)

        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            return op(*args, **kwargs) if torch.compiler.is_compiling() else fn(*args, **kwargs)

        call.register_fake = op.register_fake  # type: ignore[attr-defined]
        return call

    return wrap


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """SwiGLU's gate: silu(h1) * h3 for h = h1 | h3 (w1 x | w3 x) along the last dimension."""
    h1, h3 = h.chunk(2, dim=-1)
    return nn.functional.silu(h1) * h3


@_op("dequantize_int4")
def dequantize_int4(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int4 weights (linear.Linear's format) w: uint8 [..., N, K / 2], scales, mins [..., N, K / G] -> W [..., N, K]
    in dtype, computed in float32: W[n, k] = q[n, k] * scales[n, k // G] + mins[n, k // G]."""
    if w.is_cuda and triton is not None:  # one pass; the lines below make five over float32 copies
        return _triton_dequantize_int4(w, scales, mins, dtype)
    q = torch.stack((w & 15, w >> 4), dim=-1).flatten(-2)  # column 2j: byte j's low nibble; 2j + 1: its high one
    groups = q.unflatten(-1, (scales.shape[-1], -1)).float()  # [..., N, K / G, G]
    return (groups * scales[..., None].float() + mins[..., None].float()).flatten(-2).to(dtype)


@dequantize_int4.register_fake
def _(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w.new_empty(*w.shape[:-1], 2 * w.shape[-1], dtype=dtype)


@_op("expert_matvec")
def expert_matvec(
    x: torch.Tensor,
    w: torch.Tensor,
    experts: torch.Tensor,
    scales: Optional[torch.Tensor] = None,
    mins: Optional[torch.Tensor] = None,
    glu: bool = False,
) -> torch.Tensor:
    """x: [P, K], w: [E, N, K] -> [P, N], row p = w[experts[p]] @ x[p]; experts: [P], -1 for
    none (another rank's, expert parallelism): a row of zeros, no weight read.

    int8 w: scales [E, N]; int4 w: [E, N, K / 2] packed, scales and mins [E, N, K / G].
    glu: w is w1 | w3 of SwiGLU, and the result swiglu(row p): [P, N / 2].
    """
    if x.is_cuda and triton is not None:
        return _triton_matvec(x, w, experts, scales, mins, glu=glu)
    held, e = experts >= 0, experts.clamp(min=0)
    if mins is not None:
        y = torch.einsum("pnk,pk->pn", dequantize_int4(w[e], scales[e], mins[e], x.dtype), x)
    else:
        y = torch.einsum("pnk,pk->pn", w[e].to(x.dtype), x)
        y = y if scales is None else y * scales[e]
    return (swiglu(y) if glu else y) * held[:, None]


@expert_matvec.register_fake
def _(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor, scales=None, mins=None, glu: bool = False) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape[0], w.shape[1] // 2 if glu else w.shape[1])


@_op("expert_linear")
def expert_linear(
    x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, scales: torch.Tensor, mins: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Quantized experts on rows grouped by expert: x [P, K] -> [P, N], rows ends[e-1] .. ends[e]-1
    (ends: [E] int32, cumulative) times expert e's weights, rows past ends[-1] zeros (another rank's
    experts). w: int8 [E, N, K] with scales [E, N], or int4 [E, N, K / 2] with scales and mins [E, N, K / G].

    What torch._grouped_mm does for half-precision weights: each expert's weights read once for
    all its rows, where one matrix-vector product per (token, expert) pair (`expert_matvec`)
    reads an expert again for every token routed to it.
    """
    if _triton_rows(x):
        return _triton_small_linear(x, w, scales, mins, ends=ends)
    assert not x.is_cuda, "expert_linear on CUDA needs Triton and half precision (expert_linear_applies)"
    y = x.new_zeros(x.shape[0], w.shape[1])
    start = 0
    for e, end in enumerate(ends.tolist()):  # the host reads the groups (the CPU: no CUDA graph)
        if end > start:
            y[start:end] = linear(x[start:end], w[e], scales[e], None if mins is None else mins[e])
        start = end
    return y


def expert_linear_applies(x: torch.Tensor) -> bool:
    """Whether `expert_linear` can take x: on CUDA its kernel (static shapes, read on the device), else the CPU's loop."""
    return not x.is_cuda or bool(_triton_rows(x))


@expert_linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor, scales: torch.Tensor, mins=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape[0], w.shape[1])


@_op("linear")
def linear(
    x: torch.Tensor,
    w: torch.Tensor,
    scales: Optional[torch.Tensor] = None,
    mins: Optional[torch.Tensor] = None,
    norm: Optional[torch.Tensor] = None,
    eps: float = 0.0,
    glu: bool = False,
) -> torch.Tensor:
    """x: [M, K] -> [M, N] = x @ W^T: w [N, K] in x's dtype, or int8 with scales [N] (W = w * scales[:, None]),
    or int4, w [N, K / 2] packed with scales and mins [N, K / G] (W = dequantize_int4(w, scales, mins)).

    Where `linear_fuses(x)` only (one half-precision row on CUDA): norm, eps: the product is that of
    RMSNorm(x) with this weight [K] and eps; glu: w is w1 | w3, and the result swiglu(y): [1, N / 2].
    """
    if linear_fuses(x):
        stacked = [None if t is None else t[None] for t in (scales, mins)]
        return _triton_matvec(x, w[None], None, *stacked, norm, eps, glu)
    if norm is not None or glu:
        raise ValueError("mistral::linear fuses the norm and SwiGLU only where linear_fuses(x)")
    if scales is not None and 1 < _triton_rows(x) <= QUANT_KERNEL_MAX_ROWS:
        return _triton_small_linear(x, w, scales, mins)
    if mins is not None:
        return nn.functional.linear(x, dequantize_int4(w, scales, mins, x.dtype))
    y = nn.functional.linear(x, w.to(x.dtype))
    return y if scales is None else y * scales


def _triton_rows(x: torch.Tensor) -> int:
    """x's rows where a Triton kernel may take x, else 0. float32 stays in PyTorch: tl.dot would round it to tf32."""
    return x.shape[0] if x.is_cuda and triton is not None and x.dtype != torch.float32 else 0


def linear_applies(x: torch.Tensor, scales: Optional[torch.Tensor]) -> bool:
    """Whether `linear` runs a kernel of its own for x [M, K]; where not, F.linear is the same and stays visible to torch.compile."""
    return scales is not None or _triton_rows(x) == 1


def linear_fuses(x: torch.Tensor) -> bool:
    """Whether `linear` takes in the RMSNorm before it and the SwiGLU after it, for x [M, K]: the matrix-vector kernel's."""
    return _triton_rows(x) == 1


@linear.register_fake
def _(x: torch.Tensor, w: torch.Tensor, scales=None, mins=None, norm=None, eps: float = 0.0, glu: bool = False) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return x.new_empty(x.shape[0], w.shape[0] // 2 if glu else w.shape[0])


@_op("decode_attention", mutates_args=("cache_k", "cache_v"))
def decode_attention(
    xq: torch.Tensor,
    xk: torch.Tensor,
    xv: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    slots: torch.Tensor,
    key_lengths: torch.Tensor,
    visible: torch.Tensor,
) -> torch.Tensor:
    """A decode step's cache write and attention in one (mask 3 of masks.py), for queries b < B:

    store xk[b], xv[b] at flat cache slot slots[b], which lies in row r = slots[b] // S (row
    r's slots are r*S .. r*S+S-1; r = b in a decode step), then attend xq[b]'s heads over
    the first key_lengths[b] slots of row r, the new one included, of which only those
    fewer than visible[b] slots behind the new one, going round the row (its position p
    sees p - visible[b] + 1 .. p). A decode step's visible is its key_lengths: every filled
    slot. A verify step (cache.Verify) has several queries in a row, at consecutive
    positions, whose keys are all stored before the call: visible stops each at its own
    position and at its window, in a row of W + k slots.
    xq: [B, H, Dh]; xk, xv: [B, H_kv, Dh]; cache_k, cache_v: [rows, S, H_kv, Dh] -> [B, H, Dh].
    """
    if xq.is_cuda and triton is not None:
        return _triton_decode_attention(xq, xk, xv, cache_k, cache_v, slots, key_lengths, visible)
    cache_k.flatten(0, 1).index_copy_(0, slots, xk)
    cache_v.flatten(0, 1).index_copy_(0, slots, xv)
    S = cache_k.shape[1]
    s = torch.arange(S, device=xq.device)[None, :]
    return _attend_in_place(xq, cache_k, cache_v, slots, (s >= key_lengths[:, None]) | (_behind(slots, S) >= visible[:, None]))


def _behind(slots: torch.Tensor, S: int) -> torch.Tensor:
    """[B, S]: how far each slot of a query's row is behind the query's own, going round the row."""
    return (slots[:, None] % S - torch.arange(S, device=slots.device)[None, :]) % S


def _attend_in_place(xq: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor, unread: torch.Tensor) -> torch.Tensor:
    """The reference of the in-place kernels: each query b over the slots of the row that slots[b] is in,
    but those `unread` [B, S] says. xq [B, H, Dh] -> [B, H, Dh]."""
    (B, H, Dh), (S, H_kv) = xq.shape, cache_k.shape[1:3]
    rows = slots // S
    keys = cache_k[rows].repeat_interleave(H // H_kv, dim=2).float()  # [B, S, H, Dh]
    values = cache_v[rows].repeat_interleave(H // H_kv, dim=2).float()
    scores = torch.einsum("bhd,bshd->bhs", xq.float(), keys) * Dh**-0.5
    probs = torch.softmax(scores.masked_fill(unread[:, None, :], float("-inf")), dim=-1)
    return torch.einsum("bhs,bshd->bhd", probs, values).to(xq.dtype)


@decode_attention.register_fake
def _(xq, xk, xv, cache_k, cache_v, slots, key_lengths, visible):  # type: ignore[no-untyped-def]
    return torch.empty_like(xq)


@_op("store_keys", mutates_args=("cache_k", "cache_v"))
def store_keys(xk: torch.Tensor, xv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor) -> None:
    """Store xk[t], xv[t] [T, H_kv, Dh] at flat cache slot slots[t] of cache_k, cache_v [rows, S, H_kv, Dh],
    but where slots[t] < 0 (a CUDA graph's padding tokens: shapes stay, nothing is written)."""
    if xk.is_cuda and triton is not None:
        return _triton_store_keys(xk, xv, cache_k, cache_v, slots)
    kept = slots >= 0
    cache_k.flatten(0, 1).index_copy_(0, slots[kept], xk[kept])
    cache_v.flatten(0, 1).index_copy_(0, slots[kept], xv[kept])


@_op("chunk_attention")
def chunk_attention(
    xq: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    tile_first: torch.Tensor,
    tile_len: torch.Tensor,
    window: int,
    tile: int,
) -> torch.Tensor:
    """Attention of a call's queries, each over its own row of the cache, read in place (cache.InPlace):
    query t, at position positions[t] in the row that its slot slots[t] is in, reads the
    positions p - window + 1 .. p of its row, at slots p mod S, every key of the call stored
    before (store_keys). Queries of slot -1 are padding: their output is whatever the memory
    held (it stays in their own rows of the layers after: a matmul's rows are independent).

    The queries run in tiles of up to `tile` consecutive queries of one row (`chunk_tile`):
    tile i is queries tile_first[i] .. tile_first[i] + tile_len[i] - 1 (a tile of 0 queries does
    nothing), so that a prompt's keys are read once per tile of queries rather than once per query.
    xq: [T, H, Dh]; cache_k, cache_v: [rows, S, H_kv, Dh] -> [T, H, Dh].
    """
    if xq.is_cuda and triton is not None:
        return _triton_chunk_attention(xq, cache_k, cache_v, positions, slots, tile_first, tile_len, window, tile)
    S = cache_k.shape[1]
    out = torch.empty_like(xq)
    real = (slots >= 0).nonzero().flatten()
    slots, visible = slots[real], (positions[real] + 1).clamp(max=window)  # a query sees its window, or back to position 0
    out[real] = _attend_in_place(xq[real], cache_k, cache_v, slots, _behind(slots, S) >= visible[:, None])
    return out


@chunk_attention.register_fake
def _(xq, cache_k, cache_v, positions, slots, tile_first, tile_len, window, tile):  # type: ignore[no-untyped-def]
    return torch.empty_like(xq)


def chunk_tile(group: int) -> int:
    """Queries per tile of chunk_attention for `group` query heads per key head: a product of 64 rows
    (a tile's queries, each with its group's heads, padded to a power of two), or of the group alone."""
    return max(1, 64 // (1 << (group - 1).bit_length()))


def matvec_key(N: int, K: int, x_dtype: torch.dtype, w_dtype: torch.dtype, **flags: bool) -> str:
    """The matrix-vector kernel's autotuning key as MATVEC_CONFIGS writes it."""
    return ",".join([str(N), str(K), *(f"{k}={int(v)}" for k, v in sorted(flags.items())), str(x_dtype), str(w_dtype)])


# The matrix-vector kernel's best (BLOCK_N, BLOCK_K, num_warps) per GPU and shape, as its
# autotuning chose them (scripts/tune_matvec.py writes the file). Autotuning compiles and
# times 17 candidates per shape: 9 s of a fresh machine's first run of Mistral 7B on an
# H200, more than everything else of the run. Shapes not listed are autotuned, the result
# kept in Triton's cache on disk for the next process.
MATVEC_CONFIGS: dict[str, dict[str, list[int]]] = (
    json.loads(_CONFIGS_FILE.read_text()) if (_CONFIGS_FILE := Path(__file__).with_name("matvec_configs.json")).is_file() else {}
)


@functools.cache
def _known_configs(device: torch.device) -> dict[str, list[int]]:
    """MATVEC_CONFIGS' entries for this device's GPU, looked up once."""
    return MATVEC_CONFIGS.get(torch.cuda.get_device_name(device), {})


def fused_applies(x: torch.Tensor) -> bool:
    """Whether RMSNorm and the rotary embedding of x run as one Triton kernel each (`rms_norm`, `rotary`).

    In a decode step's CUDA graph each elementwise operation of PyTorch is a kernel of its
    own: RMSNorm is eight and the rotation ten, so 28 small kernels a layer, which cost
    more than a millisecond of a Mistral 7B step on an H200 (5.35 ms a step against 4.1
    with torch.compile fusing them). One kernel each brings that back without compiling.
    """
    return _triton_rows(x) > 0


def is_power_of_2(n: int) -> bool:
    """Whether n is one: a Triton block spans a power of two (the rotary kernel's, a head)."""
    return n > 0 and n & (n - 1) == 0


@_op("rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """model.RMSNorm's arithmetic over x's last dimension, in one Triton kernel (CUDA): x [..., D], weight [D]."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.empty_like(rows)
    D = rows.shape[1]
    _rms_norm_kernel[(rows.shape[0],)](rows, weight, y, D, eps, BLOCK_D=triton.next_power_of_2(D), num_warps=4 if D <= 4096 else 8)
    return y.view(x.shape)


@rms_norm.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@_op("rotary")
def rotary(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """model.apply_rotary_emb's arithmetic in one Triton kernel (CUDA): x [T, H, Dh] (rows may be
    strided, heads and their values not), rope [T, Dh/2, 2] float32 -> [T, H, Dh] contiguous."""
    T, H, Dh = x.shape
    assert x.stride(2) == 1 and x.stride(1) == Dh and rope.is_contiguous()
    out = torch.empty((T, H, Dh), dtype=x.dtype, device=x.device)
    block_h = min(triton.next_power_of_2(H), max(1, 4096 // Dh))
    _rotary_kernel[(T, triton.cdiv(H, block_h))](x, rope, out, x.stride(0), H, D=Dh, BLOCK_H=block_h, num_warps=4)
    return out


@rotary.register_fake
def _(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    return x.new_empty(x.shape)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, D, eps, BLOCK_D: tl.constexpr):
        # One program a row. Rounded as model.RMSNorm rounds: x * rsqrt(mean(x^2) + eps) in
        # float32, to x's dtype, then times the weight (a product of two values of x's dtype).
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_D)
        ok = cols < D
        x = tl.load(x_ptr + row * D + cols, mask=ok, other=0.0).to(tl.float32)
        normed = (x * tl.rsqrt(tl.sum(x * x, axis=0) / D + eps)).to(y_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * D + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _rotary_kernel(x_ptr, rope_ptr, out_ptr, x_stride, H, D: tl.constexpr, BLOCK_H: tl.constexpr):
        # Program (t, block of heads): each head's interleaved pairs (a, b) = (x[2j], x[2j+1])
        # become (a cos - b sin, a sin + b cos) in float32, as apply_rotary_emb computes them.
        t = tl.program_id(0).to(tl.int64)
        heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
        d = tl.arange(0, D)
        ok = (heads < H)[:, None]
        x = tl.load(x_ptr + t * x_stride + heads[:, None] * D + d[None, :], mask=ok, other=0.0).to(tl.float32)
        a, b = tl.split(tl.reshape(x, (BLOCK_H, D // 2, 2)))
        cos, sin = tl.split(tl.reshape(tl.load(rope_ptr + t * D + d), (D // 2, 2)))
        rotated = tl.reshape(tl.join(a * cos[None, :] - b * sin[None, :], a * sin[None, :] + b * cos[None, :]), (BLOCK_H, D))
        tl.store(out_ptr + (t * H + heads[:, None]) * D + d[None, :], rotated.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _int4_tile(w_rows, s_rows, m_rows, row_ok, k0, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Columns k0 .. k0 + BLOCK_K (whole groups) of BLOCK_N int4 rows as float32 weights
        # [BLOCK_N, BLOCK_K]; w_rows, s_rows, m_rows: [BLOCK_N, 1] pointers to each row's first
        # byte, scale and minimum. Byte j holds column 2j in its low nibble and 2j + 1 in its
        # high one: the two joined along a new last axis are the columns in order.
        half = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        packed = tl.load(w_rows + half[None, :], mask=row_ok[:, None] & (half < K // 2)[None, :], other=0).to(tl.int32)
        q = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, BLOCK_K))
        # Codes 0..15 -> float by bits, as int8's are in _matvec_kernel: 2^23 + q, less 2^23, exactly.
        qf = (q + 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        groups = k0 // GROUP + tl.arange(0, BLOCK_K // GROUP)
        group_ok = row_ok[:, None] & (groups < K // GROUP)[None, :]
        s = tl.load(s_rows + groups[None, :], mask=group_ok, other=0.0).to(tl.float32)[:, :, None]
        m = tl.load(m_rows + groups[None, :], mask=group_ok, other=0.0).to(tl.float32)[:, :, None]
        return tl.reshape(tl.reshape(qf, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * s + m, (BLOCK_N, BLOCK_K))

    def _tuned(key: list[str], *blocks: tuple[int, int, int], prune: Optional[Callable] = None) -> Callable:
        """A Triton kernel, autotuned (per distinct `key` arguments) over candidates (BLOCK_N, BLOCK_K, warps).

        prune(configs, named_args, **constexprs): the candidates that fit a call.
        """
        configs = [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in blocks]
        # Short timings (the kernels run for microseconds), kept on disk for the next process.
        bench = lambda fn, quantiles: triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)  # noqa: E731
        pruning = None if prune is None else {"early_config_prune": prune}
        tune = triton.autotune(configs=configs, key=key, do_bench=bench, cache_results=True, prune_configs_by=pruning)
        return lambda kernel: tune(triton.jit(kernel))

    def _fitting(configs: list, named_args: dict, **kwargs: Any) -> list:
        # SwiGLU's programs take rows in (w1, w3) pairs: at least two rows. int4's take whole groups.
        return [c for c in configs if (not kwargs["GLU"] or c.kwargs["BLOCK_N"] >= 2) and c.kwargs["BLOCK_K"] >= kwargs["GROUP"]]

    # Matrix-vector products are bound by the weights' reads, which want many bytes in
    # flight: few rows per program and long runs of each row (blocks of 1-8 rows by
    # 512-4096 columns beat cuBLAS's GEMV by 1-20% per Mistral shape on an H200; int8
    # rows want the longest runs, to load 16 bytes at a time).
    @_tuned(
        ["N", "K", "HAS_SCALES", "EXPERTS", "NORM", "GLU", "GROUP"],
        (1, 2048, 4), (1, 4096, 8), (2, 1024, 4), (2, 2048, 8), (2, 4096, 8), (4, 512, 4), (4, 1024, 4),
        (4, 1024, 8), (4, 2048, 8), (4, 4096, 8), (8, 512, 4), (8, 1024, 8), (8, 2048, 8), (16, 256, 4),
        (16, 512, 8), (16, 1024, 8), (32, 128, 4),
        prune=_fitting,
    )  # fmt: skip
    def _matvec_kernel(
        x_ptr, w_ptr, e_ptr, s_ptr, m_ptr, g_ptr, y_ptr, N, K, eps,
        HAS_SCALES: tl.constexpr, EXPERTS: tl.constexpr, NORM: tl.constexpr, GLU: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # Program (n, p): rows n*BLOCK_N .. of pair p's expert (of the one matrix without
        # EXPERTS). A [BLOCK_N, BLOCK_K] float32 accumulator is reduced once at the end,
        # so the loop only loads and multiplies.
        # GLU: w is w1 | w3 (N rows each, 2N in all), and the program's rows alternate
        # between them: local row 2i is row r of w1, 2i + 1 row r of w3, r = n*BLOCK_N/2 + i.
        # GROUP > 0: int4 weights, K / 2 bytes a row, and a scale and a minimum (s_ptr,
        # m_ptr) per GROUP columns of a row; BLOCK_K is a multiple of GROUP (whole groups).
        pid_n = tl.program_id(0)
        p = tl.program_id(1)
        if EXPERTS:
            e = tl.load(e_ptr + p).to(tl.int64)
        else:
            e = 0
        local = tl.arange(0, BLOCK_N)
        if GLU:
            out_rows = pid_n * (BLOCK_N // 2) + local // 2
            rows = out_rows + (local % 2) * N
            w_n = 2 * N
        else:
            out_rows = pid_n * BLOCK_N + local
            rows = out_rows
            w_n = N
        row_ok = out_rows < N
        if EXPERTS:  # expert -1 (another rank's): nothing read, zeros written
            held = row_ok & (out_rows * 0 + e >= 0)  # (a tensor: the interpreter takes no scalar mask)
        else:
            held = row_ok
        if GROUP:
            row_bytes = K // 2
        else:
            row_bytes = K
        w_rows = w_ptr + e * w_n * row_bytes + rows.to(tl.int64)[:, None] * row_bytes
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        squares = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_ok = cols < K
            xk = tl.load(x_ptr + p * K + cols, mask=col_ok, other=0.0).to(tl.float32)
            if NORM:  # RMSNorm(x) = x * g / rms(x): g here, the rms once x has been read whole
                squares += xk * xk
                xk *= tl.load(g_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
            if GROUP:
                first_group = (e * w_n + rows.to(tl.int64))[:, None] * (K // GROUP)
                wf = _int4_tile(w_rows, s_ptr + first_group, m_ptr + first_group, held, k0, K, GROUP, BLOCK_N, BLOCK_K)
            else:
                wk = tl.load(w_rows + cols[None, :], mask=held[:, None] & col_ok[None, :], other=0.0)
                if w_ptr.dtype.element_ty == tl.int8:
                    # int8 -> float32 by bits, not by the conversion instruction, which runs at a
                    # quarter of the rate of plain arithmetic and so, at one conversion per byte
                    # read, could not keep up with the memory: q + 128 written into the low bits
                    # of 2^23's mantissa is the float 2^23 + 128 + q, exactly.
                    wf = (wk.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
                else:
                    wf = wk.to(tl.float32)
            acc += wf * xk[None, :]
        y = tl.sum(acc, axis=1)
        if NORM:
            y *= tl.rsqrt(tl.sum(squares, axis=0) / K + eps)
        if HAS_SCALES:
            y *= tl.load(s_ptr + e * w_n + rows, mask=held, other=0.0).to(tl.float32)
        if GLU:
            y1, y3 = tl.split(tl.reshape(y, (BLOCK_N // 2, 2)))
            y = y1 * tl.sigmoid(y1) * y3
            out_rows = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            row_ok = out_rows < N
        tl.store(y_ptr + p * N + out_rows, y.to(y_ptr.dtype.element_ty), mask=row_ok)

    _matvec_fixed = _matvec_kernel.fn  # the kernel itself, below its autotuner: launched with a known config

    def _triton_matvec(
        x: torch.Tensor,
        w: torch.Tensor,
        experts: Optional[torch.Tensor],
        scales: Optional[torch.Tensor],
        mins: Optional[torch.Tensor] = None,
        norm: Optional[torch.Tensor] = None,
        eps: float = 0.0,
        glu: bool = False,
        config: Optional[Sequence[int]] = None,
    ) -> torch.Tensor:
        """y[p] = w[experts[p]] @ x[p]; without experts, w: [1, N, K] is every row's (K / 2 bytes of int4, with mins).
        norm, eps, glu: `linear`'s. config: (BLOCK_N, BLOCK_K, num_warps), else the shipped or autotuned one."""
        x, w = x.contiguous(), w.contiguous()
        P, K = x.shape
        N = w.shape[1] // 2 if glu else w.shape[1]  # rows of the result
        y = x.new_empty(P, N)
        s = w if scales is None else scales.contiguous()  # unused pointers where not needed
        m = w if mins is None else mins.contiguous()
        e = w if experts is None else experts
        g = w if norm is None else norm
        rows = 2 if glu else 1  # weight rows per output row
        group = 0 if mins is None else K // s.shape[-1]
        flags = dict(HAS_SCALES=scales is not None and mins is None, EXPERTS=experts is not None, NORM=norm is not None, GLU=glu)
        # (int4's key names its group size; int8's and bfloat16's keys are those measured before int4)
        known = config or _known_configs(x.device).get(matvec_key(N, K, x.dtype, w.dtype, **flags, **({"GROUP": group} if group else {})))
        if known is not None:  # measured once and shipped: no autotuning (seconds of compiling) on a fresh machine
            block_n, block_k, warps = known
            grid_n = triton.cdiv(N * rows, block_n)
            _matvec_fixed[(grid_n, P)](
                x, w, e, s, m, g, y, N, K, eps, **flags, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps
            )
            return y
        grid = lambda meta: (triton.cdiv(N * rows, meta["BLOCK_N"]), P)  # noqa: E731
        _matvec_kernel[grid](x, w, e, s, m, g, y, N, K, eps, **flags, GROUP=group)
        return y

    @_tuned(
        ["N", "K", "BLOCK_M", "HAS_SCALES", "GROUP", "EXPERTS"],
        (16, 256, 4), (16, 512, 4), (16, 1024, 4), (32, 256, 4), (32, 512, 4), (64, 128, 4), (64, 256, 8), (128, 128, 8),
        prune=lambda configs, named_args, **kwargs: [c for c in configs if c.kwargs["BLOCK_K"] >= kwargs["GROUP"]],
    )  # fmt: skip
    def _small_linear_kernel(
        x_ptr, w_ptr, s_ptr, m_ptr, ends_ptr, y_ptr, M, N, K,
        HAS_SCALES: tl.constexpr, GROUP: tl.constexpr, EXPERTS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # Program (n, e): output columns n*BLOCK_N .. for x's rows start .. end-1, BLOCK_M at a
        # time (all M rows at once where M <= BLOCK_M). Each weight tile is read once per
        # BLOCK_M rows (int8 or int4 turned into x's dtype) for the tensor cores; rows past
        # `end` are zeros (tl.dot needs at least 16), which costs no extra reads.
        # GROUP > 0: int4 as _matvec_kernel reads it (whole groups in a tile), scaled there.
        # EXPERTS: w, scales and mins are stacked [E, ...], and expert e's rows of x are
        # ends[e-1] .. ends[e]-1 (x sorted by expert); an expert without rows reads nothing.
        pid_n = tl.program_id(0)
        e = tl.program_id(1)
        if EXPERTS:
            end = tl.load(ends_ptr + e)
            start = tl.where(e > 0, tl.load(ends_ptr + tl.maximum(e - 1, 0)), 0)
        else:
            start, end = 0, M
        if GROUP:
            w_ptr += e.to(tl.int64) * N * (K // 2)
            s_ptr += e.to(tl.int64) * N * (K // GROUP)
            m_ptr += e.to(tl.int64) * N * (K // GROUP)
        else:
            w_ptr += e.to(tl.int64) * N * K
            s_ptr += e.to(tl.int64) * N
        cols_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = cols_n < N
        for m0 in range(start, end, BLOCK_M):
            rows_m = m0 + tl.arange(0, BLOCK_M)
            m_ok = rows_m < end
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < K
                xt = tl.load(x_ptr + rows_m[:, None] * K + ks[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                if GROUP:
                    n64 = cols_n.to(tl.int64)[:, None]
                    wf = _int4_tile(w_ptr + n64 * (K // 2), s_ptr + n64 * (K // GROUP), m_ptr + n64 * (K // GROUP), n_ok, k0, K,
                                    GROUP, BLOCK_N, BLOCK_K)  # fmt: skip
                    acc = tl.dot(xt, tl.trans(wf.to(xt.dtype)), acc)
                else:
                    wt = tl.load(w_ptr + cols_n.to(tl.int64)[None, :] * K + ks[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0)
                    acc = tl.dot(xt, wt.to(xt.dtype), acc)
            if HAS_SCALES:
                acc *= tl.load(s_ptr + cols_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(y_ptr + rows_m[:, None] * N + cols_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    def _triton_small_linear(
        x: torch.Tensor,
        w: torch.Tensor,
        scales: Optional[torch.Tensor],
        mins: Optional[torch.Tensor] = None,
        config: Optional[tuple[int, int, int]] = None,
        ends: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """`linear`'s product for a few rows; with ends, `expert_linear`'s (w stacked [E, ...]).
        config: (BLOCK_N, BLOCK_K, warps) instead of the tuned one (the tests, in Triton's interpreter)."""
        x, w = x.contiguous(), w.contiguous()
        M, K = x.shape
        E, N = (w.shape[0], w.shape[1]) if ends is not None else (1, w.shape[0])
        # Rows no expert holds (past ends[-1]) are never written.
        y = x.new_empty(M, N) if ends is None else x.new_zeros(M, N)
        s = w if scales is None else scales.contiguous()  # an unused pointer without scales
        m = s if mins is None else mins.contiguous()  # without mins (not int4)
        group = 0 if mins is None else K // mins.shape[-1]
        # An expert holds at most one row per token: M / A of them. A block of up to 64 rows
        # takes every row an expert holds in a decode step, so its weights are read once.
        block_m = max(16, min(64, triton.next_power_of_2(M)))
        flags = dict(HAS_SCALES=scales is not None and mins is None, GROUP=group, EXPERTS=ends is not None, BLOCK_M=block_m)
        g = s if ends is None else ends
        if config is not None:
            block_n, block_k, warps = config
            _small_linear_kernel.fn[(triton.cdiv(N, block_n), E)](
                x, w, s, m, g, y, M, N, K, **flags, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps
            )  # fmt: skip
            return y
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), E)  # noqa: E731
        _small_linear_kernel[grid](x, w, s, m, g, y, M, N, K, **flags)
        return y

    @triton.jit
    def _dequantize_int4_kernel(w_ptr, s_ptr, m_ptr, out_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # Program (n, k): rows n*BLOCK_N.. and columns k*BLOCK_K.. of W, the codes read and the
        # weights written once. A prefill's product of int4 weights (past QUANT_KERNEL_MAX_ROWS
        # rows) turns each weight whole into x's dtype for cuBLAS; in PyTorch's operations that
        # was five passes over float32 copies, about as long as the product itself.
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        row_ok = rows < N
        r64 = rows.to(tl.int64)[:, None]
        wf = _int4_tile(w_ptr + r64 * (K // 2), s_ptr + r64 * (K // GROUP), m_ptr + r64 * (K // GROUP), row_ok, k0, K,
                        GROUP, BLOCK_N, BLOCK_K)  # fmt: skip
        cols = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + r64 * K + cols[None, :], wf.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < K)[None, :])

    def _triton_dequantize_int4(w: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """dequantize_int4 in one Triton kernel (on CUDA, or in Triton's interpreter)."""
        K = 2 * w.shape[-1]
        group = K // scales.shape[-1]
        w2, s2, m2 = (t.reshape(-1, t.shape[-1]).contiguous() for t in (w, scales, mins))  # leading dimensions as more rows
        out = torch.empty(*w.shape[:-1], K, dtype=dtype, device=w.device)
        N, block_n, block_k = w2.shape[0], 16, max(256, group)  # whole groups per tile
        _dequantize_int4_kernel[(triton.cdiv(N, block_n), triton.cdiv(K, block_k))](
            w2, s2, m2, out, N, K, GROUP=group, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4
        )
        return out

    @triton.jit
    def _attend_block(scores, v, m, l, acc):
        """Flash-attention's step over a block of keys: scores [R, N] (log2 units, -inf where unseen)
        and their values v [N, D] into each row's running max m, sum l and output acc."""
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen nothing yet (a run of the new slot alone)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m - m_safe)
        return m_new, l * alpha + tl.sum(p, axis=1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)

    # Neither a cache of another size (S) nor another batch (SPLITS follows it) compiles the
    # kernel anew: the first run of 8 prompts on a machine whose cache held batch 1's kernel
    # waited 1.5 s for it on an H100 while SPLITS was a constant of the kernel.
    @triton.jit(do_not_specialize=["S", "SPLITS"])
    def _decode_attention_kernel(
        q_ptr, kn_ptr, vn_ptr, k_ptr, v_ptr, slot_ptr, len_ptr, vis_ptr, o_ptr, part_ptr, count_ptr,
        q_stride, kn_stride, vn_stride, S, H_KV, qk_scale, SPLITS,
        G: tl.constexpr, G_POW2: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr,
        BLOCK_S: tl.constexpr, MIN_CHUNK: tl.constexpr, MERGE: tl.constexpr,
    ):  # fmt: skip
        # Program (b * H_KV + h, split): the G query heads of query b that share key head h,
        # over one of up to SPLITS equal runs of its key_lengths[b] slots of the cache row that
        # its new token's slot is in (row b in a decode step; any in cache.Mixed) (flash-decoding).
        # Every run leaves the new token's slot out (what it holds is stale or being
        # written), and the slots `visible` or more behind it; the new key and value come in
        # at the merge, from registers. The first program stores them into the cache: in a
        # decode step nothing else in the call reads that slot, and a verify step, whose
        # later queries read it, stored the same values there before the call.
        # Each run leaves its unnormalised (output, max, sum) in `part`; the last of a
        # query's runs to finish (an atomic count) merges them and resets the count.
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H_KV
        h = bh % H_KV
        length = tl.load(len_ptr + b)
        chunk = tl.maximum(tl.cdiv(tl.cdiv(length, SPLITS), BLOCK_S) * BLOCK_S, MIN_CHUNK)
        runs = tl.maximum(tl.cdiv(length, chunk), 1)  # (a query's keys include its own: length >= 1)
        if split >= runs:  # past a short row's keys: no run, no arrival to count
            return
        visible = tl.load(vis_ptr + b)
        slot = tl.load(slot_ptr + b).to(tl.int64)
        row = slot // S * S  # the row's first slot
        new = slot - row  # the new token's slot in the row
        start = split * chunk
        end = tl.minimum(start + chunk, length)
        d = tl.arange(0, D)
        if split == 0:
            new_at = ((row + new) * H_KV + h) * D + d
            tl.store(k_ptr + new_at, tl.load(kn_ptr + b * kn_stride + h * D + d))
            tl.store(v_ptr + new_at, tl.load(vn_ptr + b * vn_stride + h * D + d))
        per_split = G * (D + 2)  # part[bh, split]: G * D outputs, then G maxima, then G sums (float32)
        g = tl.arange(0, G_PAD)
        real = g < G
        # tl.dot needs 16 rows: query rows past G are zeros, their results never stored.
        q = tl.load(q_ptr + b * q_stride + (h * G + g)[:, None] * D + d[None, :], mask=real[:, None], other=0.0)
        m = tl.full([G_PAD], float("-inf"), tl.float32)
        l = tl.zeros([G_PAD], tl.float32)
        acc = tl.zeros([G_PAD, D], tl.float32)
        for s0 in range(start, end, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            at = ((row + s) * H_KV + h)[:, None] * D + d[None, :]
            behind = (new - s + S) % S  # 0: the new slot; visible or more: past the query's position or window
            read = (s < end) & (behind > 0) & (behind < visible)
            k = tl.load(k_ptr + at, mask=(s < end)[:, None], other=0.0)
            # The new slot's old value must not reach the product, even with weight 0 (0 * inf = NaN).
            v = tl.load(v_ptr + at, mask=read[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * qk_scale  # [G_PAD, BLOCK_S], log2 units
            scores = tl.where(read[None, :], scores, float("-inf"))
            m, l, acc = _attend_block(scores, v, m, l, acc)
        mine = part_ptr + (bh * SPLITS + split).to(tl.int64) * per_split
        tl.store(mine + g[:, None] * D + d[None, :], acc, mask=real[:, None])
        tl.store(mine + G * D + g, m, mask=real)
        tl.store(mine + G * (D + 1) + g, l, mask=real)
        tl.debug_barrier()  # every thread's stores are made before the count says so
        if tl.atomic_add(count_ptr + bh, 1, sem="acq_rel") == runs - 1:
            # Start from the new token (weight 1 at its own score), then merge the runs
            # MERGE at a time, each as a row of G * D outputs, its max and sum repeated
            # along the row.
            c = tl.arange(0, G_POW2 * D)  # column c: output (c // D, c % D)
            c_ok = c < G * D
            qc = tl.load(q_ptr + b * q_stride + h * G * D + c, mask=c_ok, other=0.0).to(tl.float32)
            kc = tl.load(kn_ptr + b * kn_stride + h * D + c % D).to(tl.float32)
            own = tl.sum(tl.reshape(qc * kc, (G_POW2, D)), axis=1) * qk_scale  # [G_POW2]
            m_all = tl.reshape(tl.broadcast_to(own[:, None], (G_POW2, D)), (G_POW2 * D,))
            out = tl.load(vn_ptr + b * vn_stride + h * D + c % D).to(tl.float32)
            total = tl.full([G_POW2 * D], 1.0, tl.float32)
            ours = part_ptr + (bh * SPLITS).to(tl.int64) * per_split
            for r0 in range(0, runs, MERGE):
                r = r0 + tl.arange(0, MERGE)
                ok = (r < runs)[:, None] & c_ok[None, :]
                at = ours + r[:, None] * per_split
                ms = tl.load(at + G * D + c[None, :] // D, mask=ok, other=float("-inf"), cache_modifier=".cg")
                m_new = tl.maximum(m_all, tl.max(ms, axis=0))  # finite: the new token's score
                w = tl.exp2(ms - m_new[None, :])  # 0 for runs that read no key (all past `visible`) and rows past the runs
                alpha = tl.exp2(m_all - m_new)
                o = tl.load(at + c[None, :], mask=ok, other=0.0, cache_modifier=".cg")
                ls = tl.load(at + G * D + G + c[None, :] // D, mask=ok, other=0.0, cache_modifier=".cg")
                out = out * alpha + tl.sum(w * o, axis=0)
                total = total * alpha + tl.sum(w * ls, axis=0)
                m_all = m_new
            o_at = o_ptr + (b * G * H_KV + h * G) * D + c
            tl.store(o_at, (out / total).to(o_ptr.dtype.element_ty), mask=c_ok)
            tl.store(count_ptr + bh, 0)

    @triton.jit
    def _store_keys_kernel(kn_ptr, vn_ptr, k_ptr, v_ptr, slot_ptr, kn_stride, vn_stride, HD, BLOCK: tl.constexpr):
        t = tl.program_id(0)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot < 0:
            return
        c = tl.arange(0, BLOCK)
        ok = c < HD
        tl.store(k_ptr + slot * HD + c, tl.load(kn_ptr + t * kn_stride + c, mask=ok), mask=ok)
        tl.store(v_ptr + slot * HD + c, tl.load(vn_ptr + t * vn_stride + c, mask=ok), mask=ok)

    def _triton_store_keys(xk: torch.Tensor, xv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, slots: torch.Tensor) -> None:
        T, H_kv, Dh = xk.shape
        assert xk.stride(1) == Dh and xv.stride(1) == Dh and xk.stride(2) == 1 and xv.stride(2) == 1
        assert cache_k.is_contiguous() and cache_v.is_contiguous()
        _store_keys_kernel[(T,)](xk, xv, cache_k, cache_v, slots, xk.stride(0), xv.stride(0), H_kv * Dh,
                                 BLOCK=triton.next_power_of_2(H_kv * Dh), num_warps=4)  # fmt: skip

    # Neither the cache's size nor the window compiles the kernel anew.
    @triton.jit(do_not_specialize=["S", "WINDOW"])
    def _chunk_attention_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, slot_ptr, first_ptr, len_ptr, o_ptr,
        q_stride, o_stride, S, WINDOW, H_KV, qk_scale,
        G: tl.constexpr, G_POW2: tl.constexpr, M: tl.constexpr, D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):  # fmt: skip
        # Program (tile, h): the tile's n consecutive queries of one row (positions p0 .. p0 + n - 1),
        # each with the G query heads that share key head h, as M * G_POW2 rows of one product,
        # over the key positions that any of them sees (p0 - WINDOW + 1 .. p0 + n - 1, at slots
        # p mod S of the row), each row masked to its own query's (flash-attention).
        tile = tl.program_id(0)
        h = tl.program_id(1)
        n = tl.load(len_ptr + tile)
        if n == 0:
            return
        t0 = tl.load(first_ptr + tile)
        p0 = tl.load(pos_ptr + t0)
        row = tl.load(slot_ptr + t0).to(tl.int64) // S * S  # the row's first slot
        r = tl.arange(0, M * G_POW2)
        i, g = r // G_POW2, r % G_POW2  # row r: query t0 + i, head h * G + g
        real = (i < n) & (g < G)
        d = tl.arange(0, D)
        head_at = (h * G + g)[:, None] * D + d[None, :]
        q = tl.load(q_ptr + (t0 + i).to(tl.int64)[:, None] * q_stride + head_at, mask=real[:, None], other=0.0)
        qp = p0 + i  # each row's query position
        end = p0 + n  # past the last key any of them sees
        m = tl.full([M * G_POW2], float("-inf"), tl.float32)
        l = tl.zeros([M * G_POW2], tl.float32)
        acc = tl.zeros([M * G_POW2, D], tl.float32)
        for s0 in range(tl.maximum(p0 - WINDOW + 1, 0), end, BLOCK_S):
            kp = s0 + tl.arange(0, BLOCK_S)  # key positions
            at = ((row + kp % S) * H_KV + h)[:, None] * D + d[None, :]
            k = tl.load(k_ptr + at, mask=(kp < end)[:, None], other=0.0)
            v = tl.load(v_ptr + at, mask=(kp < end)[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k)) * qk_scale  # [M * G_POW2, BLOCK_S], log2 units
            sees = (kp[None, :] <= qp[:, None]) & (kp[None, :] > qp[:, None] - WINDOW)
            scores = tl.where(sees, scores, float("-inf"))
            m, l, acc = _attend_block(scores, v, m, l, acc)
        out = acc / tl.where(real, l, 1.0)[:, None]  # a real query sees at least its own key
        tl.store(o_ptr + (t0 + i).to(tl.int64)[:, None] * o_stride + head_at, out.to(o_ptr.dtype.element_ty), mask=real[:, None])

    def _triton_chunk_attention(
        xq: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
        tile_first: torch.Tensor, tile_len: torch.Tensor, window: int, tile: int, block_s: int = 64, num_warps: int = 4,
    ) -> torch.Tensor:  # fmt: skip
        """block_s: keys per loop step."""
        (T, H, Dh), (S, H_kv) = xq.shape, cache_k.shape[1:3]
        assert xq.stride(1) == Dh and xq.stride(2) == 1 and cache_k.is_contiguous() and cache_v.is_contiguous()
        G = H // H_kv
        assert is_power_of_2(tile) and tile * triton.next_power_of_2(G) >= 16, "tl.dot takes 16 rows or more"
        out = torch.empty((T, H, Dh), dtype=xq.dtype, device=xq.device)
        _chunk_attention_kernel[(tile_len.shape[0], H_kv)](
            xq, cache_k, cache_v, positions, slots, tile_first, tile_len, out,
            xq.stride(0), out.stride(0), S, window, H_kv, Dh**-0.5 * 1.4426950408889634,
            G=G, G_POW2=triton.next_power_of_2(G), M=tile, D=Dh, BLOCK_S=block_s, num_warps=num_warps,
        )  # fmt: skip
        return out

    # Per device: one arrival count per (row, key head) for _decode_attention_kernel,
    # zeros between calls (its last program resets its own). Made outside graph capture:
    # a decode step's warm-up call precedes its capture. Never freed: graphs captured
    # earlier may still hold a smaller one.
    _counts: dict[torch.device, list[torch.Tensor]] = {}

    def _triton_decode_attention(
        xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
        slots: torch.Tensor, key_lengths: torch.Tensor, visible: torch.Tensor, block_s: int = 32, min_chunk: int = 128, num_warps: int = 4,
        splits: Optional[int] = None, merge: Optional[int] = None,
    ) -> torch.Tensor:  # fmt: skip
        """block_s keys per loop step; min_chunk: the fewest keys a program reads (more, fewer runs to merge);
        splits: programs per row and key head (default: about two per multiprocessor in all);
        merge: runs merged at a time, a power of two (default: as many as 4096 outputs hold)."""
        (B, H, Dh), (S, H_kv) = xq.shape, cache_k.shape[1:3]
        assert xq.stride(1) == Dh and xk.stride(1) == Dh and xv.stride(1) == Dh and xq.stride(2) == 1
        assert cache_k.is_contiguous() and cache_v.is_contiguous()
        held = _counts.setdefault(xq.device, [])
        if not held or held[-1].numel() < B * H_kv:
            held.append(torch.zeros(max(B * H_kv, 4096), dtype=torch.int32, device=xq.device))
        counts = held[-1]
        # About two programs per multiprocessor, whatever the cache's size: a split that followed
        # the size would change with every prompt length (once a constant of the kernel, it
        # compiled the kernel anew for each: 0.8 s). A short row leaves the programs past its
        # keys idle: they return at once, at the cost of their launch. More programs, each
        # row's keys in shorter runs, spread a server's rows of mixed lengths a little more
        # evenly (32 rows of 128-1,536 keys: 66.4 us a layer at twice the split, 68.0 at
        # this one) but cost more where rows are alike (32 rows of 832: 61.0 against 52.7;
        # scripts/kernel_bench.py --only attention, an H100).
        if splits is None:
            sms = torch.cuda.get_device_properties(xq.device).multi_processor_count
            splits = triton.next_power_of_2(triton.cdiv(2 * sms, B * H_kv))
        G = H // H_kv
        g_pow2 = triton.next_power_of_2(G)  # tl.dot needs at least 16 rows: G_PAD
        part = torch.empty(B * H_kv * splits * G * (Dh + 2), dtype=torch.float32, device=xq.device)
        out = torch.empty_like(xq)
        _decode_attention_kernel[(B * H_kv, splits)](
            xq, xk, xv, cache_k, cache_v, slots, key_lengths, visible, out, part, counts,
            xq.stride(0), xk.stride(0), xv.stride(0), S, H_kv, Dh**-0.5 * 1.4426950408889634, splits,
            G=G, G_POW2=g_pow2, G_PAD=max(16, g_pow2), D=Dh, BLOCK_S=block_s, MIN_CHUNK=min_chunk,
            MERGE=merge or max(1, 4096 // (g_pow2 * Dh)), num_warps=num_warps,  # (masked past the last run)
        )  # fmt: skip
        return out
