"""Generation: chunked prefill of packed prompts, then decoding all sequences together.

The model maps tokens to logits; this module owns the caches' lifetime, the prefill
schedule, sampling and stopping. One loop serves a single process and every rank of
a parallel model (mistral/parallel.py): each rank runs the same calls in the same
order, so the messages between ranks pair up, and the sampler's tokens reach all.
"""

import math
from typing import Any, Iterator, Optional

import torch

from mistral.cache import RotatingBufferCache, prefill_calls
from mistral.decode import Runner, compile_pays, fast_path_applies
from mistral.errors import MistralError, check_positive_int, is_int, is_number
from mistral.model import Transformer
from mistral.parallel import split
from mistral.sampling import NON_FINITE, sample_step
from mistral.speculate import speculative_stream
from mistral.stage import Stage


def check_options(
    encoded_prompts: list[list[int]],
    vocab_size: int,
    *,
    max_tokens: int,
    temperature: float,
    top_p: float,
    chunk_size: Optional[int],
    seed: Optional[int] = None,
    speculate: int = 0,
) -> None:
    check_prompts(encoded_prompts)
    for i, prompt in enumerate(encoded_prompts):
        if len(prompt) == 0:
            raise MistralError(f"prompt {i} is empty")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise MistralError(f"prompt {i} has token ids outside the vocabulary 0..{vocab_size - 1}: {bad[:5]}")
    if not is_int(max_tokens) or max_tokens < 0:
        raise MistralError(f"max_tokens must be a non-negative integer, got {max_tokens!r}")
    # The command line hands over "nan", "abc" or 1e999 as typed: a str, or a float that is not finite.
    if not is_number(temperature) or not 0 <= temperature < math.inf:
        raise MistralError(f"temperature must be >= 0 and finite, got {temperature!r}")
    if not is_number(top_p) or not 0 < top_p <= 1:
        raise MistralError(f"top_p must be in (0, 1], got {top_p!r}")
    if chunk_size is not None:
        check_positive_int(chunk_size, "chunk_size")
    if seed is not None and (not is_int(seed) or not 0 <= seed < 2**64):
        raise MistralError(f"seed must be an integer, got {seed!r} (0 to 2**64-1, what torch.Generator takes)")
    if not is_int(speculate) or speculate < 0:
        raise MistralError(f"speculate must be a number of tokens (an int >= 0), got {speculate!r}")


def check_prompts(encoded_prompts: Any) -> None:
    """A list of prompts, each a list of token ids (ints): text, tensors and floats are named, not run."""
    if isinstance(encoded_prompts, str):
        raise MistralError("encoded_prompts is a str: encode the text first (tokenizer.encode) and give a list of prompts")
    if not isinstance(encoded_prompts, (list, tuple)):
        hint = " (.tolist() turns a tensor into one)" if isinstance(encoded_prompts, torch.Tensor) else ""
        raise MistralError(f"encoded_prompts must be a list of prompts, each a list of token ids, got {type(encoded_prompts).__name__}{hint}")
    if not encoded_prompts:
        raise MistralError("no prompts given")
    for i, prompt in enumerate(encoded_prompts):
        if not isinstance(prompt, (list, tuple)):
            raise MistralError(f"prompt {i} must be a list of token ids (ints), got {type(prompt).__name__}")
        for t in prompt:
            if not is_int(t):
                raise MistralError(f"prompt {i} holds {t!r} ({type(t).__name__}), which is not a token id (an int)")


def check_draft(draft: Any, model: Transformer, speculate: int) -> None:
    """A draft model speculation can use with `model`."""
    if not speculate:
        raise MistralError("a draft model proposes tokens for speculative decoding: give speculate=K (--speculate K) too")
    check_model(draft)
    if draft.layout.world_size > 1 or model.layout.world_size > 1:
        raise MistralError("speculation with a draft model runs on one process (prompt lookup runs on several)")
    if draft.args.vocab_size != model.args.vocab_size:
        raise MistralError(f"the draft model's vocabulary ({draft.args.vocab_size} tokens) is not the model's ({model.args.vocab_size})")
    if draft.device != model.device:
        raise MistralError(f"the draft model is on {draft.device}, the model on {model.device}: put both on one device")


def check_model(model: Any) -> None:
    """A Transformer whose weights are in one of the dtypes the model runs in."""
    if not isinstance(model, Transformer):
        raise MistralError(f"model must be a mistral Transformer, got {type(model).__name__}")
    if model.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise MistralError(f"the model's weights are {model.dtype}: run it in float32, bfloat16 or float16 (model.to(dtype))")


