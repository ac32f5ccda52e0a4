"""The generation loop: requests join and leave one cache between forward calls.

A server's requests arrive while others run, and a finished one should give its place to
the next at once (continuous batching). The rolling buffer suits this: every row has the
same slots (W, for a windowed model), so a row takes a new sequence the moment the old
one ends, with nothing to page or compact. `generate` and `stream` run here too: their
prompts are requests that start together (mistral/generation.py).

Each `Engine.step` is one forward call:

- waiting requests take the free rows, first come first served;
- while some prompt still has tokens to read, the call is a chunk call (mask 2): every
  decoding row feeds its last token, and the prompts feed up to `chunk_size` tokens
  among them, oldest first, so a long prompt never stalls the rows that decode; a
  prompt read whole samples its first token in that call;
- otherwise it is a decode step (mask 3) on rows 0..n-1, n the smallest bucket (1, 2,
  4, ...) that holds every busy row (or every row: `buckets=False`), replayed on CUDA
  from a graph captured per bucket;
  a free row below n decodes a placeholder that nobody reads (over a few keys: the ones
  a finished request left there are let go).

Worked example, 4 rows, chunk_size 4: A decodes in row 0, B (a prompt of 6 tokens, 2 of
them read) is in row 1, and C, a new prompt of 3, arrives:

    rows     [A, B, C, -]       C takes the first free row
    call 1   [1, 4, 0, 0]       A's last token; B, the older prompt, the 4 tokens it has left
                                (samples: A, and B, whose prompt is read whole)
    call 2   [1, 1, 3, 0]       A and B decode; C's 3 tokens fit the budget (samples: A, B, C)
    call 3   a decode step on rows 0..3 (the bucket of 4; row 3 decodes a placeholder)

Each request samples with its own options and its own generator, so a seeded request
draws the same numbers whatever runs beside it, and greedy ones give the tokens that the
request alone would (the same math on other rows: equal up to float rounding).

On several ranks (tensor parallel, pipeline stages), every rank's engine runs the same
calls on the same requests, submitted and ended in the same order (a tensor-parallel
server's rank 0 sends the others its plan: mistral/serve.py); the sampling rank's tokens
reach the others once per call, received at the start of their next call.
"""

import itertools
import sys
import time
from collections import deque
from typing import Any, NamedTuple, Optional, Sequence

import torch

from mistral.cache import CacheTooLarge, RotatingBufferCache
from mistral.checks import check_model, check_options
from mistral.errors import MistralError, check_positive_int, is_int
from mistral.model import Transformer
from mistral.decode import Runner
from mistral.sampling import NON_FINITE, sample_step, to_device
from mistral.stage import Stage

# The most alternatives per token a request may ask for (OpenAI's top_logprobs limit).
MAX_TOP_LOGPROBS = 20
# The most keys a free row's placeholder reads in a decode step (Engine._decode).
PLACEHOLDER_KEYS = 32


class Request:
    """One prompt being completed: its options, and what the engine has made of it so far."""

    def __init__(
        self,
        prompt: Sequence[int],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: Optional[int] = None,
        eos_id: Optional[int] = None,
        top_logprobs: int = 0,
    ):
        self.prompt = list(prompt) if isinstance(prompt, (list, tuple)) else prompt  # checked by Engine.submit
        self.max_tokens, self.temperature, self.top_p, self.seed = max_tokens, temperature, top_p, seed
        self.eos_id, self.top_logprobs = eos_id, top_logprobs
        self.tokens: list[int] = []  # generated so far, eos left out
        self.logprobs: list[float] = []
        self.eos_logprob: Optional[float] = None  # that of the eos that ended it, if one did
        self.top: list[list[tuple[int, float]]] = []  # per token, the top_logprobs most likely (token, log-probability)
        self.finish_reason: Optional[str] = None  # "stop" (eos, or the caller's stop), "length", "cancelled"
        self.row: Optional[int] = None  # the cache row it runs in
        self.read = 0  # prompt tokens in the cache
        self.arrival = 0  # order of submission
        self.generator: Optional[torch.Generator] = None
        self.sampled = 0  # tokens drawn so far, those the host has not read yet included

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def options(self) -> dict[str, Any]:
        """What makes a new request like this one (for another rank of a tensor-parallel server)."""
        return dict(prompt=self.prompt, max_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    seed=self.seed, eos_id=self.eos_id, top_logprobs=self.top_logprobs)  # fmt: skip


