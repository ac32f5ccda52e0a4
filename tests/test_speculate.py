"""Speculative decoding (mistral/speculate.py): the tokens of plain decoding, over a rolling buffer.

Greedy speculation must return exactly plain greedy decoding's tokens, whatever the
window, the prompts, the chunks, eos and max_tokens; sampled speculation must draw each
token from the distribution plain sampling draws from.
"""

import pytest
import torch
from helpers import DEVICE, DTYPE, HostReads, assert_greedy, forward_calls, random_model, tiny_args
from hypothesis import given, settings
from hypothesis import strategies as st

from mistral import DEFAULT_MODEL, MistralError, Transformer, generate
from mistral.sampling import probabilities
from mistral.speculate import Drafter, PromptLookup, _choose
from mistral.stage import Stage
from mistral.tokenizer import load_tokenizer


def propose(history: list[int], k: int) -> list[int]:
    return PromptLookup().propose(history, k)


def test_propose_follows_the_latest_occurrence_of_the_longest_ngram() -> None:
    history = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert propose(history, 2) == [7, 8]  # "2 3" last occurred before "7 8" (and "5 2 3" never before)
    assert propose(history + [7], 3) == [8, 5, 2]  # "2 3 7"
    assert propose([4, 5, 6], 3) == []  # nothing repeats
    assert propose([4, 5, 4], 3) == [5, 4]  # the unigram "4", cut where the history ends
    assert propose(history, 0) == []


def searched(history: list[int], k: int) -> list[int]:
    """What prompt lookup proposes, by searching the whole history, latest occurrence first."""
    for n in range(min(3, len(history) - 1), 0, -1):
        for start in range(len(history) - n - 1, -1, -1):
            if history[start : start + n] == history[-n:]:
                return history[start + n : start + n + k]
    return []


@given(tokens=st.lists(st.integers(0, 4), min_size=1, max_size=60), cuts=st.lists(st.integers(1, 60), max_size=8), k=st.integers(0, 5))
@settings(max_examples=200, deadline=None)
def test_the_lookup_index_proposes_what_a_search_of_the_history_finds(tokens: list[int], cuts: list[int], k: int) -> None:
    """Asked as the history grows by one token or many between steps (its index grown on
    the way): the proposals of a search of the whole history, at every step."""
    lookup = PromptLookup()
    for end in sorted({min(c, len(tokens)) for c in cuts} | {len(tokens)}):
        assert lookup.propose(tokens[:end], k) == searched(tokens[:end], k)


def repetitive_prompts(draw: st.DrawFn, vocab: int) -> list[int]:
    """A prompt of a few phrases repeated: prompt lookup finds something to propose."""
    phrases = draw(st.lists(st.lists(st.integers(3, vocab - 1), min_size=1, max_size=5), min_size=1, max_size=3))
    order = draw(st.lists(st.integers(0, len(phrases) - 1), min_size=1, max_size=8))
    return [1] + [t for i in order for t in phrases[i]]


@st.composite
def cases(draw: st.DrawFn) -> tuple:
    window = draw(st.sampled_from([4, 8, None]))
    prompts = [repetitive_prompts(draw, 97) for _ in range(draw(st.integers(1, 3)))]
    k = draw(st.integers(1, 6))
    chunk = draw(st.sampled_from([None, 3, 5]))
    max_tokens = draw(st.integers(1, 24))
    return window, prompts, k, chunk, max_tokens


MODELS = {window: random_model(tiny_args(sliding_window=window, max_batch_size=3), seed=11) for window in (4, 8, None)}
# Draft models: one layer, other weights; and each model for itself (every proposal kept).
DRAFTS = {window: random_model(tiny_args(sliding_window=window, max_batch_size=3, n_layers=1), seed=12) for window in (4, 8, None)}


