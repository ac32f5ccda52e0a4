"""Sparse mixture of experts (Mixtral): each token runs through k of E feed-forwards.

T = tokens, D = model dim, E = experts, A = activated experts per token (k), F = hidden dim.
"""

from typing import Optional

import torch
from torch import nn

from mistral.args import QuantArgs
from mistral.views import CheckpointNames, split_views
from mistral.kernels import dequantize_int4, expert_linear, expert_linear_applies, expert_matvec, swiglu
from mistral.linear import Linear

# Pairs up to which float16 experts on CUDA (no grouped matmul) run as matrix-vector
# products, and quantized ones as kernels.expert_linear's grouped products: static shapes
# that a CUDA graph can capture, every decode batch up to 64 sequences at 2 experts each.
MATVEC_MAX_PAIRS = 128


class MoeLayer(CheckpointNames):
    """gate logits -> top-k experts -> softmax over those k only -> weighted sum.

    The experts' weights are stacked, w1 | w3 as w13 [E, 2F, D] and w2 [E, D, F] (each with
    its scales (and mins) when quantized), so the
    experts of a forward call run with shapes that do not depend on the routing (a CUDA
    graph needs static shapes), and each chosen expert's weights are read once, the
    others not at all:
    - few (token, expert) pairs (decoding a small batch): one matrix-vector product per
      pair (kernels.expert_matvec), the expert index read on the device;
    - more pairs: they are sorted by expert, and a grouped matmul runs each expert on
      its contiguous group of rows (quantized experts: kernels.expert_linear, up to
      MATVEC_MAX_PAIRS; a prefill past it turns one expert at a time into x's dtype).
    `reference` is the plain loop over experts, for the tests.

    experts: the global indices of the experts this layer holds (default all): under expert
    parallelism (parallel.Layout) a rank holds some whole experts, routes every token as the
    whole model would, and adds up only its own experts' outputs; the tensor-parallel
    all-reduce after the layer sums the ranks' parts.
    """

    fused = ("w13", "w2")

    def __init__(
        self, dim: int, hidden_dim: int, num_experts: int, num_experts_per_tok: int, quantization: Optional[QuantArgs] = None,
        experts: Optional[range] = None,
    ):  # fmt: skip
        super().__init__()
        self.experts = range(num_experts) if experts is None else experts
        self.gate = nn.Linear(dim, num_experts, bias=False)  # the router stays in the model's dtype
        self.w13 = Linear(dim, 2 * hidden_dim, experts=len(self.experts), quantization=quantization)
        self.w2 = Linear(hidden_dim, dim, experts=len(self.experts), quantization=quantization)
        self.hidden_dim, self.num_experts_per_tok = hidden_dim, num_experts_per_tok

    def checkpoint_views(self, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        views, F, D = {}, self.hidden_dim, self.w2.weight.shape[1]
        for i, e in enumerate(self.experts):
            expert = {name: t[i] for name, t in fused.items()}
            views |= split_views(expert, "w13", {f"experts.{e}.w1": F, f"experts.{e}.w3": F})
            views |= split_views(expert, "w2", {f"experts.{e}.w2": D})
        return views

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, D] -> (weights [T, A], chosen experts [T, A]), experts numbered as this layer
        stacks them; under expert parallelism another rank's expert is -1 (its pairs add nothing)."""
        gate_logits = self.gate(x)  # [T, E]
        weights, chosen = torch.topk(gate_logits, self.num_experts_per_tok, dim=-1)  # [T, A]
        # Renormalising over the chosen k equals HF's softmax-over-all-then-renormalise.
        weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(x.dtype)
        if len(self.experts) == self.gate.out_features:
            return weights, chosen
        mine = (chosen >= self.experts.start) & (chosen < self.experts.stop)
        return weights, torch.where(mine, chosen - self.experts.start, -1)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone, SwiGLU: w2(silu(w1 x) * w3 x). x: [T, D]."""
        return _linear(swiglu(_linear(x, self.w13, e)), self.w2, e)

    def forward(self, x: torch.Tensor, norm: Optional[nn.Module] = None) -> torch.Tensor:
        """The layer's output for norm(x) (for x without a norm): [T, D]."""
        if norm is not None:  # the router reads it too: applied once, here
            x = norm(x)
        weights, chosen = self.route(x)  # [T, A]
        (T, A), E = chosen.shape, self.w13.weight.shape[0]
        # [T * A], pair p is (token p // A, slot p % A); -1 another rank's expert (expert
        # parallelism), whose pairs every path below leaves out with static shapes (a CUDA graph).
        pair_expert = chosen.flatten()
        w13, w2 = self.w13, self.w2
        # The grouped matmul takes bfloat16 only on CUDA and, under torch.compile, everywhere
        # (its shape function checks so); quantized experts have a grouped product of their own
        # (kernels.expert_linear) up to MATVEC_MAX_PAIRS; float16 ones on CUDA neither, and keep
        # to the matrix-vector products up to there (each pair reading its expert's rows).
        quantized = w13.scales is not None
        if quantized:
            grouped = expert_linear_applies(x)  # (not float32 on CUDA, which stays with the matrix-vector products)
        else:
            grouped = x.dtype == torch.bfloat16 or not (x.is_cuda or torch.compiler.is_compiling())
        if T * A <= (E if grouped else MATVEC_MAX_PAIRS):  # (expert -1: zeros, no weight read)
            h = expert_matvec(x.repeat_interleave(A, dim=0), w13.weight, pair_expert, w13.scales, w13.mins, glu=True)
            y = expert_matvec(h, w2.weight, pair_expert, w2.scales, w2.mins) * weights.flatten()[:, None]
            return y.view(T, A, -1).sum(dim=1)
        if not grouped or (quantized and T * A > MATVEC_MAX_PAIRS):
            # A prefill: quantized experts are turned into x's dtype one at a time, where all at
            # once would not fit beside them.
            return self.reference(x)
        whole = E == self.gate.out_features
        key = pair_expert if whole else torch.where(pair_expert < 0, E, pair_expert)  # another rank's pairs last
        order = key.argsort(stable=True)  # pairs grouped by expert, tokens ascending
        token = order // A
        # Group e is rows ends[e-1] .. ends[e]-1; counting by comparison keeps shapes static.
        ends = (key[:, None] == torch.arange(E, device=x.device)).sum(0).cumsum(0).to(torch.int32)
        xs = x[token]  # [T * A, D]
        h = swiglu(_grouped(xs, w13, ends))
        y = _grouped(h, w2, ends) * weights.flatten()[order, None]
        if not whole:  # rows past the last group: whatever the memory held (_grouped_mm's; expert_linear's are zeros)
            y = torch.where(key[order, None] < E, y, 0)
        # A token's pairs are added in expert order, as `reference` adds them.
        return torch.zeros_like(x).index_add_(0, token, y)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """forward, as a loop: each expert runs on the tokens routed to it."""
        weights, chosen = self.route(x)
        out = torch.zeros_like(x)
        for e in range(self.w13.weight.shape[0]):
            token, slot = torch.where(chosen == e)  # a token picks an expert at most once
            out.index_add_(0, token, weights[token, slot, None] * self.expert(e, x[token]))
        return out


def _grouped(x: torch.Tensor, stack: Linear, ends: torch.Tensor) -> torch.Tensor:
    """Rows of x grouped by expert (group e: rows ends[e-1] .. ends[e]-1) times their expert's weights."""
    if stack.scales is None:
        return torch._grouped_mm(x, stack.weight.mT, offs=ends)
    return expert_linear(x, stack.weight, ends, stack.scales, stack.mins)


def _linear(x: torch.Tensor, stack: Linear, e: int) -> torch.Tensor:
    """x @ W[e]^T for expert e of a stacked Linear."""
    if stack.mins is not None:
        return nn.functional.linear(x, dequantize_int4(stack.weight[e], stack.scales[e], stack.mins[e], x.dtype))
    w = stack.weight[e].to(x.dtype)
    y = nn.functional.linear(x, w)
    return y if stack.scales is None else y * stack.scales[e]