class Sampled(NamedTuple):
    """A call's sampling on its way to the host: its requests and their rows, then (on the
    sampling rank at once, on the others once received) its results [3, R] (token, log-probability,
    finite flag), the top_logprobs (sampling rank), and the CUDA event of their arrival."""

    requests: list[Request]
    rows: list[int]
    results: Optional[torch.Tensor] = None
    top: Optional[torch.Tensor] = None
    done: Optional["torch.cuda.Event"] = None


class Engine:
    """Requests of one model run together in the rows of one cache; `step` runs one forward call.

    max_batch: rows of the cache (requests running at once; default the model's max_batch_size).
    max_context: the longest a request may run, prompt and answer; a window-less model's rows
    hold that many slots, a windowed model's W.
    chunk_size: prompt tokens read per call, shared by the prompts being read (default: a
    row's slots). row_chunk: the most a row reads in one call (default and at most: its slots).
    stage: the model's Stage to run on (its link to the other ranks, its graphs).
    compile, cuda_graphs: decode.Runner's (the fast path on CUDA).
    cache: run in this cache instead of one of its own (stream's: a Stage's spare cache, or
    a chat's; the caller has begun it on the stage), on its first max_batch rows (default:
    all); max_context is what its rows hold.
    buckets: decode steps on the smallest bucket of rows (1, 2, 4, ...) holding the busy
    ones, a graph each (a server's); False, on every row of the cache, one graph
    (stream's: a call must not capture or compile again when its batch thins out).
    chunk_graphs: chunk calls whose rows read in place from a graph per bucket of tokens
    (decode.Runner's; True: padded to the bucket even where no graph is, the tests on the
    CPU); default: with buckets, where graphs are (a one-shot run would wait for captures
    and kernels it uses once).
    warm_up: a dict into which the Runners add the seconds of what runs once per shape (decode.Runner).
    """

    def __init__(
        self,
        model: Transformer,
        *,
        max_batch: Optional[int] = None,
        max_context: int = 32768,
        chunk_size: Optional[int] = None,
        row_chunk: Optional[int] = None,
        stage: Optional[Stage] = None,
        compile: bool = False,
        cuda_graphs: Optional[bool] = None,
        cache: Optional[RotatingBufferCache] = None,
        buckets: bool = True,
        chunk_graphs: Optional[bool] = None,
        warm_up: Optional[dict[str, float]] = None,
    ):
        check_model(model)
        if stage is None:
            stage = Stage(model)
        elif not isinstance(stage, Stage) or stage.model is not model:
            raise MistralError("stage must be a Stage of this model (Stage(model))")
        self.model, self.stage, self.buckets, self.timings = model, stage, buckets, warm_up
        self.link = stage.link  # (the stage's property checks the model's device and dtype, which stay while an engine runs)
        if chunk_graphs is None:
            chunk_graphs = None if buckets else False  # (the Runner's None: where graphs are)
        self.fast = dict(compile=compile, cuda_graphs=cuda_graphs, chunk_graphs=chunk_graphs)
        if cache is None:
            rows = model.args.max_batch_size if max_batch is None else check_positive_int(max_batch, "max_batch")
            self.max_context = check_positive_int(max_context, "max_context")
            try:
                self.cache = model.make_cache(rows, max_context)
            except CacheTooLarge as e:
                raise MistralError(f"{e}: lower max_context ({max_context}) or max_batch ({rows})") from None
            stage.begin([self.cache])
        else:
            self.cache, rows = cache, cache.max_batch_size if max_batch is None else check_positive_int(max_batch, "max_batch")
            if rows > cache.max_batch_size:
                raise MistralError(f"max_batch={rows} is more than the given cache's {cache.max_batch_size} rows")
            # A row that rolls (W slots of a windowed model) runs on without end; another holds `size` tokens.
            rolls = cache.sliding_window is not None and cache.size >= cache.sliding_window
            self.max_context = sys.maxsize if rolls else cache.size
        self.chunk = self.cache.size if chunk_size is None else check_positive_int(chunk_size, "chunk_size")
        self.row_chunk = self.cache.size if row_chunk is None else min(check_positive_int(row_chunk, "row_chunk"), self.cache.size)
        self.rows: list[Optional[Request]] = [None] * rows
        self.waiting: deque[Request] = deque()
        self.arrivals = itertools.count()
        # Each row's last sampled token, on the device: the next call feeds it before the host has read it.
        self.last = torch.zeros(rows, dtype=torch.long, device=model.device)
        self.pending: Optional[Sampled] = None  # the last call's sampling, for `_read` in the next
        # Free rows where a decode step wrote a placeholder since their request ended: they
        # hold what that request left no more (`stream` empties them before handing a cache back).
        self.overwritten: set[int] = set()
        # Per bucket of rows, its Runner (asking the stage compares every weight's address with the graph's).
        self.runners: dict[int, Runner] = {}

    @property
    def busy(self) -> bool:
        """Whether a request runs or waits."""
        return bool(self.waiting) or any(r is not None for r in self.rows) or self.pending is not None

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    def warm_up(self) -> float:
        """Run what a first call of each kind does once (on CUDA: capture the decode graph of every
        bucket of rows and the chunk call's of every bucket of tokens, compile and tune the
        kernels of a chunk call beside decoding rows) before any request waits for it: a few
        placeholder requests per bucket of rows, then every row emptied. Returns the seconds it
        took. On several ranks every rank calls it (they run the same calls). A chunk call that
        does not read in place (past the last bucket, or a full row reading several tokens) runs
        eagerly, its kernels those of the calls warmed up but PyTorch's attention of a prompt."""
        if self.busy:
            raise MistralError("warm_up runs before any request: this engine has requests")
        start = time.perf_counter()
        n = 1
        while True:
            # n requests, the last a call later: a chunk call beside a decoding row, then decode steps on n rows.
            for i in range(n):
                self.submit(Request([1], max_tokens=min(3, self.max_context)))
                if i == n - 2 or n == 1:
                    self.step()
            while self.busy:
                self.step()
            if n == len(self.rows):
                break
            n = min(2 * n, len(self.rows))
        self._runner(len(self.rows)).capture_chunks(self.chunk + len(self.rows))
        self.cache.reset()
        return time.perf_counter() - start

    def submit(self, request: Request) -> Request:
        """Queue a request (after `check`). max_tokens=0 finishes at once."""
        self.check(request)
        request.arrival = next(self.arrivals)
        if request.seed is not None:
            request.generator = torch.Generator(self.model.device).manual_seed(request.seed)
        if request.max_tokens == 0:
            request.finish_reason = "length"
        else:
            self.waiting.append(request)
        return request

    def resume(self, request: Request, row: int) -> Request:
        """Run `request` in `row`, whose cache holds the first cache.lengths[row] tokens of its prompt
        (a chat's earlier turns): only the rest is read. The row must be free, and a token must be left to read."""
        if not is_int(row) or not 0 <= row < len(self.rows):
            raise MistralError(f"row must be one of the engine's rows 0..{len(self.rows) - 1}, got {row!r}")
        held = self.cache.lengths[row]
        if self.rows[row] is not None:
            raise MistralError(f"row {row} of the engine's cache runs a request")
        if len(request.prompt) <= held:
            raise MistralError(f"the prompt has {len(request.prompt)} tokens, but row {row} of the cache already holds {held}: nothing new to read")
        self.submit(request)
        if not request.finished:
            self.waiting.remove(request)
            self.rows[row], request.row, request.read = request, row, held
            self.overwritten.discard(row)
        return request

    def check(self, request: Request) -> None:
        """A MistralError naming what is wrong with the request, if anything; it changes nothing."""
        if not isinstance(request, Request):
            raise MistralError(f"request must be an engine.Request, got {type(request).__name__}")
        r = request
        check_options([r.prompt], self.model.args.vocab_size, max_tokens=r.max_tokens, temperature=r.temperature,
                      top_p=r.top_p, chunk_size=None, seed=r.seed)  # fmt: skip
        if r.eos_id is not None and not is_int(r.eos_id):
            raise MistralError(f"eos_id must be a token id (an int) or None, got {r.eos_id!r}")
        if not is_int(r.top_logprobs) or not 0 <= r.top_logprobs <= MAX_TOP_LOGPROBS:
            raise MistralError(f"top_logprobs must be an int in 0..{MAX_TOP_LOGPROBS}, got {r.top_logprobs!r}")
        # The last token sampled is never fed: a request reaches prompt + max_tokens - 1 positions.
        if len(r.prompt) + r.max_tokens - 1 > self.max_context:
            raise MistralError(
                f"the prompt ({len(r.prompt)} tokens) and max_tokens={r.max_tokens} reach {len(r.prompt) + r.max_tokens - 1} "
                f"tokens, past max_context={self.max_context}"
            )
        if r.row is not None or r.finished or r.sampled:
            raise MistralError("this request was submitted before: make a new one")

    def finish(self, request: Request, reason: str = "cancelled") -> None:
        """End a request (a client gone, a stop string seen): its row is free for the next call."""
        if request.finished:
            return
        request.finish_reason = reason
        if request.row is None:
            self.waiting.remove(request)
        else:
            self.rows[request.row] = None
            request.row = None

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """One forward call. Returns the requests whose tokens the host read in it: those that
        sampled in the call before (or finished there on eos), unless they ended since.

        The host reads a call's tokens during the next one: it launches call s + 1 (decoding
        rows feed their last tokens from the device), then waits for call s's tokens alone,
        and does the bookkeeping while call s + 1 runs. Reading them at once left the GPU idle
        for the host's work after every call (about a millisecond a step at 32 rows). So a
        request that produced eos in call s is fed once more in call s + 1 (that token is
        dropped), and its row is free from call s + 2 on.

        A rank that does not sample receives the sampler's tokens of call s at the start of call
        s + 1, not at the end of call s: a pipeline's first stage runs another micro-batch's call
        (another engine's) meanwhile, and a follower of a tensor-parallel server its next plan."""
        self._receive()
        for b, r in enumerate(self.rows):
            if not self.waiting:
                break
            if r is None:
                self.rows[b] = r = self.waiting.popleft()
                r.row = b
                self.cache.reset(b)
                self.overwritten.discard(b)
        # Every running request, but those that have sampled max_tokens (their last tokens are being read).
        fed = [(b, r) for b, r in enumerate(self.rows) if r is not None and r.sampled < r.max_tokens]
        launched = None
        if fed:
            if all(r.read == len(r.prompt) for _, r in fed):
                sampling, logits = fed, self._decode(fed)
            else:
                sampling, logits = self._chunk(fed)
            launched = self._sample([r for _, r in sampling], logits)
        pending, self.pending = self.pending, launched
        return [] if pending is None else self._read(pending)

    def drain(self) -> None:
        """Before the engine is let go with a call's tokens in flight (a stream left early or
        failed, a server closing): a rank that does not sample has its link receive them before
        its next tokens (another engine's), so that each receive pairs with its own send."""
        p = self.pending
        if p is not None and p.results is None:
            self.link.skip_tokens(len(p.requests))
            self.pending = None

    def _runner(self, n: int) -> Runner:
        """The Runner on rows 0..n-1: the stage's (its graphs serve the next engine on this cache), asked once."""
        runner = self.runners.get(n)
        if runner is None:
            runner = self.runners[n] = self.stage.runner(self.cache, n, **self.fast)
            if self.timings is not None:
                runner.warm_up = self.timings
        return runner

    def _decode(self, fed: list[tuple[int, Request]]) -> Optional[torch.Tensor]:
        """A decode step on the smallest bucket of rows holding the fed ones (every row without buckets): their logits [len(fed), V]
        (on the last pipeline stage; None elsewhere)."""
        n = len(self.rows)
        if self.buckets:
            n = min(n, 1 << fed[-1][0].bit_length())  # rows 0..n-1, n a power of 2 > the last fed row
        feeds = {b for b, _ in fed}
        # A placeholder reads its row's keys as a real row does: a free row still holding a
        # finished request's thousand keys costs that request's reads in every step (about
        # 0.13 MB a key for Mistral 7B). It starts over once it holds PLACEHOLDER_KEYS (a
        # reset restarts the graph's inputs, a small copy: so not in every step), or at its
        # last slot (a window-less row cannot roll).
        for b in range(n):
            if b not in feeds:
                self.overwritten.add(b)
                if self.cache.lengths[b] >= min(PLACEHOLDER_KEYS, self.cache.size):
                    self.cache.reset(b)  # free, or done sampling: its keys are read no more
        logits = self.stage.forward(self._runner(n), self.last[:n])
        if logits is None or len(fed) == n:  # (every row fed: the logits are theirs, in order)
            return logits
        return logits[to_device([b for b, _ in fed], logits.device)]

    def _chunk(self, fed_rows: list[tuple[int, Request]]) -> tuple[list[tuple[int, Request]], Optional[torch.Tensor]]:
        """A chunk call: the decoding rows' last tokens and up to `chunk` prompt tokens, oldest prompts first.
        Returns the rows that sample (decoding, or a prompt read whole) and their logits."""
        fed: dict[int, list[int]] = {b: [0] for b, r in fed_rows if r.read == len(r.prompt)}  # the device's last token
        decoding = sorted(fed)
        budget = self.chunk
        for b, r in sorted(((b, r) for b, r in fed_rows if b not in fed), key=lambda item: item[1].arrival):
            if budget == 0:
                break
            fed[b] = r.prompt[r.read : r.read + min(budget, self.row_chunk)]
            budget -= len(fed[b])
        seqlens = [len(fed.get(b, ())) for b in range(max(fed) + 1)]
        ids, wanted, sampling, last_at = [], [], [], []
        for b, tokens in sorted(fed.items()):
            if b in decoding:
                last_at.append(len(ids))
            ids += tokens
            r = self.rows[b]
            assert r is not None
            if r.read == len(r.prompt) or r.read + len(tokens) == len(r.prompt):
                wanted.append(len(ids) - 1)
                sampling.append((b, r))
        device = self.last.device
        ids_on_device = to_device(ids, device, torch.long)
        if decoding:
            ids_on_device[to_device(last_at, device)] = self.last[to_device(decoding, device)]
        logits = self.stage.forward(self._runner(len(self.rows)), ids_on_device, seqlens, wanted)
        for b, tokens in fed.items():
            r = self.rows[b]
            assert r is not None
            r.read = min(r.read + len(tokens), len(r.prompt))  # a decoding row's token is not the prompt's
        return sampling, logits

    def _sample(self, requests: list[Request], logits: Optional[torch.Tensor]) -> Optional["Sampled"]:
        """Launch each request's draw from its row of logits [R, V], on the rank that samples (the
        greedy ones together, the others in one pass, each with its own generator); the other
        ranks receive the tokens at the start of the next step (`_receive`). Each row's last token
        is kept on the device for the next call, and the results start on their way to the host:
        `_read` takes them (after the next call is launched)."""
        if not requests:
            return None
        link, top = self.link, None
        device = self.last.device
        if link.samples:
            assert logits is not None
            greedy = [i for i, r in enumerate(requests) if r.temperature == 0]
            if len(greedy) in (0, len(requests)):  # one kind: no rows to pick out and put back
                tokens, logprobs, ok = self._draw(logits, requests)
            else:
                tokens = torch.empty(len(requests), dtype=torch.long, device=device)
                logprobs = torch.empty(len(requests), device=device)
                finite = []  # each kind's flag, read with the tokens
                for group in (greedy, [i for i, r in enumerate(requests) if r.temperature > 0]):
                    rows = to_device(group, device)
                    tokens[rows], logprobs[rows], flag = self._draw(logits[rows], [requests[i] for i in group])
                    finite.append(flag)
                ok = torch.stack(finite).all()
            if link.layout.world_size > 1:  # non-finite logits reach the other ranks as token -1: every rank fails the same read
                link.send_tokens(torch.where(ok, tokens, -1), logprobs)
            k = max(r.top_logprobs for r in requests)
            if k:
                values, indices = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
                top = torch.stack([indices.double(), values.double()]).to("cpu", non_blocking=True)
        rows = [r.row for r in requests]  # (a request may end before the next step receives its token)
        for r in requests:
            r.sampled += 1
        if not link.samples:
            return Sampled(requests, rows)  # received at the start of the next step
        return self._results(requests, rows, tokens, logprobs, ok, top)

    @staticmethod
    def _draw(logits: torch.Tensor, requests: list[Request]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sample_step for requests all greedy, or all sampled: those together, each at its own
        temperature and top_p, with its own generator."""
        if requests[0].temperature == 0:
            return sample_step(logits, 0.0, 1.0, None)
        device = logits.device
        temperatures = to_device([r.temperature for r in requests], device, torch.float32)
        top_ps = to_device([r.top_p for r in requests], device, torch.float32)
        generators = [r.generator for r in requests]
        # Unseeded, all draw from PyTorch's generator at once: a generator per row is a kernel per row.
        return sample_step(logits, temperatures, top_ps, None if all(g is None for g in generators) else generators)

    def _receive(self) -> None:
        """On a rank that does not sample: the sampler's tokens of the last call, if not received yet."""
        p = self.pending
        if p is not None and p.results is None:
            tokens, logprobs = self.link.recv_tokens(len(p.requests))
            self.pending = self._results(p.requests, p.rows, tokens, logprobs, (tokens >= 0).all(), None)

    def _results(self, requests: list[Request], rows: list[int], tokens: torch.Tensor, logprobs: torch.Tensor,
                 ok: torch.Tensor, top: Optional[torch.Tensor]) -> "Sampled":  # fmt: skip
        """Keep each row's token on the device for the next call, and start the results on their way to the host."""
        device = self.last.device
        every = rows == list(range(len(rows)))  # rows 0..n-1 in order (a stream's decode step): no index to copy over
        self.last[slice(len(rows)) if every else to_device(rows, device)] = tokens.to(device).clamp(min=0)  # an id, even then
        # One copy to the host, not waiting for anything (pinned memory), and an event that says when it is there.
        results = torch.stack([tokens.double(), logprobs.double(), ok.double().expand(len(requests))]).to("cpu", non_blocking=True)
        done = None
        if device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return Sampled(requests, rows, results, top, done)

    def _read(self, sampled: "Sampled") -> list[Request]:
        """The host's bookkeeping of a call's tokens (after the next call is launched): append them;
        end a request on eos or max_tokens. Returns the requests it read for: one ended meanwhile
        (cancelled, or on eos the call before) drops its token and is left out."""
        requests, results, top, done = sampled.requests, sampled.results, sampled.top, sampled.done
        assert results is not None
        if done is not None:
            done.synchronize()  # that call's results only, not the call just launched
        tokens, logprobs, ok = results.tolist()
        if not all(ok) and any(not r.finished for r in requests):  # (ended by an earlier failure: nothing to say)
            raise MistralError(NON_FINITE)
        read = []
        for i, (r, token, logprob) in enumerate(zip(requests, tokens, logprobs)):
            if r.finished:
                continue
            read.append(r)
            if token == r.eos_id:
                r.eos_logprob = logprob
                self.finish(r, "stop")
                continue
            r.tokens.append(int(token))
            r.logprobs.append(logprob)
            if r.top_logprobs and top is not None:  # the sampling rank's alone
                r.top.append(list(zip(top[0, i, : r.top_logprobs].long().tolist(), top[1, i, : r.top_logprobs].tolist())))
            if len(r.tokens) == r.max_tokens:
                self.finish(r, "length")
        return read