@given(case=cases(), proposer=st.sampled_from(["lookup", "draft", "itself"]))
@settings(max_examples=60, deadline=None, report_multiple_bugs=False)
def test_greedy_speculation_returns_plain_greedy_tokens(case: tuple, proposer: str) -> None:
    """Windows shorter than the prompts (the buffer wraps many times while proposals are taken
    back), packed rows that keep different numbers of proposals, chunked prefill, max_tokens
    reached inside a run of kept proposals, proposals by prompt lookup or a draft model:
    every token the same."""
    window, prompts, k, chunk, max_tokens = case
    model = MODELS[window]
    draft = {"lookup": None, "draft": DRAFTS[window], "itself": model}[proposer]
    want, want_logprobs = generate(prompts, model, max_tokens=max_tokens, chunk_size=chunk)
    got, got_logprobs = generate(prompts, model, max_tokens=max_tokens, chunk_size=chunk, speculate=k, draft=draft)
    if DTYPE == torch.float32:
        assert got == want
        for g, w in zip(got_logprobs, want_logprobs):
            assert g == pytest.approx(w, abs=1e-4)
    else:  # bfloat16 (the GPU): a verify call rounds apart from a decode step; near ties may flip
        for prompt, tokens, logprobs, plain, plain_logprobs in zip(prompts, got, got_logprobs, want, want_logprobs):
            assert_greedy(model, prompt, tokens, max_tokens)
            if tokens == plain:
                assert logprobs == pytest.approx(plain_logprobs, abs=1e-2)


def test_eos_inside_a_run_of_kept_proposals_ends_the_row_there() -> None:
    model = MODELS[8]
    prompts = [[1, 5, 6, 7, 5, 6, 7, 5, 6], [1, 9, 10, 9, 10, 9]]
    plain, _ = generate(prompts, model, max_tokens=20)
    for eos in {plain[0][3], plain[1][5], plain[0][-1]}:
        want, _ = generate(prompts, model, max_tokens=20, eos_id=eos)
        assert generate(prompts, model, max_tokens=20, eos_id=eos, speculate=4)[0] == want


@pytest.mark.parametrize("window", [8, None])
def test_a_row_holds_what_it_was_fed_and_no_filler(window: object) -> None:
    """A verify step feeds every row the same number of tokens (a shape a CUDA graph replays):
    a row with fewer proposals, or one that has reached max_tokens while others run on, is
    filled up with its last token, which is taken back. So each row ends holding its prompt
    and every token but the last, as plain decoding leaves it (a window-less cache, which
    cannot roll, would otherwise overflow)."""
    model = MODELS[window]
    prompts = [[1, 5, 6, 7, 5, 6, 7, 5, 6], [1, 9, 10, 11, 12, 13], [1, 4, 4, 4, 4]]
    stage = Stage(model)
    tokens, _ = generate(prompts, model, max_tokens=20, speculate=4, stage=stage)
    (cache,) = stage.spare_caches
    assert cache.lengths == [len(prompt) + len(row) - 1 for prompt, row in zip(prompts, tokens)]


def test_a_later_speculative_call_runs_on_the_last_ones_emptied_cache() -> None:
    """A second speculative call of the same shapes on one Stage reuses the first's cache (and
    graphs), which must start empty: the same greedy tokens again."""
    model = MODELS[8]
    stage = Stage(model)
    prompts = [[1, 5, 6, 7, 5, 6, 7, 5, 6], [1, 9, 10, 11, 12, 13]]
    first, _ = generate(prompts, model, max_tokens=12, speculate=3, stage=stage)
    (cache,) = stage.spare_caches
    again, _ = generate(prompts, model, max_tokens=12, speculate=3, stage=stage)
    assert stage.spare_caches == [cache]
    for prompt, tokens in zip(prompts, again):
        assert_greedy(model, prompt, tokens, 12)


