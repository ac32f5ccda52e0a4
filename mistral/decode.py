"""Running the model fast on CUDA: compiled blocks, and one CUDA graph per decoding batch.

A batch-1 decode step of Mistral 7B reads every weight once (14.5 GB: 4.9 ms on an
H100) but runs ~15 kernels per layer, most of them tiny. Launched one by one from
Python, the launches take longer than the reads. So, on CUDA in half precision, a
`Runner` runs the model's own `Transformer.step` with two changes that leave the math
alone:

- `TransformerBlock.forward` is compiled by torch.compile, which fuses the pieces
  between the matmuls (norms, rotary, SwiGLU, residual adds) into a few kernels; at
  batch 1 the matrix-vector kernel (mistral/kernels.py) takes in SwiGLU, and for quantized
  weights the norms before wq|wk|wv and w1|w3. The cache update and attention stay
  eager (`model._cached_attention`), and so do the tensor-parallel all-reduces: hooks on the modules run as they do in eager mode.
  Prefill runs this way too.
- a decode step (embedding, the stage's blocks, logits) is captured once in a CUDA
  graph and replayed for every token. Its inputs live in static device buffers that
  the graph itself advances after each step (`cache.Decode.advance`): the
  tokens or activations, their positions, the cache slots they are written to, and
  the key lengths of the decode mask. Nothing in the step reads a device value on the
  host (the generation loop around it does, a step late, while the next step runs: the
  sampled tokens, to stop at eos, and whether the logits were finite). NCCL's
  all-reduces are captured with the rest.

A server's chunk calls (a prompt read beside rows that decode) are replayed from graphs
too, one per bucket of tokens (`CHUNK_BUCKETS`), where every row reads in place
(cache.InPlace): run eagerly, a chunk call of Mistral 7B took the host 71-74 ms to launch,
against about 20 ms of GPU work and 1 ms for a decode step's replay (an H100,
scripts/serve_bench.py), so the GPU idled for most of each.

Elsewhere (the CPU, float32) the Runner calls the same `step` uncompiled, eagerly.
"""

import functools
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from mistral import model as model_module
from mistral.attention import decode_kernel_runs
from mistral.cache import Decode, InPlace, RotatingBufferCache, Verify, reads_in_place
from mistral.kernels import chunk_tile
from mistral.masks import register_with_dynamo
from mistral.model import RunBlock, Transformer, TransformerBlock
from mistral.sampling import to_device


# When compiling the blocks pays back within one call: only when the decode steps it
# saves time in outweigh its cost. Measured on one H200, Mistral 7B at batch 1 (main at
# a0eadf4): compiled blocks made a step 4.1 ms where graphs of the eager blocks took 5.35,
# so 1.25 ms a step, 39 us per layer; the first compiled call took 4.9 s more with
# PyTorch's compile cache warm, about 20 s more on a fresh machine. So a one-shot
# `generate` of Mistral 7B would need over 4,000 new tokens to win back even a warm
# compile, and the default model (4 layers) over 30,000.
COMPILE_SAVES_S_PER_LAYER_STEP = 39e-6
COMPILE_COSTS_S = 4.9  # the warm cache's: the least a compile costs


def compile_pays(decode_steps: int, n_layers: int) -> bool:
    """Whether compiling the blocks saves more than it costs over `decode_steps` steps of a model of `n_layers`."""
    return decode_steps * n_layers * COMPILE_SAVES_S_PER_LAYER_STEP > COMPILE_COSTS_S


def fast_path_applies(model: Transformer) -> bool:
    """Whether compilation and graphs pay here: CUDA, xformers' kernels in half precision."""
    return (
        model.device.type == "cuda"
        and model.dtype in (torch.float16, torch.bfloat16)
        and model.attention_backend in ("auto", "xformers")
    )


@functools.cache
def compiled_block() -> RunBlock:
    register_with_dynamo()
    model_module._cached_attention = torch.compiler.disable(model_module._cached_attention)
    # One compiled function serves every layer: torch.compile lifts a module's
    # parameters to inputs rather than specialising on each module. It guards on the
    # modules' hooks too, so a hook added later recompiles rather than being skipped.
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    # Legitimate variants of one frame: each mask type (prefill, chunk, decode), with a
    # cache or without, each layer's own hooks (tensor parallelism), each model shape.
    # Past the default limit of 8 a frame silently runs eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 256)
    return torch.compile(TransformerBlock.forward)


