"""Sampling a step's tokens from its logits: greedy, temperature, nucleus (top-p)."""

from typing import Optional, Sequence, Union

import torch


# One temperature or top_p for every row, or one per row ([B] tensors): a batch of requests.
Option = Union[float, torch.Tensor]
# One generator for every row, or one per row (None: PyTorch's own): seeded requests side by side.
Generators = Union[Optional[torch.Generator], Sequence[Optional[torch.Generator]]]


def sample(logits: torch.Tensor, temperature: Option, top_p: Option, generator: Generators) -> torch.Tensor:
    """logits: [B, V] -> tokens [B]. Greedy at temperature 0, else temperature + nucleus (top-p).

    A token is drawn by an exponential race: the row's probabilities, each divided by its
    own draw of Exp(1), and the largest wins, which token i does with probability p_i / sum(p)
    (what torch.multinomial draws; but rows of different generators, each filling its own row
    of draws, then share one pass).
    """
    if not isinstance(temperature, torch.Tensor) and temperature == 0:
        return logits.argmax(dim=-1)
    probs = probabilities(logits, temperature, top_p)
    race = torch.empty_like(probs, dtype=torch.float32)
    if isinstance(generator, (list, tuple)):  # each row its own numbers, whatever rows are beside it
        for row, g in zip(race, generator):
            row.exponential_(generator=g)
    else:
        race.exponential_(generator=generator)
    # A draw of 0 would make a token of no mass 0 / 0 = NaN, which argmax takes for the largest.
    return (probs / race.clamp_(min=torch.finfo(torch.float32).tiny)).argmax(dim=-1)


def probabilities(logits: torch.Tensor, temperature: Option, top_p: Option) -> torch.Tensor:
    """logits: [..., V] -> what `sample` draws from at temperature > 0: [..., V], unnormalized under top_p < 1."""
    # Subtracting the max first keeps a tiny temperature from turning logits into inf - inf, and
    # dividing by no less than float32's smallest normal number keeps one that float32 rounds to
    # 0 (1e-46) from making the max's 0 / 0 a NaN: such a temperature is greedy, as it should be.
    tiny = torch.finfo(torch.float32).tiny
    temperature = temperature.clamp(min=tiny)[..., None] if isinstance(temperature, torch.Tensor) else max(temperature, tiny)
    probs = torch.softmax((logits - logits.max(dim=-1, keepdim=True).values) / temperature, dim=-1)
    if isinstance(top_p, torch.Tensor) or top_p < 1:
        # Keep the most likely tokens until their mass reaches top_p; the first always stays.
        ordered, order = probs.sort(dim=-1, descending=True)
        ordered[ordered.cumsum(dim=-1) - ordered > (top_p[..., None] if isinstance(top_p, torch.Tensor) else top_p)] = 0
        probs = torch.zeros_like(probs).scatter_(-1, order, ordered)
    return probs


def sample_step(
    logits: torch.Tensor, temperature: Option, top_p: Option, generator: Generators
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits: [B, V] -> (tokens [B] as `sample` draws them, their log-probabilities [B],
    whether the logits are all finite: a device flag, for the caller to read a step later).

    Nothing here reads the device: a read waits for the GPU, and a decode loop reads once a
    step, late. NaN or inf would decode as garbage, which the flag then rejects; sampling
    draws from zeros instead, which keeps its arithmetic defined.
    """
    finite = torch.isfinite(logits).all()
    if isinstance(temperature, torch.Tensor) or temperature > 0:
        logits = torch.where(finite, logits, 0.0)
    tokens = sample(logits, temperature, top_p, generator)
    return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1), finite


def to_device(values: list, device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A host list on `device`; on CUDA through pinned memory, so that the host does not wait for
    the work queued before the copy (a plain copy from pageable memory would)."""
    host = torch.tensor(values, dtype=dtype)
    return host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)


NON_FINITE = "the model's logits are not finite (NaN or inf): are its weights or params.json corrupt?"