def test_speculation_keeps_proposals() -> None:
    """Not only correct but useful: on code that repeats itself, the default model (trained
    on Python) keeps most proposals, and a forward call gives 2 tokens or more."""
    model = Transformer.from_folder(DEFAULT_MODEL, device=DEVICE, dtype=DTYPE)
    prompt = load_tokenizer(DEFAULT_MODEL).encode("def f(a):\n" + "".join(f"    a.append({i})\n" for i in range(1, 5)), bos=True)
    tally: dict[str, int] = {}
    tokens, _ = generate([prompt], model, max_tokens=40, speculate=4, speculation=tally)
    assert len(tokens[0]) == 40 and tally["tokens"] == 39  # the first token comes with the prompt
    assert tally["kept"] > tally["proposed"] / 2 and tally["tokens"] >= 2 * tally["steps"]


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_a_verify_step_reads_the_device_once(temperature: float) -> None:
    """The acceptance bookkeeping of a verify step (verdicts, replacement tokens, log-probabilities,
    whether the logits were finite) reaches the host in one read: each further one would wait
    for the GPU again. Counted against a run of one token (the prefill and first token only)."""
    model = MODELS[8]
    prompts = [[1] + [5, 6, 7, 8] * 4, [1, 9, 10, 9, 10, 9]]
    counts = []
    for max_tokens in (1, 16):
        with forward_calls(model) as calls, HostReads(only_in="speculate.py") as counted:
            generate(prompts, model, max_tokens=max_tokens, speculate=4, temperature=temperature, seed=0)
        counts.append((counted.reads, len(calls)))
    (reads_1, calls_1), (reads_16, calls_16) = counts
    assert calls_16 - calls_1 >= 4  # verify steps ran
    assert reads_16 - reads_1 == calls_16 - calls_1


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_logits_that_turn_nan_in_a_verify_step_are_an_error(temperature: float) -> None:
    """Finite for the prompt, NaN from the first verify step on (a hook on the last norm): a
    one-line MistralError, read with the step's verdicts, not tokens drawn from garbage or a
    failure inside torch.multinomial."""
    model = MODELS[8]
    with forward_calls(model) as calls:
        # Read as the hook runs: on CUDA, when the verify step's graph is captured (with the fill of NaN in it).
        hook = model.norm.register_forward_hook(lambda m, args, out: out if len(calls) == 1 else torch.full_like(out, float("nan")))
        try:
            with pytest.raises(MistralError, match="logits are not finite"):
                generate([[1, 5, 6, 7, 5, 6, 7]], model, max_tokens=8, speculate=3, temperature=temperature, seed=0)  # one prefill call (W = 8)
        finally:
            hook.remove()
    assert len(calls) == 2  # the prefill, then the verify step that raised


def test_sampled_speculation_draws_from_the_target_distribution() -> None:
    """The accept/reject rule, against the closed form: position 0's token follows p0 whatever
    the proposal x; given that the proposal was kept, the next token follows p1."""
    torch.manual_seed(0)
    V, n = 5, 20000
    logits = torch.randn(2, V) * 1.5  # positions 0 and 1 of one row: the fed token, then proposal x
    x, temperature, top_p = 2, 0.8, 0.95
    p = probabilities(logits, temperature, top_p)
    p = p / p.sum(-1, keepdim=True)
    generator = torch.Generator().manual_seed(1)
    first, second = torch.zeros(V), torch.zeros(V)
    for _ in range(n):
        ((new, _),) = _choose(logits, [2], [[x]], temperature, top_p, generator)
        first[new[0]] += 1
        if new[0] == x:
            second[new[1]] += 1
    for counts, want in ((first, p[0]), (second, p[1])):
        total = counts.sum()
        sd = torch.sqrt(total * want * (1 - want)) + 1e-9
        assert bool(((counts - total * want).abs() <= 5 * sd + 1).all()), (counts / total, want)


def test_a_draft_of_the_model_itself_has_every_proposal_kept() -> None:
    import copy

    # float32 on every device: in bfloat16 the draft's 1-token steps and the target's 5-token
    # ones round differently, and a near tie may go either way.
    model = copy.deepcopy(MODELS[8]).float()
    with forward_calls(model) as calls:
        tokens, _ = generate([[1, 5, 6]], model, max_tokens=21, speculate=4, draft=copy.deepcopy(model))
    assert calls == [3, 5, 5, 5, 5]  # the prefill, then 4 calls of the last token and 4 kept proposals: 1 + 4 * 5 tokens
    assert tokens == generate([[1, 5, 6]], model, max_tokens=21)[0]


def test_sampled_speculation_with_a_draft_draws_from_the_target_distribution() -> None:
    """min(1, p/q) and the residual (p - q)+: given proposals drawn from q, the first token follows p."""
    torch.manual_seed(4)
    V, n = 5, 20000
    logits, draft_logits = torch.randn(2, V) * 1.5, torch.randn(V) * 1.5
    temperature, top_p = 1.0, 1.0
    p = probabilities(logits, temperature, top_p)
    p = p / p.sum(-1, keepdim=True)
    q = torch.softmax(draft_logits, -1)
    generator = torch.Generator().manual_seed(5)
    first = torch.zeros(V)
    for _ in range(n):
        x = int(torch.multinomial(q, 1, generator=generator))
        ((new, _),) = _choose(logits, [2], [[x]], temperature, top_p, generator, [q[None]])
        first[new[0]] += 1
    sd = torch.sqrt(n * p[0] * (1 - p[0]))
    assert bool(((first - n * p[0]).abs() <= 5 * sd + 1).all()), (first / n, p[0])


