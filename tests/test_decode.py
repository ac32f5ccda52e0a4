"""The fast path (mistral/decode.py) runs the model's own modules, and their pieces are right.

On the CPU the Runner calls Transformer.step uncompiled; MISTRAL_TEST_DEVICE=cuda runs
it compiled and, for decoding, replayed from a CUDA graph.
"""

import dataclasses
import math
from typing import Optional

import pytest
import torch
from helpers import DEVICE, DTYPE, QUANTIZATIONS, RTOL, TRITON_KERNELS_RUN, dequantized, random_model, rel_error, tiny_args

from mistral import Transformer
from mistral.args import INT4_GROUP_SIZES, QuantArgs
from mistral.cache import Decode, cache_inputs
from mistral.decode import COMPILE_COSTS_S, COMPILE_SAVES_S_PER_LAYER_STEP, Runner, compile_pays, compiled_block
from mistral.generation import stream
from mistral.stage import Stage
from mistral import kernels
from mistral.kernels import expert_linear, expert_matvec, swiglu
from mistral.linear import GatedLinear, Linear
from mistral.model import RMSNorm, TransformerBlock, apply_rotary_emb, rotary_cos_sin
from mistral.linear import quantize


def test_runner_equals_model_forward(moe: bool) -> None:
    """Packed prefill, a chunk on top of it, then decode steps past the window: same logits."""
    model = random_model(tiny_args(moe=moe, sliding_window=8))
    ref, fast = model.make_cache(2, 64), model.make_cache(2, 64)
    runner = Runner(model, fast, 2)
    torch.manual_seed(1)
    with torch.inference_mode():
        for seqlens in ([5, 3], [4, 6]):
            ids = torch.randint(0, model.args.vocab_size, (sum(seqlens),), device=DEVICE)
            assert rel_error(runner.prefill(ids, seqlens), model(ids, seqlens, ref)) < RTOL
        tokens = torch.tensor([4, 6], device=DEVICE)
        for _ in range(12):  # past the window: the rolling buffer wraps (inside the graph on CUDA)
            want = model(tokens, [1, 1], ref)
            assert rel_error(runner.decode(tokens), want) < RTOL
            tokens = want.argmax(-1)
    assert fast.lengths == ref.lengths
    assert (runner.graph is not None) == (DEVICE.type == "cuda")


def test_runner_verify_steps_equal_the_model_forward(moe: bool) -> None:
    """Verify steps of 1-5 tokens a row (speculative decoding), each followed by a rewind that
    keeps a random number of them, in rows of W + 4 slots that wrap many times: the logits of
    the model's own chunk calls; on CUDA replayed from a graph per width."""
    model = random_model(tiny_args(moe=moe, sliding_window=8))
    ref, fast = model.make_cache(2, 64, lookahead=4), model.make_cache(2, 64, lookahead=4)
    runner = Runner(model, fast, 2)
    g = torch.Generator().manual_seed(2)
    with torch.inference_mode():
        ids = torch.randint(0, model.args.vocab_size, (9,), generator=g).to(DEVICE)
        assert rel_error(runner.prefill(ids, [5, 4]), model(ids, [5, 4], ref)) < RTOL
        for step in range(24):
            n = [1, 5, 3, 2][step % 4]
            x = torch.randint(0, model.args.vocab_size, (2 * n,), generator=g).to(DEVICE)
            assert rel_error(runner.verify(x, n), model(x, [n, n], ref)) < RTOL, step
            for b in range(2):  # the fed token and some of its proposals stay
                keep = fast.lengths[b] - n + 1 + int(torch.randint(0, n, (1,), generator=g))
                fast.rewind(b, keep)
                ref.rewind(b, keep)
    assert fast.lengths == ref.lengths and min(fast.lengths) > 2 * fast.size
    assert sorted(runner.verify_graphs) == ([1, 2, 3, 5] if DEVICE.type == "cuda" else [])


