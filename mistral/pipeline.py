"""Pipeline parallelism: the layers split across processes, one stage per rank.

Rank r of P owns a contiguous group of layers (5 layers on 3 ranks: 0-1, 2-3, 4);
rank 0 also embeds the tokens, the last rank applies the final norm and output.
The activations h [T, D] of a forward call travel 0 -> 1 -> ... -> P-1 as
point-to-point messages (NCCL between GPUs, gloo between CPU processes), and each
rank's KV cache holds its own layers only. Launch one process per rank with
torchrun; `init` joins the process group torchrun describes.

Micro-batched generation (GPipe, inference only). One batch going through P = 2
stages keeps one rank busy at a time; each [ab] is one decode step of the batch:

    rank 0   [ab]      [ab]      [ab]
    rank 1       [ab]      [ab]      [ab]         time ->

Split the batch into micro-batches a and b, each with its own cache: rank 0 runs
b while rank 1 runs a, and a's next step starts once its sampled tokens are back:

    rank 0   [a][b][a][b][a][b]
    rank 1      [a][b][a][b][a][b]

Every rank runs the same loop over the same micro-batches, so sends and receives
pair up in order. Prefill chunks need no tokens back and flow without waiting.

Only the last rank has logits. It samples and sends the tokens (with their
log-probabilities) to every other rank, rather than sending the logits for each
rank to sample alike: [B] numbers instead of [B, V], and one source of truth,
where seeded sampling on each rank would agree only if every rank's random
number generator and sampling kernel behaved bit for bit the same (not so
between different GPU models, or a GPU and a CPU). Each rank then decides from
the same tokens when a micro-batch has finished, so no rank waits for a message
that never comes.

The tokens travel in a second process group: NCCL runs one communicator's
operations in order on one stream, so on a single communicator rank 0's receive
of a's tokens, queued behind its send of b, could wait forever for rank 1, which
takes b only after it has sent a's tokens.

Decoding is bound by reading the weights: a micro-batch reads a rank's weights
as often as the whole batch would, so micro-batches speed up prefill (compute
bound) far more than decoding.
"""

import atexit
import functools
import os
import sys
import traceback
from collections import deque
from typing import TYPE_CHECKING, Callable, Iterator, Optional, Sequence, Union

import torch
import torch.distributed as dist

from mistral.cache import RotatingBufferCache, prefill_calls
from mistral.errors import MistralError

if TYPE_CHECKING:
    from mistral.model import Transformer

