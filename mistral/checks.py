"""What a generation call is given, checked before anything runs: prompts, options, models.

Each check raises a MistralError whose one line names the culprit (the prompt, the option
and its value), so that nothing fails later deep inside torch, or runs on garbage.
"""

import math
from typing import Any

import torch

from mistral.errors import MistralError, check_positive_int, is_int, is_number
from mistral.model import Transformer


def check_options(
    encoded_prompts: list[list[int]],
    vocab_size: int,
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    chunk_size: int | None,
    seed: int | None = None,
    speculate: int = 0,
) -> None:
    check_prompts(encoded_prompts)
    for i, prompt in enumerate(encoded_prompts):
        if len(prompt) == 0:
            raise MistralError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise MistralError(f"prompt {i} has token ids outside the vocabulary 0..{vocab_size - 1}: {bad[:5]}")
    if not is_int(max_tokens) or max_tokens < 0:
        raise MistralError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
    # The command line hands over "nan", "abc" or 1e999 as typed: a str, or a float that is not finite.
    if not is_number(temperature) or not 0 <= temperature < math.inf:
        raise MistralError(f"temperature must be >= 0 and finite, got {temperature!r}")
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise MistralError(f"top_p must be in (0, 1], got {top_p!r}")
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    if seed is not None and (not is_int(seed) or not 0 <= seed < 2**64):
        raise MistralError(f"seed must be an integer, got {seed!r} (0 to 2**64-1, what torch.Generator takes)")
    if not is_int(speculate) or speculate < 0:
        raise MistralError(f"speculate must be a number of tokens (an int >= 0), got {speculate!r}")


def check_prompts(encoded_prompts: Any) -> None:
    """A list of prompts, each a list of token ids (ints): text, tensors and floats are named, not run."""
    if isinstance(encoded_prompts, str):
        raise MistralError("encoded_prompts is a str: encode the text first (tokenizer.encode) and give a list of prompts")
    if not isinstance(encoded_prompts, (list, tuple)):
        hint = " (.tolist() turns a tensor into one)" if isinstance(encoded_prompts, torch.Tensor) else ""
        raise MistralError(f"encoded_prompts must be a list of prompts, each a list of token ids, got {type(encoded_prompts).__name__}{hint}")
    if not encoded_prompts:
        raise MistralError("no prompts given")
    for i, prompt in enumerate(encoded_prompts):
        if not isinstance(prompt, (list, tuple)):
            raise MistralError(f"prompt {i} must be a list of token ids (ints), got {type(prompt).__name__}")
        for t in prompt:
            if not is_int(t):
                raise MistralError(f"prompt {i} holds {t!r} ({type(t).__name__}), which is not a token id (an int)")


def check_draft(draft: Any, model: Transformer, speculate: int) -> None:
    """A draft model speculation can use with `model`."""
    if not speculate:
        raise MistralError("a draft model proposes tokens for speculative decoding: give speculate=K (--speculate K) too")
    check_model(draft)
    if draft.layout.world_size > 1 or model.layout.world_size > 1:
        raise MistralError("speculation with a draft model runs on one process (prompt lookup runs on several)")
    if draft.args.vocab_size != model.args.vocab_size:
        raise MistralError(f"the draft model's vocabulary ({draft.args.vocab_size} tokens) is not the model's ({model.args.vocab_size})")
    if draft.device != model.device:
        raise MistralError(f"the draft model is on {draft.device}, the model on {model.device}: put both on one device")


def check_model(model: Any) -> None:
    """A Transformer whose weights are in one of the dtypes the model runs in."""
    if not isinstance(model, Transformer):
        raise MistralError(f"model must be a mistral Transformer, got {type(model).__name__}")
    if model.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise MistralError(f"the model's weights are {model.dtype}: run it in float32, bfloat16 or float16 (model.to(dtype))")
