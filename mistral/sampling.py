"""Sampling a step's tokens from its logits: greedy, temperature, nucleus (top-p)."""

from typing import Optional

import torch


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits: [B, V] -> tokens [B]. Greedy at temperature 0, else temperature + nucleus (top-p)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    return torch.multinomial(probabilities(logits, temperature, top_p), 1, generator=generator).squeeze(-1)


def probabilities(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """logits: [..., V] -> what `sample` draws from at temperature > 0: [..., V], unnormalized under top_p < 1."""
    # Subtracting the max first keeps a tiny temperature from turning logits into inf - inf, and
    # dividing by no less than float32's smallest normal number keeps one that float32 rounds to
    # 0 (1e-46) from making the max's 0 / 0 a NaN: such a temperature is greedy, as it should be.
    temperature = max(temperature, torch.finfo(torch.float32).tiny)
    probs = torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / temperature, dim=-1)
    if top_p < 1:
        # Keep the most likely tokens until their mass reaches top_p; the first always stays.
        ordered, order = probs.sort(dim=-1, descending=True)
        ordered[ordered.cumsum(dim=-1) - ordered > top_p] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
    return probs


def sample_step(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits: [B, V] -> (tokens [B] as `sample` draws them, their log-probabilities [B],
    whether the logits are all finite: a device flag, for the caller to read a step later).

    Nothing here reads the device: a read waits for the GPU, and a decode loop reads once a
    step, late. NaN or inf would decode as garbage, which the flag then rejects; sampling
    draws from zeros instead, since they would fail inside torch.multinomial (on CUDA,
    killing the process).
    """
    finite = torch.isfinite(logits).all()
    if temperature > 0:
        logits = torch.where(finite, logits, 0.0)
    tokens = sample(logits, temperature, top_p, generator)
    return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1), finite


NON_FINITE = "the model's logits are not finite (NaN or inf): are its weights or params.json corrupt?"