@pytest.mark.parametrize("window", [4, None])
def test_a_draft_proposes_its_own_greedy_continuation_round_after_round(window: object) -> None:
    """The Drafter's proposals are the draft model's greedy tokens for each row's history,
    also in rounds where rows feed different numbers of unseen tokens (a fully kept run:
    its last draft and the target's token; a rejection: the target's token only), the
    shorter rows filled up and the filler taken back."""
    draft = DRAFTS[window]
    prompts = [[1, 5, 6, 7, 8], [1, 9, 10]]
    drafter = Drafter(draft, prompts, max_tokens=16, k=3, chunk=4, compile=False)
    history = [list(p) for p in prompts]
    for round, kept in enumerate([(3, 0), (1, 3), (3, 3), (0, 2)]):
        budgets = {0: 3, 1: 3 if round % 2 else 2}
        drafted, _ = drafter.propose(history, budgets, 0.0, 1.0, None)
        for b in (0, 1):
            want, _ = generate([history[b]], draft, max_tokens=budgets[b])
            assert drafted[b] == want[0], (round, b)
            # The target keeps kept[b] drafts and adds a token of its own (here: 2); the
            # draft's cache keeps what the target's does.
            history[b] += drafted[b][: kept[b]] + [2]
            drafter.rewind(b, len(history[b]) - 1)


def test_a_bad_draft_is_named() -> None:
    model = MODELS[8]
    with pytest.raises(MistralError, match="give speculate=K"):
        generate([[1, 2]], model, max_tokens=2, draft=DRAFTS[8])
    with pytest.raises(MistralError, match="the draft model's vocabulary \\(50 tokens\\) is not the model's \\(97\\)"):
        generate([[1, 2]], model, max_tokens=2, speculate=2, draft=random_model(tiny_args(vocab_size=50)))
    with pytest.raises(MistralError, match="model must be a mistral Transformer"):
        generate([[1, 2]], model, max_tokens=2, speculate=2, draft="small")  # type: ignore[arg-type]


def test_sampled_speculation_runs_and_is_seeded() -> None:
    model = MODELS[8]
    prompts = [[1, 5, 6, 7, 5, 6, 7, 5], [1, 9, 10]]
    a = generate(prompts, model, max_tokens=12, temperature=0.9, top_p=0.9, seed=3, speculate=3)
    b = generate(prompts, model, max_tokens=12, temperature=0.9, top_p=0.9, seed=3, speculate=3)
    assert a == b and all(len(t) == 12 for t in a[0])


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"])
def test_a_bad_speculate_is_named(value: object) -> None:
    with pytest.raises(MistralError, match="speculate must be a number of tokens"):
        generate([[1, 2]], MODELS[8], max_tokens=2, speculate=value)  # type: ignore[arg-type]


def test_speculation_with_a_given_cache_is_refused() -> None:
    from mistral import stream

    model = MODELS[8]
    with pytest.raises(MistralError, match="speculative decoding runs in one micro-batch, without a given cache"):
        list(stream([[1, 2]], model, max_tokens=2, speculate=2, cache=model.make_cache(1, 16)))


def test_a_cache_with_lookahead_rewinds_past_k_taken_back_tokens() -> None:
    """W + k slots: after writing k tokens ahead (the buffer wrapped), taking all k back keeps the row."""
    from mistral.cache import RotatingBufferCache

    W, k = 4, 3
    cache = RotatingBufferCache(1, 1, 100, W, 1, 1, lookahead=k)
    assert cache.size == W + k
    cache.advance([20 + k])  # 20 tokens, then k proposals
    cache.rewind(0, 20)
    assert cache.lengths == [20]
    plain = RotatingBufferCache(1, 1, 100, W, 1, 1)
    plain.advance([20 + k])
    plain.rewind(0, 20)
    assert plain.lengths == [0]  # without the lookahead slots, positions 17..19 were overwritten: start over
