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
from typing import Any, Optional, Sequence

import torch

from mistral.errors import MistralError
from mistral.kernels import decode_attention
from mistral.masks import AttentionBias, chunk_mask, decode_mask, prefill_mask


def slots(rows: torch.Tensor, positions: torch.Tensor, size: int) -> torch.Tensor:
    """Flat cache slot of the token at `positions` in row `rows`: row * size + position mod size."""
    return rows * size + positions % size


def key_lengths(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Cache slots a decode query at `positions` reads (its own token included): min(position + 1, size)."""
    return (positions + 1).clamp(max=size)


@dataclass
class CacheInputs:
    """Everything one forward call needs from the cache, shared by all layers."""

    kind: str  # "prefill" (nothing cached), "chunk" (cached + new) or "decode" (1 new token each)
    positions: torch.Tensor  # [T] absolute position of each new token
    mask: AttentionBias
    n_rows: int  # cache rows the call reads: 0..n_rows-1
    size: int  # slots per row
    # [N] which new tokens are stored (the last `size` of each sequence); None: all, in order.
    write_from: Optional[torch.Tensor]
    write_to: Optional[torch.Tensor]  # [N] their flat slot (`slots`); None without a cache
    # "chunk" only: keys = cached tokens in order + new tokens, per sequence, laid out
    # in a [n_keys] buffer: cached slot `read_from[j]` goes to key `read_to[j]`, and new
    # token t goes to key `new_to[t]`.
    n_keys: int = 0
    read_from: Optional[torch.Tensor] = None
    read_to: Optional[torch.Tensor] = None
    new_to: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None  # "decode" only: 0..n_rows-1, made once for `advance_decode`
    # "decode" only: the slots of each row that queries read, its first `padding` (the
    # filled ones, all `size` for a graph's static inputs, which must bound later steps).
    padding: int = 0

    @staticmethod
    def uncached(seqlens: Sequence[int], sliding_window: Optional[int], device: torch.device) -> "CacheInputs":
        """A forward call without a cache: each sequence starts at position 0 and sees only itself."""
        active = [s for s in seqlens if s > 0]
        positions = torch.cat([torch.arange(s, device=device) for s in active])
        mask = prefill_mask(active, sliding_window, device)
        return CacheInputs("prefill", positions, mask, n_rows=0, size=0, write_from=None, write_to=None)

    @staticmethod
    def decode(lengths: Sequence[int], size: int, device: torch.device, *, static: bool = False) -> "CacheInputs":
        """One new token for each of rows 0..B-1, which hold lengths[b] tokens so far.

        static: for a captured graph, whose later steps `advance_decode` computes in
        place (and `restart_decode`, after other calls). xformers sizes its split-KV work
        by the mask's `max_seqlen`, a host int baked into the graph, so it must bound
        every later length: the mask is built with every row full, and the true lengths
        go into its device tensor `seqlen`.
        """
        B = len(lengths)
        # The lengths from the host's list: reading them back from the device would sync every step.
        # Eagerly a row's keys are only its filled slots: a window-less cache of max_tokens
        # slots would otherwise make every step read (and, on the CPU, copy) all of them.
        reads = [size] * B if static else key_lengths(torch.tensor(lengths), size).tolist()
        padding = size if static else max(reads)
        positions = torch.empty(B, dtype=torch.long, device=device)
        inputs = CacheInputs(
            "decode", positions, decode_mask(reads, padding, device), n_rows=B, size=size, write_from=None,
            write_to=torch.empty_like(positions), rows=torch.arange(B, device=device), padding=padding,
        )  # fmt: skip
        inputs.restart_decode(lengths)
        return inputs

    def restart_decode(self, lengths: Sequence[int]) -> None:
        """In place, the inputs of a decode step from rows that hold lengths[b] tokens."""
        self.positions.copy_(torch.tensor(lengths, dtype=torch.long))
        self.advance_decode(0)

    def advance_decode(self, steps: int = 1) -> None:
        """The next decode step's inputs, in place on the device, so a captured graph can run it."""
        assert self.kind == "decode" and self.write_to is not None and self.rows is not None
        self.positions += steps
        self.write_to.copy_(slots(self.rows, self.positions, self.size))
        self.mask.k_seqinfo.seqlen.copy_(key_lengths(self.positions, self.size))

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
        if len(rows) == len(seqlens) and all(s == 1 for s in seqlens):
            return CacheInputs.decode(cached[: len(seqlens)], size, device)

        def tensor(values: list) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        positions, write_from, write_row, write_pos = [], [], [], []
        start = 0
        for b in rows:
            c, s = cached[b], seqlens[b]
            positions += range(c, c + s)
            keep = min(s, size)  # only the last `size` new tokens survive the call
            write_from += range(start + s - keep, start + s)
            write_row += [b] * keep
            write_pos += range(c + s - keep, c + s)
            start += s
        common = dict(
            positions=tensor(positions), n_rows=len(seqlens), size=size, write_from=tensor(write_from),
            write_to=slots(tensor(write_row), tensor(write_pos), size),
        )  # fmt: skip
        active = [seqlens[b] for b in rows]
        if all(cached[b] == 0 for b in rows):
            return CacheInputs(kind="prefill", mask=prefill_mask(active, sliding_window, device), **common)

        read_row, read_pos, read_to, new_to, kv_seqlens = [], [], [], [], []
        key = 0
        for b in rows:
            c, s = cached[b], seqlens[b]
            n = min(c, size)
            read_row += [b] * n
            read_pos += range(c - n, c)
            read_to += range(key, key + n)
            new_to += range(key + n, key + n + s)
            kv_seqlens.append(n + s)
            key += n + s
        return CacheInputs(
            kind="chunk",
            mask=chunk_mask(active, kv_seqlens, sliding_window, device),
            n_keys=key,
            read_from=slots(tensor(read_row), tensor(read_pos), size),
            read_to=tensor(read_to),
            new_to=tensor(new_to),
            **common,
        )


class CacheView:
    """One layer's slice of the cache, with the current call's inputs."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, inputs: CacheInputs):
        self.k, self.v, self.inputs = k, v, inputs

    def update(self, xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values; return the keys/values the new queries attend to."""
        inputs = self.inputs
        assert inputs.write_to is not None
        flat_k, flat_v = self.k.flatten(0, 1), self.v.flatten(0, 1)  # [rows * size, H_kv, D]
        if inputs.kind == "chunk":
            # Read the cached keys before the write below can overwrite them.
            keys = xk.new_empty(inputs.n_keys, *xk.shape[1:])
            values = xv.new_empty(inputs.n_keys, *xv.shape[1:])
            keys[inputs.read_to] = flat_k[inputs.read_from]
            values[inputs.read_to] = flat_v[inputs.read_from]
            keys[inputs.new_to] = xk
            values[inputs.new_to] = xv
        stored_k = xk if inputs.write_from is None else xk[inputs.write_from]
        stored_v = xv if inputs.write_from is None else xv[inputs.write_from]
        flat_k.index_copy_(0, inputs.write_to, stored_k)
        flat_v.index_copy_(0, inputs.write_to, stored_v)
        if inputs.kind == "prefill":
            return xk, xv
        if inputs.kind == "decode":
            # Each query reads its row's first `padding` slots (mask 3 of masks.py): in place
            # when that is every slot, else a copy of the filled ones.
            rows, padding = inputs.n_rows, inputs.padding
            return self.k[:rows, :padding].flatten(0, 1), self.v[:rows, :padding].flatten(0, 1)
        return keys, values

    def attend_decode(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor) -> torch.Tensor:
        """A decode call's update and attention as one kernel (kernels.decode_attention, on CUDA).

        xq: [B, H, Dh] and xk, xv: [B, H_kv, Dh], one new token for each of rows 0..B-1;
        each query attends over its row's first mask.k_seqinfo.seqlen[b] slots (mask 3).
        """
        inputs = self.inputs
        assert inputs.kind == "decode" and inputs.write_to is not None
        return decode_attention(xq, xk, xv, self.k, self.v, inputs.write_to, inputs.mask.k_seqinfo.seqlen)


# The share of free memory the KV cache leaves to the rest of a run (activations, logits,
# the allocator's slack).
HEADROOM = 0.2


class CacheTooLarge(MistralError):
    """The cache would not fit the device's free memory; `fits` positions per row would."""

    def __init__(self, needed: int, free: int, fits: int, device: torch.device):
        super().__init__(
            f"the KV cache needs {needed:,} bytes ({needed / 2**30:.1f} GiB) but {device} has {free:,} bytes free for it: "
            f"{fits:,} tokens per sequence fit"
        )
        self.fits = fits


def free_memory(device: torch.device) -> Optional[int]:
    """Bytes that can still be allocated on device, or None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:  # MemAvailable counts the page cache that the system would give back
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):  # not Linux: no check
        return None


class RotatingBufferCache:
    """Keys and values of every layer: [n_layers, max_batch_size, size, n_kv_heads, head_dim], size = `row_size`."""

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
        overhead: float = 0.0,
    ):
        self.sliding_window = sliding_window
        self.size = RotatingBufferCache.row_size(max_seq_len, sliding_window)
        shape = (n_layers, max_batch_size, self.size, n_kv_heads, head_dim)
        # Keys and values of one position in every row: a window-less model with a huge
        # max_seq_len would otherwise die in torch.zeros asking for hundreds of GB, or be
        # killed by the system without a word once the run's other allocations came on
        # top. So the check keeps HEADROOM of what is free for those, and counts what
        # a step allocates in proportion to the cache (`overhead`, bytes per cache byte).
        per_position = 2 * n_layers * max_batch_size * n_kv_heads * head_dim * dtype.itemsize * (1 + overhead)
        free = free_memory(torch.device(device))
        usable = None if free is None else int(free * (1 - HEADROOM))
        if usable is not None and per_position * self.size > usable:
            raise CacheTooLarge(int(per_position * self.size), usable, int(usable // per_position), torch.device(device))
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths: list[int] = []  # tokens seen so far, per row
        self.written: list[int] = []
        self.reset()
        # The decode.Runner of each model and batch on this cache, made once: their CUDA
        # graphs hold this cache's tensors, so a later stream replays them (decode.runner).
        self.runners: dict[tuple, Any] = {}

    @staticmethod
    def row_size(max_seq_len: int, sliding_window: Optional[int]) -> int:
        """Slots per row: a window-less model needs one for every position, a windowed one never more than W."""
        return max_seq_len if sliding_window is None else min(sliding_window, max_seq_len)

    @property
    def max_batch_size(self) -> int:
        return self.k.shape[1]

    def prepare(self, seqlens: Sequence[int]) -> CacheInputs:
        """This call's metadata; seqlens[b] new tokens go to row b (0 allowed)."""
        if len(seqlens) > self.max_batch_size:
            raise MistralError(f"{len(seqlens)} sequences do not fit a cache of {self.max_batch_size} rows")
        return CacheInputs.build(seqlens, self.lengths, self.size, self.sliding_window, self.k.device)

    def view(self, layer: int, inputs: CacheInputs) -> CacheView:
        return CacheView(self.k[layer], self.v[layer], inputs)

    def advance(self, seqlens: Sequence[int]) -> None:
        """Record that a prepared call has run."""
        for b, s in enumerate(seqlens):
            self.lengths[b] += s
            self.written[b] = max(self.written[b], self.lengths[b])

    def reset(self) -> None:
        self.lengths = [0] * self.max_batch_size
        self.written = [0] * self.max_batch_size  # per row: tokens ever written since the reset, rewound or not

    def rewind(self, row: int, length: int) -> None:
        """Keep the first `length` tokens of a row only, so that its sequence goes on otherwise from there.

        The next token reads positions length-W+1 .. length-1, which the buffer still
        holds unless later tokens overwrote them (position p + size takes p's slot), those
        of an earlier rewind included: once the row has wrapped (more tokens written than
        slots), only `length` >= written - 1 keeps them, and otherwise the row starts over.
        """
        written = self.written[row]
        assert 0 <= length <= self.lengths[row]
        self.lengths[row] = length if written <= self.size or length >= written - 1 else 0
