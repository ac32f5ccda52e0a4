"""Decoding on CUDA near the memory-bandwidth floor: one CUDA graph per generation.

A batch-1 decode step of Mistral 7B reads every weight once (14.5 GB: 4.9 ms on an
H100) but runs ~40 kernels per layer, most of them tiny. Launched one by one from
Python, the launches take longer than the reads. So, on CUDA in half precision:

- the whole step (embedding, 32 blocks, logits) is captured once in a CUDA graph and
  replayed for every token. Its inputs live in static device buffers that the graph
  itself advances after each step: the tokens, their positions, the cache slots they
  are written to, and the key lengths of the decode mask. Nothing in the loop reads
  a device value on the host.
- the decode mask is `masks.decode_mask`, the same xformers bias the eager path uses,
  built once over those buffers. xformers' flash operator reads three things from
  it: `k_seqinfo.seqstart` and `k_seqinfo.seqlen` (device tensors, read by the kernel
  at replay, so updating `seqlen` in place is seen) and `k_seqinfo.max_seqlen`, a
  host int baked into the graph at capture, which sizes flash's split-KV work. It
  must bound every later length, so the mask is built with every row full (= the
  cache size) and the true lengths are written into `seqlen` before the first replay.
- the pieces of each block between the matmuls (norms, rotary, SwiGLU) are compiled by
  torch.compile into a few fused kernels (COMPILE), and wq|wk|wv and w1|w3 run as one
  matmul each (`fuse_linears`), so far fewer, larger kernels remain. Prefill on CUDA
  runs the same pieces (`prefill`): there the float32 norms and rotary of the eager
  path cost a quarter of the time.
- Mixtral's experts run with shapes that do not depend on the routing (`moe_static`:
  matrix-vector products for a small batch, a grouped matmul for more tokens): the
  graph needs static shapes, and each chosen expert's weights are read once.

model.forward stays the reference; the tests compare this path with it.
"""

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from mistral.attention import attend
from mistral.cache import CacheInputs, CacheView, RotatingBufferCache
from mistral.kernels import expert_matvec
from mistral.masks import decode_mask
from mistral.model import Transformer, TransformerBlock, precompute_freqs_cis
from mistral.moe import MoeLayer

# Switches for measuring each lever on its own (scripts/bench.py flips them).
CUDA_GRAPHS = True
COMPILE = True

# Expert weights stacked per MoE layer: w1|w3 [E, 2F, D] and w2 [E, D, F].
ExpertStacks = tuple[torch.Tensor, torch.Tensor]


def moe_static(moe: MoeLayer, x: torch.Tensor, stacks: ExpertStacks) -> torch.Tensor:
    """MoeLayer.forward with shapes that do not depend on the routing.

    T = tokens, A = experts per token, E = experts, F = hidden dim. Each chosen expert's
    weights are read once, the others not at all:
    - few (token, expert) pairs (decoding a small batch): one matrix-vector product per
      pair (kernels.expert_matvec), the expert index read on the device;
    - more pairs: they are sorted by expert, and a grouped matmul runs each expert on its
      contiguous group of rows.
    """
    w13, w2 = stacks
    weights, chosen = moe.route(x)  # [T, A]
    (T, A), E = chosen.shape, w13.shape[0]
    pair_expert = chosen.flatten()  # [T * A], pair p is (token p // A, slot p % A)
    if T * A <= E:
        h1, h3 = expert_matvec(x.repeat_interleave(A, dim=0), w13, pair_expert).chunk(2, dim=-1)
        y = expert_matvec(nn.functional.silu(h1) * h3, w2, pair_expert) * weights.flatten()[:, None]
        return y.view(T, A, -1).sum(dim=1)
    order = pair_expert.argsort(stable=True)  # pairs grouped by expert, tokens ascending
    token = order // A
    # Group e is rows ends[e-1] .. ends[e]-1; counting by comparison keeps shapes static.
    ends = (pair_expert[:, None] == torch.arange(E, device=x.device)).sum(0).cumsum(0).to(torch.int32)
    xs = x[token]  # [T * A, D]
    h1, h3 = torch._grouped_mm(xs, w13.mT, offs=ends).chunk(2, dim=-1)
    y = torch._grouped_mm(nn.functional.silu(h1) * h3, w2.mT, offs=ends) * weights.flatten()[order, None]
    # A token's pairs are added in expert order, as MoeLayer.forward adds them.
    return torch.zeros_like(x).index_add_(0, token, y)


