"""The Mistral / Mixtral Transformer: tokens in, logits out.

Shapes: T = tokens of all sequences packed back to back, D = dim, H = n_heads,
H_kv = n_kv_heads, Dh = head_dim, F = hidden_dim, V = vocab_size.

This file defines the math. Every way of running it is this code: on CUDA,
mistral/decode.py compiles `TransformerBlock.forward` and replays a CUDA graph of
`Transformer.step`; on several processes, mistral/parallel.py's `Layout` decides which
layers and which heads a `Transformer` holds. A few pieces have fused versions that
run in their place where they apply (mistral/kernels.py: the matrix-vector product with
SwiGLU or a norm taken in, the decode step's cache write and attention in one kernel,
RMSNorm, rotary; mistral/moe.py's static-shape paths for the experts), each with a plain
PyTorch version beside it and tests holding the two to each other and to HF transformers.

Weights are kept in the layout the fast path wants (wq|wk|wv as one matrix, w1|w3 as
one, Mixtral's experts stacked), while `state_dict()` shows them under the names and
shapes of Mistral's checkpoints, as views: see mistral/views.py.
"""

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from mistral import kernels
from mistral.args import ModelArgs, QuantArgs
from mistral.attention import BACKENDS, Backend
from mistral.cache import CacheInputs, CacheView, RotatingBufferCache, Uncached
from mistral.errors import MistralError, is_int
from mistral.linear import GatedLinear, Linear
from mistral.moe import MoeLayer
from mistral.parallel import Layout, Link, add_all_reduces, check_tensor_split
from mistral.sampling import to_device
from mistral.views import CheckpointNames, split_views


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """cos and sin of the angle p * theta^(-2j/Dh) for each position p and pair j: float32 [T, Dh/2, 2]."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * freqs[None, :]
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rotary_emb(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x[2j], x[2j+1]) of x: [T, H, Dh] by its angle.

    The complex product (a + ib)(cos + i sin), in real arithmetic. Where kernels.fused_applies
    (half precision on CUDA) this arithmetic runs as one Triton kernel, kernels.rotary.
    """
    if kernels.fused_applies(x) and kernels.is_power_of_2(x.shape[-1]):
        return kernels.rotary(x, rope)
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [T, H, Dh/2]
    cos, sin = rope[:, None, :, 0], rope[:, None, :, 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernels.fused_applies(x):  # this arithmetic as one Triton kernel (half precision on CUDA)
            return kernels.rms_norm(x, self.weight, self.eps)
        x_float = x.float()
        return (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(CheckpointNames):
    """Grouped-query attention: H query heads share H_kv key-value heads (H / H_kv each).

    n_heads, n_kv_heads: this module's heads (all of them, or a tensor-parallel rank's share).
    """

    fused = ("wqkv",)

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, quantization: Optional[QuantArgs] = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.wqkv = Linear(dim, (n_heads + 2 * n_kv_heads) * head_dim, quantization=quantization)  # wq | wk | wv
        self.wo = Linear(n_heads * head_dim, dim, quantization=quantization)

    def checkpoint_views(self, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return split_views(fused, "wqkv", {"wq": q, "wk": kv, "wv": kv})

    def forward(self, x: torch.Tensor, norm: RMSNorm, rope: torch.Tensor, cache: CacheView, backend: Backend) -> torch.Tensor:
        """Attention of norm(x), under the mask of the cache's call."""
        T = x.shape[0]
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        xqk, xv = self.wqkv(x, norm=norm).split([q + kv, kv], dim=-1)
        # Queries and keys rotate alike: one [T, H + H_kv, Dh] tensor, one fused kernel.
        xqk = apply_rotary_emb(xqk.view(T, self.n_heads + self.n_kv_heads, self.head_dim), rope)
        xq, xk = xqk.split([self.n_heads, self.n_kv_heads], dim=1)
        out = _cached_attention(xq, xk, xv.view(T, self.n_kv_heads, self.head_dim), cache, backend)  # [T, H, Dh]
        return self.wo(out.flatten(1))


# The cache's index bookkeeping and xformers' bias objects are opaque to torch.compile:
# this part runs eagerly between two compiled pieces (and inside a CUDA graph all the
# same). decode.compiled_block marks it so, when it first compiles: the mark's import
# (torch._dynamo) takes a second that an uncompiled run need not wait for.
def _cached_attention(xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, cache: CacheView, backend: Backend) -> torch.Tensor:
    return cache.attend(xq, xk, xv, backend)


class FeedForward(CheckpointNames):
    """SwiGLU: w2(silu(w1 x) * w3 x), with w1 | w3 as one matrix."""

    fused = ("w13",)

    def __init__(self, dim: int, hidden_dim: int, quantization: Optional[QuantArgs] = None):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.w13 = GatedLinear(dim, 2 * hidden_dim, quantization=quantization)  # silu(w1 x) * w3 x
        self.w2 = Linear(hidden_dim, dim, quantization=quantization)

    def checkpoint_views(self, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return split_views(fused, "w13", {"w1": self.hidden_dim, "w3": self.hidden_dim})

    def forward(self, x: torch.Tensor, norm: Optional[RMSNorm] = None) -> torch.Tensor:
        """The feed-forward of norm(x) (of x without a norm)."""
        return self.w2(self.w13(x, norm))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layout: Layout = Layout()):
        super().__init__()
        ranks, quantization = layout.num_tensor_ranks, args.quantization  # each rank holds 1/ranks of the heads
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args.dim, args.n_heads // ranks, args.n_kv_heads // ranks, args.head_dim, quantization)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module
        if args.moe is None:
            self.feed_forward = FeedForward(args.dim, args.hidden_dim // ranks, quantization)
        else:
            moe = args.moe  # each rank holds 1/ranks of every expert, or (expert parallel) 1/ranks of the experts
            hidden_dim = args.hidden_dim if layout.expert_parallel else args.hidden_dim // ranks
            self.feed_forward = MoeLayer(args.dim, hidden_dim, moe.num_experts, moe.num_experts_per_tok, quantization,
                                         layout.experts(moe.num_experts))  # fmt: skip

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: CacheView, backend: Backend) -> torch.Tensor:
        # h = x + attention(attention_norm(x)); out = h + feed_forward(ffn_norm(h)). Each norm
        # is handed to the projection that reads its result (Linear's `norm`): for quantized
        # weights at batch 1 on CUDA the matrix-vector kernel applies it as it streams x,
        # one kernel fewer (see Linear._norm for why not for bfloat16 weights).
        h = x + self.attention(x, self.attention_norm, rope, cache, backend)
        return h + self.feed_forward(h, self.ffn_norm)


# How Transformer.step runs a block: plainly, or (mistral/decode.py) compiled.
RunBlock = Callable[..., torch.Tensor]


class Transformer(nn.Module):
    """The whole model, or one parallel rank's part of it (`layout`, see mistral/parallel.py).

    A pipeline stage builds only its own layers (the first also the embeddings, the
    last the final norm and output); a tensor-parallel rank builds its share of the
    heads and hidden units of each. `forward` then runs across all ranks and returns
    the same logits on each.
    """

    def __init__(self, args: ModelArgs, *, layout: Optional[Layout] = None, attention_backend: Backend = "auto"):
        super().__init__()
        if not isinstance(args, ModelArgs):
            raise MistralError(f"args must be a ModelArgs (ModelArgs.from_json(folder / 'params.json')), got {type(args).__name__}")
        if attention_backend not in BACKENDS:
            raise MistralError(f"attention_backend must be one of {BACKENDS}, got {attention_backend!r}")
        layout = layout or Layout()
        check_tensor_split(layout.num_tensor_ranks, args, layout.expert_parallel)
        own_layers = layout.layers(args.n_layers)
        self.args, self.layout, self.attention_backend = args, layout, attention_backend
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim) if layout.is_first else None
        # A dict keyed by the global layer index keeps the checkpoint's names (layers.7.attention.wq.weight).
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args, layout) for i in own_layers})
        self.norm = RMSNorm(args.dim, args.norm_eps) if layout.is_last else None
        self.output = Linear(args.dim, args.vocab_size) if layout.is_last else None  # kept in float by `quantize`
        if layout.num_tensor_ranks > 1:
            add_all_reduces(list(self.layers.values()), layout)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device  # every stage has layers; only the first has embeddings

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def step(
        self,
        x: torch.Tensor,
        inputs: CacheInputs,
        cache: Optional[RotatingBufferCache],
        run_block: RunBlock = TransformerBlock.__call__,
        rows: Optional[Sequence[int] | torch.Tensor] = None,
    ) -> torch.Tensor:
        """This rank's share of one forward call, for a prepared cache call (or none).

        x: token ids [T] on the first stage, else the previous stage's activations [T, D].
        Returns activations [T, D], or on the last stage float logits [T, V]: of the
        tokens `rows` only, when given (a prefill needs each prompt's last; a graph's are on the device).
        """
        h = x if self.tok_embeddings is None else self.tok_embeddings(x)
        rope = rotary_cos_sin(inputs.positions, self.args.head_dim, self.args.rope_theta)
        # The cache holds this stage's layers only: the k-th of them is cache layer k.
        for k, layer in enumerate(self.layers.values()):
            view = CacheView(None, None, inputs) if cache is None else cache.view(k, inputs)
            h = run_block(layer, h, rope, view, self.attention_backend)
        if self.output is None:
            return h
        assert self.norm is not None
        if rows is not None:  # [T, V] float32 logits of a long prefill would take gigabytes
            h = h[rows if isinstance(rows, torch.Tensor) else to_device(list(rows), h.device, torch.long)]  # without waiting for the GPU
        return self.output(self.norm(h)).float()

    def forward(
        self, input_ids: torch.Tensor, seqlens: Sequence[int], cache: Optional[RotatingBufferCache] = None
    ) -> torch.Tensor:
        """input_ids: [T], the sequences back to back; seqlens: their lengths. Returns float logits [T, V].

        With a cache, seqlens[b] tokens continue the sequence in cache row b (0 = none this call).
        """
        if not isinstance(seqlens, (list, tuple)) or not all(is_int(n) and n >= 0 for n in seqlens):
            raise MistralError(f"seqlens must be a list of token counts (ints >= 0), got {seqlens!r}")
        T = sum(seqlens)
        if T == 0:
            raise MistralError("seqlens add up to no tokens: a forward call needs at least one")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 1 or input_ids.shape[0] != T:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise MistralError(f"input_ids must be a 1-D tensor of sum(seqlens)={T} token ids, got {shape}")
        if self.layout.is_first and (input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool):
            raise MistralError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
        if self.layout.is_first and T and not bool(((input_ids >= 0) & (input_ids < self.args.vocab_size)).all()):
            raise MistralError(f"input_ids holds token ids outside the vocabulary 0..{self.args.vocab_size - 1}")
        if cache is not None and not isinstance(cache, RotatingBufferCache):
            raise MistralError(f"cache must be a RotatingBufferCache (model.make_cache), got {type(cache).__name__}")
        inputs = Uncached(seqlens, self.args.sliding_window, self.device) if cache is None else cache.prepare(seqlens)
        link = Link(self.layout, self.args.dim, self.device, self.dtype)  # the messages of this call
        x = input_ids if self.layout.is_first else link.recv_activations(T)
        out = self.step(x, inputs, cache)
        if cache is not None:
            cache.advance(seqlens)
        return link.share_logits(out, T, self.args.vocab_size)

    def make_cache(self, max_batch_size: int, max_seq_len: int, lookahead: int = 0) -> RotatingBufferCache:
        """A cache for this rank's layers and KV heads: W slots per row, fewer when max_seq_len < W,
        and `lookahead` more for tokens that may be taken back (speculative decoding)."""
        attention = next(iter(self.layers.values())).attention
        # The CPU's decode attention (attention._reference) copies one layer's filled keys and
        # values in float32, once for each query head of a key head; CUDA's kernel reads in place.
        group = attention.n_heads // attention.n_kv_heads
        overhead = 0.0 if self.device.type == "cuda" else group * 4 / self.dtype.itemsize / len(self.layers)
        return RotatingBufferCache(
            len(self.layers),
            max_batch_size,
            max_seq_len,
            self.args.sliding_window,
            attention.n_kv_heads,
            self.args.head_dim,
            device=self.device,
            dtype=self.dtype,
            overhead=overhead,
            lookahead=lookahead,
        )

    # Making a model from a folder, from random numbers, and writing it: mistral/loading.py,
    # imported where it is called (the file formats it reads are none of the math's business),
    # which builds the class it is handed.

    @classmethod
    def from_folder(
        cls, folder: Union[str, Path], *, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
        attention_backend: Backend = "auto", progress: Optional[Callable[[int, int, int], None]] = None,
        num_pipeline_ranks: int = 1, num_tensor_ranks: int = 1, pipeline_rank: Optional[int] = None,
        tensor_rank: Optional[int] = None, lora_path: Optional[Union[str, Path]] = None, expert_parallel: bool = False,
    ) -> "Transformer":  # fmt: skip
        """Load params.json and consolidated.safetensors (or consolidated.00.pth) from a folder
        (loading.from_folder says what each option does)."""
        from mistral.loading import from_folder

        return from_folder(
            cls, folder, device=device, dtype=dtype, attention_backend=attention_backend, progress=progress,
            num_pipeline_ranks=num_pipeline_ranks, num_tensor_ranks=num_tensor_ranks, pipeline_rank=pipeline_rank,
            tensor_rank=tensor_rank, lora_path=lora_path, expert_parallel=expert_parallel,
        )  # fmt: skip

    @classmethod
    def random(
        cls, args: ModelArgs, *, seed: int = 0, device: Union[str, torch.device] = "cpu", dtype: torch.dtype = torch.float32,
        attention_backend: Backend = "auto", num_pipeline_ranks: int = 1, num_tensor_ranks: int = 1,
        pipeline_rank: Optional[int] = None, tensor_rank: Optional[int] = None, expert_parallel: bool = False,
    ) -> "Transformer":  # fmt: skip
        """Random weights made directly on the device, seeded per tensor (loading.random)."""
        from mistral.loading import random

        return random(
            cls, args, seed=seed, device=device, dtype=dtype, attention_backend=attention_backend,
            num_pipeline_ranks=num_pipeline_ranks, num_tensor_ranks=num_tensor_ranks, pipeline_rank=pipeline_rank,
            tensor_rank=tensor_rank, expert_parallel=expert_parallel,
        )  # fmt: skip

    def save(self, folder: Union[str, Path]) -> None:
        """Write params.json and consolidated.safetensors, the layout from_folder reads: loading.save."""
        from mistral.loading import save

        save(self, folder)


def checkpoint_shapes(args: ModelArgs) -> dict[str, tuple[int, ...]]:
    """The name and shape of every tensor of params.json's model in its checkpoint (one process's, whole)."""
    with torch.device("meta"):  # shapes only (its first use imports torch._dynamo: for convert and quantize)
        return {name: tuple(t.shape) for name, t in Transformer(args).state_dict().items()}
