"""generate() against greedy decoding that recomputes the whole no-cache forward each step."""

import gc
import math
from typing import Optional

import pytest
import torch

from helpers import (DEVICE, DTYPE, RTOL, HostReads, assert_greedy, forward_calls, full_forward, random_model, random_prompts,
                     recomputed_greedy, rel_error, tiny_args)
from mistral import MistralError
from mistral.generation import generate, stream
from mistral.sampling import sample, sample_step
from mistral.stage import Stage

W = 8  # tiny_args' sliding window


LENGTHS = {"shorter-than-W": 5, "equal-to-W": W, "several-W": 3 * W + 3}


@pytest.mark.parametrize("length", LENGTHS.values(), ids=LENGTHS.keys())
def test_greedy_with_cache_equals_recomputed_greedy(moe: bool, length: int) -> None:
    model = random_model(tiny_args(moe=moe))
    n = 2 * W + 3  # decoding alone wraps the buffer twice
    (prompt,) = random_prompts([length], model.args.vocab_size, seed=length)
    for chunk in (None, 3):
        tokens, _ = generate([prompt], model, max_tokens=n, chunk_size=chunk)
        assert_greedy(model, prompt, tokens[0], n)


def test_batch_equals_each_prompt_alone(moe: bool) -> None:
    model = random_model(tiny_args(moe=moe))
    prompts = random_prompts([3, W, 1, 3 * W + 1, W + 1], model.args.vocab_size, seed=7)
    n = W + 4
    batched, batched_logprobs = generate(prompts, model, max_tokens=n, chunk_size=5)
    for prompt, tokens, logprobs in zip(prompts, batched, batched_logprobs):
        alone, alone_logprobs = generate([prompt], model, max_tokens=n)
        if DTYPE == torch.float32:
            assert tokens == alone[0]
            assert rel_error(torch.tensor(logprobs), torch.tensor(alone_logprobs[0])) < RTOL
        assert_greedy(model, prompt, tokens, n)


def test_logprobs_are_log_softmax_of_full_forward(moe: bool) -> None:
    model = random_model(tiny_args(moe=moe))
    prompts = random_prompts([4, 2 * W + 1], model.args.vocab_size, seed=8)
    for temperature in (0.0, 1.0):  # the log-probability is the model's, whatever the sampling
        tokens, logprobs = generate(prompts, model, max_tokens=W + 2, temperature=temperature, seed=0)
        off_argmax = 0
        for prompt, toks, lps in zip(prompts, tokens, logprobs):
            logits = full_forward(model, prompt + toks[:-1])[len(prompt) - 1 :]
            chosen = torch.tensor(toks, device=DEVICE)
            want = torch.log_softmax(logits, dim=-1).gather(-1, chosen[:, None]).squeeze(-1)
            assert rel_error(torch.tensor(lps), want.cpu()) < RTOL
            off_argmax += int((logits.argmax(-1) != chosen).sum())
        if temperature > 0:  # so the check above covered drawn tokens, not just the argmax
            assert off_argmax > 0


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled"])
def test_a_sampling_step_reads_nothing_of_the_device(temperature: float) -> None:
    """sample_step leaves every read to its caller (on CUDA each read waits for the GPU, and a
    decode loop reads once a step, a step late): not even of NaN logits, which it hands back
    as a flag, drawing from zeros instead (torch.multinomial would fail on them)."""

    generator = torch.Generator().manual_seed(0)
    for logits in (torch.randn(3, 11), torch.full((3, 11), float("nan"))):
        with HostReads() as counted:
            tokens, logprobs, finite = sample_step(logits, temperature, 0.9, generator)
        assert counted.reads == 0
        assert bool(finite) == bool(torch.isfinite(logits).all()) and tokens.shape == logprobs.shape == (3,)


