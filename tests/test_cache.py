"""The rolling-buffer cache against the plain no-cache forward.

The no-cache forward sees every prompt whole, with the sliding-window mask applied to
all its tokens at once: it is the definition. Whatever order and grouping the cache
receives tokens in (chunks, packed rows, rows that sit a call out, a buffer that has
wrapped several times), each token's logits must match it.
"""

import random
from typing import Optional, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import DEVICE, RTOL, random_model, random_prompts, rel_error, tiny_args
from mistral import MistralError, Transformer, kernels
from mistral.cache import InPlace, reads_in_place
from mistral.model import apply_rotary_emb, rotary_cos_sin

W = 8  # tiny_args' sliding window


def full_logits(model: Transformer, prompts: list[list[int]]) -> list[torch.Tensor]:
    """The reference: every prompt whole, packed into one no-cache call. [len(prompt), V] each."""
    logits = model(torch.tensor(sum(prompts, []), device=DEVICE), [len(p) for p in prompts])
    return list(logits.split([len(p) for p in prompts]))


def run_schedule(model: Transformer, prompts: list[list[int]], schedule: list[list[int]], max_seq_len: int) -> list[torch.Tensor]:
    """Feed prompts[b] through one cache, schedule[call][b] tokens of row b per call; collect all logits."""
    cache = model.make_cache(len(prompts), max_seq_len)
    fed = [0] * len(prompts)
    out: list[list[torch.Tensor]] = [[] for _ in prompts]
    for seqlens in schedule:
        pieces = [p[f : f + s] for p, f, s in zip(prompts, fed, seqlens)]
        assert [len(x) for x in pieces] == list(seqlens)
        logits = model(torch.tensor(sum(pieces, []), device=DEVICE), seqlens, cache)
        for b, chunk in enumerate(logits.split(list(seqlens))):
            out[b].append(chunk)
        fed = [f + s for f, s in zip(fed, seqlens)]
    assert fed == [len(p) for p in prompts], "schedule must feed every prompt whole"
    assert cache.lengths[: len(prompts)] == fed
    return [torch.cat(x) for x in out]


def chunked_schedule(lengths: Sequence[int], chunk: int) -> list[list[int]]:
    """Chunk c of every prompt in call c (0 tokens once a prompt is done): what `stream` does with a chunk_size, and prefill_calls plans."""
    return [[max(0, min(chunk, n - start)) for n in lengths] for start in range(0, max(lengths), chunk)]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for b, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape
        err = rel_error(g, w)
        assert err < RTOL, f"prompt {b}: relative error {err:.2e}"


@pytest.mark.parametrize("chunk", [1, 3, W, W + 5], ids=["chunk1", "chunk3", "chunkW", "chunk>W"])
def test_chunked_prefill_equals_full_prefill(moe: bool, chunk: int) -> None:
    model = random_model(tiny_args(moe=moe))
    # Shorter than, equal to and several times longer than the window.
    lengths = [5, W, 3 * W + 3, 2]
    prompts = random_prompts(lengths, model.args.vocab_size)
    got = run_schedule(model, prompts, chunked_schedule(lengths, chunk), max(lengths))
    assert_close(got, full_logits(model, prompts))


