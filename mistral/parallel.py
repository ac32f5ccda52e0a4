"""Several processes, one model: pipeline stages and tensor-parallel slices.

P x T processes run, started by `mistral` itself on one machine (mistral/launch.py) or
by torchrun. World rank r = p * T + t is pipeline stage p and
tensor rank t, so the T ranks of a stage are neighbours (one node), while stages may
span nodes. A stage is an ordinary `Transformer` that holds some of the layers, and of
each layer some of the heads (or experts); `Layout` says which, and nothing else in the
model knows about ranks (a MoeLayer knows which experts it holds, not why).

Pipeline (layers split). Stage p owns a contiguous group of layers (5 layers on 3
stages: 0-1, 2-3, 4); the first also embeds the tokens, the last applies the final
norm and output. Activations h [T, D] travel p -> p+1, rank t to rank t. One batch
keeps one stage busy at a time; micro-batches a and b (each with its own cache) keep
both busy, GPipe-style (generation.py runs the schedule; [ab] = one step):

    stage 0   [ab]      [ab]             stage 0   [a][b][a][b][a][b]
    stage 1       [ab]      [ab]         stage 1      [a][b][a][b][a][b]

Tensor parallelism (Megatron-LM, layers split). Each rank of a stage holds H/T
query heads and H_kv/T key-value heads of every layer, and F/T of the hidden units
of the feed-forward (of every expert). A linear layer split by output rows needs no
communication; the one after it, split by input columns, gives each rank a partial
sum, and one all-reduce adds them:

    x -> wq|wk|wv (my heads' rows) -> attention on my heads -> wo (my heads' columns) -> all-reduce -> + x
    h -> w1, w3 (my hidden rows) -> silu(w1 h) * w3 h -> w2 (my hidden columns) -> all-reduce -> + h

Expert parallelism (Mixtral, `Layout.expert_parallel`) splits a mixture of experts the
other way: each rank holds E/T whole experts, routes every token, and runs only its own:

    h -> gate (every expert) -> top-k -> my experts' tokens through them -> all-reduce -> + h

Two all-reduces per layer, nothing else. Each rank's cache holds its own KV heads,
and each rank reads only its own slices from the checkpoint. A decode step reads every
weight once, so splitting every layer over T GPUs reads the weights with T GPUs'
bandwidth at once; pipeline stages run one after another and cannot.

Sampling. Only the last stage has logits; its tensor rank 0 (the sampler) samples and
sends the tokens (with their log-probabilities) to every other rank: [B] numbers instead
of [B, V], and one source of truth, where seeded sampling on each rank would agree only
if every rank's random number generator behaved bit for bit the same. Every rank then
decides from the same tokens when a sequence has finished.

The tokens travel in a process group of their own: NCCL runs one communicator's
operations in order, so on a single communicator stage 0's receive of a's tokens,
queued behind its send of b, could wait forever for the last stage, which takes b
only after it has sent a's tokens.
"""

import atexit
import functools
import math
import os
import sys
import traceback
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from mistral.args import ModelArgs
from mistral.errors import MistralError, check_positive_int, is_int