_compiled: set[tuple] = set()  # the kinds of prefill call the compiled block has seen

# The token counts of a chunk call's graphs: a call of T tokens replays the smallest that holds
# it, its other tokens padding (each bucket about 1.5 times the last: at most a third of a
# call's matmul rows wasted). Past the last, a call runs eagerly: its matmuls take far
# longer than its launch.
CHUNK_BUCKETS = (64, 128, 256, 384, 512, 768, 1024, 1536, 2048)


def chunk_graphs_apply(model: Transformer) -> bool:
    """Whether a chunk call can be captured: the in-place attention kernel runs, and every
    piece of the call has static shapes. Not quantized weights: past
    kernels.QUANT_KERNEL_MAX_ROWS rows (all buckets but the first) they are turned into x's
    dtype per call, and quantized experts loop over their tokens; nor float16 experts, which
    loop past MATVEC_MAX_PAIRS."""
    moe = model.args.moe
    return (
        fast_path_applies(model)
        and decode_kernel_runs(model.device, model.dtype, model.args.head_dim, model.attention_backend)
        and model.args.quantization is None
        and (moe is None or model.dtype == torch.bfloat16)
    )


@dataclass
class ChunkCall:
    """A bucket's chunk call (Runner._chunk): its inputs, x and logits' rows (static tensors, filled
    per call) and, where graphs are, its graph and output (else None: it runs eagerly)."""

    inputs: InPlace
    graph: Optional[torch.cuda.CUDAGraph]
    x: torch.Tensor
    rows: torch.Tensor
    out: Optional[torch.Tensor]


