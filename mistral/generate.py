"""Generation: chunked prefill of packed prompts, then decoding all sequences together.

The model maps tokens to logits; this module owns the cache's lifetime, sampling and
stopping.
"""

from typing import Iterator, Optional

import torch

from mistral import decode, pipeline
from mistral.cache import RotatingBufferCache, prefill_calls
from mistral.errors import MistralError
from mistral.model import Transformer


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits: [B, V] -> tokens [B]. Greedy at temperature 0, else temperature + nucleus (top-p)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        # Keep the most likely tokens until their mass reaches top_p; the first always stays.
        probs, order = probs.sort(dim=-1, descending=True)
        probs[probs.cumsum(dim=-1) - probs > top_p] = 0
        return order.gather(-1, torch.multinomial(probs, 1, generator=generator)).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def pick(
    logits: torch.Tensor, temperature: float, top_p: float, generator: Optional[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [B, V] -> (tokens [B] as `sample` draws them, their log-probabilities [B])."""
    tokens = sample(logits, temperature, top_p, generator)
    return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def check_options(
    encoded_prompts: list[list[int]],
    vocab_size: int,
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    chunk_size: Optional[int],
    seed: Optional[int] = None,
) -> None:
    if not encoded_prompts:
        raise MistralError("no prompts given")
    for i, prompt in enumerate(encoded_prompts):
        if len(prompt) == 0:
            raise MistralError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise MistralError(f"prompt {i} has token ids outside the vocabulary 0..{vocab_size - 1}: {bad[:5]}")
    if not isinstance(max_tokens, int) or max_tokens < 0:
        raise MistralError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
    if not temperature >= 0:
        raise MistralError(f"temperature must be >= 0, got {temperature!r}")
    if not 0 < top_p <= 1:
        raise MistralError(f"top_p must be in (0, 1], got {top_p!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise MistralError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise MistralError(f"seed must be an integer, got {seed!r}")


@torch.inference_mode()
def stream(
    encoded_prompts: list[list[int]],
    model: Transformer,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chunk_size: Optional[int] = None,
    eos_id: Optional[int] = None,
    seed: Optional[int] = None,
    cache: Optional[RotatingBufferCache] = None,
    micro_batches: Optional[int] = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens [B], logprobs [B]) on the model's device after each step.

    A sequence keeps receiving tokens after its eos (they are cut by `generate`); the
    stream ends once every sequence has produced eos, or after max_tokens steps.
    All prompts must fit one cache: at most model.args.max_batch_size of them.

    cache: continue sequences that a previous stream left in this cache (a chat). Row b
    already holds the first cache.lengths[b] tokens of encoded_prompts[b]; only the rest
    is prefilled. The last token a stream yields is never fed to the model, so a
    continuation's prompt starts with it.

    micro_batches: a pipelined model (num_pipeline_ranks > 1) splits the batch into this
    many micro-batches (default: one per rank); see mistral/pipeline.py. Every rank
    yields the same tokens. Ignored on a single process.
    """
    check_options(
        encoded_prompts, model.args.vocab_size, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        chunk_size=chunk_size, seed=seed,
    )
    B = len(encoded_prompts)
    if B > model.args.max_batch_size:
        raise MistralError(f"{B} prompts exceed max_batch_size={model.args.max_batch_size}")
    if max_tokens == 0:
        return
    if model.num_pipeline_ranks > 1:
        if cache is not None:
            raise MistralError("continuing sequences from a cache is not supported with num_pipeline_ranks > 1")
        generator = None if seed is None else torch.Generator(model.device).manual_seed(seed)
        yield from pipeline.stream(
            encoded_prompts, model, max_tokens=max_tokens, chunk_size=chunk_size, eos_id=eos_id,
            micro_batches=micro_batches, pick=lambda logits: pick(logits, temperature, top_p, generator),
        )
        return
    if cache is None:
        cache = model.make_cache(B, max(len(p) for p in encoded_prompts) + max_tokens)
    for b, p in enumerate(encoded_prompts):
        if len(p) <= cache.lengths[b]:
            raise MistralError(f"prompt {b} has {len(p)} tokens, but the cache already holds {cache.lengths[b]}: nothing new to read")
    unseen = [p[cache.lengths[b] :] for b, p in enumerate(encoded_prompts)]
    device = model.device

    # Prefill: a prompt that has ended contributes 0 tokens to later calls; its last
    # logits were kept when it ended.
    last_logits: list[Optional[torch.Tensor]] = [None] * B
    for call in prefill_calls(unseen, chunk_size or cache.size):
        input_ids = torch.tensor(call.input_ids, device=device)
        # On CUDA, the fused pieces of mistral/decode.py compute the same logits.
        if decode.usable(model):
            logits = decode.prefill(model, input_ids, call.seqlens, cache)
        else:
            logits = model(input_ids, call.seqlens, cache)
        for b, row in call.ends.items():
            last_logits[b] = logits[row]
    logits = torch.stack(last_logits)  # type: ignore[arg-type]

    generator = None if seed is None else torch.Generator(device).manual_seed(seed)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    # On CUDA the decode steps replay one captured graph (mistral/decode.py).
    decoder = decode.GraphDecoder(model, cache, B) if max_tokens > 1 and decode.usable(model) else None
    for step in range(max_tokens):
        tokens, logprobs = pick(logits, temperature, top_p, generator)
        yield tokens, logprobs
        if eos_id is not None:
            done |= tokens == eos_id
            if done.all():
                return
        if step + 1 < max_tokens:
            logits = model(tokens, [1] * B, cache) if decoder is None else decoder.step(tokens)


def generate(
    encoded_prompts: list[list[int]],
    model: Transformer,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chunk_size: Optional[int] = None,
    eos_id: Optional[int] = None,
    seed: Optional[int] = None,
    micro_batches: Optional[int] = None,
) -> tuple[list[list[int]], list[list[float]]]:
    """Generated tokens (eos excluded) and their log-probabilities, per prompt.

    More prompts than max_batch_size run as consecutive batches of that size.
    """
    options = dict(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, chunk_size=chunk_size, eos_id=eos_id, seed=seed,
        micro_batches=micro_batches,
    )
    n = model.args.max_batch_size
    all_tokens: list[list[int]] = []
    all_logprobs: list[list[float]] = []
    for first in range(0, max(len(encoded_prompts), 1), n):
        batch = encoded_prompts[first : first + n]
        steps = list(stream(batch, model, **options))  # type: ignore[arg-type]
        tokens = torch.stack([t for t, _ in steps], dim=1).tolist() if steps else [[] for _ in batch]
        logprobs = torch.stack([lp for _, lp in steps], dim=1).tolist() if steps else [[] for _ in batch]
        for toks, lps in zip(tokens, logprobs):
            stop = toks.index(eos_id) if eos_id in toks else len(toks)
            all_tokens.append(toks[:stop])
            all_logprobs.append(lps[:stop])
    return all_tokens, all_logprobs
