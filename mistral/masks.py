"""The three attention masks, built in one place, as xformers block-diagonal biases.

Several sequences are packed back to back into one flat batch of tokens, so a mask
is block-diagonal: a query sees keys of its own sequence only. Inside a block,
sliding-window attention lets the query at position i see keys i-W+1 .. i.
The pictures use W = 3; `x` = attends, `.` = masked.

1. First prefill (empty cache): queries and keys are the same new tokens.
   `BlockDiagonalCausalMask.from_seqlens(seqlens).make_local_attention(W)`,
   seqlens = [4, 2]:

            keys  a0 a1 a2 a3 b0 b1
        a0         x  .  .  .  .  .
        a1         x  x  .  .  .  .
        a2         x  x  x  .  .  .
        a3         .  x  x  x  .  .     <- a0 has left the window
        b0         .  .  .  .  x  .
        b1         .  .  .  .  x  x

2. A later prefill chunk: each sequence's keys are its cached tokens (at most W,
   in chronological order) followed by its new tokens, so there are more keys
   than queries and the causal diagonal is anchored at the bottom right.
   `BlockDiagonalMask.from_seqlens(q_seqlen, kv_seqlen).make_local_attention_from_bottomright(W)`,
   sequence a: 3 cached (c0..c2) + 2 new; sequence b: 1 cached + 1 new:

            keys  c0 c1 c2 a3 a4 | d0 b1
        a3         .  x  x  x  .   .  .
        a4         .  .  x  x  x   .  .
        b1         .  .  .  .  .   x  x

3. Decoding, one new token per sequence: the new token is written into the cache
   first, then each query reads its own sequence's W cache slots in place. Slots
   hold positions in rotated order (p mod W), which attention does not mind: keys
   carry their rotary position already, and softmax is order-free. Only the
   first min(length, W) slots of a row are filled.
   `BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens([1]*B, kv_padding=W, kv_seqlen)`,
   a has 5 tokens (wrapped, all 3 slots live), b has 2:

            slots  a:0 a:1 a:2 | b:0 b:1 b:2
        a            x   x   x     .   .   .
        b            .   .   .     x   x   .
"""

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence, Union

import torch


def _attn_bias() -> ModuleType:
    """xformers' attention-bias module, without the rest of xformers.

    The bias classes are plain Python over torch, but `import xformers` runs the
    package's __init__, which imports torch._dynamo and torch.testing, and the module's
    own last lines register two classes we never use with torch._dynamo: 1.5 s of the
    3.2 s that 16 tokens of the default model took on a CPU. So the module is run from
    its file under its own name, with those lines kept for `register_with_dynamo`; a
    later `import xformers.ops` (CUDA, mistral/attention.py) finds it in sys.modules and
    uses these very classes.
    """
    name = "xformers.ops.fmha.attn_bias"
    if name not in sys.modules:
        spec = importlib.util.find_spec("xformers")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("mistral needs xformers: pip install xformers")
        path = Path(list(spec.submodule_search_locations)[0]) / "ops" / "fmha" / "attn_bias.py"
        lines = path.read_text().splitlines(keepends=True)
        _deferred.extend(line for line in lines if line.startswith("torch._dynamo."))
        source = "".join("\n" if line.startswith("torch._dynamo.") else line for line in lines)  # same line numbers
        module = ModuleType(name)
        module.__file__ = str(path)
        sys.modules[name] = module  # before it runs: its dataclasses look their module up
        exec(compile(source, str(path), "exec"), module.__dict__)
    return sys.modules[name]


_deferred: list[str] = []  # attn_bias.py's module-level calls into torch._dynamo, not run yet


def register_with_dynamo() -> None:
    """Run what attn_bias.py's import would have told torch._dynamo: before compiling, or
    once the rest of xformers is imported (which imports torch._dynamo anyway)."""
    module = sys.modules["xformers.ops.fmha.attn_bias"]
    while _deferred:
        exec(_deferred.pop(0), module.__dict__)


_bias = _attn_bias()
BlockDiagonalCausalMask = _bias.BlockDiagonalCausalMask
BlockDiagonalCausalLocalAttentionMask = _bias.BlockDiagonalCausalLocalAttentionMask
BlockDiagonalCausalWithOffsetPaddedKeysMask = _bias.BlockDiagonalCausalWithOffsetPaddedKeysMask
BlockDiagonalMask = _bias.BlockDiagonalMask

AttentionBias = Union[BlockDiagonalCausalMask, BlockDiagonalMask, BlockDiagonalCausalWithOffsetPaddedKeysMask]


def prefill_mask(seqlens: Sequence[int], sliding_window: Optional[int], device: torch.device) -> AttentionBias:
    """Mask 1: causal within each sequence, and local when a window is set."""
    mask = BlockDiagonalCausalMask.from_seqlens(list(seqlens), device=device)
    return mask if sliding_window is None else mask.make_local_attention(sliding_window)


def chunk_mask(
    seqlens: Sequence[int], kv_seqlens: Sequence[int], sliding_window: Optional[int], device: torch.device
) -> AttentionBias:
    """Mask 2: queries are the last tokens of each key block (cached + new)."""
    mask = BlockDiagonalMask.from_seqlens(q_seqlen=list(seqlens), kv_seqlen=list(kv_seqlens), device=device)
    if sliding_window is None:
        return mask.make_causal_from_bottomright()
    return mask.make_local_attention_from_bottomright(sliding_window)


def decode_mask(kv_seqlens: Sequence[int], cache_size: int, device: torch.device) -> AttentionBias:
    """Mask 3: one query per sequence over the first kv_seqlens[b] slots of its cache row."""
    return BlockDiagonalCausalWithOffsetPaddedKeysMask.from_seqlens(
        q_seqlen=[1] * len(kv_seqlens), kv_padding=cache_size, kv_seqlen=list(kv_seqlens), device=device
    )