def fuse_linears(owner: nn.Module, name: str, groups: list[list[nn.Linear]]) -> torch.Tensor:
    """One tensor [G, rows, cols] holding the weights of G groups of linear layers: the
    layers of a group concatenated along their output rows, the groups stacked.

    Each layer's parameter then becomes a view of it, so memory is not doubled and the
    checkpoint names and shapes (state_dict, save) stay what they were. The tensor is
    kept as `owner.<name>`; a later call finds the views in place and returns it.
    """
    linears = [linear for group in groups for linear in group]

    def views(fused: torch.Tensor) -> list[torch.Tensor]:
        return [v for g, group in zip(fused, groups) for v in g.split([linear.weight.shape[0] for linear in group])]

    fused = getattr(owner, name, None)
    if fused is not None and all(
        linear.weight.data_ptr() == view.data_ptr() and linear.weight.shape == view.shape
        for linear, view in zip(linears, views(fused))
    ):
        return fused
    # Plain tensors, not inference tensors: the parameters must stay usable outside inference mode.
    with torch.inference_mode(False), torch.no_grad():
        fused = torch.stack([torch.cat([linear.weight for linear in group]) for group in groups])
        for linear, view in zip(linears, views(fused)):
            linear.weight.data = view
    setattr(owner, name, fused)  # a plain attribute: neither a parameter nor in state_dict
    return fused