def split(n: int, parts: int, index: int) -> range:
    """The index-th of `parts` contiguous ranges covering 0..n-1, as even as possible, larger first."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (index < extra))


def _launch(P: int, T: int) -> str:
    """How to start P x T processes by hand, for a script (the command line starts its own)."""
    flags = (f" --num_pipeline_ranks {P}" if P > 1 else "") + (f" --num_tensor_ranks {T}" if T > 1 else "")
    return f"torchrun --nproc-per-node {P * T} -m mistral generate MODEL_DIR ...{flags}"


@dataclass(frozen=True)
class Layout:
    """This process's place: pipeline stage `pipeline_rank` of P, tensor rank `tensor_rank` of T.

    expert_parallel: a Mixtral's tensor ranks hold whole experts, E / T each, instead of
    1/T of every expert's hidden units (attention is split by heads either way).
    """

    pipeline_rank: int = 0
    num_pipeline_ranks: int = 1
    tensor_rank: int = 0
    num_tensor_ranks: int = 1
    expert_parallel: bool = False

    def __post_init__(self) -> None:
        P = check_positive_int(self.num_pipeline_ranks, "num_pipeline_ranks")
        T = check_positive_int(self.num_tensor_ranks, "num_tensor_ranks")
        for name, rank, n in (("pipeline_rank", self.pipeline_rank, P), ("tensor_rank", self.tensor_rank, T)):
            if not is_int(rank) or not 0 <= rank < n:
                raise MistralError(f"{name} must be in 0..{n - 1}, got {rank!r}")
        if not isinstance(self.expert_parallel, bool):
            raise MistralError(f"expert_parallel must be True or False, got {self.expert_parallel!r}")

    @classmethod
    def of(
        cls,
        num_pipeline_ranks: int = 1,
        num_tensor_ranks: int = 1,
        pipeline_rank: Optional[int] = None,
        tensor_rank: Optional[int] = None,
        expert_parallel: bool = False,
    ) -> "Layout":
        """A layout; ranks not given are this process's place in the process group (world rank = p * T + t)."""
        P = check_positive_int(num_pipeline_ranks, "num_pipeline_ranks")
        T = check_positive_int(num_tensor_ranks, "num_tensor_ranks")
        if P * T == 1:
            return cls(pipeline_rank or 0, P, tensor_rank or 0, T, expert_parallel)
        rank = _check_process_group(P, T)
        layout = cls(
            rank // T if pipeline_rank is None else pipeline_rank, P, rank % T if tensor_rank is None else tensor_rank, T, expert_parallel
        )
        if layout.world_rank != rank:
            raise MistralError(f"this process is rank {rank} of the process group, not {layout.world_rank} (= pipeline_rank x T + tensor_rank)")
        return layout

    @property
    def world_size(self) -> int:
        return self.num_pipeline_ranks * self.num_tensor_ranks

    @property
    def world_rank(self) -> int:
        return self.pipeline_rank * self.num_tensor_ranks + self.tensor_rank

    @property
    def is_first(self) -> bool:
        return self.pipeline_rank == 0

    @property
    def is_last(self) -> bool:
        return self.pipeline_rank == self.num_pipeline_ranks - 1

    @property
    def sampler(self) -> int:
        """World rank that samples: the last stage's tensor rank 0."""
        return (self.num_pipeline_ranks - 1) * self.num_tensor_ranks

    def experts(self, num_experts: int) -> range:
        """Global indices of the experts this rank holds whole (expert parallelism), else all of them."""
        return split(num_experts, self.num_tensor_ranks, self.tensor_rank) if self.expert_parallel else range(num_experts)

    def layers(self, n_layers: int) -> range:
        """Global indices of this stage's layers."""
        if self.num_pipeline_ranks > n_layers:
            raise MistralError(
                f"num_pipeline_ranks={self.num_pipeline_ranks} exceeds the model's n_layers={n_layers}: "
                "each stage needs at least one layer"
            )
        return split(n_layers, self.num_pipeline_ranks, self.pipeline_rank)


def check_tensor_split(num_tensor_ranks: int, args: ModelArgs, expert_parallel: bool = False) -> None:
    """Tensor parallelism splits whole heads and equal hidden slices: T must divide them. wo and
    w2 are split by input columns, and int4's groups of columns must not straddle two ranks.
    Expert parallelism gives each rank E / T whole experts: T must divide E."""
    T = check_positive_int(num_tensor_ranks, "num_tensor_ranks")
    if expert_parallel:
        if args.moe is None:
            raise MistralError("expert_parallel splits a mixture of experts (Mixtral): this model has none")
        if args.moe.num_experts % T:
            raise MistralError(f"expert_parallel: num_tensor_ranks={T} does not divide the model's {args.moe.num_experts} experts")
    divided = {"n_kv_heads": args.n_kv_heads, "n_heads": args.n_heads}
    columns = {"wo": args.n_heads * args.head_dim}  # split by input columns
    if not expert_parallel:  # whole experts keep their hidden units whole
        divided["hidden_dim"] = columns["w2"] = args.hidden_dim
    for name, value in divided.items():
        if value % T:
            raise MistralError(f"num_tensor_ranks={T} does not divide the model's {name}={value}")
    group = args.quantization.group_size if args.quantization is not None else None
    for name, width in columns.items():
        if group is not None and width // T % group:
            raise MistralError(
                f"num_tensor_ranks={T} splits {name}'s {width} input columns into {width // T} a rank, "
                f"not a multiple of the int4 group_size={group}"
            )


def _check_process_group(P: int, T: int) -> int:
    """A parallel model talks over the default process group of P x T processes; returns this one's rank."""
    if not dist.is_initialized():
        raise MistralError(
            f"num_pipeline_ranks={P} x num_tensor_ranks={T} needs a torch.distributed process group of {P * T} processes: "
            f"start one process per rank ({_launch(P, T)}) and call mistral.parallel.init({P}, {T}) first"
        )
    if dist.get_world_size() != P * T:
        raise MistralError(
            f"num_pipeline_ranks={P} x num_tensor_ranks={T} needs {P * T} processes, "
            f"but the process group has {dist.get_world_size()}: {_launch(P, T)}"
        )
    return dist.get_rank()


