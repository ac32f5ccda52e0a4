"""The attention executors against a definition written out by hand.

The masks say "query i of a sequence sees keys i-W+1 .. i of the same sequence"; here
that rule is spelled with plain index arithmetic, independently of xformers, and every
executor must agree with it: the reference on any device; on CUDA xformers' kernels, and
backend "auto" (xformers, or PyTorch's cuDNN / flash kernels for a batch of causal
prompts, or our Triton kernel for a decode step).
"""

from typing import Optional

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from helpers import DEVICE, TRITON_KERNELS_RUN, rel_error

from mistral import MistralError, kernels
from mistral.attention import causal_attention, attend, causal_blocks, prefill_backends
from mistral.cache import Decode, InPlace, RotatingBufferCache, Verify, _store, cache_inputs
from mistral.masks import chunk_mask, decode_mask, prefill_mask

H, H_KV, D = 4, 2, 16


def by_hand(xq: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, allowed: list[list[int]]) -> torch.Tensor:
    """Softmax attention of query t over the keys allowed[t], in float64."""
    out = torch.empty(xq.shape, dtype=torch.float64)
    group = H // H_KV
    for t, ks in enumerate(allowed):
        for h in range(H):
            k = keys[ks, h // group].double()
            v = values[ks, h // group].double()
            p = torch.softmax(k @ xq[t, h].double() * D**-0.5, dim=0)
            out[t, h] = p @ v
    return out


def cases(window: int) -> list[tuple[str, object, int, list[list[int]]]]:
    """(name, mask, n_keys, allowed keys of each query) for the three masks."""
    seqlens = [5, 1, 7]
    allowed, start = [], 0
    for s in seqlens:  # prefill: causal and local within each sequence
        allowed += [[start + j for j in range(max(0, i - window + 1), i + 1)] for i in range(s)]
        start += s
    prefill = ("prefill", prefill_mask(seqlens, window, DEVICE), sum(seqlens), allowed)

    q, kv = [2, 3], [6, 3]  # chunk: the queries are the last q of kv keys
    allowed, start = [], 0
    for n_q, n_kv in zip(q, kv):
        for i in range(n_kv - n_q, n_kv):
            allowed.append([start + j for j in range(max(0, i - window + 1), i + 1)])
        start += n_kv
    chunk = ("chunk", chunk_mask(q, kv, window, DEVICE), sum(kv), allowed)

    filled = [window, min(2, window), 1]  # decode: each query reads the filled slots of its own row
    allowed = [[b * window + j for j in range(n)] for b, n in enumerate(filled)]
    decode = ("decode", decode_mask(filled, window, DEVICE), len(filled) * window, allowed)

    # Prompts of one length: a batch of causal attentions once the window covers them
    # (backend "auto" on CUDA runs those through PyTorch's scaled_dot_product_attention).
    allowed = [[b * 4 + j for j in range(max(0, i - window + 1), i + 1)] for b in range(3) for i in range(4)]
    equal = ("equal prefill", prefill_mask([4, 4, 4], window, DEVICE), 12, allowed)
    return [prefill, chunk, decode, equal]


@pytest.mark.parametrize("backend", ["reference", "xformers", "auto"])
@pytest.mark.parametrize("window", [1, 3, 4])
def test_attention_matches_the_rule_written_by_hand(backend: str, window: int) -> None:
    if backend != "reference" and DEVICE.type != "cuda":
        pytest.skip("xformers' kernels run on CUDA only (and 'auto' is the reference elsewhere)")
    dtype = torch.float32 if backend == "reference" else torch.bfloat16
    # bf16 inputs and a bf16 output: 8 bits of mantissa, so about 4e-3 relative.
    tolerance = 1e-5 if backend == "reference" else 1e-2
    torch.manual_seed(window)
    for name, mask, n_keys, allowed in cases(window):
        xq = torch.randn(len(allowed), H, D)
        keys, values = torch.randn(n_keys, H_KV, D), torch.randn(n_keys, H_KV, D)
        got = attend(*(x.to(DEVICE, dtype) for x in (xq, keys, values)), mask, backend)
        assert rel_error(got.cpu(), by_hand(xq, keys, values, allowed)) < tolerance, name


@given(
    seqlens=st.lists(st.integers(1, 6), min_size=1, max_size=4),
    window=st.one_of(st.none(), st.integers(1, 8)),
    equal=st.booleans(),
)
@example(seqlens=[4, 4], window=3, equal=True)  # the edges: one short of the prompts, and just covering them
@example(seqlens=[4, 4], window=4, equal=True)
def test_causal_blocks_are_read_off_exactly_the_masks_of_causal_blocks(seqlens: list[int], window, equal: bool) -> None:
    if equal:
        seqlens = [seqlens[0]] * len(seqlens)
    mask = prefill_mask(seqlens, window, torch.device("cpu"))
    dense = window is None or window >= max(seqlens)
    starts = [sum(seqlens[:b]) for b in range(len(seqlens))]
    want: dict[int, list[int]] = {}
    for start, n in zip(starts, seqlens):
        want.setdefault(n, []).append(start)
    assert causal_blocks(mask) == (want if dense else None)
    if dense:  # and then the mask is that of causal blocks, spelled out here
        allowed = torch.block_diag(*[torch.ones(n, n, dtype=torch.bool).tril() for n in seqlens])
        T = sum(seqlens)
        assert torch.equal(mask.materialize((T, T)) == 0, allowed)
    # An empty sequence (which the model never packs) holds no block, and is no error.
    assert causal_blocks(prefill_mask([0] + seqlens, window, torch.device("cpu"))) == (want if dense else None)
    # Chunks and decode steps read a cache: never plain causal blocks.
    assert causal_blocks(chunk_mask(seqlens, [s + 1 for s in seqlens], window, torch.device("cpu"))) is None
    assert causal_blocks(decode_mask(seqlens, 8, torch.device("cpu"))) is None


@pytest.mark.parametrize("window", [3, 4, None])
@pytest.mark.parametrize("seqlens", [[3, 3], [2, 3, 2, 1], [4]])
def test_causal_blocks_attention_matches_the_reference(window, seqlens: list[int]) -> None:
    """The batched causal products (on the CPU here; backend "auto" runs them on CUDA), one per
    length of sequence, against the materialized mask, where no window cuts a sequence."""
    torch.manual_seed(0)
    mask = prefill_mask(seqlens, window, torch.device("cpu"))
    blocks = causal_blocks(mask)
    assert (blocks is None) == (window is not None and window < max(seqlens))
    if blocks is None:
        return
    T = sum(seqlens)
    xq, keys, values = torch.randn(T, H, D), torch.randn(T, H_KV, D), torch.randn(T, H_KV, D)
    assert rel_error(causal_attention(xq, keys, values, blocks), attend(xq, keys, values, mask, "reference")) < 1e-5


def decode_case(group: int, static: bool, query_rows: Optional[list[int]] = None) -> tuple:
    """A decode step's inputs and what it must do: rows of a first token, a short row, a row that
    just filled its slots, wrapped rows, and a cache with more rows than the call. static: the
    graph's mask, built with every row full, whose device lengths carry the truth. query_rows:
    the cache rows of the queries, in their order (a chunk call's decoding rows: cache.Mixed), else 0..5.
    Returns (cache, xq, xk, xv, slots, key lengths, the cache as it must end, the output)."""
    # Rows of up to 300 slots: the Triton kernel splits each into runs of at least 128 keys.
    size, rows, positions = 300, 7, [0, 5, 299, 300, 1234, 2000]
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    torch.manual_seed(group)
    cache = RotatingBufferCache(1, rows, size, size, H_KV, D, device=DEVICE, dtype=dtype)
    cache.k.normal_(), cache.v.normal_()
    inputs = Decode(positions, size, DEVICE, rows=query_rows)
    B = len(positions)
    xq, xk, xv = (torch.randn(B, n, D, device=DEVICE, dtype=dtype) for n in (group * H_KV, H_KV, H_KV))
    want_k, want_v = cache.k.clone(), cache.v.clone()
    keys, values = inputs.update(want_k[0], want_v[0], xk, xv)
    want = attend(xq, keys, values, inputs.mask, "reference")
    graph = Decode(positions, size, DEVICE, static=static, rows=query_rows)
    return cache, xq, xk, xv, graph.write_to, graph.mask.k_seqinfo.seqlen, (want_k, want_v), want


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("static", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("rows", [None, [6, 1, 3, 0, 4, 2]], ids=["rows-0-5", "other-rows"])
def test_decode_kernel_writes_and_attends_as_the_decode_mask_says(group: int, static: bool, rows: Optional[list[int]]) -> None:
    """kernels.decode_attention (Triton on CUDA) = the cache update, then attention under mask 3,
    each query in the row its slot is in (Decode's keys of those rows, gathered)."""
    cache, xq, xk, xv, slots, lengths, (want_k, want_v), want = decode_case(group, static, rows)
    got = kernels.decode_attention(xq, xk, xv, cache.k[0], cache.v[0], slots, lengths, lengths)
    assert torch.equal(cache.k, want_k) and torch.equal(cache.v, want_v)
    assert rel_error(got, want) < (1e-5 if xq.dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(not TRITON_KERNELS_RUN, reason="Triton's kernel: CUDA, or the CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("rows", [None, [6, 1, 3, 0, 4, 2]], ids=["rows-0-5", "other-rows"])
def test_decode_kernel_splits_rows_into_any_number_of_runs(group: int, rows: Optional[list[int]]) -> None:
    """The Triton decode kernel for every number of programs per row and key head (one compiled
    kernel serves them all: it follows the batch size): one run, programs past a short row's
    runs, a number no power of two, more than the keys fill; runs of 16 keys merged 2 at a time,
    so that the merge goes round many times, as a long row's 64 runs do 8 at a time."""
    for splits in (1, 2, 3, 8, 64):
        cache, xq, xk, xv, slots, lengths, (want_k, want_v), want = decode_case(group, static=False, query_rows=rows)
        got = kernels._triton_decode_attention(
            xq, xk, xv, cache.k[0], cache.v[0], slots, lengths, lengths, block_s=16, min_chunk=16, splits=splits, merge=2
        )
        assert torch.equal(cache.k, want_k) and torch.equal(cache.v, want_v), splits
        assert rel_error(got, want) < (1e-5 if xq.dtype == torch.float32 else 1e-2), splits


def verify_case(group: int, window: Optional[int], n: int, static: bool) -> tuple:
    """A verify step of n tokens a row in rows of window + n - 1 slots (speculative decoding's
    lookahead; 40 + n - 1 without a window): a fresh row, short rows, rows that wrapped once
    and many times, slots ahead holding stale proposals. Returns (cache, inputs, xq, xk, xv, the
    cache as it must end, the output): the chunk call's of the same tokens, keys in position order."""
    lengths = [0, 3, 17, 30, 31, 95, 400] if window else [0, 3, 17, 30]
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    torch.manual_seed(group * 100 + n)
    cache = RotatingBufferCache(1, len(lengths), 1000 if window else 40, window, H_KV, D, device=DEVICE, dtype=dtype, lookahead=n - 1)
    size = cache.size
    cache.k.normal_(), cache.v.normal_()  # every slot: what is not the row's must not be read
    T = len(lengths) * n
    xq, xk, xv = (torch.randn(T, m, D, device=DEVICE, dtype=dtype) for m in (group * H_KV, H_KV, H_KV))
    want_k, want_v = cache.k.clone(), cache.v.clone()
    want = cache_inputs([n] * len(lengths), lengths, size, window, DEVICE).attend(want_k[0], want_v[0], xq, xk, xv, "reference")
    inputs = Verify([0] * len(lengths), n, size, window, DEVICE, static=True) if static else Verify(lengths, n, size, window, DEVICE)
    if static:
        inputs.restart(lengths)
    return cache, inputs, xq, xk, xv, (want_k, want_v), want


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("window", [None, 8, 32])
@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("static", [False, True], ids=["eager", "graph"])
def test_a_verify_step_on_the_decode_kernel_attends_as_its_chunk_call(group: int, window: Optional[int], n: int, static: bool) -> None:
    """cache.Verify on the decode kernel (every key stored, then each query in place, no further
    than its own position and window: kernels.decode_attention's visible) = the chunk call of
    the same tokens under mask 2, and the cache ends as the chunk call leaves it. Off CUDA the
    kernel's PyTorch version stands in for it (Triton's: the test below)."""
    cache, inputs, xq, xk, xv, (want_k, want_v), want = verify_case(group, window, n, static)
    got = inputs.attend(cache.k[0], cache.v[0], xq, xk, xv, "auto")
    assert torch.equal(cache.k, want_k) and torch.equal(cache.v, want_v)
    assert rel_error(got, want) < (1e-5 if xq.dtype == torch.float32 else 1e-2)


def test_a_verify_step_in_rows_without_room_for_its_tokens_is_refused() -> None:
    """A row of W slots that rolls cannot take n tokens at once: the last would overwrite a key
    the first still reads (the kernel, reading in place, would attend to the wrong one)."""
    with pytest.raises(MistralError, match=r"lookahead=2\)"):
        Verify([30, 5], 3, 8, 8, DEVICE)
    with pytest.raises(MistralError, match="past the cache's 12 slots"):  # a window-less row cannot roll
        Verify([10, 5], 3, 12, None, DEVICE)
    Verify([30, 5], 3, 10, 8, DEVICE)  # W + n - 1 slots


@pytest.mark.skipif(not TRITON_KERNELS_RUN, reason="Triton's kernel: CUDA, or the CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize("window", [None, 8])
def test_the_triton_decode_kernel_verifies_in_any_number_of_runs(window: Optional[int]) -> None:
    """The Triton kernel's verify step (queries of a row reading each other's keys) for one run,
    programs past a short row's runs, and more programs than keys."""
    for splits in (1, 3, 64):
        cache, inputs, xq, xk, xv, (want_k, want_v), want = verify_case(4, window, 5, static=False)
        q = inputs.queries
        _store(cache.k[0], cache.v[0], xk, xv, q.write_to)
        got = kernels._triton_decode_attention(
            xq, xk, xv, cache.k[0], cache.v[0], q.write_to, q.mask.k_seqinfo.seqlen, inputs.visible, block_s=16, min_chunk=16, splits=splits, merge=2
        )  # fmt: skip
        assert torch.equal(cache.k, want_k) and torch.equal(cache.v, want_v), splits
        assert rel_error(got, want) < (1e-5 if xq.dtype == torch.float32 else 1e-2), splits


def chunk_case(group: int, window: Optional[int]) -> tuple:
    """A call read in place (cache.InPlace) in rows of W + 20 slots (40 without a window), so that
    a rolled row reads several tokens in place: rows fresh, mid-prompt, decoding and rolled, a
    row's queries in several tiles and a short last one, 3 padding tokens (slot -1). Returns
    (cache, inputs, xq, xk, xv, the cache as it must end, the output of the real tokens): the
    chunk call's of the same tokens under mask 2."""
    size = 40 if window is None else window + 20
    cached, seqlens = ([0, 3, 20, 39, 0], [25, 17, 1, 1, 0]) if window is None else ([0, 3, 20, 95, 50], [25, 6, 1, 6, 1])
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    torch.manual_seed(group)
    cache = RotatingBufferCache(1, len(cached), size, window, H_KV, D, device=DEVICE, dtype=dtype, lookahead=size - (window or size))
    cache.k.normal_(), cache.v.normal_()  # every slot: what is not a query's must not be read
    T = sum(seqlens)
    tile = 16 // (1 << (group - 1).bit_length())  # the fewest rows a product takes: several tiles a row
    inputs = InPlace(T + 3, len(cached), tile, size, window, DEVICE)
    inputs.restart(seqlens, cached)
    assert int((inputs.tile_len > 0).sum()) > len([s for s in seqlens if s])
    # Views of one [T, H + 2 H_kv + 1, D] tensor, as the model's projections hand them over: strided rows.
    xq, xk, xv, _ = torch.randn(T + 3, (group + 2) * H_KV + 1, D, device=DEVICE, dtype=dtype).split([group * H_KV, H_KV, H_KV, 1], dim=1)
    want_k, want_v = cache.k.clone(), cache.v.clone()
    want = cache_inputs(seqlens, cached, size, window, DEVICE).attend(want_k[0], want_v[0], xq[:T], xk[:T], xv[:T], "reference")
    return cache, inputs, xq, xk, xv, (want_k, want_v), want


@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("window", [None, 8])
def test_a_call_read_in_place_attends_as_its_chunk_call(group: int, window: Optional[int]) -> None:
    """cache.InPlace (kernels.store_keys, then kernels.chunk_attention: every key stored, then each
    query reading its own row in place) = the chunk call of the same tokens under mask 2, and
    the cache ends as the chunk call leaves it. Off CUDA the kernels' PyTorch versions stand in
    for them (Triton's: the test below)."""
    cache, inputs, xq, xk, xv, (want_k, want_v), want = chunk_case(group, window)
    got = inputs.attend(cache.k[0], cache.v[0], xq, xk, xv, "auto")
    assert torch.equal(cache.k, want_k) and torch.equal(cache.v, want_v)
    assert rel_error(got[: len(want)], want) < (1e-5 if xq.dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(not TRITON_KERNELS_RUN, reason="Triton's kernel: CUDA, or the CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize("group", [1, 3, 4])
@pytest.mark.parametrize("window", [None, 8])
def test_the_triton_chunk_kernels_attend_as_the_chunk_call(group: int, window: Optional[int]) -> None:
    """store_keys' and chunk_attention's Triton kernels on chunk_case's call, blocks of 16 keys."""
    cache, inputs, xq, xk, xv, (want_k, want_v), want = chunk_case(group, window)
    kernels._triton_store_keys(xk, xv, cache.k[0], cache.v[0], inputs.write_to)
    assert torch.equal(cache.k, want_k) and torch.equal(cache.v, want_v)
    got = kernels._triton_chunk_attention(xq, cache.k[0], cache.v[0], inputs.positions, inputs.write_to, inputs.tile_first,
                                          inputs.tile_len, inputs.window, inputs.tile, block_s=16)  # fmt: skip
    assert rel_error(got[: len(want)], want) < (1e-5 if xq.dtype == torch.float32 else 1e-2)


def test_a_prefill_shape_runs_on_flash_attention_first_and_on_cudnn_once_it_recurs(monkeypatch: pytest.MonkeyPatch) -> None:
    """cuDNN builds a plan per new shape (0.1-0.4 s) that a one-shot run would wait for: a shape's
    first call takes flash-attention, its later ones cuDNN; each list names both (a fallback).
    A warm-up's call (prewarm, remember=False) leaves the shape new."""
    from torch.nn.attention import SDPBackend

    from mistral import attention

    monkeypatch.setattr(attention, "_shapes_seen", set())
    flash_first, cudnn_first = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION], [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    shape = (1, 4096, 32, 8, 128, torch.bfloat16, torch.device("cuda"))
    assert prefill_backends(shape, remember=False) == flash_first
    assert prefill_backends(shape) == flash_first
    assert prefill_backends(shape) == prefill_backends(shape) == cudnn_first
    assert prefill_backends((2, *shape[1:])) == flash_first  # another batch: another shape