def keys_values_of_full_forward(model: Transformer, prompt: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the rotated keys and the values [T, H_kv, Dh] that the no-cache forward computes."""
    captured: dict[str, torch.Tensor] = {}
    hooks = [
        # attention(x, norm, ...) attends over norm(x)
        layer.attention.register_forward_pre_hook(lambda m, args, key=i: captured.__setitem__(key, args[1](args[0])))
        for i, layer in model.layers.items()
    ]
    try:
        model(torch.tensor(prompt, device=DEVICE), [len(prompt)])
    finally:
        for h in hooks:
            h.remove()
    T, args, weights = len(prompt), model.args, model.state_dict()
    rope = rotary_cos_sin(torch.arange(T, device=DEVICE), args.head_dim, args.rope_theta)
    out = []
    for i in model.layers:
        x = captured[i]  # the attention's input, after its norm
        k = (x @ weights[f"layers.{i}.attention.wk.weight"].T).view(T, args.n_kv_heads, args.head_dim)
        v = (x @ weights[f"layers.{i}.attention.wv.weight"].T).view(T, args.n_kv_heads, args.head_dim)
        out.append((apply_rotary_emb(k, rope), v))
    return out


@pytest.mark.parametrize("chunk", [3, W + 5])
def test_rolling_buffer_wraps_past_window(chunk: int) -> None:
    model = random_model(tiny_args())
    # Row 0 wraps the buffer 3+ times during prefill; row 1 less than once.
    lengths = [3 * W + 5, W - 3]
    prompts = random_prompts(lengths, model.args.vocab_size, seed=1)
    cache = model.make_cache(2, 1000)
    assert cache.size == W
    fed = [0, 0]
    for seqlens in chunked_schedule(lengths, chunk):
        pieces = [p[f : f + s] for p, f, s in zip(prompts, fed, seqlens)]
        model(torch.tensor(sum(pieces, []), device=DEVICE), seqlens, cache)
        fed = [f + s for f, s in zip(fed, seqlens)]
    # Then decode a few steps one token per row, wrapping row 0 once more and row 1 for the first time.
    extra = random_prompts([W + 2, W + 2], model.args.vocab_size, seed=2)
    for step in range(W + 2):
        model(torch.tensor([extra[0][step], extra[1][step]], device=DEVICE), [1, 1], cache)
    assert cache.lengths == [lengths[0] + W + 2, lengths[1] + W + 2]

    for row, (prompt, more) in enumerate(zip(prompts, extra)):
        sequence = prompt + more
        T = len(sequence)
        reference = keys_values_of_full_forward(model, sequence)
        live = range(T - W, T)  # the window: exactly what the buffer must hold now
        slots = [p % W for p in live]
        assert sorted(slots) == list(range(W))
        for layer, (k, v) in enumerate(reference):
            err_k = rel_error(cache.k[layer, row, slots], k[list(live)])
            err_v = rel_error(cache.v[layer, row, slots], v[list(live)])
            assert err_k < RTOL and err_v < RTOL, f"row {row} layer {layer}: key error {err_k:.2e}, value error {err_v:.2e}"


def test_packed_prompts_do_not_see_each_other(moe: bool) -> None:
    model = random_model(tiny_args(moe=moe))
    a, b, b2 = random_prompts([W + 3, 2 * W, 2 * W], model.args.vocab_size, seed=3)
    alone = full_logits(model, [a])[0]
    for other in (b, b2):  # a's logits do not depend on whatever is packed next to it
        for chunk in (3, W):
            schedule = chunked_schedule([len(other), len(a), len(other)], chunk)
            got = run_schedule(model, [other, a, other], schedule, 100)
            assert_close([got[1]], [alone])
        assert_close([full_logits(model, [other, a])[1]], [alone])


@pytest.mark.parametrize("window", [W, None], ids=["window", "full-attention"])
def test_rows_with_different_cached_lengths_share_a_call(moe: bool, window: Optional[int]) -> None:
    """Every kind of call: a row may be fresh, mid-prompt or idle (0 new tokens) in any call, and
    rows that decode beside others (cache.Mixed) attend as a decode step does, in place."""
    model = random_model(tiny_args(moe=moe, sliding_window=window))
    schedule = [
        [5, 0, 2, 0],  # rows 1 and 3 sit out the first prefill
        [0, 4, 3, 0],  # row 0 idle, row 1 fresh while row 2 is cached: a mixed chunk
        [1, 1, 1, 0],  # rows 0-2 decode, row 3 idle: decoding rows alone
        [W + 2, 0, 1, 0],  # row 0 wraps within one chunk, row 2 decodes beside it
        [1, 0, 1, 6],  # rows 0 and 2 decode beside row 3's first chunk (a server's chunk call)
        [1, 1, 0, 0],  # one token each but rows idle: not a plain decode step
        [0, 0, 2 * W, 3],
        [1, 1, 1, 1],
        [1, 1, 1, 1],
    ]
    lengths = [sum(s[b] for s in schedule) for b in range(4)]
    prompts = random_prompts(lengths, model.args.vocab_size, seed=4)
    got = run_schedule(model, prompts, schedule, max(lengths))
    assert_close(got, full_logits(model, prompts))


@pytest.mark.parametrize("chunk", [1, 5, 40])
def test_full_attention_with_cache(chunk: int) -> None:
    model = random_model(tiny_args(sliding_window=None))
    lengths = [3 * W, W - 1]
    prompts = random_prompts(lengths, model.args.vocab_size, seed=5)
    cache_len = max(lengths)
    got = run_schedule(model, prompts, chunked_schedule(lengths, chunk), cache_len)
    assert_close(got, full_logits(model, prompts))
    # Without a window no token ever leaves: with a slot per position, the buffer did not roll.
    assert model.make_cache(1, cache_len).size == cache_len


def test_window_less_cache_overflow_is_a_clear_error() -> None:
    model = random_model(tiny_args(sliding_window=None))
    cache = model.make_cache(2, 10)
    model(torch.tensor([1] * 8, device=DEVICE), [8], cache)
    with pytest.raises(MistralError, match="sequence 0 would reach 11 tokens, past the cache's 10 slots"):
        model(torch.tensor([1] * 3, device=DEVICE), [3], cache)
    # The failed call changed nothing: the cache still takes what fits.
    assert cache.lengths == [8, 0]
    model(torch.tensor([1] * 2, device=DEVICE), [2], cache)
    with pytest.raises(MistralError, match="past the cache"):
        model(torch.tensor([1], device=DEVICE), [1], cache)

    # A windowed cache smaller than its window cannot roll either: slots would be overwritten
    # while still inside the window.
    windowed = random_model(tiny_args(sliding_window=W))
    small = windowed.make_cache(1, W - 2)
    with pytest.raises(MistralError, match="past the cache's 6 slots"):
        windowed(torch.tensor([1] * (W - 1), device=DEVICE), [W - 1], small)

    with pytest.raises(MistralError, match="3 sequences do not fit a cache of 2 rows"):
        model(torch.tensor([1, 1, 1], device=DEVICE), [1, 1, 1], cache)


# One model per (window, moe): building it is cheap, but hypothesis reruns the body many times.
_MODELS: dict[tuple[Optional[int], bool], Transformer] = {}


def _model(window: Optional[int], moe: bool) -> Transformer:
    if (window, moe) not in _MODELS:
        _MODELS[window, moe] = random_model(tiny_args(moe=moe, sliding_window=window, n_layers=2))
    return _MODELS[window, moe]


def ragged_schedule(lengths: Sequence[int], chunk: int, rng: random.Random) -> list[list[int]]:
    """Calls in which every row takes 0..chunk of its remaining tokens, independently."""
    left, schedule = list(lengths), []
    while any(left):
        seqlens = [rng.randint(0, min(chunk, n)) for n in left]
        if not any(seqlens):
            first = next(b for b, n in enumerate(left) if n)
            seqlens[first] = 1
        schedule.append(seqlens)
        left = [n - s for n, s in zip(left, seqlens)]
    return schedule


@settings(max_examples=25, deadline=None)
@given(
    window=st.sampled_from([1, 2, 3, 5, 8, None]),
    moe=st.booleans(),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    chunk=st.integers(1, 12),
    ragged=st.booleans(),
    decode_steps=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_cached_logits_match_no_cache_forward(
    window: Optional[int], moe: bool, lengths: list[int], chunk: int, ragged: bool, decode_steps: int, seed: int
) -> None:
    """Prefill in generate()'s chunks, or ragged (rows idle or mid-prompt in any call), then decode."""
    model = _model(window, moe)
    total = [n + decode_steps for n in lengths]
    prompts = random_prompts(total, model.args.vocab_size, seed=seed)
    prefill = ragged_schedule(lengths, chunk, random.Random(seed)) if ragged else chunked_schedule(lengths, chunk)
    got = run_schedule(model, prompts, prefill + [[1] * len(lengths)] * decode_steps, max(total))
    assert_close(got, full_logits(model, prompts))


def test_rewind_keeps_slots_only_where_no_later_token_overwrote_them() -> None:
    """A row of 8 slots that has seen 12 tokens: rewinding one token keeps positions 4..10
    (position 11 took position 3's slot); a second rewind, to 10, needs position 3 back,
    which is gone although the row's length says 11: the row starts over."""
    from mistral.cache import RotatingBufferCache

    cache = RotatingBufferCache(1, 1, 100, 8, 1, 4)
    cache.advance([12])
    cache.rewind(0, 11)
    assert cache.lengths == [11]
    cache.rewind(0, 10)
    assert cache.lengths == [0]
    cache.reset()
    cache.advance([6])  # never wrapped: any rewind keeps what it needs
    cache.rewind(0, 2)
    assert cache.lengths == [2]


@given(lengths=st.lists(st.integers(0, 40), min_size=1, max_size=4), size=st.sampled_from([8, 64, 10_000]))
@settings(max_examples=40, deadline=None)
def test_an_eager_decode_step_reads_only_filled_slots(lengths: list[int], size: int) -> None:
    """Without a graph a decode query reads the first max(filled) slots of the rows, not the
    whole row (a window-less cache of max_tokens slots made every step cost max_tokens), and
    attends exactly as over the whole row, the graph's way (mask 3 padded to every slot)."""
    from mistral.attention import attend
    from mistral.cache import Decode, RotatingBufferCache
    from mistral.masks import decode_mask

    H_KV, D, B = 2, 4, len(lengths)
    cache = RotatingBufferCache(1, B, size, None, H_KV, D, device=DEVICE)
    cache.k.normal_(), cache.v.normal_()
    eager = Decode(lengths, size, DEVICE)
    reads = [min(n + 1, size) for n in lengths]
    xk, xv, xq = (torch.randn(B, h, D, device=DEVICE) for h in (H_KV, H_KV, 2 * H_KV))
    keys, values = eager.update(cache.k[0], cache.v[0], xk, xv)
    assert keys.shape[0] == B * max(reads)
    every_slot = decode_mask(reads, size, DEVICE)
    want = attend(xq, cache.k[0].flatten(0, 1), cache.v[0].flatten(0, 1), every_slot, "reference")
    assert rel_error(attend(xq, keys, values, eager.mask, "reference"), want) < 1e-6


@settings(max_examples=25, deadline=None)
@given(
    window=st.sampled_from([2, 5, 8, None]),
    moe=st.booleans(),
    lengths=st.lists(st.integers(1, 30), min_size=1, max_size=4),
    chunk=st.integers(1, 12),
    decode_steps=st.integers(1, 4),
    padding=st.integers(0, 9),
    lookahead=st.integers(0, 4),
    seed=st.integers(0, 2**16),
)
def test_calls_read_in_place_match_no_cache_forward(
    window: Optional[int], moe: bool, lengths: list[int], chunk: int, decode_steps: int, padding: int, lookahead: int, seed: int
) -> None:
    """A server's chunk call as its CUDA graph runs it (cache.InPlace, decode.Runner's chunk
    graphs): every key stored first, each query reading its row in place, `padding` tokens past
    the call's that write nothing, the logits of chosen tokens. Ragged calls, in rows of W slots
    or more (speculative decoding's lookahead); those whose rows would overwrite keys they
    read (`reads_in_place` says no) run as cache.prepare's call."""
    model = _model(window, moe)
    total = [n + decode_steps for n in lengths]
    prompts = random_prompts(total, model.args.vocab_size, seed=seed)
    cache = model.make_cache(len(prompts), max(total), lookahead)
    # (a first call of no more tokens a row than its slots reads in place: no row holds a key yet)
    schedule = ragged_schedule(lengths, min(chunk, cache.size), random.Random(seed)) + [[1] * len(lengths)] * decode_steps
    attention = model.layers["0"].attention
    tile = kernels.chunk_tile(attention.n_heads // attention.n_kv_heads)
    fed, in_place, out = [0] * len(prompts), [], [[] for _ in prompts]
    for seqlens in schedule:
        ids = sum((p[f : f + s] for p, f, s in zip(prompts, fed, seqlens)), [])
        T = len(ids)
        if reads_in_place(seqlens, cache.lengths, cache.size, window):
            inputs = InPlace(T + padding, len(prompts), tile, cache.size, window, DEVICE)
            inputs.restart(seqlens, cache.lengths)
            x = torch.tensor(ids + [0] * padding, device=DEVICE)
            logits = model.step(x, inputs, cache, rows=torch.arange(T, device=DEVICE))
            in_place.append(any(cache.lengths[: len(prompts)]))  # whether some row held keys
            cache.advance(seqlens)
        else:
            logits = model(torch.tensor(ids, device=DEVICE), seqlens, cache)
        for b, part in enumerate(logits.split(list(seqlens))):
            out[b].append(part)
        fed = [f + s for f, s in zip(fed, seqlens)]
    assert any(in_place)  # (the decode steps read in place, after keys of their own)
    assert_close([torch.cat(x) for x in out], full_logits(model, prompts))


def test_a_call_that_would_overwrite_keys_it_reads_is_not_read_in_place() -> None:
    """Rows of W = 8 slots: a row that has rolled reads one token a call in place (a decoding row),
    not two (the second's key would overwrite the first's oldest); one that has not rolled reads
    up to its slots; a window-less row up to its slots (it never rolls)."""
    assert reads_in_place([1, 3, 8], [20, 5, 0], 8, 8)
    assert not reads_in_place([2], [20], 8, 8)
    assert not reads_in_place([4], [5], 8, 8)  # position 8 takes slot 0, which position 5 still reads
    assert reads_in_place([4], [20], 11, 8) and not reads_in_place([5], [20], 11, 8)  # W + 3 slots: room for 4
    assert not reads_in_place([2], [7], 8, 8)  # full (7 = W - 1 tokens), not rolled: position 8 takes position 0's slot
    assert reads_in_place([10], [30], 40, None)  # a window-less row: up to its slots (check_fits refuses more)
    inputs = InPlace(8, 2, 4, 8, 8, DEVICE)
    with pytest.raises(MistralError, match="overwrite keys that its own queries read"):
        inputs.restart([2, 0], [20, 0])
    with pytest.raises(MistralError, match="a call of 9 tokens does not fit inputs of 8"):
        inputs.restart([5, 4], [0, 0])


def test_a_call_read_in_place_packs_its_inputs_as_the_worked_example_says() -> None:
    """cache.InPlace's docstring: W = 8 slots, tiles of 4, a decoding row and 6 prompt tokens, 3 padding."""
    inputs = InPlace(10, 3, 4, 8, 8, DEVICE)
    inputs.restart([1, 0, 6], [20, 0, 0])
    assert inputs.positions.tolist() == [20, 0, 1, 2, 3, 4, 5, 0, 0, 0]
    assert inputs.write_to.tolist() == [4, 16, 17, 18, 19, 20, 21, -1, -1, -1]
    assert inputs.tile_first.tolist()[:3] == [0, 1, 5] and inputs.tile_len.tolist() == [1, 4, 2, 0, 0, 0]
    inputs.restart([0, 5, 0], [0, 3, 0])  # restarted in place: the last call's tokens and tiles gone
    assert inputs.positions.tolist() == [3, 4, 5, 6, 7, 0, 0, 0, 0, 0]
    assert inputs.write_to.tolist() == [11, 12, 13, 14, 15, -1, -1, -1, -1, -1]
    assert inputs.tile_first.tolist()[:2] == [0, 4] and inputs.tile_len.tolist() == [4, 1, 0, 0, 0, 0]
