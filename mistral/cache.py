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

`cache_inputs` computes all of this once per call, as one of the classes of call
(Prefill, Chunk, Decode, or Mixed: decoding rows beside rows that read a prompt;
speculative decoding's Verify is made by decode.Runner.verify); the layers only consume
it through `CacheView.attend`, and never decide which mask applies.
"""

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mistral.attention import Backend, attend, decode_kernel_applies
from mistral.errors import MistralError
from mistral.kernels import chunk_attention, decode_attention, store_keys
from mistral.masks import AttentionBias, chunk_mask, decode_mask, prefill_mask
from mistral.sampling import to_device


def slots(rows: torch.Tensor, positions: torch.Tensor, size: int) -> torch.Tensor:
    """Flat cache slot of the token at `positions` in row `rows`: row * size + position mod size."""
    return rows * size + positions % size


def key_lengths(positions: torch.Tensor, size: int) -> torch.Tensor:
    """Cache slots a decode query at `positions` reads (its own token included): min(position + 1, size)."""
    return (positions + 1).clamp(max=size)


class CacheInputs:
    """What one forward call needs from the cache, computed once and shared by all layers:
    the new tokens' positions, the mask, and where their keys and values go. One class per
    kind of call, each with its own `update` (and Decode and Mixed their own `attend`)."""

    def __init__(self, positions: torch.Tensor, mask: Optional[AttentionBias]):
        self.positions = positions  # [T] absolute position of each new token
        self.mask = mask  # (None for a call of parts, each with its own: Mixed)

    def update(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys and values xk, xv [T, H_kv, Dh] in one layer's cache k, v
        [rows, size, H_kv, Dh]; return the keys and values the new queries attend to."""
        raise NotImplementedError

    def attend(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor,
               backend: Backend) -> torch.Tensor:  # fmt: skip
        """The attention of queries xq [T, H, Dh] under this call's mask, the cache updated on the way."""
        keys, values = self.update(k, v, xk, xv)
        assert self.mask is not None
        return attend(xq, keys, values, self.mask, backend)


class Uncached(CacheInputs):
    """A forward call without a cache: each sequence starts at position 0 and sees only itself."""

    def __init__(self, seqlens: Sequence[int], sliding_window: Optional[int], device: torch.device):
        active = [s for s in seqlens if s > 0]
        super().__init__(torch.cat([torch.arange(s, device=device) for s in active]), prefill_mask(active, sliding_window, device))

    def update(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return xk, xv


class Prefill(CacheInputs):
    """The first tokens of each sequence (nothing cached): they attend to each other (mask 1),
    and the last `size` of each are stored."""

    def __init__(self, positions: torch.Tensor, mask: AttentionBias, write_from: torch.Tensor, write_to: torch.Tensor):
        super().__init__(positions, mask)
        self.write_from = write_from  # [N] the new tokens stored, in order
        self.write_to = write_to  # [N] their flat slot (`slots`)

    def update(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert k is not None and v is not None
        _store(k, v, xk[self.write_from], xv[self.write_from], self.write_to)
        return xk, xv


class Chunk(CacheInputs):
    """More tokens of sequences that have some cached (mask 2): the keys are each sequence's
    cached tokens in order, then its new ones, laid out in a [n_keys] buffer: cached slot
    `read_from[j]` goes to key `read_to[j]`, new token t to key `new_to[t]`."""

    def __init__(self, positions: torch.Tensor, mask: AttentionBias, write_from: torch.Tensor, write_to: torch.Tensor,
                 n_keys: int, read_from: torch.Tensor, read_to: torch.Tensor, new_to: torch.Tensor):  # fmt: skip
        super().__init__(positions, mask)
        self.write_from, self.write_to = write_from, write_to  # as Prefill's
        self.n_keys, self.read_from, self.read_to, self.new_to = n_keys, read_from, read_to, new_to

    def update(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert k is not None and v is not None
        # Read the cached keys before the write can overwrite them.
        keys, values = xk.new_empty(self.n_keys, *xk.shape[1:]), xv.new_empty(self.n_keys, *xv.shape[1:])
        keys[self.read_to], values[self.read_to] = k.flatten(0, 1)[self.read_from], v.flatten(0, 1)[self.read_from]
        keys[self.new_to], values[self.new_to] = xk, xv
        _store(k, v, xk[self.write_from], xv[self.write_from], self.write_to)
        return keys, values


class Decode(CacheInputs):
    """One new token for each of rows 0..B-1, or of `rows` (mask 3): each query reads its row's
    first `padding` slots, of which the mask's key lengths say how many are filled.

    Its inputs can advance in place on the device (`advance`), so that a captured CUDA
    graph runs step after step (mistral/decode.py).
    """

    def __init__(self, lengths: Sequence[int], size: int, device: torch.device, *, static: bool = False,
                 rows: Optional[Sequence[int]] = None):  # fmt: skip
        """Rows 0..B-1 (or rows[0..B-1]) hold lengths[b] tokens so far.

        static: for a captured graph. xformers sizes its split-KV work by the mask's
        `max_seqlen`, a host int baked into the graph, so it must bound every later
        length: the mask is built with every row full, and the true lengths go into its
        device tensor `seqlen`.
        """
        B = len(lengths)
        # The lengths from the host's list: reading them back from the device would sync every step.
        # Eagerly a row's keys are only its filled slots: a window-less cache of max_tokens
        # slots would otherwise make every step read (and, on the CPU, copy) all of them.
        reads = [size] * B if static else key_lengths(torch.tensor(lengths), size).tolist()
        self.padding = size if static else max(reads)
        super().__init__(torch.empty(B, dtype=torch.long, device=device), decode_mask(reads, self.padding, device))
        self.size = size
        # Rows 0..B-1 are read in place where the padding is every slot; other rows are gathered.
        self.first_rows = rows is None or list(rows) == list(range(B))
        self.rows = torch.arange(B, device=device) if rows is None else to_device(list(rows), device, torch.long)
        self.write_to = torch.empty_like(self.positions)  # [B] each new token's flat slot
        self.restart(lengths)

    def restart(self, lengths: Sequence[int]) -> None:
        """In place, the inputs of a decode step from rows that hold lengths[b] tokens."""
        self.positions.copy_(to_device(list(lengths), self.positions.device, torch.long))
        self.advance(0)

    def advance(self, steps: int = 1) -> None:
        """The inputs `steps` decode steps later, in place on the device (a captured graph runs it)."""
        self.positions += steps
        self.write_to.copy_(slots(self.rows, self.positions, self.size))
        self.mask.k_seqinfo.seqlen.copy_(key_lengths(self.positions, self.size))

    def update(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], xk: torch.Tensor, xv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert k is not None and v is not None
        _store(k, v, xk, xv, self.write_to)
        # In place when the padding is every slot of rows 0..B-1, else a copy of the filled ones.
        B = self.positions.shape[0]
        rows = slice(0, B) if self.first_rows else self.rows
        return k[rows, : self.padding].flatten(0, 1), v[rows, : self.padding].flatten(0, 1)

    def attend(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor,
               backend: Backend) -> torch.Tensor:  # fmt: skip
        """Where the decode kernel applies (CUDA), the update and attention as one kernel (kernels.decode_attention)."""
        if not decode_kernel_applies(xq, backend):
            return super().attend(k, v, xq, xk, xv, backend)
        assert k is not None and v is not None
        seqlen = self.mask.k_seqinfo.seqlen  # every filled slot is in the window: visible as it is scanned
        return decode_attention(xq, xk, xv, k, v, self.write_to, seqlen, seqlen)


class Verify(CacheInputs):
    """Speculative decoding's verify step: n tokens for each of rows 0..B-1 (the row's last
    token and n - 1 proposals), at positions lengths[b] .. lengths[b] + n - 1, in a cache
    of W + n - 1 slots a row or more (`RotatingBufferCache.row_size`'s lookahead).

    A decode step of B * n queries on the decode kernel: the call's keys are stored first,
    then each query reads its row in place, up to its own position and no further back than
    its window (kernels.decode_attention's `visible`), so that a CUDA graph replays it
    (decode.Runner.verify) with the fused kernels of a decode step. Where that kernel does
    not run, Runner.verify makes the chunk call (mask 2) of the same tokens instead, which
    the tests hold this to.

    Worked example, W = 3, n = 3 (slots 5): row a holds positions 0..6, and 7, 8, 9 come in.
    Position 7 goes to slot 2, 8 to 3, 9 to 4; query 8 (slot 3) sees slots 3, 2, 1
    (positions 8, 7, 6), never slot 4 (position 9, "4 behind" going round) or slot 0 (5).
    """

    def __init__(self, lengths: Sequence[int], n: int, size: int, sliding_window: Optional[int], device: torch.device, *,
                 static: bool = False):  # fmt: skip
        """static: for a captured graph (Decode's), on CUDA where the decode kernel applies; `restart` moves it."""
        B = len(lengths)
        if sliding_window is not None and sliding_window <= size < sliding_window + n - 1:
            raise MistralError(
                f"a verify step of {n} tokens a row needs rows of sliding_window + {n - 1} slots, this cache has {size} "
                f"(make_cache(..., lookahead={n - 1})): its new keys would overwrite keys still in the window"
            )
        check_fits([n] * B, lengths, size, sliding_window)
        self.n, self.window = n, sliding_window
        self.queries = Decode(self._positions(lengths), size, device, static=static, rows=[b for b in range(B) for _ in range(n)])
        super().__init__(self.queries.positions, None)
        self.visible = torch.empty_like(self.positions)
        self._visible()
        self.size = size

    def _positions(self, lengths: Sequence[int]) -> list[int]:
        return [length + j for length in lengths for j in range(self.n)]

    def _visible(self) -> None:
        # A query at position p sees p + 1 positions, or its window.
        self.visible.copy_(self.positions + 1 if self.window is None else (self.positions + 1).clamp(max=self.window))

    def restart(self, lengths: Sequence[int]) -> None:
        """In place, the inputs of a verify step from rows that hold lengths[b] tokens."""
        check_fits([self.n] * len(lengths), lengths, self.size, self.window)
        self.queries.restart(self._positions(lengths))
        self._visible()

    def attend(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor,
               backend: Backend) -> torch.Tensor:  # fmt: skip
        assert k is not None and v is not None
        # Every key first: a query reads those of the row's earlier new tokens.
        _store(k, v, xk, xv, self.queries.write_to)
        q = self.queries
        return decode_attention(xq, xk, xv, k, v, q.write_to, q.mask.k_seqinfo.seqlen, self.visible)


class InPlace(CacheInputs):
    """A call of tokens that each continue their row (mask 2's), where no row's new keys overwrite
    a key that one of its queries reads (`reads_in_place`): every new key is stored first, then
    each query reads its own row in place (kernels.chunk_attention), as a verify step's do.
    Nothing is copied out of the cache, and the inputs are a few device tensors of fixed
    shapes, so that a CUDA graph of `tokens` tokens replays any such call of up to that many
    (mistral/decode.py: a server's chunk calls).

    Built empty (every token padding: slot -1, nothing written; its attention output is
    whatever memory held, and stays in its own token's rows, which nobody reads), then
    filled in place by `restart` for each call, in one copy. The queries of a row are cut
    into tiles of `tile` (kernels.chunk_tile): the kernel reads a row's keys once per tile.

    Worked example, size = W = 8, tile 4, 10 tokens: row 0 decodes after 20 tokens, row 2
    reads the first 6 of a prompt:

        positions   = [20 | 0, 1, 2, 3, 4, 5 | 0, 0, 0]         (3 padding tokens)
        write_to    = [4  | 16, 17, 18, 19, 20, 21 | -1, -1, -1]  (row * 8 + position mod 8)
        tiles       = (first 0, 1 query), (first 1, 4), (first 5, 2), then empty ones
    """

    def __init__(self, tokens: int, rows: int, tile: int, size: int, sliding_window: Optional[int], device: torch.device):
        tiles = -(-tokens // tile) + rows  # each row's last tile may be short
        # One buffer, one copy per call: positions, slots, each tile's first query and its length.
        self.buffer = torch.zeros(2 * tokens + 2 * tiles, dtype=torch.long, device=device)
        positions, self.write_to, self.tile_first, self.tile_len = self.buffer.split([tokens, tokens, tiles, tiles])
        super().__init__(positions, None)
        self.write_to.fill_(-1)
        self.tokens, self.tiles, self.tile, self.size, self.sliding_window = tokens, tiles, tile, size, sliding_window
        self.window = _reach(size, sliding_window)

    def restart(self, seqlens: Sequence[int], cached: Sequence[int]) -> None:
        """In place, the call that brings seqlens[b] new tokens to row b, which holds cached[b]; the tokens past them are padding."""
        check_fits(seqlens, cached, self.size, self.sliding_window)
        if not reads_in_place(seqlens, cached, self.size, self.sliding_window):
            raise MistralError("a row of this call would overwrite keys that its own queries read: not a call to read in place")
        rows = [b for b, s in enumerate(seqlens) if s > 0]
        c, s, row = (torch.tensor(values, dtype=torch.long) for values in ([cached[b] for b in rows], [seqlens[b] for b in rows], rows))
        T = int(s.sum())
        if T > self.tokens:
            raise MistralError(f"a call of {T} tokens does not fit inputs of {self.tokens}")
        positions = _ranges(c, s)
        per_row = -(-s // self.tile)  # tiles per row
        start = s.cumsum(0) - s  # each row's first token
        j = _ranges(torch.zeros_like(per_row), per_row)  # each tile's index in its row
        first = start.repeat_interleave(per_row) + j * self.tile
        host = torch.cat([
            torch.cat([positions, positions.new_zeros(self.tokens - T)]),
            torch.cat([slots(row.repeat_interleave(s), positions, self.size), positions.new_full((self.tokens - T,), -1)]),
            torch.cat([first, first.new_zeros(self.tiles - len(first))]),
            torch.cat([(s.repeat_interleave(per_row) - j * self.tile).clamp(max=self.tile), first.new_zeros(self.tiles - len(first))]),
        ])  # fmt: skip
        self.buffer.copy_(host.pin_memory() if self.buffer.is_cuda else host, non_blocking=True)

    def attend(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor,
               backend: Backend) -> torch.Tensor:  # fmt: skip
        assert k is not None and v is not None
        store_keys(xk, xv, k, v, self.write_to)  # every key first: a query reads those of its row's earlier new tokens
        return chunk_attention(xq, k, v, self.positions, self.write_to, self.tile_first, self.tile_len, self.window, self.tile)


def reads_in_place(seqlens: Sequence[int], cached: Sequence[int], size: int, sliding_window: Optional[int]) -> bool:
    """Whether the call's keys can all be stored before its queries read (InPlace): row b's new
    positions c .. c + L - 1 overwrite c - size .. c + L - 1 - size, none of which its first query
    (at c) may still read: those from c - W + 1 on (a short row, or no window: from 0).

    With a row of W slots (size = window) that is full (from W - 1 tokens on), only one token
    a call is read in place: a decoding row, whose new key replaces the one that just left its window."""
    window = _reach(size, sliding_window)
    return all(c + L - 1 - size < max(0, c - window + 1) for c, L in zip(cached, seqlens) if L)


def _reach(size: int, sliding_window: Optional[int]) -> int:
    """How far back a query reads: its window, or (a window-less row never rolls) the row's size."""
    return size if sliding_window is None else sliding_window


class Mixed(CacheInputs):
    """A call in which some rows decode (one new token after cached ones) beside rows that
    read a prompt: the decoding rows attend as a decode step does (mask 3, `Decode` on their
    rows), their keys read in place by the decode kernel on CUDA; the others as a call of
    their own (`Prefill` or `Chunk`), which copies only their rows' cached keys. A server's
    chunk call is mostly the former: 31 rows decoding beside one new prompt would otherwise
    copy every row's cache in every layer. Each part takes its tokens out of the call's and
    puts its output back in their place."""

    def __init__(self, positions: torch.Tensor, decode: Decode, decode_tokens: torch.Tensor,
                 rest: Optional[CacheInputs], rest_tokens: torch.Tensor):  # fmt: skip
        super().__init__(positions, None)  # each part attends under its own mask
        self.decode, self.decode_tokens, self.rest, self.rest_tokens = decode, decode_tokens, rest, rest_tokens

    def attend(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor,
               backend: Backend) -> torch.Tensor:  # fmt: skip
        out = torch.empty_like(xq)
        for part, tokens in ((self.decode, self.decode_tokens), (self.rest, self.rest_tokens)):
            if part is not None:  # the parts' rows differ: neither writes what the other reads
                out[tokens] = part.attend(k, v, xq[tokens], xk[tokens], xv[tokens], backend)
        return out


def _store(k: torch.Tensor, v: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, write_to: torch.Tensor) -> None:
    k.flatten(0, 1).index_copy_(0, write_to, xk)
    v.flatten(0, 1).index_copy_(0, write_to, xv)


def check_fits(seqlens: Sequence[int], cached: Sequence[int], size: int, sliding_window: Optional[int]) -> None:
    """Without a window the buffer cannot roll: position p must have a slot of its own."""
    if sliding_window is None or size < sliding_window:
        for b, s in enumerate(seqlens):
            if s and cached[b] + s > size:
                raise MistralError(
                    f"sequence {b} would reach {cached[b] + s} tokens, past the cache's {size} slots "
                    f"(sliding_window={sliding_window}): make a larger cache"
                )


def cache_inputs(seqlens: Sequence[int], cached: Sequence[int], size: int, sliding_window: Optional[int], device: torch.device) -> CacheInputs:
    """The call that brings seqlens[b] new tokens to row b, which holds cached[b] tokens so far."""
    assert len(seqlens) <= len(cached)
    rows = [b for b, s in enumerate(seqlens) if s > 0]
    check_fits(seqlens, cached, size, sliding_window)
    # Mask 3 reads every filled slot of a row: one token each, where the row is no longer than the window.
    reads_filled = sliding_window is None or size <= sliding_window
    if len(rows) == len(seqlens) and all(s == 1 for s in seqlens) and reads_filled:
        return Decode(cached[: len(seqlens)], size, device)
    decoding = [b for b in rows if seqlens[b] == 1 and cached[b] > 0] if reads_filled else []
    if decoding:
        return _mixed(seqlens, cached, decoding, size, sliding_window, device)

    # The index tensors, built on the host from one [rows] tensor per quantity (a Python list
    # per token took 6 ms for a chunk call beside 32 rows of 700 cached tokens), then copied
    # to the device at once (a Mixed call's Decode makes its own few small copies).
    c, s, row = (torch.tensor(values, dtype=torch.long) for values in ([cached[b] for b in rows], [seqlens[b] for b in rows], rows))
    start = s.cumsum(0) - s  # each row's first new token among the call's
    keep = s.clamp(max=size)  # only the last `size` new tokens survive the call
    host = dict(
        positions=_ranges(c, s),
        write_from=_ranges(start + s - keep, keep),
        write_to=slots(row.repeat_interleave(keep), _ranges(c + s - keep, keep), size),
    )
    active = [seqlens[b] for b in rows]
    if all(cached[b] == 0 for b in rows):
        return Prefill(mask=prefill_mask(active, sliding_window, device), **_to(host, device))
    # Each row's keys: its last min(cached, size) cached tokens in order, then its new ones.
    n = c.clamp(max=size)
    key = (n + s).cumsum(0) - (n + s)  # each row's first key
    host |= dict(
        read_from=slots(row.repeat_interleave(n), _ranges(c - n, n), size), read_to=_ranges(key, n), new_to=_ranges(key + n, s)
    )
    return Chunk(mask=chunk_mask(active, (n + s).tolist(), sliding_window, device), n_keys=int((n + s).sum()), **_to(host, device))


def _mixed(seqlens: Sequence[int], cached: Sequence[int], decoding: list[int], size: int, sliding_window: Optional[int],
           device: torch.device) -> Mixed:  # fmt: skip
    """cache_inputs' call where rows `decoding` decode: those as a Decode, the others as their own call."""
    rest_seqlens = [0 if b in decoding else s for b, s in enumerate(seqlens)]
    rest = cache_inputs(rest_seqlens, cached, size, sliding_window, device) if any(rest_seqlens) else None
    s = torch.tensor(seqlens, dtype=torch.long)
    first = s.cumsum(0) - s  # each row's first token among the call's
    mine = torch.tensor(decoding, dtype=torch.long)
    tokens = torch.zeros(int(s.sum()), dtype=torch.bool)
    tokens[first[mine]] = True  # a decoding row's one token
    host = dict(positions=_ranges(torch.tensor(cached[: len(seqlens)], dtype=torch.long), s),
                decode_tokens=tokens.nonzero().flatten(), rest_tokens=(~tokens).nonzero().flatten())  # fmt: skip
    decode = Decode([cached[b] for b in decoding], size, device, rows=decoding)
    return Mixed(decode=decode, rest=rest, **_to(host, device))


def _ranges(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The ranges starts[i] .. starts[i] + lengths[i] - 1, one after the other."""
    total = int(lengths.sum())
    first = lengths.cumsum(0) - lengths  # where range i begins in the result
    return (starts - first).repeat_interleave(lengths, output_size=total) + torch.arange(total)


def _to(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The same tensors on `device`, copied in one transfer (from pinned memory: the host does not wait for the GPU)."""
    if device.type == "cpu":
        return tensors
    moved = torch.cat(list(tensors.values())).pin_memory().to(device, non_blocking=True).split([len(t) for t in tensors.values()])
    return dict(zip(tensors, moved))


@dataclass
class PrefillCall:
    """One forward call of a chunked prefill: chunk c of every prompt, packed back to back."""

    input_ids: list[int]
    seqlens: list[int]  # per prompt; 0 once a prompt has ended
    ends: dict[int, int]  # prompt b -> row of its last token among this call's tokens, if it ends here


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
    """One layer's slice of the cache (none for an uncached call), with the current call's inputs."""

    def __init__(self, k: Optional[torch.Tensor], v: Optional[torch.Tensor], inputs: CacheInputs):
        self.k, self.v, self.inputs = k, v, inputs

    def attend(self, xq: torch.Tensor, xk: torch.Tensor, xv: torch.Tensor, backend: Backend) -> torch.Tensor:
        """Store this layer's new keys and values, and attend to what the call's mask shows."""
        return self.inputs.attend(self.k, self.v, xq, xk, xv, backend)


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
        lookahead: int = 0,
    ):
        self.sliding_window = sliding_window
        self.size = RotatingBufferCache.row_size(max_seq_len, sliding_window, lookahead)
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

    @staticmethod
    def row_size(max_seq_len: int, sliding_window: Optional[int], lookahead: int = 0) -> int:
        """Slots per row: a window-less model needs one for every position, a windowed one never more than W;
        `lookahead` more for tokens written ahead and maybe taken back (speculative decoding's proposals):
        writing them overwrites only positions that no later token's window reaches."""
        return (max_seq_len if sliding_window is None else min(sliding_window, max_seq_len)) + lookahead

    @property
    def max_batch_size(self) -> int:
        return self.k.shape[1]

    def prepare(self, seqlens: Sequence[int]) -> CacheInputs:
        """This call's metadata; seqlens[b] new tokens go to row b (0 allowed)."""
        if len(seqlens) > self.max_batch_size:
            raise MistralError(f"{len(seqlens)} sequences do not fit a cache of {self.max_batch_size} rows")
        return cache_inputs(seqlens, self.lengths, self.size, self.sliding_window, self.k.device)

    def view(self, layer: int, inputs: CacheInputs) -> CacheView:
        return CacheView(self.k[layer], self.v[layer], inputs)

    def advance(self, seqlens: Sequence[int]) -> None:
        """Record that a prepared call has run."""
        for b, s in enumerate(seqlens):
            self.lengths[b] += s
            self.written[b] = max(self.written[b], self.lengths[b])

    def reset(self, row: Optional[int] = None) -> None:
        """Empty every row, or one (a new sequence starts there): its next token is position 0."""
        if row is None:
            self.lengths = [0] * self.max_batch_size
            self.written = [0] * self.max_batch_size  # per row: tokens ever written since the reset, rewound or not
        else:
            self.lengths[row] = self.written[row] = 0

    def rewind(self, row: int, length: int) -> None:
        """Keep the first `length` tokens of a row only, so that its sequence goes on otherwise from there.

        The next token reads positions length-W+1 .. length-1, which the buffer still
        holds unless later tokens overwrote them (position p + size takes p's slot), those
        of an earlier rewind included: the slots hold positions written-size .. written-1,
        so once the row has wrapped (more tokens written than slots) only `length` >=
        written - (size - W) - 1 keeps them (written - 1 when size is W; a cache with
        `lookahead` slots takes back that many more), and otherwise the row starts over.
        """
        written = self.written[row]
        assert 0 <= length <= self.lengths[row]
        reach = self.size if self.sliding_window is None else min(self.sliding_window, self.size)
        self.lengths[row] = length if written <= self.size or length >= written - (self.size - reach) - 1 else 0
