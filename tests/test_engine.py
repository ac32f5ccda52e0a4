"""The continuous-batching engine against whole forwards: requests that come and go between
forward calls get the tokens each would get alone."""

from functools import cache
from typing import Optional

import pytest
import torch
from helpers import DEVICE, DTYPE, HostReads, assert_greedy, full_forward, random_model, recomputed_greedy, tiny_args
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral import MistralError
from mistral.engine import Engine, Request
from mistral.sampling import sample


@cache
def model(window: Optional[int]) -> torch.nn.Module:
    return random_model(tiny_args(sliding_window=window, max_batch_size=4), seed=3)


@cache
def alone(window: Optional[int], prompt: tuple[int, ...], max_tokens: int) -> list[int]:
    """The prompt's greedy continuation, each token from a whole forward over all before it
    (not generate(), which runs on the engine too)."""
    return recomputed_greedy(model(window), list(prompt), max_tokens)


def assert_alone(window: Optional[int], prompt: tuple[int, ...], tokens: list[int], max_tokens: int) -> None:
    """tokens are the prompt's greedy continuation, as alone. Exactly in float32; in bfloat16
    (the GPU) the rows beside it change the products' shapes and so their rounding, and a
    near-tied argmax may flip: there, the greedy continuation within rounding (assert_greedy)."""
    if DTYPE == torch.float32:
        assert tokens == alone(window, prompt, max_tokens)
    else:
        assert_greedy(model(window), list(prompt), tokens, max_tokens)


def run(engine: Engine, requests: list[Request], arrivals: list[int]) -> int:
    """Submit request i before step arrivals[i]; step until all have finished. Returns the steps run."""
    steps = 0
    order = sorted(range(len(requests)), key=lambda i: arrivals[i])
    while order or engine.busy:
        while order and arrivals[order[0]] <= steps:
            engine.submit(requests[order.pop(0)])
        engine.step()
        steps += 1
        assert steps < 1000
    return steps


@settings(max_examples=40, deadline=None, derandomize=True, report_multiple_bugs=False)
@given(
    window=st.sampled_from([4, 8, None]),
    specs=st.lists(st.tuples(st.integers(1, 20), st.integers(1, 12), st.integers(0, 12)), min_size=1, max_size=7),
    chunk=st.integers(1, 12),
    rows=st.integers(1, 4),
    in_place=st.sampled_from([None, True]),
    seed=st.integers(0, 2**16),
)
def test_requests_that_come_and_go_get_the_tokens_they_get_alone(
    window: Optional[int], specs: list[tuple[int, int, int]], chunk: int, rows: int, in_place: Optional[bool], seed: int
) -> None:
    """Random prompt lengths, answer lengths and arrival steps, rows fewer than requests (some
    wait), prompts read in chunks beside the rows that decode, windows shorter than a prompt
    and none: each request's greedy tokens are those it gets alone, from whole forwards. With
    chunk_graphs (True: also on the CPU, without graphs) the calls that read in place run
    padded to a bucket of tokens, the logits of the sampled rows picked on the device."""
    g = torch.Generator().manual_seed(seed)
    prompts = [tuple(torch.randint(0, 97, (n,), generator=g).tolist()) for n, _, _ in specs]
    requests = [Request(p, max_tokens=m) for p, (_, m, _) in zip(prompts, specs)]
    engine = Engine(model(window), max_batch=rows, max_context=40, chunk_size=chunk, chunk_graphs=in_place)
    run(engine, requests, [a for _, _, a in specs])
    for r, p, (_, m, _) in zip(requests, prompts, specs):
        assert r.finish_reason == "length"
        assert_alone(window, p, r.tokens, m)


def test_eos_ends_a_request_and_frees_its_row() -> None:
    prompt = (5, 17, 3)
    tokens = alone(8, prompt, 12)
    eos = tokens[4]  # the fifth token, taken as eos: the request ends before it
    engine = Engine(model(8), max_batch=1, max_context=40)
    first, second = Request(prompt, max_tokens=12, eos_id=eos), Request((9, 9), max_tokens=3)
    run(engine, [first, second], [0, 0])
    assert first.finish_reason == "stop" and first.tokens == tokens[: tokens.index(eos)]
    assert_alone(8, (9, 9), second.tokens, 3)  # it waited for the one row, then ran