def test_rows_sampled_together_each_follow_their_own_options_and_generator() -> None:
    """A batch of requests samples in one pass (the engine): each row at its own temperature and
    top_p draws from its own nucleus (within 5 standard deviations over N draws), and a row's
    tokens depend on its generator alone, not on the rows beside it."""
    N = 20000
    options = [(0.5, 0.7), (2.0, 1.0), (1.0, 0.95)]  # (temperature, top_p) of rows 0, 1, 2 mod 3
    rows = [LOGITS, LOGITS[::-1], LOGITS]
    logits = torch.tensor(rows).repeat(N, 1)
    temperatures = torch.tensor([t for t, _ in options]).repeat(N)
    top_ps = torch.tensor([p for _, p in options]).repeat(N)
    generators = [torch.Generator().manual_seed(i) for i in range(3 * N)]
    drawn = sample(logits, temperatures, top_ps, generators)
    for k, (row, (temperature, top_p)) in enumerate(zip(rows, options)):
        want = torch.tensor(nucleus_by_hand(row, temperature, top_p), dtype=torch.float64)
        counts = torch.bincount(drawn[k::3], minlength=len(row)).double()
        assert (counts[want == 0] == 0).all(), k
        assert ((counts - N * want).abs() <= 5 * (N * want * (1 - want)).sqrt() + 1e-9).all(), (k, counts, N * want)
    # Row 1 alone, with the same generator state, draws what it drew beside the others.
    for i in (1, 4, 3 * N - 2):
        alone = sample(logits[i : i + 1], temperatures[i : i + 1], top_ps[i : i + 1], [torch.Generator().manual_seed(i)])
        assert alone.item() == drawn[i].item()


def test_sampling_is_reproducible_with_a_seed() -> None:
    model = random_model(tiny_args())
    prompts = random_prompts([3, 11], model.args.vocab_size, seed=9)
    options = dict(max_tokens=20, temperature=1.0, top_p=0.9)
    first, _ = generate(prompts, model, seed=1234, **options)
    again, _ = generate(prompts, model, seed=1234, **options)
    other, _ = generate(prompts, model, seed=4321, **options)
    greedy, _ = generate(prompts, model, max_tokens=20)
    assert first == again
    # 40 tokens from ~97: equal draws under another seed, or greedy output, would mean no sampling.
    assert first != other
    assert first != greedy


def test_each_prompt_samples_with_its_own_seed() -> None:
    """Prompt i draws from a generator seeded seed + i: its answer is the one it gets alone with
    that seed, whatever runs beside it (a server's requests do the same), over consecutive
    batches too; two equal prompts draw apart."""
    if DTYPE != torch.float32:
        pytest.skip("the same draws across batch shapes need the same logits: float32")
    model = random_model(tiny_args(max_batch_size=2))
    p, q, r = random_prompts([3, 11, 6], model.args.vocab_size, seed=9)
    options = dict(max_tokens=12, temperature=1.0)
    three, _ = generate([p, q, r], model, seed=5, **options)  # two batches: [p, q], then [r]
    assert three[0] == generate([p], model, seed=5, **options)[0][0]
    assert three[1] == generate([q], model, seed=6, **options)[0][0]
    assert three[2] == generate([r], model, seed=7, **options)[0][0]
    same, _ = generate([p, p], model, seed=5, **options)
    assert same[0] == three[0] and same[1] != same[0]


def test_a_call_reads_chunk_size_tokens_of_every_prompt() -> None:
    """Prompts start together: the first call packs every prompt's first chunk_size tokens
    (all of each where they fit), and the rows decode together from the call where the last
    prompt is read whole."""
    model = random_model(tiny_args())  # W = 8 slots a row
    prompts = random_prompts([5, 7, 3], model.args.vocab_size, seed=1)
    with forward_calls(model) as calls:
        generate(prompts, model, max_tokens=3)
    assert calls == [15, 3, 3]
    with forward_calls(model) as calls:
        generate(prompts, model, max_tokens=3, chunk_size=4)
    # 4 + 4 + 3; then what 0 and 1 have left (prompt 2 decodes); then a decode step of 3 rows
    assert calls == [11, 1 + 3 + 1, 3, 3]