class Runner:
    """Forward calls of one model (or pipeline stage) on one cache, rows 0..n_rows-1.

    prefill(x, seqlens) is model.step for cache.prepare(seqlens); decode(x) the same for
    one token per row, replayed from a graph captured at the first call; verify(x, n) for
    n tokens per row (speculative decoding), from a graph captured per n.

    compile, cuda_graphs: None uses graphs where they pay (`fast_path_applies`) and does not
    compile (`stream` decides by `compile_pays`); False turns each off, True on.
    chunk_graphs: prefill calls that want some rows' logits and read in place (an Engine's
    chunk calls, for a server) run on cache.InPlace inputs of a bucket of tokens, padded.
    None: from a graph per bucket where cuda_graphs and `chunk_graphs_apply`, else as
    `prefill` does (`capture_chunks` captures them before any request); True: also where
    no graph is captured, each bucket's inputs run eagerly (the tests, on the CPU); False: never.

    warm_up: seconds spent on what a first call of a shape does once, by kind: "compile"
    (the first call of a compiled block for a shape), "kernels" (the decode step's first,
    uncaptured run: Triton compiles and tunes its kernels, or loads them from its cache
    on disk) and "graph capture". A caller subtracts them from the phase they fell in.
    """

    def __init__(
        self,
        model: Transformer,
        cache: RotatingBufferCache,
        n_rows: int,
        *,
        compile: Optional[bool] = None,
        cuda_graphs: Optional[bool] = None,
        chunk_graphs: Optional[bool] = False,
    ):
        fast = fast_path_applies(model)
        compile = bool(compile)
        self.model, self.cache, self.n_rows = model, cache, n_rows
        self.weights = Runner.weights_of(model)
        self.run_block: RunBlock = compiled_block() if compile else TransformerBlock.__call__
        self.cuda_graphs = (fast if cuda_graphs is None else cuda_graphs) and model.device.type == "cuda"
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        # Per verify step's tokens a row: its inputs, graph, input and output (`verify`).
        self.verify_graphs: dict[int, tuple[Verify, torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.graph_lengths: list[int] = []  # the cache lengths that the graph's next replay reads
        captured = self.cuda_graphs and chunk_graphs_apply(model)
        # On CUDA the in-place attention is the Triton kernel's alone (half precision, its head sizes); elsewhere its PyTorch version.
        in_place = model.device.type != "cuda" or decode_kernel_runs(model.device, model.dtype, model.args.head_dim, model.attention_backend)
        self.chunk_graphs = (chunk_graphs is True and in_place) or (chunk_graphs is None and captured)
        # Per bucket: its inputs, graph (None: run eagerly), input, logits' rows and output
        # (`_chunk`); the graphs in one memory pool, as one replays at a time.
        self.chunks: dict[int, ChunkCall] = {}
        self.chunk_pool = torch.cuda.graph_pool_handle() if self.chunk_graphs and captured else None
        self.compiled = compile
        self.warm_up: dict[str, float] = {}  # an Engine hands each Runner its caller's (`stream`'s warm_up)

    @staticmethod
    def weights_of(model: Transformer) -> list[int]:
        """Where the model's weights are, which a captured graph reads."""
        return [p.data_ptr() for p in model.parameters()]

    def _book(self, kind: str, start: float) -> None:
        if self.model.device.type == "cuda":
            torch.cuda.synchronize(self.model.device)
        self.warm_up[kind] = self.warm_up.get(kind, 0.0) + time.perf_counter() - start

    def prefill(self, x: torch.Tensor, seqlens: Sequence[int], rows: Optional[Sequence[int]] = None) -> torch.Tensor:
        """model.step for cache.prepare(seqlens); on the last stage the logits of `rows` only, when given."""
        bucket = self._chunk_bucket(seqlens, rows)
        if bucket is not None:
            assert rows is not None
            return self._chunk(bucket, x, seqlens, rows)
        inputs = self.cache.prepare(seqlens)
        # The compiled block's first call of a kind of call compiles it: booked as such, with its
        # run. (A later new length may compile once more, until torch.compile makes it dynamic.)
        kind = (type(inputs), rows is None, repr(self.model.args)) if self.compiled else None
        start, first = time.perf_counter(), kind is not None and kind not in _compiled
        out = self.model.step(x, inputs, self.cache, self.run_block, rows)
        if first:
            _compiled.add(kind)
            self._book("compile", start)
        self.cache.advance(seqlens)
        return out

    @torch.inference_mode()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x: tokens [B] (first stage) or activations [B, D] -> logits [B, V] or activations, valid until the next call."""
        if not self.cuda_graphs:
            return self.prefill(x, [1] * self.n_rows)
        lengths = self.cache.lengths[: self.n_rows]
        if self.graph is None:
            self.inputs = Decode(lengths, self.cache.size, x.device, static=True)
            self.graph, self.x, self.out = self._capture(x, self.inputs, advance=True)
        elif lengths != self.graph_lengths:  # prefills, a reset or a rewind since the last step
            self.inputs.restart(lengths)
        self.x.copy_(x)
        self.graph_lengths = []  # unknown, should the replay be interrupted
        self.graph.replay()
        self.cache.advance([1] * self.n_rows)
        self.graph_lengths = self.cache.lengths[: self.n_rows]  # what the graph's inputs have advanced to
        return self.out

    @torch.inference_mode()
    def verify(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """Speculative decoding's verify step (cache.Verify): x holds n tokens for each row, row
        after row ([n_rows * n], or the activations [n_rows * n, D]) -> their logits or activations,
        valid until the next call. Every row's length advances by n: the caller rewinds what
        it rejects. Where the decode kernel runs, replayed from a graph captured per n where
        decode steps are; where it does not, the chunk call of the same tokens (mask 2)."""
        lengths, model, cache = self.cache.lengths[: self.n_rows], self.model, self.cache
        if not decode_kernel_runs(x.device, model.dtype, model.args.head_dim, model.attention_backend):
            out = model.step(x, cache.prepare([n] * self.n_rows), cache, self.run_block)  # the chunk call
        elif not self.cuda_graphs:
            out = model.step(x, Verify(lengths, n, cache.size, cache.sliding_window, x.device), cache, self.run_block)
        else:
            if n not in self.verify_graphs:
                inputs = Verify(lengths, n, cache.size, cache.sliding_window, x.device, static=True)
                self.verify_graphs[n] = (inputs, *self._capture(x, inputs))
            inputs, graph, static_x, out = self.verify_graphs[n]
            inputs.restart(lengths)
            static_x.copy_(x)
            graph.replay()
        cache.advance([n] * self.n_rows)
        return out

    def _chunk_bucket(self, seqlens: Sequence[int], rows: Optional[Sequence[int]]) -> Optional[int]:
        """The bucket whose inputs (and graph) run this prefill call, if one does (`chunk_graphs`)."""
        if not self.chunk_graphs or rows is None or len(rows) > self.n_rows:  # (the logits' rows hold n_rows)
            return None
        T, cache = sum(seqlens), self.cache
        if T > CHUNK_BUCKETS[-1] or not reads_in_place(seqlens, cache.lengths, cache.size, cache.sliding_window):
            return None
        return next(b for b in CHUNK_BUCKETS if b >= T)

    @torch.inference_mode()
    def capture_chunks(self, tokens: int) -> None:
        """Capture the chunk call's graph of every bucket up to the one holding `tokens` (an
        Engine's chunk budget and its decoding rows), before any request waits for one."""
        for bucket in CHUNK_BUCKETS:
            if self.chunk_pool is not None and bucket not in self.chunks:  # (without graphs, nothing to do ahead)
                self._chunk_call(bucket)
            if bucket >= tokens:
                break

    def _chunk_call(self, bucket: int) -> "ChunkCall":
        """The chunk call of `bucket` tokens: its inputs, and its graph, captured on inputs of
        padding alone (nothing written), where graphs are."""
        model, cache = self.model, self.cache
        attention = next(iter(model.layers.values())).attention
        inputs = InPlace(bucket, self.n_rows, chunk_tile(attention.n_heads // attention.n_kv_heads), cache.size,
                         cache.sliding_window, model.device)  # fmt: skip
        if model.layout.is_first:
            x = torch.zeros(bucket, dtype=torch.long, device=model.device)
        else:
            x = torch.zeros(bucket, model.args.dim, dtype=model.dtype, device=model.device)
        rows = torch.zeros(self.n_rows, dtype=torch.long, device=model.device)
        graph, out = None, None
        if self.chunk_pool is not None:
            graph, x, out = self._capture(x, inputs, rows=rows, pool=self.chunk_pool)
        self.chunks[bucket] = ChunkCall(inputs, graph, x, rows, out)
        return self.chunks[bucket]

    @torch.inference_mode()  # (its buffers, made in a warm-up's inference mode, take no update outside it)
    def _chunk(self, bucket: int, x: torch.Tensor, seqlens: Sequence[int], rows: Sequence[int]) -> torch.Tensor:
        """A prefill call on its bucket's inputs, x's tokens first, padding after, replayed from its
        graph: on the last stage the logits of `rows`, elsewhere the activations of x's tokens;
        valid until the next call (every bucket's graph shares one memory pool)."""
        call = self.chunks.get(bucket) or self._chunk_call(bucket)
        call.inputs.restart(seqlens, self.cache.lengths)
        call.x[: len(x)].copy_(x)
        call.rows[: len(rows)].copy_(to_device(list(rows), call.rows.device, torch.long))
        if call.graph is None:
            out = self.model.step(call.x, call.inputs, self.cache, self.run_block, call.rows[: len(rows)])
        else:
            call.graph.replay()
            out = call.out
        self.cache.advance(seqlens)
        return out[: len(rows)] if self.model.layout.is_last else out[: len(x)]

    def _capture(self, x: torch.Tensor, inputs: Decode | Verify | InPlace, advance: bool = False,
                 rows: Optional[torch.Tensor] = None, pool: Optional[tuple] = None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:  # fmt: skip
        """A graph of model.step on `inputs` (advancing them a step, for a decode step; the logits of
        the tokens `rows`, when given), in memory `pool` (default its own), its input x and its output."""
        x = x.clone()
        # Warm up on a side stream (compilation, cuBLAS workspaces, NCCL, allocator) as
        # graph capture requires. The warm-up step writes this step's keys into this
        # step's slots, which the first replay overwrites before anything reads them.
        start = time.perf_counter()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.model.step(x, inputs, self.cache, self.run_block, rows)
        torch.cuda.current_stream().wait_stream(side)
        self._book("compile" if self.compiled else "kernels", start)
        start = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self.model.step(x, inputs, self.cache, self.run_block, rows)
            if advance:
                inputs.advance()
        self._book("graph capture", start)
        return graph, x, out  # only once captured whole: a failed capture is tried again