def rotary(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_emb in real arithmetic, which torch.compile fuses (it leaves complex ops to eager).

    x: [T, H, Dh]; cos_sin: [T, Dh/2, 2] = torch.view_as_real(freqs_cis).
    """
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [T, H, Dh/2]: the pair (x[2j], x[2j+1])
    cos, sin = cos_sin[:, None, :, 0], cos_sin[:, None, :, 1]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2).type_as(x)


def _attention_inputs(
    layer: TransformerBlock, x: torch.Tensor, cos_sin: torch.Tensor, wqkv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention.forward up to the cache: norm, one matmul for q, k, v, rotary. x: [T, D]."""
    attn, T = layer.attention, x.shape[0]
    q_dim, kv_dim = attn.n_heads * attn.head_dim, attn.n_kv_heads * attn.head_dim
    xq, xk, xv = nn.functional.linear(layer.attention_norm(x), wqkv).split([q_dim, kv_dim, kv_dim], dim=-1)
    xq = rotary(xq.view(T, attn.n_heads, attn.head_dim), cos_sin)
    xk = rotary(xk.view(T, attn.n_kv_heads, attn.head_dim), cos_sin)
    return xq, xk, xv.view(T, attn.n_kv_heads, attn.head_dim)


def _block_output(
    layer: TransformerBlock,
    x: torch.Tensor,
    attn_out: torch.Tensor,
    w13: Optional[torch.Tensor],
    stacks: Optional[ExpertStacks],
) -> torch.Tensor:
    """The rest of TransformerBlock.forward after attention: wo, residual, feed-forward."""
    h = x + layer.attention.wo(attn_out.flatten(1))
    hn = layer.ffn_norm(h)
    if stacks is not None:
        return h + moe_static(layer.feed_forward, hn, stacks)
    assert w13 is not None
    h1, h3 = nn.functional.linear(hn, w13).chunk(2, dim=-1)
    return h + layer.feed_forward.w2(nn.functional.silu(h1) * h3)


_compiled: dict[str, Callable] = {}


def _maybe_compiled(fn: Callable) -> Callable:
    # One compiled function serves every layer: torch.compile lifts the layer's
    # parameters to inputs rather than specialising on each module.
    if not COMPILE:
        return fn
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = torch.compile(fn)
    return _compiled[fn.__name__]


LayerWeights = tuple[torch.Tensor, Optional[torch.Tensor], Optional[ExpertStacks]]


def fused_weights(model: Transformer) -> list[LayerWeights]:
    """Per layer: wq|wk|wv, and w1|w3 (dense) or the experts' w1|w3 and w2 stacks (MoE), as fuse_linears makes them."""
    weights = []
    for layer in model.layers.values():
        a, ff = layer.attention, layer.feed_forward
        wqkv = fuse_linears(a, "_wqkv", [[a.wq, a.wk, a.wv]])[0]
        if isinstance(ff, MoeLayer):
            w13 = fuse_linears(ff, "_w13", [[e.w1, e.w3] for e in ff.experts])
            weights.append((wqkv, None, (w13, fuse_linears(ff, "_w2", [[e.w2] for e in ff.experts]))))
        else:
            weights.append((wqkv, fuse_linears(ff, "_w13", [[ff.w1, ff.w3]])[0], None))
    return weights  # type: ignore[return-value]


def run(
    model: Transformer,
    tokens: torch.Tensor,
    inputs: CacheInputs,
    cache: RotatingBufferCache,
    n_rows: int,
    weights: list[LayerWeights],
) -> torch.Tensor:
    """model.forward's computation for one prepared cache call, with the fused pieces. Returns float logits [T, V]."""
    pre, post = _maybe_compiled(_attention_inputs), _maybe_compiled(_block_output)
    freqs_cis = precompute_freqs_cis(inputs.positions, model.args.head_dim, model.args.rope_theta)
    cos_sin = torch.view_as_real(freqs_cis)
    h = model.tok_embeddings(tokens)  # [T, D]
    for k, (layer, (wqkv, w13, stacks)) in enumerate(zip(model.layers.values(), weights)):
        xq, xk, xv = pre(layer, h, cos_sin, wqkv)
        keys, values = CacheView(cache.k[k], cache.v[k], inputs, n_rows).update(xk, xv)
        out = attend(xq, keys, values, inputs.mask, model.attention_backend)
        h = post(layer, h, out, w13, stacks)
    return model.output(model.norm(h)).float()


def prefill(model: Transformer, input_ids: torch.Tensor, seqlens: Sequence[int], cache: RotatingBufferCache) -> torch.Tensor:
    """model(input_ids, seqlens, cache) on the fast path (CUDA): float logits [T, V]."""
    inputs = cache.prepare(seqlens)
    logits = run(model, input_ids, inputs, cache, len(seqlens), fused_weights(model))
    cache.advance(seqlens)
    return logits


def usable(model: Transformer) -> bool:
    """Whether the fast path can run this model: CUDA, xformers in half precision, one rank."""
    return (
        CUDA_GRAPHS
        and model.device.type == "cuda"
        and model.dtype in (torch.float16, torch.bfloat16)
        and model.attention_backend in ("auto", "xformers")
        and getattr(model, "num_pipeline_ranks", 1) == 1
    )


class GraphDecoder:
    """Decodes rows 0..B-1 of `cache` one token per step, replaying a captured step.

    Equivalent to `model(tokens, [1] * B, cache)`, step after step.
    """

    def __init__(self, model: Transformer, cache: RotatingBufferCache, n_rows: int):
        self.model, self.cache, self.B = model, cache, n_rows
        device, size = model.device, cache.size
        self.tokens = torch.zeros(n_rows, dtype=torch.long, device=device)
        self.positions = torch.tensor(cache.lengths[:n_rows], dtype=torch.long, device=device)
        rows = torch.arange(n_rows, device=device)
        self.row_start = rows * size
        # Every row full: see the module docstring on max_seqlen; _set_slots writes the truth.
        mask = decode_mask([size] * n_rows, size, device)
        self.kv_seqlen = mask.k_seqinfo.seqlen  # [B] int32, read by the kernel at replay
        # Every new token is stored: write_from as a slice takes them all without a gather.
        self.inputs = CacheInputs(
            kind="decode", positions=self.positions, mask=mask, write_from=slice(None), write_to=torch.empty_like(rows)  # type: ignore[arg-type]
        )
        self._set_slots()
        self.weights = fused_weights(model)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None

    def _set_slots(self) -> None:
        """Cache slots and key lengths for the tokens at self.positions (CacheInputs.build's decode case)."""
        size = self.cache.size
        torch.add(self.row_start, self.positions % size, out=self.inputs.write_to)
        self.kv_seqlen.copy_((self.positions + 1).clamp(max=size))

    def _forward(self) -> torch.Tensor:
        return run(self.model, self.tokens, self.inputs, self.cache, self.B, self.weights)

    def _step(self) -> torch.Tensor:
        logits = self._forward()
        self.positions += 1
        self._set_slots()
        return logits

    def _capture(self) -> None:
        # Warm up on a side stream (compilation, cuBLAS workspaces, allocator) as graph
        # capture requires. The warm-up step writes this step's keys into this step's
        # slots, which the first replay overwrites before anything reads them.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._step()

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: [B] -> float logits [B, V], valid until the next step."""
        if self.graph is None:
            self._capture()
        assert self.graph is not None and self.logits is not None
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.cache.advance([1] * self.B)
        return self.logits