def sampled_by_hand(prompt: list[int], max_tokens: int, temperature: float, top_p: float, seed: int) -> list[int]:
    """Each token drawn by `sample` from a whole forward's last logits, with one generator seeded `seed`."""
    generator = torch.Generator(DEVICE).manual_seed(seed)
    sequence = list(prompt)
    for _ in range(max_tokens):
        sequence.append(int(sample(full_forward(model(8), sequence)[-1:], temperature, top_p, [generator])[0]))
    return sequence[len(prompt) :]


def test_a_seeded_request_samples_alike_alone_and_in_a_crowd() -> None:
    """Each request draws from a generator of its own: the same seed gives the same tokens
    whatever else runs beside it, those that whole forwards and `sample` give with that seed."""
    prompt = [4, 8, 15, 16, 23]
    options = dict(max_tokens=10, temperature=1.0, top_p=0.9, seed=42)
    lone = Request(prompt, **options)  # type: ignore[arg-type]
    run(Engine(model(8), max_batch=4), [lone], [0])
    crowd = [Request([7, 7, 7], max_tokens=6, temperature=1.0, seed=1), Request(prompt, **options),  # type: ignore[arg-type]
             Request([1, 2], max_tokens=9, temperature=0.5), Request([3] * 11, max_tokens=4)]  # fmt: skip
    run(Engine(model(8), max_batch=3, chunk_size=3), crowd, [0, 1, 0, 2])
    assert lone.tokens == crowd[1].tokens
    assert crowd[0].tokens != lone.tokens[:6]
    if DTYPE == torch.float32:  # (in bfloat16 whole forwards round unlike cached steps: other logits, other draws)
        assert lone.tokens == sampled_by_hand(prompt, 10, 1.0, 0.9, 42)


@pytest.mark.parametrize("in_place", [None, True])
def test_mixture_of_experts_requests_get_the_tokens_they_get_alone(in_place: Optional[bool]) -> None:
    """Mixtral's sparse experts in the engine: prompts read beside decoding rows (on CUDA from
    the chunk calls' graphs, its experts' grouped products captured; True: padded on the CPU
    too), each request's greedy tokens those of whole forwards."""
    experts = random_model(tiny_args(moe=True, max_batch_size=4), seed=5)
    specs = [([5, 17, 3, 9, 2, 11, 40, 8, 1, 6, 23], 9), ([30, 31], 12), ([2] * 19, 6), ([7, 1, 4], 10)]
    requests = [Request(prompt, max_tokens=m) for prompt, m in specs]
    engine = Engine(experts, max_batch=3, max_context=40, chunk_size=8, chunk_graphs=in_place)
    run(engine, requests, [0, 0, 1, 3])
    # Padded calls ran (on the CPU only when asked; on CUDA from graphs by default).
    assert bool(engine.runners[3].chunks) == (in_place is True or engine.runners[3].chunk_pool is not None)
    for r, (prompt, m) in zip(requests, specs):
        if DTYPE == torch.float32:
            assert r.tokens == recomputed_greedy(experts, prompt, m)
        else:
            assert_greedy(experts, prompt, r.tokens, m)


def test_a_cancelled_request_frees_its_row_for_the_next() -> None:
    """Cancelled between calls: its row takes the next request in the next call, and the
    token it sampled in the last call, not read yet (the host reads a call's tokens during
    the next), is dropped."""
    engine = Engine(model(8), max_batch=1)
    long, waiting = Request([1, 2, 3], max_tokens=30), Request([4, 5], max_tokens=5)
    engine.submit(long)
    engine.submit(waiting)
    for _ in range(3):
        engine.step()
    assert len(long.tokens) == 2 and long.sampled == 3 and waiting.row is None and engine.waiting
    engine.finish(long)
    assert engine.step() == []  # the call that read what it had sampled: dropped
    assert long.finish_reason == "cancelled" and waiting.row == 0 and len(long.tokens) == 2
    while engine.busy:
        engine.step()
    assert_alone(8, (4, 5), waiting.tokens, 5)