# logits [B, V] -> (tokens [B], logprobs [B]): generate's sampling, with its options bound.
Pick = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def split(n: int, parts: int, index: int) -> range:
    """The index-th of `parts` contiguous ranges covering 0..n-1, as even as possible, larger first."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def _check_num_ranks(num_ranks: int) -> None:
    if not isinstance(num_ranks, int) or isinstance(num_ranks, bool) or num_ranks < 1:
        raise MistralError(f"num_pipeline_ranks must be a positive integer, got {num_ranks!r}")


def layer_range(n_layers: int, rank: int, num_ranks: int) -> range:
    """Global indices of the layers that rank `rank` of `num_ranks` owns."""
    _check_num_ranks(num_ranks)
    if num_ranks > n_layers:
        raise MistralError(
            f"num_pipeline_ranks={num_ranks} exceeds the model's n_layers={n_layers}: each rank needs at least one layer"
        )
    if not isinstance(rank, int) or not 0 <= rank < num_ranks:
        raise MistralError(f"pipeline_rank must be in 0..{num_ranks - 1}, got {rank!r}")
    return split(n_layers, num_ranks, rank)


def check_process_group(rank: int, num_ranks: int) -> None:
    """A pipelined model talks over the default process group: num_ranks processes, this one `rank`."""
    launch = f"start one process per rank: torchrun --nproc-per-node {num_ranks} ..."
    if not dist.is_initialized():
        raise MistralError(
            f"num_pipeline_ranks={num_ranks} needs a torch.distributed process group: {launch}, "
            f"and call mistral.pipeline.init({num_ranks}) first"
        )
    if dist.get_world_size() != num_ranks:
        raise MistralError(f"num_pipeline_ranks={num_ranks} but the process group has {dist.get_world_size()} processes: {launch}")
    if dist.get_rank() != rank:
        raise MistralError(f"pipeline_rank={rank} but this process is rank {dist.get_rank()} of the process group")


def init(num_pipeline_ranks: int, device: Optional[str] = None) -> tuple[int, torch.device]:
    """Join the process group described by torchrun's environment; return (rank, device).

    device: None takes cuda:LOCAL_RANK (NCCL) when CUDA is available, else the CPU
    (gloo); "cuda" or "cpu" chooses. Each process of a node takes its own GPU. A
    process group made here is destroyed at exit.
    """
    P = num_pipeline_ranks
    _check_num_ranks(P)
    missing = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise MistralError(
            f"num_pipeline_ranks={P} runs one process per rank, started by torchrun ({missing[0]} is not set): "
            f"torchrun --nproc-per-node {P} -m mistral generate ... --num_pipeline_ranks {P}"
        )
    if int(os.environ["WORLD_SIZE"]) != P:
        raise MistralError(
            f"num_pipeline_ranks={P} but torchrun started {os.environ['WORLD_SIZE']} processes (nodes x --nproc-per-node)"
        )
    try:
        use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    except RuntimeError:
        raise MistralError(f"device must be cpu or cuda, got {device!r}") from None
    if use_cuda and not torch.cuda.is_available():
        raise MistralError(f"device {device!r}: no CUDA GPU is available")
    if not use_cuda:
        local = torch.device("cpu")
    else:
        local_rank = int(os.environ["LOCAL_RANK"])
        if local_rank >= torch.cuda.device_count():
            raise MistralError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}")
        local = torch.device("cuda", local_rank)
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=local if use_cuda else None)
        # NCCL warns at exit about a group left open, which may hide pending operations.
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return dist.get_rank(), local


def silence() -> None:
    """Ranks > 0 of a command-line run, whose results rank 0 prints: drop their output,
    but let a crash still show its traceback."""
    stderr = sys.stderr
    sys.excepthook = lambda kind, value, tb: traceback.print_exception(kind, value, tb, file=stderr)
    sys.stdout = sys.stderr = open(os.devnull, "w")


@functools.cache
def _tokens_group(world: dist.ProcessGroup) -> dist.ProcessGroup:
    """All ranks again, on communicators of their own (see the module docstring)."""
    # Drop the group at exit, before the default group is destroyed (exit handlers run
    # last registered first). Left in this cache, gloo's destructor ran in interpreter
    # teardown and now and then aborted a finished run ("terminate called without an
    # active exception"), also where the caller, not init(), made the default group.
    atexit.register(_tokens_group.cache_clear)
    return dist.new_group(list(range(dist.get_world_size(world))))


class _Link:
    """This rank's messages: activations to the next rank, sampled tokens from the last."""

    def __init__(self, model: "Transformer"):
        self.rank, self.size = model.pipeline_rank, model.num_pipeline_ranks
        self.device, self.dtype, self.dim = model.device, model.dtype, model.args.dim
        self.tokens_group = _tokens_group(dist.group.WORLD)
        self.sends: deque[dist.Work] = deque()

    def recv_activations(self, n_tokens: int) -> torch.Tensor:
        h = torch.empty(n_tokens, self.dim, device=self.device, dtype=self.dtype)
        dist.recv(h, self.rank - 1)
        return h

    def send_activations(self, h: torch.Tensor) -> None:
        self._post(dist.isend(h, self.rank + 1))

    def send_tokens(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        # One message, not two: token ids are exact in float64.
        message = torch.stack([tokens.double(), logprobs.double()])
        for r in range(self.size - 1):
            self._post(dist.isend(message, r, group=self.tokens_group))

    def recv_tokens(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        message = torch.empty(2, n, device=self.device, dtype=torch.float64)
        dist.recv(message, self.size - 1, group=self.tokens_group)
        return message[0].long(), message[1].float()

    def _post(self, work: dist.Work) -> None:
        # Sends are asynchronous, so rank 0 moves on to the next micro-batch at once.
        # A running pipeline has long received all but the last few: bound the backlog.
        self.sends.append(work)
        while len(self.sends) > 2 * self.size:
            self.sends.popleft().wait()

    def flush(self) -> None:
        while self.sends:
            self.sends.popleft().wait()


def _stage(
    model: "Transformer",
    input_ids: Union[torch.Tensor, Sequence[int]],
    seqlens: Sequence[int],
    cache: Optional[RotatingBufferCache],
    link: _Link,
) -> Optional[torch.Tensor]:
    """This rank's part of one forward call; the last rank returns the logits [T, V]."""
    if model.pipeline_rank == 0:
        h = model.tok_embeddings(torch.as_tensor(input_ids, device=model.device))
    else:
        h = link.recv_activations(sum(seqlens))
    h = model.run_layers(h, seqlens, cache)
    if model.pipeline_rank < model.num_pipeline_ranks - 1:
        link.send_activations(h)
        return None
    return model.output(model.norm(h)).float()


def forward(
    model: "Transformer", input_ids: torch.Tensor, seqlens: Sequence[int], cache: Optional[RotatingBufferCache]
) -> torch.Tensor:
    """Transformer.forward across the ranks: every rank returns the same logits [T, V]."""
    link = _Link(model)
    logits = _stage(model, input_ids, seqlens, cache, link)
    if logits is None:
        logits = torch.empty(sum(seqlens), model.args.vocab_size, device=model.device, dtype=torch.float32)
    dist.broadcast(logits, model.num_pipeline_ranks - 1)
    link.flush()
    return logits


class _MicroBatch:
    """A slice of the batch with its own cache, and how far its generation has come."""

    def __init__(self, prompts: list[list[int]], cache: RotatingBufferCache, chunk: int):
        self.prompts, self.cache = prompts, cache
        self.calls = prefill_calls(prompts, chunk)  # the same calls as generate.stream's
        self.prefilled = 0  # prefill calls already run
        self.last_logits: list[Optional[torch.Tensor]] = [None] * len(prompts)  # last rank only
        self.tokens: list[torch.Tensor] = []  # one [b] per step
        self.logprobs: list[torch.Tensor] = []
        self.done: Optional[torch.Tensor] = None  # [b], the sequence has produced eos
        self.unseen = False  # the last call sampled, and this rank has not received the tokens yet
        self.finished = False

    def record(self, tokens: torch.Tensor, logprobs: torch.Tensor, eos_id: Optional[int]) -> None:
        self.tokens.append(tokens)
        self.logprobs.append(logprobs)
        if eos_id is not None:
            self.done = (tokens == eos_id) if self.done is None else self.done | (tokens == eos_id)

    def stopped(self, max_tokens: int) -> bool:
        # The same rule as generate.stream's: max_tokens steps, or eos everywhere.
        return len(self.tokens) == max_tokens or (self.done is not None and bool(self.done.all()))

    def run(self, model: "Transformer", link: _Link) -> tuple[bool, Optional[torch.Tensor]]:
        """One forward call on this rank: a prefill chunk of every prompt, or a decode step.

        Returns whether the call ends in sampling and, on the last rank, the logits [b, V] to sample.
        """
        if self.prefilled == len(self.calls):
            return True, _stage(model, self.tokens[-1], [1] * len(self.prompts), self.cache, link)
        call = self.calls[self.prefilled]
        logits = _stage(model, call.input_ids, call.seqlens, self.cache, link)
        self.prefilled += 1
        if logits is not None:
            for b, row in call.ends.items():
                self.last_logits[b] = logits[row]
        if self.prefilled < len(self.calls):
            return False, None
        return True, None if logits is None else torch.stack(self.last_logits)  # type: ignore[arg-type]


def default_micro_batches(num_ranks: int, batch_size: int) -> int:
    """One micro-batch per rank keeps every rank busy; a single rank or sequence gains nothing."""
    return min(num_ranks, batch_size)


def stream(
    encoded_prompts: list[list[int]],
    model: "Transformer",
    *,
    max_tokens: int,
    pick: Pick,
    chunk_size: Optional[int],
    eos_id: Optional[int],
    micro_batches: Optional[int],
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """generate.stream's loop across the ranks: every rank yields the same (tokens [B], logprobs [B]).

    A micro-batch stops once all its sequences have produced eos; its later tokens are
    eos (log-probability 0) until the other micro-batches stop too.
    """
    B, P = len(encoded_prompts), model.num_pipeline_ranks
    if micro_batches is None:
        micro_batches = default_micro_batches(P, B)
    if not isinstance(micro_batches, int) or isinstance(micro_batches, bool) or micro_batches < 1:
        raise MistralError(f"micro_batches must be a positive integer, got {micro_batches!r}")
    M = min(micro_batches, B)  # a last, short batch of generate() may have fewer prompts
    # Every cache gets the whole batch's length, so chunks split prompts as generate.stream's do.
    max_seq_len = max(len(p) for p in encoded_prompts) + max_tokens
    mbs = []
    for i in range(M):
        rows = split(B, M, i)
        cache = model.make_cache(len(rows), max_seq_len)
        mbs.append(_MicroBatch(encoded_prompts[rows.start : rows.stop], cache, chunk_size or cache.size))

    link = _Link(model)
    yielded = 0
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
            samples, logits = mb.run(model, link)
            if logits is not None:
                tokens, logprobs = pick(logits)
                link.send_tokens(tokens, logprobs)
                mb.record(tokens, logprobs, eos_id)
            elif samples:
                mb.unseen = True
        # Step s is complete once every micro-batch still running has its tokens.
        running = [len(mb.tokens) for mb in mbs if not mb.finished]
        ready = min(running) if running else max(len(mb.tokens) for mb in mbs)
        for step in range(yielded, ready):
            yield _gather(mbs, step, eos_id)
        yielded = ready
    link.flush()


def _gather(mbs: list[_MicroBatch], step: int, eos_id: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, logprobs = [], []
    for mb in mbs:
        if step < len(mb.tokens):
            tokens.append(mb.tokens[step])
            logprobs.append(mb.logprobs[step])
        else:  # stopped early: every sequence has produced eos
            assert eos_id is not None
            tokens.append(torch.full_like(mb.tokens[-1], eos_id))
            logprobs.append(torch.zeros_like(mb.logprobs[-1]))
    return torch.cat(tokens), torch.cat(logprobs)