class MicroBatch:
    """Some of the batch's sequences with their own cache, and how far their generation has come.

    A single process runs the whole batch as one; a pipeline splits it so that the
    stages work on different micro-batches at once (see mistral/parallel.py).
    """

    def __init__(self, prompts: list[list[int]], runner: Runner, chunk: int):
        self.prompts, self.runner = prompts, runner
        self.start = runner.cache.lengths[: len(prompts)]  # tokens each row held before
        self.calls = prefill_calls(prompts, chunk)
        self.prefilled = 0  # prefill calls already run
        self.last_logits: list[Optional[torch.Tensor]] = [None] * len(prompts)  # last stage only
        # One [b] per step, from step `forgotten` on: the steps already yielded are let go
        # (all but the last two, which the next call and a late eos still read), so a long
        # stream holds constant memory.
        self.tokens: list[torch.Tensor] = []
        self.logprobs: list[torch.Tensor] = []
        self.forgotten = 0
        self.done: Optional[torch.Tensor] = None  # [b], the sequence has produced eos
        self.done_before: Optional[torch.Tensor] = None  # the same, a step earlier
        self.finite: list[torch.Tensor] = []  # flags of the steps sampled here, not read yet
        self.unseen = False  # the last call sampled, and this rank has not received the tokens yet
        self.finished = False

    # The host reads the device's flags (eos, finite logits) a step late, while the next
    # step runs: reading them at once would leave the GPU idle between steps while Python
    # works (5-10% of a batch-1 step of Mistral 7B on an H100).

    def record(self, tokens: torch.Tensor, logprobs: torch.Tensor, eos_id: Optional[int], finite: Optional[torch.Tensor] = None) -> None:
        self.tokens.append(tokens)
        self.logprobs.append(logprobs)
        if finite is not None:
            self.finite.append(finite)
        if eos_id is not None:
            self.done_before = self.done
            self.done = (tokens == eos_id) if self.done is None else self.done | (tokens == eos_id)

    def check(self, pending: int = 1) -> None:
        """Raise if the logits of a sampled step were not finite; the last `pending` steps are left for later."""
        while len(self.finite) > pending:
            if not bool(self.finite.pop(0)):
                raise MistralError(NON_FINITE)

    def stopped(self, max_tokens: int) -> bool:
        """max_tokens steps, or eos everywhere.

        Eos is read a step late, so when every sequence had produced it one step before
        the last, that last step went past the end: its tokens are dropped (never yielded),
        and `take_back` takes the tokens it fed back out of the cache.
        """
        if self.done_before is not None and bool(self.done_before.all()):
            self.tokens.pop()
            self.logprobs.pop()
            del self.finite[-1:]  # its flag, where it was sampled
        elif self.steps < max_tokens:
            return False
        self.check(pending=0)
        return True

    @property
    def steps(self) -> int:
        """Steps sampled so far."""
        return self.forgotten + len(self.tokens)

    def step(self, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The tokens and log-probabilities of step s (not forgotten yet)."""
        return self.tokens[s - self.forgotten], self.logprobs[s - self.forgotten]

    def forget(self, yielded: int) -> None:
        """Let go of the steps before `yielded`, which the caller has, but the last two."""
        while self.forgotten < yielded and len(self.tokens) > 2:
            self.tokens.pop(0)
            self.logprobs.pop(0)
            self.forgotten += 1

    def take_back(self, yielded: int) -> None:
        """Leave in the cache what the stream promises after `yielded` steps: the prompts and
        every yielded token but the last. A decode step runs before the step it follows is
        yielded, so one more may have been fed (a stream ended by eos, or left early)."""
        cache = self.runner.cache
        for b, prompt in enumerate(self.prompts):
            promised = self.start[b] + len(prompt) + max(yielded - 1, 0)
            if cache.lengths[b] > promised:  # never below: a prefill left half-way stays as it is
                cache.rewind(b, promised)

    def run(self, stage: Stage) -> tuple[bool, Optional[torch.Tensor]]:
        """This rank's share of the next forward call: a prefill chunk of every prompt, or a decode step.

        Returns whether the call ends in sampling and, on the last stage, the logits [b, V] to sample.
        """
        if self.prefilled == len(self.calls):
            return True, stage.forward(self.runner, self.tokens[-1])
        call = self.calls[self.prefilled]
        # The logits of the last token of each prompt ending here.
        out = stage.forward(self.runner, call.input_ids, call.seqlens, list(call.ends.values()))
        self.prefilled += 1
        samples = self.prefilled == len(self.calls)
        if out is None:  # not the last stage
            return samples, None
        for i, b in enumerate(call.ends):  # a prompt's last logits come from the call where it ends
            self.last_logits[b] = out[i]
        return samples, torch.stack(self.last_logits) if samples else None  # type: ignore[arg-type]


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
    """Yield (tokens [B], logprobs [B]) on the model's device after each step.

    A sequence keeps receiving tokens after its eos (they are cut by `generate`); the
    stream ends once every sequence has produced eos, or after max_tokens steps.
    All prompts must fit one cache: at most model.args.max_batch_size of them.

    cache: continue sequences that a previous stream left in this cache (a chat). Row b
    already holds the first cache.lengths[b] tokens of encoded_prompts[b]; only the rest
    is prefilled. The last token a stream yields is never fed to the model, so a
    continuation's prompt starts with it.

    micro_batches: split the batch into this many micro-batches, each with its own
    cache, that follow each other through the pipeline stages (default: one per stage,
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
    fast = dict(compile=compile, cuda_graphs=cuda_graphs)
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
        for b, p in enumerate(encoded_prompts):
            if len(p) <= cache.lengths[b]:
                raise MistralError(f"prompt {b} has {len(p)} tokens, but the cache already holds {cache.lengths[b]}: nothing new to read")
        unseen = [p[cache.lengths[b] :] for b, p in enumerate(encoded_prompts)]
        stage.begin([cache])
        mbs = [MicroBatch(unseen, stage.runner(cache, B, **fast), chunk_size or cache.size)]
        caches = None
    else:
        # Every cache gets the whole batch's length, so chunks split prompts alike whatever M.
        longest = max(len(p) for p in encoded_prompts)
        caches = stage.caches([len(split(B, M, i)) for i in range(M)], longest, max_tokens)
        stage.begin(caches)
        mbs = []
        for i, mb_cache in enumerate(caches):
            rows = split(B, M, i)
            mb_runner = stage.runner(mb_cache, len(rows), **fast)
            mbs.append(MicroBatch(encoded_prompts[rows.start : rows.stop], mb_runner, chunk_size or mb_cache.size))
    for mb in mbs:
        mb.runner.warm_up = {} if warm_up is None else warm_up
    try:
        yield from _steps(mbs, stage, max_tokens, temperature, top_p, eos_id, seed)
    finally:
        if caches is not None:  # for the next stream of the same shapes, its graphs included
            stage.keep(caches)


def _steps(
    mbs: list[MicroBatch], stage: Stage, max_tokens: int, temperature: float, top_p: float,
    eos_id: Optional[int], seed: Optional[int],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # fmt: skip
    """stream's loop: each micro-batch's next call in turn, yielding each step once all have it."""

    generator = None if seed is None else torch.Generator(stage.model.device).manual_seed(seed)
    link = stage.link
    yielded = 0
    try:
        while not all(mb.finished for mb in mbs):
            for mb in mbs:  # the same order on every rank: messages pair up
                if mb.finished:
                    continue
                if mb.unseen:
                    mb.record(*link.recv_tokens(len(mb.prompts)), eos_id)
                    mb.unseen = False
                if mb.stopped(max_tokens):
                    mb.finished = True
                    continue
                samples, logits = mb.run(stage)
                if samples and link.samples:
                    assert logits is not None
                    tokens, logprobs, finite = sample_step(logits, temperature, top_p, generator)
                    link.send_tokens(tokens, logprobs)
                    mb.record(tokens, logprobs, eos_id, finite)
                elif samples:
                    mb.unseen = True
                mb.check()  # the steps before this one, which is queued behind them
            # Step s is complete once every micro-batch still running has its tokens, and
            # checked: a running micro-batch's last step is not, yet.
            running = [mb.steps - 1 for mb in mbs if not mb.finished]
            ready = min(running) if running else max(mb.steps for mb in mbs)
            for step in range(yielded, ready):
                yielded = step + 1  # counted when handed over: the caller may stop there
                yield _gather(mbs, step, eos_id)
            for mb in mbs:
                mb.forget(yielded)
        link.flush()
    finally:
        for mb in mbs:
            mb.take_back(min(yielded, mb.steps))


def _gather(mbs: list[MicroBatch], step: int, eos_id: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, logprobs = [], []
    for mb in mbs:
        if step < mb.steps:
            t, lp = mb.step(step)
            tokens.append(t)
            logprobs.append(lp)
        else:  # stopped early: every sequence has produced eos
            assert eos_id is not None
            tokens.append(torch.full_like(mb.tokens[-1], eos_id))
            logprobs.append(torch.zeros_like(mb.logprobs[-1]))
    return torch.cat(tokens), torch.cat(logprobs)


def generate(
    encoded_prompts: list[list[int]], model: Transformer, *, max_tokens: int, **options: Any
) -> tuple[list[list[int]], list[list[float]]]:
    """Generated tokens (eos excluded) and their log-probabilities, per prompt.

    options: those of `stream` (temperature, top_p, chunk_size, eos_id, seed,
    micro_batches, compile, cuda_graphs, stage), except `cache`. More prompts than
    max_batch_size run as consecutive batches of that size, on one Stage.
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
    for first in range(0, max(len(encoded_prompts), 1), n):
        batch = encoded_prompts[first : first + n]
        steps = list(stream(batch, model, max_tokens=max_tokens, **options))
        tokens = torch.stack([t for t, _ in steps], dim=1).tolist() if steps else [[] for _ in batch]
        logprobs = torch.stack([lp for _, lp in steps], dim=1).tolist() if steps else [[] for _ in batch]
        for toks, lps in zip(tokens, logprobs):
            stop = toks.index(eos_id) if eos_id in toks else len(toks)
            all_tokens.append(toks[:stop])
            all_logprobs.append(lps[:stop])
    return all_tokens, all_logprobs
