"""A model being run: what this process holds beside the weights, from one call to the next.

The model maps tokens to logits and holds nothing of a run. A `Stage` (this process's
part of the model: all of it, or one pipeline stage / tensor rank) owns the rest:

- the link to the other ranks, through which it receives its input and sends its output,
  once per forward call (`forward`);
- the KV caches of its last stream, kept for the next stream of the same shapes
  (`caches`), and for each cache and batch a decode.Runner, whose CUDA graph, captured on
  that cache's tensors, is replayed by every later stream on it (`runner`).

`generate` and `stream` make one per call unless given one: hold a Stage to run several
calls on the same caches and graphs (the command line does, for its batches and a chat's turns).
"""

from typing import Optional, Sequence

import torch

from mistral.cache import CacheTooLarge, RotatingBufferCache
from mistral.decode import Runner
from mistral.errors import MistralError
from mistral.model import Transformer
from mistral.parallel import Link


class Stage:
    """This process's part of `model` being run: its link to the other ranks, its caches, their Runners."""

    def __init__(self, model: Transformer):
        if not isinstance(model, Transformer):
            raise MistralError(f"model must be a mistral Transformer, got {type(model).__name__}")
        self.model = model
        self._link: Optional[Link] = None
        # The caches of the last stream that made its own, for the next one of the same shapes.
        self.spare_caches: list[RotatingBufferCache] = []
        # Per cache, batch and fast-path options: its Runner, for the caches of the latest call
        # only (`begin`). A Runner holds its cache, so an id here is never reused while its entry lives.
        self.runners: dict[tuple, Runner] = {}
        # The draft model's Stage of the last speculative stream on this one (mistral/speculate.py):
        # its caches and graphs serve the next stream of the same shapes too.
        self.draft: Optional[Stage] = None

    @property
    def link(self) -> Link:
        """This rank's messages to the others (nothing to send on a single process), in the model's dtype of now."""
        model = self.model
        if self._link is None or (self._link.device, self._link.dtype) != (model.device, model.dtype):
            self._link = Link(model.layout, model.args.dim, model.device, model.dtype)
        return self._link

    def runner(self, cache: RotatingBufferCache, n_rows: int, **fast: Optional[bool]) -> Runner:
        """The Runner on rows 0..n_rows-1 of `cache`, made at the first call (fast: Runner's compile and cuda_graphs)."""
        key = (id(cache), n_rows, tuple(sorted(fast.items())))
        found = self.runners.get(key)
        # A graph reads the weights where they were at its capture: not after model.to(...).
        if found is None or found.weights != Runner.weights_of(self.model):
            found = self.runners[key] = Runner(self.model, cache, n_rows, **fast)
        return found

    def begin(self, caches: Sequence[RotatingBufferCache]) -> None:
        """A call on these caches starts: the Runners on them stay (their graphs replay), the
        others go, and with them the memory of caches a caller has let go."""
        weights = Runner.weights_of(self.model)
        self.runners = {k: r for k, r in self.runners.items() if any(r.cache is c for c in caches) and r.weights == weights}

    def caches(self, rows: Sequence[int], longest: int, max_tokens: int, lookahead: int = 0) -> list[RotatingBufferCache]:
        """A cache of rows[i] rows for each micro-batch, for prompts of up to `longest` tokens
        (and `lookahead` slots more per row, for speculative decoding's proposals).

        The last stream's (`keep`) when their shapes are these, with the decode graphs captured
        on them; otherwise new ones, made once the spare ones are let go. While a stream runs
        there are none spare: a stream interleaved with it makes its own.
        """
        model, (spare, self.spare_caches) = self.model, (self.spare_caches, [])
        size = RotatingBufferCache.row_size(longest + max_tokens, model.args.sliding_window, lookahead)
        shape = lambda c: (c.max_batch_size, c.size, c.k.dtype, c.k.device)  # noqa: E731
        if [shape(c) for c in spare] == [(n, size, model.dtype, model.device) for n in rows]:
            for c in spare:
                c.reset()
            return spare
        self.forget(spare)
        del spare
        try:
            return [model.make_cache(n, longest + max_tokens, lookahead) for n in rows]
        except CacheTooLarge as e:
            raise MistralError(f"{e}, so max_tokens={max(e.fits - longest, 0)} at most after a prompt of {longest}") from None

    def keep(self, caches: list[RotatingBufferCache]) -> None:
        """The caches of a stream that has ended, for the next one."""
        self.forget(self.spare_caches)
        self.spare_caches = caches

    def forget(self, caches: Sequence[RotatingBufferCache]) -> None:
        """Let these caches' runners go, and with them their graphs and the caches' memory."""
        gone = {id(c) for c in caches}
        self.runners = {key: r for key, r in self.runners.items() if key[0] not in gone}

    def clear(self) -> None:
        """Let every cache and graph of this stage go."""
        self.spare_caches, self.runners = [], {}

    def forward(self, runner: Runner, ids: torch.Tensor | list[int], seqlens: Optional[list[int]] = None,
                rows: Optional[list[int]] = None, *, verify: int = 0) -> Optional[torch.Tensor]:  # fmt: skip
        """This rank's share of one forward call on `runner`'s rows: a prefill of `seqlens` (on
        the last stage, the logits of the tokens `rows`), a verify step of `verify` tokens a row
        (Runner.verify) or, without either, a decode step.

        ids: the call's token ids; the first stage reads them, the others receive the previous
        stage's activations. Returns the logits on the last stage; the others send their
        activations on and return None.
        """
        layout = self.model.layout
        n = len(ids)
        x = torch.as_tensor(ids, device=self.model.device) if layout.is_first else self.link.recv_activations(n)
        if verify:
            out = runner.verify(x, verify)
        else:
            out = runner.decode(x) if seqlens is None else runner.prefill(x, seqlens, rows)
        if not layout.is_last:
            self.link.send_activations(out)
            return None
        return out
