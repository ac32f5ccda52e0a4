"""Generation: `stream` and `generate`, a batch of prompts run to the end on the engine.

The model maps tokens to logits; mistral/engine.py runs requests in the rows of a cache,
one forward call a step (chunked prefill of packed prompts, decoding, sampling, stopping).
A stream is a batch of requests that start together on an engine of its own (one per
micro-batch of a pipeline, which take turns through the stages), read back a step at a
time: the one generation loop, which a server's requests run on too. Every rank of a
parallel model (mistral/parallel.py) runs the same calls in the same order, so the
messages between ranks pair up, and the sampler's tokens reach all.
"""

from typing import Any, Iterator, Optional

import torch

from mistral.cache import RotatingBufferCache
from mistral.checks import check_draft, check_model, check_options, check_prompts
from mistral.decode import compile_pays, fast_path_applies
from mistral.engine import Engine, Request
from mistral.errors import MistralError, check_positive_int, is_int
from mistral.model import Transformer
from mistral.parallel import split
from mistral.speculate import speculative_stream
from mistral.stage import Stage


@torch.inference_mode()
def stream(
    encoded_prompts: list[list[int]],
    model: Transformer,
    *,
    max_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    chunk_size: Optional[int] = None,
    eos_id: Optional[int] = None,
    seed: Optional[int] = None,
    cache: Optional[RotatingBufferCache] = None,
    micro_batches: Optional[int] = None,
    compile: Optional[bool] = None,
    cuda_graphs: Optional[bool] = None,
    warm_up: Optional[dict[str, float]] = None,
    stage: Optional[Stage] = None,
    speculate: int = 0,
    draft: Optional[Transformer] = None,
    speculation: Optional[dict[str, int]] = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens [B], logprobs [B]), on the host, after each step.

    A sequence that has produced eos yields eos (log-probability 0) until the others end;
    the stream ends once every sequence has produced eos, or after max_tokens steps.
    All prompts must fit one cache: at most model.args.max_batch_size of them. Each is a
    request of an engine (mistral/engine.py) that starts with the others.

    cache: continue sequences that a previous stream left in this cache (a chat). Row b
    already holds the first cache.lengths[b] tokens of encoded_prompts[b]; only the rest
    is prefilled. The last token a stream yields is never fed to the model, so a
    continuation's prompt starts with it. A row whose sequence ended while others ran on
    is emptied (the engine decoded placeholders in it).

    chunk_size: prompt tokens of each prompt read per call (default: a row's slots).

    seed: prompt b draws from its own generator seeded seed + b (its answer does not depend
    on the other prompts; with speculate, one generator seeded `seed` draws for all). None:
    PyTorch's global generator.

    micro_batches: split the batch into this many micro-batches, each with its own
    cache and engine, that follow each other through the pipeline stages (default: one per stage,
    so every stage is busy; 1 on a single process). Each micro-batch reads a stage's
    weights again, but on 2 stages this was never slower than one batch, and faster
    for prefill and for mid-sized batches (README's table). A micro-batch that has
    finished yields eos (log-probability 0) until the others do.

    compile, cuda_graphs: the fast path on CUDA (mistral/decode.py). None: CUDA graphs
    wherever they run, and compiled blocks only on CUDA in half precision where
    `decode.compile_pays` for max_tokens steps (never for a short call: compiling costs
    seconds, a step saves tens of microseconds).

    warm_up: a dict into which the seconds of what runs once per shape are added as they
    happen, by kind (see decode.Runner): a caller's timing books them apart.

    stage: the model's Stage (mistral/stage.py) to run on, which keeps its caches and
    decode graphs for the next call of the same shapes; by default a new one for this call.

    speculate: propose up to this many tokens per row and step by prompt lookup, and check
    them in one forward call (mistral/speculate.py): greedy output is the same token for
    token, sampled output follows the same distribution; in one micro-batch, without a cache.
    draft: with speculate, a smaller model of the same vocabulary (on the same device)
    whose own tokens are the proposals instead.
    speculation: with speculate, a dict into which its counts are added as it runs: "steps"
    (verify steps), "rows" (rows verified, over all steps), "tokens" (the tokens they gave),
    "proposed" and "kept" (proposals).

    Every rank of a parallel model yields the same tokens.
    """
    check_model(model)
    check_options(
        encoded_prompts, model.args.vocab_size, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
        chunk_size=chunk_size, seed=seed, speculate=speculate,
    )
    if eos_id is not None and not is_int(eos_id):
        raise MistralError(f"eos_id must be a token id (an int) or None, got {eos_id!r}")
    if eos_id is not None and not 0 <= eos_id < model.args.vocab_size:  # it would never end a sequence
        raise MistralError(f"eos_id={eos_id} is outside the vocabulary 0..{model.args.vocab_size - 1}")
    M = model.layout.num_pipeline_ranks if micro_batches is None else check_positive_int(micro_batches, "micro_batches")
    B = len(encoded_prompts)
    if B > model.args.max_batch_size:
        raise MistralError(f"{B} prompts exceed max_batch_size={model.args.max_batch_size}")
    if cache is not None and not isinstance(cache, RotatingBufferCache):
        raise MistralError(f"cache must be a RotatingBufferCache (model.make_cache), got {type(cache).__name__}")
    if cache is not None and model.layout.world_size > 1:
        raise MistralError("continuing sequences from a cache is not supported on several processes")
    if stage is None:
        stage = Stage(model)
    elif not isinstance(stage, Stage) or stage.model is not model:
        raise MistralError("stage must be a Stage of this model (Stage(model))")
    if speculate and (cache is not None or (micro_batches or 1) > 1):
        raise MistralError("speculative decoding runs in one micro-batch, without a given cache")
    if draft is not None:
        check_draft(draft, model, speculate)
    if max_tokens == 0:
        return
    M = min(M, B)  # a last, short batch of generate() may have fewer prompts
    if compile is None:  # the saving was measured on a GPU; on the CPU compiling only costs
        compile = fast_path_applies(model) and compile_pays(max_tokens, model.args.n_layers)
    if speculate:
        yield from speculative_stream(
            encoded_prompts, stage, max_tokens=max_tokens, speculate=speculate, temperature=temperature, top_p=top_p,
            chunk_size=chunk_size, eos_id=eos_id, seed=seed, compile=compile, draft=draft, tally=speculation,
            warm_up=warm_up,
        )  # fmt: skip
        return
    if cache is not None:
        if M > 1:
            raise MistralError("continuing sequences from a cache takes one micro-batch")
        if B > cache.max_batch_size:
            raise MistralError(f"{B} prompts do not fit the given cache of {cache.max_batch_size} rows")
        # A cache that cannot roll must hold every token fed (checked here: a captured decode step could not).
        if cache.sliding_window is None or cache.size < cache.sliding_window:
            longest = max(len(p) for p in encoded_prompts) + max_tokens - 1
            if longest > cache.size:
                raise MistralError(
                    f"the prompts and max_tokens={max_tokens} reach {longest} tokens, past the given cache's {cache.size} "
                    f"slots (sliding_window={cache.sliding_window}): make a larger cache"
                )
        caches = [cache]  # (Engine.resume names a prompt that the row already holds whole)
    rows = [len(split(B, M, i)) for i in range(M)]
    if cache is None:
        caches = stage.caches(rows, max(len(p) for p in encoded_prompts), max_tokens)
    stage.begin(caches)
    engines = _engines(caches, rows, stage, chunk_size, compile, cuda_graphs, warm_up)
    requests = _requests(encoded_prompts, max_tokens, temperature, top_p, seed, eos_id)
    if cache is not None:
        for b, r in enumerate(requests):
            engines[0].resume(r, b)
    else:
        _submit(engines, requests)
    yielded = 0
    try:
        for _ in _run(engines):
            # Step s is complete once every request still running has its token s (the host reads them a call late).
            ready = min((len(r.tokens) for r in requests if not r.finished), default=max(map(_steps_of, requests)))
            while yielded < ready:
                yielded += 1  # counted when handed over: the caller may stop there
                yield _step(requests, yielded - 1, eos_id)
    finally:
        for engine in engines:  # (in the order they ran: each rank receives in the order the sampler sent)
            engine.drain()
        if cache is None:
            stage.keep(caches)  # for the next stream of the same shapes, its graphs included
        else:
            _take_back(engines[0], requests, yielded)


def _engines(caches: list[RotatingBufferCache], rows: list[int], stage: Stage, chunk_size: Optional[int],
             compile: bool, cuda_graphs: Optional[bool], warm_up: Optional[dict[str, float]]) -> list[Engine]:  # fmt: skip
    """One engine per micro-batch, each on its cache's first rows[i] rows. A call reads up to
    chunk_size prompt tokens of each of its prompts (by default a row's slots): all of them at
    once where they fit, packed into one sequence."""
    return [
        Engine(stage.model, cache=c, max_batch=n, stage=stage, chunk_size=(chunk_size or c.size) * n, row_chunk=chunk_size,
               compile=compile, cuda_graphs=cuda_graphs, buckets=False, warm_up={} if warm_up is None else warm_up)
        for c, n in zip(caches, rows)
    ]  # fmt: skip


def _requests(encoded_prompts: list[list[int]], max_tokens: int, temperature: float, top_p: float,
              seed: Optional[int], eos_id: Optional[int]) -> list[Request]:  # fmt: skip
    """A request per prompt; prompt i draws from its own generator, seeded seed + i, so that its
    answer depends on the seed and on nothing that runs beside it (what a server's requests do)."""
    return [
        Request(p, max_tokens=max_tokens, temperature=temperature, top_p=top_p, eos_id=eos_id,
                seed=None if seed is None else (seed + i) % 2**64)
        for i, p in enumerate(encoded_prompts)
    ]  # fmt: skip


def _submit(engines: list[Engine], requests: list[Request]) -> None:
    """Micro-batch i takes the i-th of len(engines) consecutive shares of the requests."""
    for i, engine in enumerate(engines):
        share = split(len(requests), len(engines), i)
        for r in requests[share.start : share.stop]:
            engine.submit(r)


def _run(engines: list[Engine]) -> Iterator[None]:
    """Each engine's next call in turn, the same order on every rank (their messages pair up),
    until every request has ended; on a pipeline the stages work on different engines at once."""
    while any(e.busy for e in engines):
        for e in engines:
            if e.busy:
                e.step()
        yield
    engines[0].link.flush()  # every send has a receive by now: a failed one is named here, not in a later call


def _steps_of(r: Request) -> int:
    """The steps a request yields: its tokens, and its eos if it produced one."""
    return len(r.tokens) + (r.finish_reason == "stop")


def _step(requests: list[Request], s: int, eos_id: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step s of every request: its token and log-probability; its eos, then eos (log-probability 0) until the others end."""
    tokens = [r.tokens[s] if s < len(r.tokens) else eos_id for r in requests]
    logprobs = [r.logprobs[s] if s < len(r.tokens) else r.eos_logprob if s == len(r.tokens) else 0.0 for r in requests]
    return torch.tensor(tokens), torch.tensor(logprobs)


def _take_back(engine: Engine, requests: list[Request], yielded: int) -> None:
    """Leave in a given cache what the stream promises after `yielded` steps: each prompt and every
    token yielded for it but the last (the host reads a call's tokens during the next call, so one
    more may have been fed; more, where the caller left early). A row where a placeholder was
    decoded after its sequence ended (the others ran on) holds it no more: it is emptied."""
    cache = engine.cache
    for b, r in enumerate(requests):
        promised = len(r.prompt) + max(min(yielded, _steps_of(r)) - 1, 0)
        if b in engine.overwritten:
            cache.reset(b)
        elif cache.lengths[b] > promised:  # never below: a prefill left half-way stays as it is
            cache.rewind(b, promised)


def generate(
    encoded_prompts: list[list[int]], model: Transformer, *, max_tokens: int, **options: Any
) -> tuple[list[list[int]], list[list[float]]]:
    """Generated tokens (eos excluded) and their log-probabilities, per prompt.

    options: those of `stream` (temperature, top_p, chunk_size, eos_id, seed, micro_batches,
    compile, cuda_graphs, warm_up, stage, speculate, draft, speculation), except `cache`. More
    prompts than max_batch_size run as consecutive batches of that size, on one Stage; prompt
    i of the whole list draws with the seed + i (stream's seeds, counted over the batches;
    with speculate, batch j's one generator is seeded seed + its first prompt's index).
    """
    check_model(model)
    check_prompts(encoded_prompts)
    if "cache" in options:
        raise MistralError("generate() makes its own caches: continue a cache with stream(..., cache=...)")
    if options.get("stage") is None:  # one for every batch: a later one of the same shapes runs on the first's caches
        options["stage"] = Stage(model)
    eos_id = options.get("eos_id")
    n = model.args.max_batch_size
    all_tokens: list[list[int]] = []
    all_logprobs: list[list[float]] = []
    seed = options.get("seed")
    for first in range(0, max(len(encoded_prompts), 1), n):
        batch = encoded_prompts[first : first + n]
        if first:  # (the first batch ran: the seed is valid)
            options["seed"] = None if seed is None else (seed + first) % 2**64
        steps = list(stream(batch, model, max_tokens=max_tokens, **options))
        tokens = torch.stack([t for t, _ in steps], dim=1).tolist() if steps else [[] for _ in batch]
        logprobs = torch.stack([lp for _, lp in steps], dim=1).tolist() if steps else [[] for _ in batch]
        for toks, lps in zip(tokens, logprobs):
            stop = toks.index(eos_id) if eos_id in toks else len(toks)
            all_tokens.append(toks[:stop])
            all_logprobs.append(lps[:stop])
    return all_tokens, all_logprobs