@pytest.mark.parametrize("phase", ["chunk", "decode"])
def test_a_call_reads_the_device_once_for_the_call_before(phase: str) -> None:
    """A call's results (tokens, log-probabilities, whether the logits were finite) reach the
    host in one read, made in the next call after it is launched (on CUDA, waiting for that
    call alone): greedy and sampled rows, a chunk call beside a new prompt, a decode step."""
    engine = Engine(model(8), max_batch=4, chunk_size=4)
    requests = [Request([1, 2, 3], max_tokens=9), Request([4, 5], max_tokens=9, temperature=0.7, seed=1)]
    run(engine, [], [])  # nothing yet: no read
    for r in requests:
        engine.submit(r)
    engine.step()
    engine.step()
    if phase == "chunk":
        engine.submit(Request([6] * 10, max_tokens=2))
    with HostReads(only_in="engine.py") as counted:
        read = engine.step()
    assert counted.reads == 1 and read == requests and [len(r.tokens) for r in requests] == [2, 1]


@pytest.mark.parametrize("rows", [1, 3, 4])
def test_a_warm_up_runs_every_bucket_and_leaves_no_trace(rows: int) -> None:
    """Engine.warm_up (before a server listens) runs a decode step on every bucket of rows
    (1, 2, 4, ..., all) and a chunk call beside decoding rows, then empties every row: the
    requests after it get the tokens they get alone."""
    engine = Engine(model(None), max_batch=rows, max_context=40, chunk_size=5)
    decoded: list[int] = []
    hook = model(None).layers["0"].register_forward_pre_hook(lambda module, args: decoded.append(args[0].shape[0]))
    try:
        engine.warm_up()
    finally:
        hook.remove()
    assert {1, 2, 4, rows} & set(range(rows + 1)) <= set(decoded) and not engine.busy
    assert engine.cache.lengths == [0] * rows
    requests = [Request([7, 8, 9, 10][: 2 + i], max_tokens=6) for i in range(rows)]
    run(engine, requests, [0] * rows)
    for r in requests:
        assert_alone(None, tuple(r.prompt), r.tokens, 6)
    engine.submit(Request([1], max_tokens=2))
    with pytest.raises(MistralError, match="before any request"):
        engine.warm_up()


def test_a_free_row_of_a_window_less_cache_starts_over() -> None:
    """Row 0 ends early while row 1 decodes on: row 0 decodes placeholders in the decode
    step's bucket of 2 rows, past the end of its max_context slots, which it cannot roll."""
    engine = Engine(model(None), max_batch=2, max_context=16)
    short, long = Request([1, 2, 3, 4, 5], max_tokens=2), Request([6, 7], max_tokens=15)
    run(engine, [short, long], [0, 0])
    assert_alone(None, (6, 7), long.tokens, 15)
    assert_alone(None, (1, 2, 3, 4, 5), short.tokens, 2)


def test_a_free_row_below_a_busy_one_reads_few_keys() -> None:
    """Rows 0 and 1 end after long prompts while row 2 decodes on: the decode steps still
    run on the bucket of 4 rows, and a free row's placeholder must not read the keys its
    finished request left (a real row's reads, in every step): it starts over."""
    from mistral.engine import PLACEHOLDER_KEYS

    engine = Engine(model(None), max_batch=4, max_context=200)
    requests = [Request(list(range(1, 90)), max_tokens=2), Request(list(range(2, 80)), max_tokens=2), Request([6, 7], max_tokens=60)]
    for r in requests:
        engine.submit(r)
    held = []
    while engine.busy:
        engine.step()
        if requests[0].finished and requests[1].finished and not requests[2].finished:
            held.append(max(engine.cache.lengths[:2]))
    assert len(held) > PLACEHOLDER_KEYS and max(held) <= PLACEHOLDER_KEYS
    assert_alone(None, (6, 7), requests[2].tokens, 60)