def timeout() -> timedelta:
    """How long a rank waits in a collective for the others: a rank that stopped answering
    (killed, SIGSTOP, a hung GPU) then ends every rank with an error, not a wait forever.
    It bounds the slowest rank's head start too (loading the weights), so it is generous;
    MISTRAL_TIMEOUT_S sets it."""
    value = os.environ.get("MISTRAL_TIMEOUT_S", "60")
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= 10**6:  # nan and inf too: timedelta takes neither
        raise MistralError(f"MISTRAL_TIMEOUT_S must be a number of seconds in (0, 1e6], got {value!r}")
    return timedelta(seconds=seconds)


@contextmanager
def answered() -> Iterator[None]:
    """A message or collective between ranks, whose failure (a rank that stopped answering
    within `timeout()`, or died) is one line naming this rank, for every rank alike."""
    try:
        yield
    except (RuntimeError, dist.DistError) as e:  # gloo raises RuntimeError, NCCL DistBackendError
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise MistralError(
            f"rank {dist.get_rank()}: another rank did not answer within {timeout().total_seconds():g} s (MISTRAL_TIMEOUT_S) "
            f"or has ended: {detail}"
        ) from None


def init(num_pipeline_ranks: int = 1, num_tensor_ranks: int = 1, device: Optional[str] = None) -> tuple[Layout, torch.device]:
    """Join the process group described by torchrun's environment; return (this process's layout, device).

    device: None takes cuda:LOCAL_RANK (NCCL) when CUDA is available, else the CPU
    (gloo); "cuda" or "cpu" chooses. Each process of a node takes its own GPU. A
    process group made here is destroyed at exit.
    """
    P = check_positive_int(num_pipeline_ranks, "num_pipeline_ranks")
    T = check_positive_int(num_tensor_ranks, "num_tensor_ranks")
    missing = [v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise MistralError(f"{P * T} ranks run one process each, started by torchrun ({missing[0]} is not set): {_launch(P, T)}")
    if int(os.environ["WORLD_SIZE"]) != P * T:
        raise MistralError(
            f"num_pipeline_ranks={P} x num_tensor_ranks={T} needs {P * T} processes, "
            f"but torchrun started {os.environ['WORLD_SIZE']} (nodes x --nproc-per-node)"
        )
    try:
        use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):
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
    # Our point-to-point messages have process groups of their own (_groups), so NCCL's
    # warning that it serializes them with the rest of their group is moot.
    os.environ.setdefault("TORCH_NCCL_SHOW_EAGER_INIT_P2P_SERIALIZATION_WARNING", "false")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=local if use_cuda else None, timeout=timeout())
        # NCCL warns at exit about a group left open, which may hide pending operations.
        atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
    return Layout.of(P, T), local


def silence() -> None:
    """Ranks > 0 of a command-line run, whose results rank 0 prints: drop their output,
    but let a crash still show its traceback."""
    stderr = sys.stderr
    sys.excepthook = lambda kind, value, tb: traceback.print_exception(kind, value, tb, file=stderr)
    sys.stdout = sys.stderr = open(os.devnull, "w")


@functools.cache
def _groups(P: int, T: int) -> tuple[Any, Any, Any]:
    """(this rank's tensor-parallel group, the tokens group, the activations group).

    The last two hold all ranks, each on communicators of its own: NCCL serializes a
    point-to-point message with every other operation of its group.

    Every rank must create every group, in the same order. Dropped at exit, before the
    default group is destroyed (exit handlers run last registered first): left in this
    cache, gloo's destructor ran in interpreter teardown and now and then aborted a
    finished run ("terminate called without an active exception").
    """
    atexit.register(_groups.cache_clear)
    rank, tensor_group = dist.get_rank(), None
    for p in range(P):
        ranks = list(range(p * T, (p + 1) * T))
        group = dist.new_group(ranks, timeout=timeout())
        if rank in ranks:
            tensor_group = group
    every = list(range(P * T))
    return tensor_group, dist.new_group(every, timeout=timeout()), dist.new_group(every, timeout=timeout())


