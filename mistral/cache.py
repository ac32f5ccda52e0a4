"""The rolling-buffer KV cache.

Each sequence (a row of the cache) owns `size` slots per layer, where `size` is
the sliding window W (or less, when nothing will ever run that long). The token at
absolute position p lives in slot p mod size, so a sequence can run forever: a new
token overwrites the one that just left the window.

Worked example: size = 3, two sequences already cached 5 and 1 tokens, and a call
brings seqlens = [2, 3] new tokens (a prefill chunk):

    positions       = [5, 6 | 1, 2, 3]          (absolute, for rotary embeddings)
    keys attended   = a2 a3 a4 a5 a6 | b0 b1 b2 b3
                      (sequence a: its last 3 cached tokens, unrolled from slots
                       2, 0, 1 into chronological order, then its new tokens)
    written         = a5 -> slot 2, a6 -> slot 0 | b1 -> 1, b2 -> 2, b3 -> 0
                      (of sequence b's 3 new tokens all are written, in order, so
                       b3 overwrites b0 in slot 0 once every query has read it)
    row a after     = [a6, a4, a5]              (slot 0, 1, 2)

`CacheInputs.build` computes all of this once per call; the layers only consume it
through `CacheView.update`, and never decide which mask applies.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mistral.errors import MistralError
from mistral.masks import AttentionBias, chunk_mask, decode_mask, prefill_mask


@dataclass
class CacheInputs:
    """Everything one forward call needs from the cache, shared by all layers."""

    kind: str  # "prefill" (nothing cached), "chunk" (cached + new) or "decode" (1 new token each)
    positions: torch.Tensor  # [T] absolute position of each new token
    mask: AttentionBias
    write_from: torch.Tensor  # [N] which new tokens are stored (the last `size` of each sequence)
    write_to: torch.Tensor  # [N] their flat slot, row * size + position % size
    # "chunk" only: keys = cached tokens in order + new tokens, per sequence, laid out
    # in a [n_keys] buffer: cached slot `read_from[j]` goes to key `read_to[j]`, and new
    # token t goes to key `new_to[t]`.
    n_keys: int = 0
    read_from: Optional[torch.Tensor] = None
    read_to: Optional[torch.Tensor] = None
    new_to: Optional[torch.Tensor] = None

    @staticmethod
    def build(
        seqlens: Sequence[int],
        cached: Sequence[int],
        size: int,
        sliding_window: Optional[int],
        device: torch.device,
    ) -> "CacheInputs":
        """seqlens[b] new tokens for row b, which holds cached[b] tokens so far."""
        assert len(seqlens) <= len(cached)
        rows = [b for b, s in enumerate(seqlens) if s > 0]
        # Without a window the buffer cannot roll: position p must have a slot of its own.
        if sliding_window is None or size < sliding_window:
            for b in rows:
                if cached[b] + seqlens[b] > size:
                    raise MistralError(
                        f"sequence {b} would reach {cached[b] + seqlens[b]} tokens, past the cache's {size} slots "
                        f"(sliding_window={sliding_window}): make a larger cache"
                    )

        positions, write_from, write_to = [], [], []
        start = 0
        for b in rows:
            c, s = cached[b], seqlens[b]
            positions += range(c, c + s)
            keep = min(s, size)  # only the last `size` new tokens survive the call
            write_from += range(start + s - keep, start + s)
            write_to += (b * size + p % size for p in range(c + s - keep, c + s))
            start += s

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        common = dict(positions=tensor(positions), write_from=tensor(write_from), write_to=tensor(write_to))
        if len(rows) == len(seqlens) and all(s == 1 for s in seqlens):
            kv_seqlens = [min(c + 1, size) for c in cached[: len(seqlens)]]
            return CacheInputs(kind="decode", mask=decode_mask(kv_seqlens, size, device), **common)
        active = [seqlens[b] for b in rows]
        if all(cached[b] == 0 for b in rows):
            return CacheInputs(kind="prefill", mask=prefill_mask(active, sliding_window, device), **common)

        read_from, read_to, new_to, kv_seqlens = [], [], [], []
        key = 0
        for b in rows:
            c, s = cached[b], seqlens[b]
            n = min(c, size)
            read_from += (b * size + p % size for p in range(c - n, c))
            read_to += range(key, key + n)
            new_to += range(key + n, key + n + s)
            kv_seqlens.append(n + s)
            key += n + s
        return CacheInputs(
            kind="chunk",
            mask=chunk_mask(active, kv_seqlens, sliding_window, device),
            n_keys=key,
            read_from=tensor(read_from),
            read_to=tensor(read_to),
            new_to=tensor(new_to),
            **common,
        )


@dataclass
class PrefillCall:
    """One forward call of a chunked prefill: chunk c of every prompt, packed back to back."""

    input_ids: list[int]
    seqlens: list[int]  # per prompt; 0 once a prompt has ended
    ends: dict[int, int]  # prompt b -> row of its last token in this call's logits, if it ends here


def prefill_calls(prompts: Sequence[Sequence[int]], chunk: int) -> list[PrefillCall]:
    """The calls that read `prompts` into a cache, `chunk` tokens of each per call.

    Prompts of different lengths share every call until they end, so a short prompt's
    last logits come from an early call.
    """
    calls = []
    for start in range(0, max(len(p) for p in prompts), chunk):
        pieces = [list(p[start : start + chunk]) for p in prompts]
        seqlens = [len(piece) for piece in pieces]
        ends, row = {}, -1
        for b, (prompt, n) in enumerate(zip(prompts, seqlens)):
            row += n
            if n and start + n == len(prompt):
                ends[b] = row
        calls.append(PrefillCall(sum(pieces, []), seqlens, ends))
    return calls


class CacheView:
    """One layer's slice of the cache, with the current call's inputs."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, inputs: CacheInputs, n_rows: int):
        self.k, self.v, self.inputs, self.n_rows = k, v, inputs, n_rows

    def update(self, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values; return the keys/values the new queries attend to."""
        inputs = self.inputs
        flat_k, flat_v = self.k.flatten(0, 1), self.v.flatten(0, 1)  # [rows * size, H_kv, D]
        if inputs.kind == "chunk":
            # Read the cached keys before the write below can overwrite them.
            keys = xk.new_empty(inputs.n_keys, *xk.shape[1:])
            values = xv.new_empty(inputs.n_keys, *xv.shape[1:])
            keys[inputs.read_to] = flat_k[inputs.read_from]
            values[inputs.read_to] = flat_v[inputs.read_from]
            keys[inputs.new_to] = xk
            values[inputs.new_to] = xv
        flat_k.index_copy_(0, inputs.write_to, xk[inputs.write_from])
        flat_v.index_copy_(0, inputs.write_to, xv[inputs.write_from])
        if inputs.kind == "prefill":
            return xk, xv
        if inputs.kind == "decode":
            size = self.k.shape[1]
            return flat_k[: self.n_rows * size], flat_v[: self.n_rows * size]
        return keys, values


class RotatingBufferCache:
    """Keys and values of every layer: [n_layers, max_batch_size, size, n_kv_heads, head_dim].

    `size` = min(sliding_window, max_seq_len): a window-less model needs a slot for
    every position, a windowed one never more than W.
    """

    def __init__(
        self,
        n_layers: int,
        max_batch_size: int,
        max_seq_len: int,
        sliding_window: Optional[int],
        n_kv_heads: int,
        head_dim: int,
        *,
        device: torch.device = torch.device("cpu"),
        dtype: torch.dtype = torch.float32,
    ):
        self.sliding_window = sliding_window
        self.size = max_seq_len if sliding_window is None else min(sliding_window, max_seq_len)
        shape = (n_layers, max_batch_size, self.size, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = [0] * max_batch_size  # tokens seen so far, per row
        self.inputs: Optional[CacheInputs] = None

    @property
    def max_batch_size(self) -> int:
        return self.k.shape[1]

    def prepare(self, seqlens: Sequence[int]) -> CacheInputs:
        """Compute this call's metadata; seqlens[b] new tokens go to row b (0 allowed)."""
        if len(seqlens) > self.max_batch_size:
            raise MistralError(f"{len(seqlens)} sequences do not fit a cache of {self.max_batch_size} rows")
        self.inputs = CacheInputs.build(seqlens, self.lengths, self.size, self.sliding_window, self.k.device)
        self.n_rows = len(seqlens)
        return self.inputs

    def view(self, layer: int) -> CacheView:
        assert self.inputs is not None, "call prepare() first"
        return CacheView(self.k[layer], self.v[layer], self.inputs, self.n_rows)

    def advance(self, seqlens: Sequence[int]) -> None:
        """Record that the prepared call has run."""
        for b, s in enumerate(seqlens):
            self.lengths[b] += s
        self.inputs = None

    def reset(self) -> None:
        self.lengths = [0] * self.max_batch_size
        self.inputs = None