def test_compiling_only_where_it_pays() -> None:
    """Compiling costs seconds (COMPILE_COSTS_S, measured) and saves tens of microseconds per
    layer and step: a one-shot run of any length people ask for stays uncompiled."""
    assert not compile_pays(64, 32) and not compile_pays(1000, 32) and not compile_pays(30_000, 4)
    assert compile_pays(5000, 32) and compile_pays(100_000, 4)
    # The break-even point is where the saving equals the cost.
    steps = math.ceil(COMPILE_COSTS_S / (32 * COMPILE_SAVES_S_PER_LAYER_STEP))
    assert not compile_pays(steps - 1, 32) and compile_pays(steps + 1, 32)
    model = random_model(tiny_args())
    assert Runner(model, model.make_cache(1, 8), 1).run_block is TransformerBlock.__call__
    assert Runner(model, model.make_cache(1, 8), 1, compile=True).run_block is compiled_block()
    stage = Stage(model)
    list(stream([[1, 2, 3]], model, max_tokens=8, stage=stage))  # stream's default: by compile_pays(8, 2)
    (runner,) = stage.runners.values()
    assert runner.compiled is False


def test_compiled_blocks_generate_what_eager_ones_do(moe: bool) -> None:
    """compile=True where it is not the default (the CPU, float32): the compiled block runs
    every kind of call (a packed prefill, decode steps) and greedy tokens are the eager ones.
    Mixtral's grouped matmul takes float32 eagerly on the CPU but not under torch.compile."""
    from mistral import generate

    model = random_model(tiny_args(moe=moe))
    prompts = [[1, 5, 6], [1, 7, 8, 9, 10, 11, 12, 13, 14, 15]]  # 13 tokens, 26 pairs: the grouped path
    (tokens, logprobs), (eager_tokens, eager_logprobs) = (generate(prompts, model, max_tokens=6, compile=c) for c in (True, False))
    assert tokens == eager_tokens
    # The same sums on the CPU; on a GPU the compiled kernels fuse and order them otherwise (2e-3 seen on an H100).
    torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(eager_logprobs), rtol=0, atol=0 if DEVICE.type == "cpu" else 1e-2)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs and float16 kernels: CUDA only")
@pytest.mark.parametrize("method", [None, "int8", "int4"], ids=["float16", "int8", "int4"])
def test_experts_without_grouped_matmul_decode_in_a_graph(method: Optional[str]) -> None:
    """float16 experts take no grouped matmul, and quantized ones a grouped product of their own
    (kernels.expert_linear): a decode batch of 8 (16 pairs > 4 experts) must still have static
    shapes, which the graph captures, and the same logits as eagerly."""
    args = dataclasses.replace(tiny_args(moe=True), quantization=QUANTIZATIONS.get(method))
    model = Transformer.random(args, device=DEVICE, dtype=torch.float16)
    ref, fast = model.make_cache(8, 32), model.make_cache(8, 32)
    runner = Runner(model, fast, 8)
    ids = torch.randint(0, args.vocab_size, (8 * 5,), device=DEVICE)
    with torch.inference_mode():
        model(ids, [5] * 8, ref)
        runner.prefill(ids, [5] * 8)
        tokens = ids[:8]
        for _ in range(4):
            want = model(tokens, [1] * 8, ref)
            assert rel_error(runner.decode(tokens), want) < RTOL
            tokens = want.argmax(-1)
    assert runner.graph is not None


