"""The fast path (mistral/decode.py) computes what the reference path computes.

On the CPU its pieces run uncompiled and without graphs; MISTRAL_TEST_DEVICE=cuda runs
them compiled and, for decoding, replayed from a CUDA graph.
"""

import pytest
import torch
from conftest import DEVICE, RTOL, random_model, rel_error, tiny_args

from mistral import decode
from mistral.cache import CacheInputs
from mistral.decode import GraphDecoder, fused_weights, moe_static, rotary
from mistral.model import apply_rotary_emb, precompute_freqs_cis
from mistral.moe import MoeLayer


@pytest.fixture(autouse=True)
def compile_on_cuda_only(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.compile on the CPU needs a C++ toolchain and minutes; the CPU checks the math.
    monkeypatch.setattr(decode, "COMPILE", DEVICE.type == "cuda")


def test_rotary_equals_complex_rotary() -> None:
    torch.manual_seed(0)
    x = torch.randn(7, 4, 16, device=DEVICE, dtype=torch.float32)
    freqs_cis = precompute_freqs_cis(torch.arange(100, 107, device=DEVICE), 16, 1e6)
    assert rel_error(rotary(x, torch.view_as_real(freqs_cis)), apply_rotary_emb(x, freqs_cis)) < 1e-6


@pytest.mark.parametrize("T", [1, 2, 3, 16])  # T * 2 <= 4 experts: matrix-vector products; more: grouped
def test_static_moe_equals_moe_layer(T: int) -> None:
    model = random_model(tiny_args(moe=True))
    moe = model.layers["0"].feed_forward
    assert isinstance(moe, MoeLayer)
    torch.manual_seed(T)
    x = torch.randn(T, model.args.dim, device=DEVICE, dtype=model.dtype)
    want = moe(x)
    stacks = fused_weights(model)[0][2]
    assert stacks is not None
    assert rel_error(moe_static(moe, x, stacks), want) < RTOL


def test_fused_weights_keep_the_checkpoint(moe: bool) -> None:
    model = random_model(tiny_args(moe=moe))
    before = {n: t.clone() for n, t in model.state_dict().items()}
    first = fused_weights(model)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[n], before[n]) for n in before)
    assert fused_weights(model)[0][0].data_ptr() == first[0][0].data_ptr()  # fused once, then found in place
    # The parameters are views of the fused tensors: an update of one is seen by the other.
    with torch.no_grad():
        model.layers["0"].attention.wk.weight.fill_(0.5)
    q_rows, kv_rows = model.args.n_heads * model.args.head_dim, model.args.n_kv_heads * model.args.head_dim
    assert bool((first[0][0][q_rows : q_rows + kv_rows] == 0.5).all())


def test_fast_path_equals_model_forward(moe: bool) -> None:
    """Packed prefill, a chunk on top of it, then decode steps past the window: same logits."""
    model = random_model(tiny_args(moe=moe, sliding_window=8))
    weights = fused_weights(model)
    ref, fast = model.make_cache(2, 64), model.make_cache(2, 64)
    torch.manual_seed(1)
    with torch.inference_mode():
        for seqlens in ([5, 3], [4, 6], [1, 1], [1, 1], [1, 1], [1, 1], [1, 1], [1, 1]):
            ids = torch.randint(0, model.args.vocab_size, (sum(seqlens),), device=DEVICE)
            want = model(ids, seqlens, ref)
            inputs = fast.prepare(seqlens)
            got = decode.run(model, ids, inputs, fast, len(seqlens), weights)
            fast.advance(seqlens)
            assert rel_error(got, want) < RTOL, (seqlens, inputs.kind)
    assert fast.lengths == ref.lengths


def test_decoder_slots_equal_cache_inputs() -> None:
    """The decoder's in-place slot arithmetic is CacheInputs.build's decode case, step after step."""
    args = tiny_args(sliding_window=4)
    model = random_model(args)
    cache = model.make_cache(3, 64)
    cache.lengths[:3] = [0, 2, 5]
    decoder = GraphDecoder(model, cache, 3)
    lengths = list(cache.lengths)
    for _ in range(6):  # rows wrap past the window of 4
        want = CacheInputs.build([1, 1, 1], lengths, cache.size, args.sliding_window, model.device)
        assert decoder.positions.tolist() == want.positions.tolist()
        assert decoder.inputs.write_to.tolist() == want.write_to.tolist()
        assert decoder.kv_seqlen.tolist() == want.mask.k_seqinfo.seqlen.tolist()
        decoder.positions += 1
        decoder._set_slots()
        lengths = [n + 1 for n in lengths]


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs run on CUDA only; the CPU path is the reference")
def test_graph_decode_equals_eager_decode(moe: bool) -> None:
    model = random_model(tiny_args(moe=moe, sliding_window=8))
    assert decode.usable(model)
    prompts = [[5, 9, 2, 7, 1], [3, 3, 8]]
    eager, graphed = model.make_cache(2, 64), model.make_cache(2, 64)
    with torch.inference_mode():
        for cache in (eager, graphed):
            model(torch.tensor(sum(prompts, []), device=DEVICE), [len(p) for p in prompts], cache)
        decoder = GraphDecoder(model, graphed, 2)
        tokens = torch.tensor([4, 6], device=DEVICE)
        for _ in range(12):  # past the window: the rolling buffer wraps inside the graph
            want = model(tokens, [1, 1], eager)
            got = decoder.step(tokens)
            assert rel_error(got, want) < RTOL
            tokens = want.argmax(-1)
    assert graphed.lengths == eager.lengths