def test_logprobs_and_top_alternatives_are_the_models() -> None:
    prompt = [11, 12, 13]
    engine = Engine(model(8), max_batch=2)
    r = engine.submit(Request(prompt, max_tokens=4, top_logprobs=3))
    run(engine, [], [])
    logits = model(8)(torch.tensor(prompt + r.tokens[:-1], device=DEVICE), [len(prompt) + 3]).float()[len(prompt) - 1 :]
    logprobs = torch.log_softmax(logits, dim=-1).cpu()
    atol = 1e-4 if DTYPE == torch.float32 else 1e-2  # bfloat16: the cached and the full forward round apart
    assert torch.allclose(torch.tensor(r.logprobs), logprobs.gather(-1, torch.tensor(r.tokens)[:, None]).squeeze(-1), atol=atol)
    for top, row in zip(r.top, logprobs):
        ids, values = torch.tensor([t for t, _ in top]), torch.tensor([v for _, v in top])
        assert torch.allclose(values, row[ids], atol=atol) and torch.allclose(values, row.topk(3).values, atol=atol)
        if DTYPE == torch.float32:  # (bfloat16 may order near-tied alternatives apart)
            assert ids.tolist() == row.topk(3).indices.tolist()
    assert [t for t, _ in r.top[0]][0] == r.tokens[0]  # greedy: the token is the first alternative


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(prompt=[], max_tokens=3), "prompt 0 is empty"),
        (dict(prompt=[1, 500], max_tokens=3), "outside the vocabulary"),
        (dict(prompt="hi", max_tokens=3), "must be a list of token ids"),
        (dict(prompt=[1, 2], max_tokens=-1), "max_tokens must be"),
        (dict(prompt=[1, 2], max_tokens=3, temperature=float("nan")), "temperature must be"),
        (dict(prompt=[1, 2], max_tokens=3, top_p=0), "top_p must be"),
        (dict(prompt=[1, 2], max_tokens=3, top_logprobs=21), "top_logprobs must be"),
        (dict(prompt=[1, 2], max_tokens=3, eos_id="x"), "eos_id must be"),
        (dict(prompt=[1] * 30, max_tokens=12), r"reach 41 tokens, past max_context=40"),
    ],
)
def test_a_bad_request_is_named_and_changes_nothing(options: dict, message: str) -> None:
    engine = Engine(model(8), max_batch=2, max_context=40)
    prompt = options.pop("prompt")
    with pytest.raises(MistralError, match=message):
        engine.submit(Request(prompt, **options))
    assert not engine.busy


@pytest.mark.parametrize("temperature", [0.0, 0.8], ids=["greedy", "sampled"])
def test_logits_that_turn_nan_are_an_error_not_tokens(temperature: float) -> None:
    """Finite for the prompt, NaN from the next call on (a hook on the last norm): a one-line
    MistralError when the host reads that call's tokens (in the call after it), not
    tokens drawn from garbage, nor a failure inside torch.multinomial."""
    m = model(8)
    calls: list[int] = []

    def nan_after_first(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return out if len(calls) == 1 else torch.full_like(out, float("nan"))

    # Without CUDA graphs: a decode graph captured while the hook runs would replay its NaN after it is removed.
    engine = Engine(m, max_context=64, cuda_graphs=False)
    request = engine.submit(Request([1, 5, 6, 7], max_tokens=8, temperature=temperature, seed=0))
    hook = m.norm.register_forward_hook(nan_after_first)
    try:
        engine.step()  # the prompt, and its first token
        engine.step()  # NaN logits sampled; the first token read
        with pytest.raises(MistralError, match="logits are not finite"):
            engine.step()  # read with the tokens of the call that sampled them
    finally:
        hook.remove()
    assert len(request.tokens) == 1
    # The server ends what ran (mistral/serve.py) and serves on: the failed request's last call,
    # still to be read, says nothing more.
    engine.finish(request, "error")
    after = engine.submit(Request([1, 5, 6], max_tokens=4))
    try:
        run(engine, [], [])
    except MistralError as e:
        pytest.fail(f"a request after the failure failed too: {e}")
    assert_alone(8, (1, 5, 6), after.tokens, 4)


def test_max_tokens_zero_finishes_at_once() -> None:
    engine = Engine(model(8))
    r = engine.submit(Request([1, 2], max_tokens=0))
    assert r.finish_reason == "length" and not engine.busy and engine.step() == []
