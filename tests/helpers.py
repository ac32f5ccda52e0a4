"""Test helpers: the test device and tolerances, tiny random models, safetensors edits.

The suite runs on the CPU in float32 (reference attention on the materialized
xformers bias). `MISTRAL_TEST_DEVICE=cuda` runs the same tests through the xformers
kernels in bfloat16, with the looser tolerance that precision needs.
"""

import os
import random
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file
from torch.overrides import TorchFunctionMode

from mistral import ModelArgs, MoeArgs, Transformer, kernels
from mistral.stage import Stage

DEVICE = torch.device(os.environ.get("MISTRAL_TEST_DEVICE", "cpu"))
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
# The Triton kernels run compiled on CUDA, or on the CPU in Triton's interpreter
# (TRITON_INTERPRET=1, with Triton installed: CI has neither, and skips their tests).
TRITON_KERNELS_RUN = kernels.triton is not None and (DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")
# Relative error of logits between two float32 computations of the same function
# (rounding alone lands near 1e-6). Comparisons with Hugging Face transformers run in
# float32 on every device, so that an error of 1e-3 (a rope theta fixed wrongly) stands
# 10x over it on the GPU too, where bfloat16's own rounding would hide it.
F32_RTOL = 1e-4


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def tiny_args(
    *,
    moe: bool = False,
    sliding_window: Optional[int] = 8,
    n_layers: int = 2,
    vocab_size: int = 97,
    max_batch_size: int = 8,
) -> ModelArgs:
    return ModelArgs(
        dim=64,
        n_layers=n_layers,
        head_dim=16,
        hidden_dim=96,
        n_heads=4,
        n_kv_heads=2,
        norm_eps=1e-5,
        vocab_size=vocab_size,
        rope_theta=10000.0 if not moe else 1e6,
        sliding_window=sliding_window,
        max_batch_size=max_batch_size,
        moe=MoeArgs(num_experts=4, num_experts_per_tok=2) if moe else None,
    )


def random_model(args: ModelArgs, seed: int = 0) -> Transformer:
    """Random weights with std dim^-0.5, so activations neither vanish nor explode."""
    torch.manual_seed(seed)
    model = Transformer(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=args.dim**-0.5)
    return model.to(device=DEVICE, dtype=DTYPE).eval()


# The quantizations the tests run, as params.json records them: int4's groups fit the tiny models' widths (64, 96).
QUANTIZATIONS = {"int8": {"method": "int8"}, "int4": {"method": "int4", "group_size": 32}}


def dequantized(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float weight [..., out, in] that a quantized Linear's tensors stand for (README's formats, spelled
    out apart from the model's code): int8 weight * scales per row; int4 codes (column 2j in byte j's low
    nibble, 2j + 1 in its high one) * scales + mins of each column's group."""
    weight, scales = tensors["weight"], tensors["scales"].float()
    if "mins" not in tensors:
        return weight.float() * scales[..., None]
    codes = torch.empty(*weight.shape[:-1], 2 * weight.shape[-1])
    codes[..., 0::2], codes[..., 1::2] = weight % 16, weight // 16
    group = codes.shape[-1] // scales.shape[-1]
    return codes * scales.repeat_interleave(group, dim=-1) + tensors["mins"].float().repeat_interleave(group, dim=-1)


def edit_tensors(file: Path, **changes: Optional[torch.Tensor]) -> None:
    """Rewrite a safetensors file. changes: tensor name with dots as "__" -> new tensor, or None to drop it."""
    state = load_file(str(file))
    for key, tensor in changes.items():
        name = key.replace("__", ".")
        if tensor is None:
            del state[name]
        else:
            state[name] = tensor
    save_file(state, str(file), metadata={"format": "pt"})


def bfloat16_cost(seed: int = 0) -> float:
    """What bfloat16 costs on this device: the relative error of the logits of a tiny
    random Mixtral-style model (the test models' shape) run in bfloat16, against the
    same weights in float32, on prompts past the window."""
    model = Transformer.random(tiny_args(moe=True), seed=seed, device=DEVICE)
    ids = torch.randint(0, 97, (33,), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    with torch.no_grad():
        want = model(ids, [33])
        got = model.to(torch.bfloat16)(ids, [33])
    return rel_error(got, want)


# Relative error of logits between two computations of the same function in the test
# dtype: float32's above; in bfloat16, 4x bfloat16's measured cost (two computations
# rounded apart differ by about sqrt(2) of it; the cost measured 6.0e-3 on an H100, README).
RTOL = F32_RTOL if DTYPE == torch.float32 else 4 * max(bfloat16_cost(0), bfloat16_cost(1))


def random_prompts(lengths: Sequence[int], vocab_size: int = 97, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(n)] for n in lengths]


def full_forward(model: Transformer, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor(tokens, device=DEVICE), [len(tokens)])


def recomputed_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The definition of greedy decoding: the whole no-cache forward again for every new token."""
    sequence = list(prompt)
    for _ in range(n):
        sequence.append(int(full_forward(model, sequence)[-1].argmax()))
    return sequence[len(prompt) :]


def assert_greedy(model: Transformer, prompt: list[int], generated: list[int], n: int) -> None:
    """generated must be the greedy continuation of prompt under the no-cache forward.

    float32: token for token, exactly. bfloat16: the cached and the full forward round
    differently (different shapes, different kernels), so where the two best logits are
    closer than that rounding the argmax may legitimately flip, and once one token differs
    the sequences part. There we teacher-force: feed the cached path's own tokens to the
    full forward and require each chosen token's logit to be within a tolerance of the
    best, the tolerance being RTOL of the logits' largest magnitude (rel_error's scale).
    """
    assert len(generated) == n
    if DTYPE == torch.float32:
        assert generated == recomputed_greedy(model, prompt, n)
        return
    logits = full_forward(model, prompt + generated[:-1])[len(prompt) - 1 :]  # row i predicts generated[i]
    chosen = logits.gather(-1, torch.tensor(generated, device=DEVICE)[:, None]).squeeze(-1)
    gap = logits.max(-1).values - chosen
    tolerance = RTOL * logits.abs().max(-1).values
    assert (gap <= tolerance).all(), f"gaps {gap.tolist()} exceed tolerances {tolerance.tolist()}"


class HostReads(TorchFunctionMode):
    """Counts the host's reads of tensors while active (on CUDA each one waits for the GPU):
    every read, or, with `only_in`, those made directly in source files of that name."""

    READS = {"tolist", "item", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"}

    def __init__(self, only_in: Optional[str] = None) -> None:
        super().__init__()
        self.only_in, self.reads = only_in, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if getattr(func, "__name__", "") in self.READS and (
            self.only_in is None or sys._getframe(1).f_code.co_filename.endswith(self.only_in)
        ):
            self.reads += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def forward_calls(model: Transformer) -> Iterator[list[int]]:
    """The tokens of each forward call of `model` while active (Stage.forward, in Python): a
    call replayed from a CUDA graph counts too, where a module's hook runs only at capture."""
    calls: list[int] = []
    forward = Stage.forward

    def counted(stage: Stage, runner, ids, *args, **kwargs):  # type: ignore[no-untyped-def]
        if stage.model is model:
            calls.append(len(ids))
        return forward(stage, runner, ids, *args, **kwargs)

    Stage.forward = counted  # type: ignore[method-assign]
    try:
        yield calls
    finally:
        Stage.forward = forward  # type: ignore[method-assign]
