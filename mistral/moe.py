"""Sparse mixture of experts (Mixtral): each token runs through k of E feed-forwards."""

import torch
from torch import nn


class MoeLayer(nn.Module):
    """gate logits -> top-k experts -> softmax over those k only -> weighted sum.

    T = tokens, D = model dim, E = experts, A = activated experts per token (k).
    """

    def __init__(self, experts: list[nn.Module], gate: nn.Linear, num_experts_per_tok: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.gate = gate
        self.num_experts_per_tok = num_experts_per_tok

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, D] -> (weights [T, A], chosen experts [T, A])."""
        gate_logits = self.gate(x)  # [T, E]
        weights, chosen = torch.topk(gate_logits, self.num_experts_per_tok, dim=-1)  # [T, A]
        # Renormalising over the chosen k equals HF's softmax-over-all-then-renormalise.
        return torch.softmax(weights, dim=-1, dtype=torch.float32).to(x.dtype), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D]
        weights, chosen = self.route(x)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            # Each expert runs only on the tokens routed to it; a token picks an expert at most once.
            token, slot = torch.where(chosen == e)
            out.index_add_(0, token, weights[token, slot, None] * expert(x[token]))
        return out