@pytest.mark.parametrize("method", [None, "int8", "int4"], ids=["float", "int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3])
def test_gated_linear_takes_in_its_norm_and_swiglu(method: Optional[str], rows: int) -> None:
    """GatedLinear(x, norm) = swiglu(norm(x) W^T), spelled out in float32 on the CPU; Linear(x) = x W^T.
    On CUDA one row runs all of it in the matrix-vector kernel (kernels.linear_fuses), 3 rows do not."""
    torch.manual_seed(0)
    K, N = 96, 2 * 40  # w1 | w3 of 40 hidden units
    quantization = None if method is None else QuantArgs(**QUANTIZATIONS[method])
    linear = GatedLinear(K, N, quantization=quantization)
    weight = torch.randn(N, K) * K**-0.5
    if quantization is not None:
        tensors = quantize(weight, quantization)
        for kind, t in tensors.items():
            getattr(linear, kind).data = t
        weight = dequantized(tensors)
    else:
        linear.weight.data = weight
    norm = RMSNorm(K, 1e-5)
    norm.weight.data = torch.rand(K) + 0.5
    x = torch.randn(rows, K) * 3
    x_normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    h1, h3 = (x_normed @ weight.T).chunk(2, dim=-1)
    want = h1 * torch.sigmoid(h1) * h3
    with torch.inference_mode():
        got = linear.to(DEVICE, DTYPE)(x.to(DEVICE, DTYPE), norm.to(DEVICE, DTYPE))
        assert rel_error(got.cpu(), want) < (1e-5 if DTYPE == torch.float32 else 1e-2)
        plain = Linear(K, N, quantization=quantization)
        plain.load_state_dict(linear.state_dict())
        plain.to(DEVICE, DTYPE)  # quantized weights stay int8, uint8
        assert rel_error(plain(x.to(DEVICE, DTYPE)).cpu(), x @ weight.T) < (1e-5 if DTYPE == torch.float32 else 1e-2)


@pytest.mark.parametrize("method", [None, "int8", "int4"], ids=["float", "int8", "int4"])
def test_expert_matvec_takes_in_swiglu(method: Optional[str]) -> None:
    """expert_matvec(glu=True) = swiglu of each pair's product with its own expert."""
    torch.manual_seed(0)
    E, N, K = 3, 2 * 24, 64
    w = torch.randn(E, N, K) * K**-0.5
    tensors = {"weight": w} if method is None else quantize(w, QuantArgs(**QUANTIZATIONS[method]))
    dense = w if method is None else dequantized(tensors)
    x, experts = torch.randn(4, K), torch.tensor([2, 0, 2, 1])
    want = swiglu(torch.stack([dense[e] @ x[p] for p, e in enumerate(experts.tolist())]))
    with torch.inference_mode():
        to = lambda t: None if t is None else t.to(DEVICE, DTYPE if t.is_floating_point() else t.dtype)  # noqa: E731
        weight, scales, mins = (to(tensors.get(kind)) for kind in ("weight", "scales", "mins"))
        got = expert_matvec(to(x), weight, experts.to(DEVICE), scales, mins, glu=True)
    assert rel_error(got.cpu(), want) < (1e-5 if DTYPE == torch.float32 else 1e-2)


@pytest.mark.skipif(not TRITON_KERNELS_RUN, reason="Triton's kernel: CUDA, or the CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize(
    "quantization", [None, QuantArgs("int8"), QuantArgs("int4", 32), QuantArgs("int4", 64), QuantArgs("int4", 128)],
    ids=["float", "int8", "int4-32", "int4-64", "int4-128"],
)
@pytest.mark.parametrize("config", [(4, 256, 4), (16, 128, 4), (2, 1024, 8)], ids=lambda c: "x".join(map(str, c)))
def test_matvec_kernel_equals_the_product_of_the_weights_its_codes_stand_for(quantization: Optional[QuantArgs], config: tuple) -> None:
    """The Triton matrix-vector kernel (programs of BLOCK_N weight rows, reading BLOCK_K columns at a
    time; int8 and int4 codes turned into floats in registers) against float32 products with
    helpers.dequantized's weights: sizes no block divides, stacked experts, SwiGLU and RMSNorm taken in."""
    torch.manual_seed(0)
    for N, K, E, glu, norm in [(37, 384, 0, False, False), (21, 640, 3, True, False), (13, 384, 0, True, True)]:
        dtype = DTYPE if DEVICE.type == "cuda" else torch.float32  # the interpreter: float32 throughout
        w = torch.randn(max(E, 1), 2 * N if glu else N, K) * K**-0.5
        tensors = {"weight": w} if quantization is None else quantize(w, quantization)
        # The weights the codes stand for with the scales (and mins) the model holds: in its dtype.
        # (Rounding int4's mins to bfloat16 moves a whole group of 32 weights at once: 1.2-1.4%
        # of these products on an H100, which the kernel did not cause.)
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        dense = w if quantization is None else dequantized(tensors)
        # Expert -1: another rank's (expert parallelism), a row of zeros.
        P, experts = (4, torch.tensor([2, -1, 2, 1])) if E else (1, torch.zeros(1, dtype=torch.long))
        x, gain = torch.randn(P, K) * 3, torch.rand(K) + 0.5
        xn = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * gain if norm else x
        want = torch.einsum("pnk,pk->pn", dense[experts.clamp(min=0)], xn)
        want = (swiglu(want) if glu else want) * (experts >= 0)[:, None]
        to = lambda t: None if t is None else t.to(DEVICE, dtype if t.is_floating_point() else t.dtype)  # noqa: E731
        got = kernels._triton_matvec(
            to(x), to(tensors["weight"]), experts.to(DEVICE) if E else None, to(tensors.get("scales")), to(tensors.get("mins")),
            to(gain) if norm else None, 1e-5, glu, config=config,
        )  # fmt: skip
        assert rel_error(got.cpu(), want) < (1e-5 if dtype == torch.float32 else 1e-2), (N, K, E, glu, norm)


@pytest.mark.skipif(not TRITON_KERNELS_RUN, reason="Triton's kernel: CUDA, or the CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize(
    "quantization", [None, QuantArgs("int8"), QuantArgs("int4", 32), QuantArgs("int4", 128)], ids=["float", "int8", "int4-32", "int4-128"]
)
@pytest.mark.parametrize("M", [2, 17, 64])
@pytest.mark.parametrize("config", [(16, 128, 4), (32, 256, 4)], ids=lambda c: "x".join(map(str, c)))
def test_small_batch_kernel_equals_the_product_of_the_weights_its_codes_stand_for(quantization: Optional[QuantArgs], M: int, config: tuple) -> None:
    """kernels.linear for 2..64 rows of x (a decode step of a batch): the small-matmul kernel, tiles of
    weights turned into x's dtype for the tensor cores, against float32 products with the weights the
    codes stand for (with the scales and mins the model holds); a width no block divides."""
    torch.manual_seed(0)
    dtype = DTYPE if DEVICE.type == "cuda" else torch.float32
    N, K = 40, 384
    w = torch.randn(N, K) * K**-0.5
    tensors = {"weight": w} if quantization is None else quantize(w, quantization)
    tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    dense = tensors["weight"].float() if quantization is None else dequantized(tensors)
    x = torch.randn(M, K)
    scales, mins = (tensors[k].to(DEVICE) if k in tensors else None for k in ("scales", "mins"))
    got = kernels._triton_small_linear(x.to(DEVICE, dtype), tensors["weight"].to(DEVICE), scales, mins, config=config)
    assert rel_error(got.cpu(), x.to(dtype).float() @ dense.T) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("quantization", [QuantArgs("int8"), QuantArgs("int4", 32), QuantArgs("int4", 128)], ids=["int8", "int4-32", "int4-128"])
def test_grouped_experts_multiply_each_group_of_rows_by_its_expert(quantization: QuantArgs) -> None:
    """kernels.expert_linear, rows sorted by expert: group e (rows ends[e-1] .. ends[e]-1) times expert
    e's weights, against float32 products with the weights the codes stand for. A group of more
    rows than a block holds (70: the kernel's loop over blocks of 64), an empty one (nothing read),
    and rows past the last group (another rank's experts) left zero. On CUDA the Triton kernel
    (also under TRITON_INTERPRET=1, with a fixed block), on the CPU the loop over experts."""
    torch.manual_seed(0)
    dtype = DTYPE if DEVICE.type == "cuda" else torch.float32
    E, N, K = 3, 40, 384
    tensors = quantize(torch.randn(E, N, K) * K**-0.5, quantization)
    tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    dense = dequantized(tensors)
    groups = [70, 0, 6]
    x = torch.randn(sum(groups) + 4, K)
    ends = torch.tensor(groups).cumsum(0).to(torch.int32)
    expert_of_row = torch.repeat_interleave(torch.arange(E), torch.tensor(groups))
    want = torch.zeros(len(x), N)
    want[: len(expert_of_row)] = torch.einsum("pnk,pk->pn", dense[expert_of_row], x[: len(expert_of_row)].to(dtype).float())
    weight, scales, mins = (tensors[k].to(DEVICE) if k in tensors else None for k in ("weight", "scales", "mins"))
    runs = [lambda: expert_linear(x.to(DEVICE, dtype), weight, ends.to(DEVICE), scales, mins)]
    if TRITON_KERNELS_RUN:
        runs.append(lambda: kernels._triton_small_linear(x.to(DEVICE, dtype), weight, scales, mins, config=(16, 128, 4), ends=ends.to(DEVICE)))
    for run in runs:
        got = run().cpu().float()
        assert (got[len(expert_of_row) :] == 0).all()
        assert rel_error(got, want) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(not TRITON_KERNELS_RUN, reason="Triton's kernel: CUDA, or the CPU under TRITON_INTERPRET=1")
@pytest.mark.parametrize("group", INT4_GROUP_SIZES)
def test_dequantize_kernel_writes_the_weights_the_codes_stand_for(group: int) -> None:
    """int4 weights turned whole into floats for a prefill's product, by the Triton kernel: stacked
    experts, rows and columns that no tile divides, against helpers.dequantized (the format spelled
    out apart from the model's code), with the scales and mins the model holds (its dtype)."""
    torch.manual_seed(0)
    dtype = DTYPE if DEVICE.type == "cuda" else torch.float32
    for shape in [(37, 384), (3, 21, 640)]:
        tensors = quantize(torch.randn(*shape), QuantArgs("int4", group))
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        want = dequantized(tensors)
        got = kernels._triton_dequantize_int4(*(tensors[k].to(DEVICE) for k in ("weight", "scales", "mins")), dtype).cpu()
        assert got.dtype == dtype and got.shape == want.shape
        # float32: equal but for the order of rounding; bfloat16: each weight rounded once
        assert ((got.float() - want).abs() <= want.abs() * (1e-6 if dtype == torch.float32 else 2**-8) + 1e-6).all(), shape


def test_decode_inputs_advance_like_a_new_call() -> None:
    """A captured graph's in-place step (Decode.advance) is cache_inputs' decode call, step after step."""
    size, lengths = 4, [0, 2, 5]
    static = Decode(lengths, size, DEVICE, static=True)
    for _ in range(6):  # rows wrap past the window of 4
        want = cache_inputs([1, 1, 1], lengths, size, size, DEVICE)
        assert isinstance(want, Decode)
        for inputs in (static, want):  # the rule spelled out: slot p mod size of row b; min(p + 1, size) keys
            assert inputs.positions.tolist() == lengths
            assert inputs.write_to.tolist() == [b * size + p % size for b, p in enumerate(lengths)]
            assert inputs.mask.k_seqinfo.seqlen.tolist() == [min(p + 1, size) for p in lengths]
        static.advance()
        lengths = [n + 1 for n in lengths]


@pytest.mark.parametrize("method", [None, "int8", "int4"], ids=["float", "int8", "int4"])
def test_hooks_on_attention_and_feed_forward_reach_the_fast_path(moe: bool, method: Optional[str]) -> None:
    """A forward hook that changes a module's output changes the Runner's logits exactly as model.forward's."""
    args = dataclasses.replace(tiny_args(moe=moe, sliding_window=8), quantization=QUANTIZATIONS.get(method))
    model = Transformer.random(args, seed=1, device=DEVICE, dtype=DTYPE)
    prompts = torch.randint(0, model.args.vocab_size, (9,), generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def run(fast: bool) -> list[torch.Tensor]:
        cache = model.make_cache(1, 32)
        runner = Runner(model, cache, 1, compile=DEVICE.type == "cuda")  # the tiny model would run uncompiled
        call = runner.prefill if fast else lambda ids, seqlens: model(ids, seqlens, cache)
        step = runner.decode if fast else lambda ids: model(ids, [1], cache)
        with torch.inference_mode():
            out = [call(prompts, [9])[-1:].clone()]
            tokens = out[0].argmax(-1)
            for _ in range(4):
                out.append(step(tokens).clone())
                tokens = out[-1].argmax(-1)
        return out

    plain = run(fast=False)
    layer = model.layers["1"]
    hooks = [
        layer.attention.register_forward_hook(lambda m, args, out: out * 0.5),
        layer.feed_forward.register_forward_hook(lambda m, args, out: out + 0.25),
    ]
    try:
        want, got = run(fast=False), run(fast=True)
    finally:
        for h in hooks:
            h.remove()
    for g, w, p in zip(got, want, plain, strict=True):
        assert rel_error(w, p) > 10 * RTOL  # the hooks matter
        assert rel_error(g, w) < RTOL


def test_a_hook_on_a_norm_is_not_skipped_by_the_fused_kernel() -> None:
    """A hook that multiplies attention_norm's output by 4 is that norm with 4 times its weight, also where
    the int8 matrix-vector kernel would take the norm in (batch 1 on CUDA), in the Runner and eagerly."""
    args = dataclasses.replace(tiny_args(), quantization={"method": "int8"})
    model = Transformer.random(args, seed=3, device=DEVICE, dtype=DTYPE)
    norm = model.layers["0"].attention_norm
    prompt = torch.randint(0, args.vocab_size, (9,), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    tokens = torch.randint(0, args.vocab_size, (4, 1), generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def logits(fast: bool) -> torch.Tensor:
        cache = model.make_cache(1, 32)
        runner = Runner(model, cache, 1)
        with torch.inference_mode():
            (runner.prefill if fast else lambda ids, seqlens: model(ids, seqlens, cache))(prompt, [9])
            return torch.cat([(runner.decode if fast else lambda t: model(t, [1], cache))(t).clone() for t in tokens])

    plain = logits(fast=False)
    hook = norm.register_forward_hook(lambda m, args, out: out * 4)
    try:
        hooked = [logits(fast=True), logits(fast=False)]
    finally:
        hook.remove()
    with torch.no_grad():
        norm.weight *= 4  # a power of 2: the same rounding as the hook's
    want = logits(fast=False)
    assert rel_error(want, plain) > 10 * RTOL  # the hook matters
    for got in hooked:
        assert rel_error(got, want) < RTOL


@pytest.mark.skipif(DEVICE.type != "cuda", reason="Triton kernels: CUDA only")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fused_norm_and_rotary_kernels_equal_the_math(dtype: torch.dtype) -> None:
    """kernels.rms_norm and kernels.rotary (one Triton kernel each) against RMSNorm's and
    apply_rotary_emb's PyTorch arithmetic: equal up to a rounding of the dtype, at odd
    sizes, with rows strided as the rotary's input is (queries and keys of wq|wk|wv)."""
    torch.manual_seed(0)
    for D, rows in ((192, 1), (4096, 7), (100, 33)):
        norm = RMSNorm(D, 1e-5).to(DEVICE, dtype)
        torch.nn.init.normal_(norm.weight)
        x = torch.randn(rows, D, device=DEVICE, dtype=dtype)
        want = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype) * norm.weight
        assert rel_error(kernels.rms_norm(x, norm.weight, 1e-5), want) < torch.finfo(dtype).eps
        assert rel_error(norm(x), want) < torch.finfo(dtype).eps  # the module takes the kernel here
    for T, H, Dh in ((1, 40, 128), (9, 12, 32), (5, 3, 16)):
        wqkv = torch.randn(T, (H + 2) * Dh, device=DEVICE, dtype=dtype)
        x = wqkv[:, : H * Dh].view(T, H, Dh)
        rope = rotary_cos_sin(torch.randint(0, 5000, (T,), device=DEVICE), Dh, 1e6)
        a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        cos, sin = rope[:, None, :, 0], rope[:, None, :, 1]
        want = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).to(dtype)
        assert rel_error(kernels.rotary(x, rope), want) < torch.finfo(dtype).eps
        assert rel_error(apply_rotary_emb(x, rope), want) < torch.finfo(dtype).eps