class _AllReduce:
    """The hook that sums a module's output over the tensor-parallel group.

    Decode's sums are tiny ([B, D]: 8 KB at batch 1), so what they cost is latency, 64
    of them per Mistral 7B step. On CUDA, one up to ONE_SHOT_MAX_BYTES goes through a
    one-shot all-reduce in symmetric memory: each GPU copies its part into a buffer its
    peers can read over NVLink, and one kernel sums all of them (no multicast). Larger
    ones (prefill), and gloo's on the CPU, go through the process group. Both run
    eagerly, also under torch.compile, and are captured into the CUDA graph like any kernel.
    """

    ONE_SHOT_MAX_BYTES = 1 << 20

    def __init__(self, group: Any):
        self.group = group
        self.buffers: dict[torch.dtype, Optional[torch.Tensor]] = {}  # None: symmetric memory refused

    def __call__(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        if output.is_cuda and output.nbytes <= self.ONE_SHOT_MAX_BYTES:
            buffer = self._buffer(output)
            if buffer is not None:
                out = torch.empty_like(output)
                view = buffer[: output.numel()].view_as(output)
                torch.ops.symm_mem.one_shot_all_reduce_copy_out(view, output, "sum", self.group.group_name, out)
                return out
        with answered():
            dist.all_reduce(output, group=self.group)
        return output

    def _buffer(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        # Made at the first sum of a dtype, by every rank of the group at once (the
        # rendezvous is collective): a prefill, never inside a graph capture.
        if x.dtype not in self.buffers:
            try:
                from torch.distributed import _symmetric_memory as symm_mem

                buffer = symm_mem.empty(self.ONE_SHOT_MAX_BYTES // x.element_size(), dtype=x.dtype, device=x.device)
                symm_mem.rendezvous(buffer, self.group.group_name)
                self.buffers[x.dtype] = buffer
            except (RuntimeError, ImportError, AttributeError):  # no peer access here: NCCL it is
                self.buffers[x.dtype] = None
        return self.buffers[x.dtype]


def add_all_reduces(blocks: list[nn.Module], layout: Layout) -> None:
    """Tensor parallelism's two sums per block: after attention (wo) and after the feed-forward (w2)."""
    reducer = _AllReduce(_groups(layout.num_pipeline_ranks, layout.num_tensor_ranks)[0])
    hook = torch.compiler.disable(lambda module, inputs, output: reducer(module, inputs, output))
    for block in blocks:
        for module in (block.attention, block.feed_forward):
            module.register_forward_hook(hook)


class Link:
    """This rank's messages: activations between stages, the sampler's tokens to every rank."""

    def __init__(self, layout: Layout, dim: int, device: torch.device, dtype: torch.dtype):
        self.layout, self.dim, self.device, self.dtype = layout, dim, device, dtype
        groups = _groups(layout.num_pipeline_ranks, layout.num_tensor_ranks) if layout.world_size > 1 else (None,) * 3
        _, self.tokens_group, self.activations_group = groups

    @property
    def samples(self) -> bool:
        return self.layout.world_rank == self.layout.sampler

    def recv_activations(self, n_tokens: int) -> torch.Tensor:
        h = torch.empty(n_tokens, self.dim, device=self.device, dtype=self.dtype)
        with answered():
            dist.recv(h, self.layout.world_rank - self.layout.num_tensor_ranks, group=self.activations_group)
        return h

    def send_activations(self, h: torch.Tensor) -> None:
        self._post(dist.isend(h, self.layout.world_rank + self.layout.num_tensor_ranks, group=self.activations_group))

    def send_tokens(self, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
        # One message, not two: token ids are exact in float64.
        message = torch.stack([tokens.double(), logprobs.double()])
        for r in range(self.layout.world_size):
            if r != self.layout.sampler:
                self._post(dist.isend(message, r, group=self.tokens_group))

    def recv_tokens(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        while _owed:  # an abandoned call's tokens, sent before these
            self._recv_message(_owed.popleft())
        message = self._recv_message(n)
        return message[0].long(), message[1].float()

    def skip_tokens(self, n: int) -> None:
        """The sampler's tokens for n rows of a call that nothing will read (a stream left early
        or failed): the next recv_tokens receives them first, without waiting for them now (on
        Ctrl-C the sampler may be gone)."""
        _owed.append(n)

    def _recv_message(self, n: int) -> torch.Tensor:
        message = torch.empty(2, n, device=self.device, dtype=torch.float64)
        with answered():
            dist.recv(message, self.layout.sampler, group=self.tokens_group)
        return message

    def share_logits(self, out: torch.Tensor, n_tokens: int, vocab_size: int) -> torch.Tensor:
        """After a whole forward call: every rank gets the sampler's logits [T, V]."""
        if self.layout.world_size == 1:
            return out
        if not self.layout.is_last:
            self.send_activations(out)
            out = torch.empty(n_tokens, vocab_size, device=self.device, dtype=torch.float32)
        with answered():
            dist.broadcast(out, self.layout.sampler)
        self.flush()
        return out

    def _post(self, work: Any) -> None:
        # Sends are asynchronous, so a stage moves on to the next micro-batch at once.
        # Never wait on one here: its receiver may post the receive only after a
        # collective that this rank has yet to join (the tokens of micro-batch m are
        # received just before m's next forward call, the engine's tokens at the start
        # of its next call). Keep each until it is done, beyond this Link's life: a send
        # whose work object is let go is cancelled, and never arrives.
        _sends.append(work)
        while _sends and _sends[0].is_completed():
            _sends.popleft()

    def flush(self) -> None:
        """Wait until every send of this process has arrived."""
        with answered():
            while _sends:
                _sends.popleft().wait()


_sends: deque[Any] = deque()  # this process's sends in flight, oldest first (Link._post)
_owed: deque[int] = deque()  # token messages sent to this rank and not received, by rows (Link.skip_tokens)
