"""The Mistral / Mixtral Transformer: tokens in, logits out.

Shapes: T = tokens of all sequences packed back to back, D = dim, H = n_heads,
H_kv = n_kv_heads, Dh = head_dim, V = vocab_size.
"""

import zlib
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from mistral import pipeline
from mistral.args import ModelArgs
from mistral.attention import BACKENDS, Backend, attend
from mistral.cache import CacheView, RotatingBufferCache
from mistral.checkpoint import Progress, read_args, read_weights, write_folder
from mistral.errors import MistralError
from mistral.masks import AttentionBias, prefill_mask
from mistral.moe import MoeLayer


def precompute_freqs_cis(positions: torch.Tensor, head_dim: int, theta: float) -> torch.Tensor:
    """Rotations e^(i * p * theta^(-2j/Dh)) for each position p and pair j: complex [T, Dh/2]."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions.float()[:, None] * freqs[None, :]
    return torch.polar(torch.ones_like(angles), angles)


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x[2j], x[2j+1]) of x: [T, H, Dh] as one complex number."""
    x_complex = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(x_complex * freqs_cis[:, None, :]).flatten(-2).type_as(x)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        return (x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        mask: AttentionBias,
        cache: Optional[CacheView],
        backend: Backend,
    ) -> torch.Tensor:
        T = x.shape[0]
        xq = self.wq(x).view(T, self.n_heads, self.head_dim)
        xk = self.wk(x).view(T, self.n_kv_heads, self.head_dim)
        xv = self.wv(x).view(T, self.n_kv_heads, self.head_dim)
        xq, xk = apply_rotary_emb(xq, freqs_cis), apply_rotary_emb(xk, freqs_cis)
        keys, values = (xk, xv) if cache is None else cache.update(xk, xv)
        out = attend(xq, keys, values, mask, backend)  # [T, H, Dh]
        return self.wo(out.reshape(T, self.n_heads * self.head_dim))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.w1 = nn.Linear(args.dim, args.hidden_dim, bias=False)
        self.w2 = nn.Linear(args.hidden_dim, args.dim, bias=False)
        self.w3 = nn.Linear(args.dim, args.hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward: nn.Module
        if args.moe is None:
            self.feed_forward = FeedForward(args)
        else:
            self.feed_forward = MoeLayer(
                experts=[FeedForward(args) for _ in range(args.moe.num_experts)],
                gate=nn.Linear(args.dim, args.moe.num_experts, bias=False),
                num_experts_per_tok=args.moe.num_experts_per_tok,
            )

    def forward(
        self,
        x: torch.Tensor,
        freqs_cis: torch.Tensor,
        mask: AttentionBias,
        cache: Optional[CacheView],
        backend: Backend,
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis, mask, cache, backend)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """The whole model, or with num_pipeline_ranks > 1 one pipeline rank's part of it.

    Rank r builds only its own layers (mistral.pipeline.layer_range), rank 0 also the
    embeddings, the last rank the final norm and output; forward then runs across all
    ranks (see mistral/pipeline.py) and returns the same logits on each.
    """

    def __init__(
        self,
        args: ModelArgs,
        *,
        pipeline_rank: int = 0,
        num_pipeline_ranks: int = 1,
        attention_backend: Backend = "auto",
    ):
        super().__init__()
        if attention_backend not in BACKENDS:
            raise MistralError(f"attention_backend must be one of {BACKENDS}, got {attention_backend!r}")
        own_layers = pipeline.layer_range(args.n_layers, pipeline_rank, num_pipeline_ranks)
        if num_pipeline_ranks > 1:
            pipeline.check_process_group(pipeline_rank, num_pipeline_ranks)
        self.args = args
        self.attention_backend = attention_backend
        self.pipeline_rank, self.num_pipeline_ranks = pipeline_rank, num_pipeline_ranks
        if pipeline_rank == 0:
            self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        # A dict keyed by the global layer index keeps the checkpoint's names (layers.7.attention.wq.weight).
        self.layers = nn.ModuleDict({str(i): TransformerBlock(args) for i in own_layers})
        if pipeline_rank == num_pipeline_ranks - 1:
            self.norm = RMSNorm(args.dim, args.norm_eps)
            self.output = nn.Linear(args.dim, args.vocab_size, bias=False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device  # every rank has layers; only rank 0 has embeddings

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def forward(
        self, input_ids: torch.Tensor, seqlens: Sequence[int], cache: Optional[RotatingBufferCache] = None
    ) -> torch.Tensor:
        """input_ids: [T], the sequences back to back; seqlens: their lengths. Returns float logits [T, V].

        With a cache, seqlens[b] tokens continue the sequence in cache row b (0 = none this call).
        """
        if input_ids.dim() != 1 or input_ids.shape[0] != sum(seqlens):
            raise MistralError(
                f"input_ids must be 1-D with sum(seqlens)={sum(seqlens)} tokens, got shape {tuple(input_ids.shape)}"
            )
        if self.num_pipeline_ranks > 1:
            return pipeline.forward(self, input_ids, seqlens, cache)
        h = self.run_layers(self.tok_embeddings(input_ids), seqlens, cache)  # [T, D]
        return self.output(self.norm(h)).float()  # [T, V]

    def run_layers(self, h: torch.Tensor, seqlens: Sequence[int], cache: Optional[RotatingBufferCache]) -> torch.Tensor:
        """h: [T, D] through this model's layers (a pipeline rank's own); advances the cache."""
        if cache is None:
            active = [s for s in seqlens if s > 0]
            positions = torch.cat([torch.arange(s, device=self.device) for s in active])
            mask = prefill_mask(active, self.args.sliding_window, self.device)
        else:
            inputs = cache.prepare(seqlens)
            positions, mask = inputs.positions, inputs.mask
        freqs_cis = precompute_freqs_cis(positions, self.args.head_dim, self.args.rope_theta)
        # The cache holds this model's layers only: the k-th of them is cache layer k.
        for k, layer in enumerate(self.layers.values()):
            view = None if cache is None else cache.view(k)
            h = layer(h, freqs_cis, mask, view, self.attention_backend)
        if cache is not None:
            cache.advance(seqlens)
        return h

    def make_cache(self, max_batch_size: int, max_seq_len: int) -> RotatingBufferCache:
        """A cache for this model: W slots per row, fewer when max_seq_len < W."""
        return RotatingBufferCache(
            len(self.layers),
            max_batch_size,
            max_seq_len,
            self.args.sliding_window,
            self.args.n_kv_heads,
            self.args.head_dim,
            device=self.device,
            dtype=self.dtype,
        )

    @classmethod
    def from_folder(
        cls,
        folder: Union[str, Path],
        *,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        attention_backend: Backend = "auto",
        progress: Optional[Progress] = None,
        pipeline_rank: int = 0,
        num_pipeline_ranks: int = 1,
    ) -> "Transformer":
        """Load params.json and consolidated.safetensors (or consolidated.00.pth) from a folder.

        progress: called after each tensor is read (a CLI shows it while a large checkpoint loads).
        pipeline_rank, num_pipeline_ranks: read only this rank's tensors.
        """
        args = read_args(folder)
        with torch.device("meta"):  # shapes only: the weights are read straight into place
            model = cls(
                args, pipeline_rank=pipeline_rank, num_pipeline_ranks=num_pipeline_ranks, attention_backend=attention_backend
            )
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
        weights = read_weights(
            folder, expected, device=device, dtype=dtype, progress=progress, allow_extra=num_pipeline_ranks > 1
        )
        model.load_state_dict(weights, assign=True)
        return model

    @classmethod
    def random(
        cls,
        args: ModelArgs,
        *,
        seed: int = 0,
        device: Union[str, torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        attention_backend: Backend = "auto",
        pipeline_rank: int = 0,
        num_pipeline_ranks: int = 1,
    ) -> "Transformer":
        """Random weights (normal, std dim^-0.5) made directly on the device: benchmarks need no files.

        Each tensor is drawn from a generator seeded by (seed, its name), so a pipeline
        rank holds exactly the tensors the whole model would hold on the same device.
        """
        with torch.device("meta"):
            model = cls(
                args, pipeline_rank=pipeline_rank, num_pipeline_ranks=num_pipeline_ranks, attention_backend=attention_backend
            )
        model = model.to(dtype).to_empty(device=device)
        with torch.no_grad():
            for name, p in model.named_parameters():
                generator = torch.Generator(p.device).manual_seed(seed << 32 | zlib.crc32(name.encode()))
                p.normal_(std=args.dim**-0.5, generator=generator)
        return model.eval()

    def save(self, folder: Union[str, Path]) -> None:
        """Write params.json and consolidated.safetensors, the layout from_folder reads."""
        if self.num_pipeline_ranks > 1:
            raise MistralError(f"pipeline rank {self.pipeline_rank} holds only part of the model: save it from one process")
        write_folder(folder, self.args, self.state_dict())