def test_tiny_top_p_is_greedy(moe: bool) -> None:
    model = random_model(tiny_args(moe=moe))
    prompts = random_prompts([2, W + 3], model.args.vocab_size, seed=10)
    greedy, _ = generate(prompts, model, max_tokens=12)
    nucleus, _ = generate(prompts, model, max_tokens=12, temperature=5.0, top_p=1e-6, seed=0)
    assert nucleus == greedy


# No two equal: the order of tokens by probability is unambiguous.
LOGITS = [2.0, 1.0, 0.4, 0.0, -1.0, -3.0]


def nucleus_by_hand(logits: list[float], temperature: float, top_p: float) -> list[float]:
    """The distribution sample() must draw from, spelled out: softmax(logits / temperature),
    then, most likely first, a token stays while the mass before it is at most top_p (so
    the first always does), and the survivors are renormalised."""
    weights = [math.exp(x / temperature) for x in logits]
    probs = [w / sum(weights) for w in weights]
    kept, before = [0.0] * len(probs), 0.0
    for i in sorted(range(len(probs)), key=lambda i: -probs[i]):
        if before <= top_p:
            kept[i] = probs[i]
        before += probs[i]
    return [k / sum(kept) for k in kept]


# top_p = 0.3 is below the top token's probability at every temperature here: greedy.
@pytest.mark.parametrize("top_p", [0.3, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sample_draws_like_a_hand_written_sampler(temperature: float, top_p: float) -> None:
    """N draws per row: each token's count within 5 standard deviations of N * its
    probability, and tokens outside the nucleus never. Even rows hold LOGITS, odd rows
    them reversed, so each row must follow its own order. Seeded: exact and fast."""
    N = 20000
    rows = (LOGITS, LOGITS[::-1])
    logits = torch.tensor(rows).repeat(N, 1)  # [2N, V]
    drawn = sample(logits, temperature, top_p, torch.Generator().manual_seed(0))
    for parity, row in enumerate(rows):
        want = torch.tensor(nucleus_by_hand(row, temperature, top_p), dtype=torch.float64)
        counts = torch.bincount(drawn[parity::2], minlength=len(row)).double()
        sigma = (N * want * (1 - want)).sqrt()
        assert ((counts - N * want).abs() <= 5 * sigma).all(), f"counts {counts.tolist()}, expected {(N * want).tolist()}"
    if top_p == 0.3:
        assert (drawn[0::2] == 0).all() and (drawn[1::2] == len(LOGITS) - 1).all()


def test_zero_temperature_takes_the_argmax() -> None:
    logits = torch.tensor([LOGITS, LOGITS[::-1]])
    assert sample(logits, 0.0, 1.0, None).tolist() == [0, len(LOGITS) - 1]
    assert sample(logits, 0.0, 0.3, None).tolist() == [0, len(LOGITS) - 1]


def test_eos_stops_a_sequence() -> None:
    model = random_model(tiny_args())
    prompts = random_prompts([4, W + 1], model.args.vocab_size, seed=11)
    greedy, greedy_logprobs = generate(prompts, model, max_tokens=15)
    for prompt, tokens in zip(prompts, greedy):
        assert_greedy(model, prompt, tokens, 15)
    eos = greedy[0][3]  # a token prompt 0 produces: it must stop there
    stop = greedy[0].index(eos)
    tokens, logprobs = generate(prompts, model, max_tokens=15, eos_id=eos)
    assert tokens[0] == greedy[0][:stop] and logprobs[0] == pytest.approx(greedy_logprobs[0][:stop])
    # The other sequence is unaffected, except that it stops at eos too if it produces it.
    other = greedy[1][: greedy[1].index(eos)] if eos in greedy[1] else greedy[1]
    assert tokens[1] == other
    # Once every sequence has produced eos, the stream ends early.
    steps = list(stream(prompts[:1], model, max_tokens=15, eos_id=eos))
    assert len(steps) == stop + 1 and int(steps[-1][0][0]) == eos
    assert float(steps[-1][1][0]) == pytest.approx(greedy_logprobs[0][stop])  # eos's own log-probability
    # The stream reads eos a step late: the step it ran past it is taken back out of a
    # given cache, which holds the prompt and every yielded token but the last.
    cache = model.make_cache(1, 64)
    assert len(list(stream(prompts[:1], model, max_tokens=15, eos_id=eos, cache=cache))) == stop + 1
    assert cache.lengths[0] == len(prompts[0]) + stop


def test_a_given_cache_keeps_what_each_sequence_promises() -> None:
    """Continuing two sequences: one ends on eos while the other runs on. The one that ran on
    holds its prompt and every yielded token but the last, and goes on from there; the one
    that ended was decoded as a placeholder since, so its row is emptied, and reads its whole
    prompt again."""
    model = random_model(tiny_args(sliding_window=None))
    prompts = random_prompts([4, 6], model.args.vocab_size, seed=22)
    greedy = [recomputed_greedy(model, prompt, 8) for prompt in prompts]
    eos = greedy[0][1]
    assert eos not in greedy[1] and greedy[0][0] != eos
    cache = model.make_cache(2, 64)
    steps = list(stream(prompts, model, max_tokens=8, eos_id=eos, cache=cache))
    assert [int(t[0]) for t, _ in steps] == greedy[0][:1] + [eos] * 7
    assert cache.lengths == [0, len(prompts[1]) + 7]
    conts = [prompts[0] + greedy[0][:1] + [3], prompts[1] + greedy[1] + [5]]
    with forward_calls(model) as calls:
        steps = list(stream(conts, model, max_tokens=4, cache=cache))
    assert calls[0] == len(conts[0]) + len(conts[1]) - (len(prompts[1]) + 7)  # what row 1 holds is not read again
    for b, cont in enumerate(conts):
        assert_greedy(model, cont, [int(t[b]) for t, _ in steps], 4)


def test_micro_batches_on_one_process_change_nothing(moe: bool) -> None:
    """The pipeline's schedule (each micro-batch with its own cache, mistral/parallel.py)
    runs on one process too: the same tokens and log-probabilities as one batch, also
    when a whole micro-batch reaches eos before the others."""
    if DTYPE != torch.float32:
        pytest.skip("token-for-token equality across batch shapes needs float32")
    model = random_model(tiny_args(moe=moe))
    prompts = random_prompts([3, W + 2, 1, 2 * W, 5], model.args.vocab_size, seed=13)
    greedy, _ = generate(prompts, model, max_tokens=10)
    eos = greedy[4][2]  # with 3 micro-batches, prompt 4 is the last one, alone
    want, want_logprobs = generate(prompts, model, max_tokens=10, eos_id=eos)
    assert len(want[4]) < 10 and any(len(t) == 10 for t in want)
    for m in (2, 3):
        tokens, logprobs = generate(prompts, model, max_tokens=10, eos_id=eos, micro_batches=m)
        assert tokens == want
        for got, expected in zip(logprobs, want_logprobs):
            assert got == pytest.approx(expected, rel=RTOL, abs=RTOL)


def test_more_prompts_than_max_batch_size_run_in_batches() -> None:
    model = random_model(tiny_args(max_batch_size=2))
    prompts = random_prompts([3, 9, 1, 20, 6], model.args.vocab_size, seed=12)
    with pytest.raises(MistralError, match="5 prompts exceed max_batch_size=2"):
        next(stream(prompts, model, max_tokens=4))
    tokens, logprobs = generate(prompts, model, max_tokens=6)
    assert len(tokens) == len(logprobs) == 5
    for prompt, toks in zip(prompts, tokens):
        alone, _ = generate([prompt], model, max_tokens=6)
        if DTYPE == torch.float32:
            assert toks == alone[0]
        assert_greedy(model, prompt, toks, 6)


def test_zero_max_tokens_generates_nothing() -> None:
    model = random_model(tiny_args())
    assert generate([[1, 2], [3]], model, max_tokens=0) == ([[], []], [[], []])


BAD_OPTIONS = {
    "no-prompts": (dict(encoded_prompts=[]), "no prompts given"),
    "empty-prompt": (dict(encoded_prompts=[[1, 2], []]), "prompt 1 is empty"),
    "negative-max-tokens": (dict(max_tokens=-1), "max_tokens must be a non-negative integer, got -1"),
    "negative-temperature": (dict(temperature=-0.1), r"temperature must be >= 0 and finite, got -0.1"),
    "nan-temperature": (dict(temperature=float("nan")), "temperature must be >= 0 and finite, got nan"),
    "top-p-zero": (dict(top_p=0.0), r"top_p must be in \(0, 1\], got 0.0"),
    "top-p-above-one": (dict(top_p=1.5), r"top_p must be in \(0, 1\], got 1.5"),
    "token-too-large": (dict(encoded_prompts=[[1, 97]]), r"prompt 0 has token ids outside the vocabulary 0..96: \[97\]"),
    "token-negative": (dict(encoded_prompts=[[-1, 5]]), r"outside the vocabulary 0..96: \[-1\]"),
    "chunk-size-zero": (dict(chunk_size=0), "chunk_size must be a positive integer, got 0"),
}


@pytest.mark.parametrize("options, message", BAD_OPTIONS.values(), ids=BAD_OPTIONS.keys())
def test_bad_options_raise_mistral_error(options: dict, message: str) -> None:
    model = random_model(tiny_args(vocab_size=97))
    kwargs: dict = dict(encoded_prompts=[[1, 2, 3]], max_tokens=3)
    kwargs.update(options)
    prompts: Optional[list[list[int]]] = kwargs.pop("encoded_prompts")
    with pytest.raises(MistralError, match=message):
        generate(prompts, model, **kwargs)


def test_a_given_cache_that_cannot_hold_the_run_is_an_error() -> None:
    """Checked before anything runs: on CUDA a captured decode step could not check it, and would wrap."""
    model = random_model(tiny_args(sliding_window=None))
    cache = model.make_cache(2, 16)
    with pytest.raises(MistralError, match=r"reach 19 tokens, past the given cache's 16 slots \(sliding_window=None\)"):
        list(stream([[1] * 10], model, max_tokens=10, cache=cache))
    with pytest.raises(MistralError, match="3 prompts do not fit the given cache of 2 rows"):
        list(stream([[1], [2], [3]], model, max_tokens=2, cache=cache))
    assert cache.lengths == [0, 0]  # nothing ran


def test_a_later_generate_reuses_the_caches_and_graphs_of_the_last(moe: bool) -> None:
    """The second call of the same shapes on one Stage runs on the first's caches (on CUDA,
    replaying the first's decode graph from new positions); a call of other shapes lets them go."""
    model = random_model(tiny_args(moe=moe))
    stage = Stage(model)
    generate(random_prompts([3, 11], 97, seed=1), model, max_tokens=6, stage=stage)
    caches, runners = list(stage.spare_caches), dict(stage.runners)
    second = random_prompts([9, 4], 97, seed=2)  # other lengths, the same cache of W slots per row
    tokens, _ = generate(second, model, max_tokens=6, stage=stage)
    assert stage.spare_caches == caches and stage.runners == runners and len(runners) == 1
    for prompt, generated in zip(second, tokens):
        assert_greedy(model, prompt, generated, 6)
    generate(second[:1], model, max_tokens=6, stage=stage)
    assert stage.spare_caches[0] is not caches[0] and len(stage.runners) == 1 and stage.runners != runners
    generate(second, model, max_tokens=6)  # without a stage: one of its own
    assert len(stage.runners) == 1
    with pytest.raises(MistralError, match="stage must be a Stage of this model"):
        generate(second, random_model(tiny_args()), max_tokens=6, stage=stage)


def test_a_stage_keeps_the_runners_of_its_latest_call_only() -> None:
    """A chat's turns on one cache replay one Runner (and graph); caches a caller has moved on
    from are let go, not kept alive by the Stage's Runners."""
    model = random_model(tiny_args())
    stage = Stage(model)
    cache = model.make_cache(1, 32)
    list(stream([[1, 2, 3]], model, max_tokens=3, cache=cache, stage=stage))
    (first,) = stage.runners.values()
    list(stream([[1, 2, 3, 4, 5, 6]], model, max_tokens=3, cache=cache, stage=stage))  # the next turn
    assert list(stage.runners.values()) == [first]
    for _ in range(3):
        cache = model.make_cache(1, 32)
        list(stream([[1, 2, 3]], model, max_tokens=3, cache=cache, stage=stage))
    assert [r.cache for r in stage.runners.values()] == [cache]


def test_interleaved_streams_keep_their_own_caches() -> None:
    model = random_model(tiny_args())
    prompts = [random_prompts([5, 12], 97, seed=3), random_prompts([10, 2], 97, seed=4)]
    streams = [stream(p, model, max_tokens=7) for p in prompts]
    steps = [[], []]
    for a, b in zip(*streams):
        steps[0].append(a[0].tolist())
        steps[1].append(b[0].tolist())
    for p, s in zip(prompts, steps):
        for i, prompt in enumerate(p):
            assert_greedy(model, prompt, [step[i] for step in s], 7)


def test_a_stream_left_early_leaves_the_cache_as_promised() -> None:
    """Steps are yielded a step late; a caller that stops after 3 of them finds in the cache the
    prompt and the first 2 (the last yielded token is never fed), and can go on differently."""
    model = random_model(tiny_args())
    (prompt,) = random_prompts([W + 3], 97, seed=5)  # past the window: the buffer has wrapped
    cache = model.make_cache(1, 64)
    steps = stream([prompt], model, max_tokens=10, cache=cache)
    got = [int(next(steps)[0][0]) for _ in range(3)]
    steps.close()
    assert cache.lengths[0] == len(prompt) + 2
    cont = prompt + got + [7, 8]
    assert_greedy(model, cont, [int(t[0]) for t, _ in stream([cont], model, max_tokens=4, cache=cache)], 4)


def test_spare_caches_follow_the_models_dtype() -> None:
    model = random_model(tiny_args())
    stage = Stage(model)
    prompts = random_prompts([5, 9], 97, seed=6)
    generate(prompts, model, max_tokens=4, stage=stage)
    kept = stage.spare_caches[0]
    model.to(torch.float32 if DTYPE == torch.bfloat16 else torch.bfloat16)
    generate(prompts, model, max_tokens=4, stage=stage)
    assert stage.spare_caches[0] is not kept and stage.spare_caches[0].k.dtype == model.dtype


def test_a_long_stream_holds_no_tensors_per_step() -> None:
    """A step's tokens reach the host and are kept there as numbers, not as tensors (10k steps of
    kept tensors took RSS from 433 to 930 MB and slowed the steps by half): the tensors alive
    stay as many however long a stream runs."""
    model = random_model(tiny_args(sliding_window=8))
    steps = stream([[1, 2, 3], [4, 5]], model, max_tokens=300)
    alive = []
    for i, _ in enumerate(steps):
        if i % 50 == 49:
            gc.collect()
            alive.append(sum(type(o) is torch.Tensor for o in gc.get_objects()))
    assert len(alive) == 6 and max(alive) - min(alive) <= 4, alive
