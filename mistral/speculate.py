"""Speculative decoding over the rolling buffer: propose tokens, check them in one forward call.

At batch 1 a decode step reads every weight once, so a call on k + 1 tokens costs about
what a call on one costs. Each step here feeds every row its last token and up to k
tokens proposed to follow it, and the model's choice at each position decides:

- greedy: a proposal is kept while it is the model's argmax, and the model's own next
  token follows the kept ones, so the output is plain greedy decoding's, token for token;
- sampling: a proposed token x is kept with probability p(x), p being what `sample`
  draws from (temperature, top-p), and a rejected one is replaced by a draw from p
  without x, renormalized: the standard accept/reject rule of speculative sampling
  (Leviathan et al., 2023) for a proposal that is certain (q(x) = 1), so every token
  follows p exactly.

Proposals come from prompt lookup (`PromptLookup`): the text so far, prompt and
generated, is searched for the latest earlier occurrence of its last n tokens (n = 3, 2,
1), and what followed it there is proposed. Code and chat repeat themselves enough for
that to pay without a second model.

The cache. Writing k proposals ahead in a row of W slots would overwrite positions
p - W, which the tokens after a rejection still read. So the rows hold W + k slots
(`lookahead`): writing k ahead overwrites only positions older than any later
token's window, and `RotatingBufferCache.rewind` takes back the rejected ones. After
the prompts, every call is a verify step (`cache.Verify`) of the same number of tokens
in every row, n = 1 + the most proposals of any row: on CUDA a decode step of B * n
queries, each reading its row in place up to its own position and window, replayed
from a CUDA graph captured per n (decode.Runner.verify); elsewhere a chunk call (mask
2). The decode mask, which reads a whole row, never runs on such rows: a row of W + k
slots holds positions older than the window.
"""

from typing import Iterator, Optional, Sequence

import torch

from mistral.cache import RotatingBufferCache, prefill_calls
from mistral.errors import MistralError
from mistral.sampling import NON_FINITE, probabilities, sample_step, to_device
from mistral.model import Transformer
from mistral.parallel import Link
from mistral.stage import Stage

# The n-grams prompt lookup searches for, longest first.
MAX_NGRAM = 3


class PromptLookup:
    """Prompt lookup for one row: up to k tokens to follow its history, those that followed
    the latest earlier occurrence of its last n tokens, for the longest n <= max_ngram that
    occurs earlier; else none.

    An index of every n-gram that some token follows, to where its latest occurrence ends,
    grown as the history grows (it only grows: taken-back proposals never enter it). A
    search of the history instead costs a step time in proportion to its length (0.26 ms
    in Python for 640 tokens, beside a decode step of 0.3 ms of the default model on an H100).
    """

    def __init__(self, max_ngram: int = MAX_NGRAM):
        self.max_ngram = max_ngram
        self.follows: dict[tuple[int, ...], int] = {}  # n-gram -> the position after its latest occurrence
        self.indexed = 1  # positions 1..indexed-1 are in `follows` as what follows their n-grams

    def propose(self, history: Sequence[int], k: int) -> list[int]:
        for p in range(self.indexed, len(history)):  # later occurrences overwrite earlier ones
            for n in range(1, min(self.max_ngram, p) + 1):
                self.follows[tuple(history[p - n : p])] = p
        self.indexed = max(self.indexed, len(history))
        if k <= 0:
            return []
        for n in range(min(self.max_ngram, len(history) - 1), 0, -1):
            after = self.follows.get(tuple(history[-n:]))
            if after is not None:
                return list(history[after : after + k])
        return []


def speculative_stream(
    encoded_prompts: list[list[int]],
    stage: Stage,
    *,
    max_tokens: int,
    speculate: int,
    temperature: float,
    top_p: float,
    chunk_size: Optional[int],
    eos_id: Optional[int],
    seed: Optional[int],
    compile: bool,
    draft: Optional[Transformer] = None,
    tally: Optional[dict[str, int]] = None,
    warm_up: Optional[dict[str, float]] = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """`stream` with up to `speculate` proposed tokens per row and step: the same (tokens [B],
    logprobs [B]) per step, each step yielded once every row has its token (a row that has
    produced eos yields eos, log-probability 0, until the others end).

    draft: a smaller model of the same vocabulary whose own tokens are the proposals
    (`Drafter`); by default prompt lookup (`PromptLookup`).
    tally: `stream`'s `speculation`, added to as the steps run.
    warm_up: `stream`'s: the seconds of the verify graphs' first runs and captures, the draft's too."""
    model = stage.model
    B, k = len(encoded_prompts), speculate
    longest = max(len(p) for p in encoded_prompts)
    chunk = chunk_size or RotatingBufferCache.row_size(longest + max_tokens, model.args.sliding_window)  # as stream's
    (cache,) = stage.caches([B], longest, max_tokens, lookahead=k)
    stage.begin([cache])
    runner = stage.runner(cache, B, compile=compile)  # verify steps replay graphs where decode steps do
    runner.warm_up = {} if warm_up is None else warm_up
    generator = None if seed is None else torch.Generator(model.device).manual_seed(seed)
    drafter = None if draft is None else Drafter(draft, encoded_prompts, max_tokens, k, chunk, compile, stage.draft)
    if drafter is not None:
        drafter.runner.warm_up = runner.warm_up

    history = [list(p) for p in encoded_prompts]  # per row: the prompt and every token yielded or to be
    lookups = [PromptLookup() for _ in range(B)]
    tokens: list[list[int]] = [[] for _ in range(B)]  # per row: the tokens generated, not yet yielded from `yielded` on
    logprobs: list[list[float]] = [[] for _ in range(B)]
    done = [False] * B  # the row has produced eos
    last_logits: list[Optional[torch.Tensor]] = [None] * B
    for call in prefill_calls(encoded_prompts, chunk):
        out = stage.forward(runner, call.input_ids, call.seqlens, list(call.ends.values()))
        for i, b in enumerate(call.ends if out is not None else ()):  # a prompt's last logits come from the call where it ends
            last_logits[b] = out[i]  # type: ignore[index]
    link = stage.link  # on several ranks the sampling rank chooses, and tells the others
    if link.samples:
        first, first_logprobs, finite = sample_step(torch.stack(last_logits), temperature, top_p, generator)  # type: ignore[arg-type]
        _check_finite(finite)
        _send(link, first, first_logprobs)
    else:
        first, first_logprobs = link.recv_tokens(B)
    for b, (t, lp) in enumerate(zip(first.tolist(), first_logprobs.tolist())):
        _take(b, [t], [lp], history, tokens, logprobs, done, eos_id)
    yielded = 0
    try:
        while True:
            ready = min(len(tokens[b]) for b in range(B) if not done[b]) if not all(done) else max(map(len, tokens))
            ready = min(ready, max_tokens)
            for s in range(yielded, ready):
                yield _step(s, tokens, logprobs, eos_id)
            yielded = max(yielded, ready)
            rows = [b for b in range(B) if not done[b] and len(tokens[b]) < max_tokens]
            if not rows or yielded >= max_tokens:
                break
            # Each running row's last token (sampled, not fed yet) and its proposals, no more than it may still use.
            budgets = {b: min(k, max_tokens - len(tokens[b]) - 1) for b in rows}
            if drafter is None:
                proposals, drafted = {b: lookups[b].propose(history[b], budgets[b]) for b in rows}, None
            else:
                proposals, drafted = drafter.propose(history, budgets, temperature, top_p, generator)
            fed = {b: [history[b][-1], *proposals[b]] for b in rows}
            counts = [len(fed[b]) for b in rows]
            n, ids = _filled(fed, history)  # a row that no longer runs is filler only; taken back below
            before = list(cache.lengths[:B])
            out = stage.forward(runner, ids, verify=n)
            if link.samples:
                assert out is not None
                q = None if drafted is None else [drafted[b] for b in rows]
                fed_at = to_device([b * n + i for b, count in zip(rows, counts) for i in range(count)], model.device)
                chosen = _choose(out[fed_at], counts, [proposals[b] for b in rows], temperature, top_p, generator, q)
                if model.layout.world_size > 1:
                    _send(link, *_packed(chosen, counts, model.device))
            else:
                chosen = _unpacked(*link.recv_tokens(sum(counts)), counts)
            if tally is not None:  # what a user reads to judge the speculation (mistral generate's timing line)
                for key, count in (("steps", 1), ("rows", len(rows)), ("tokens", sum(len(new) for new, _ in chosen)),
                                   ("proposed", sum(len(proposals[b]) for b in rows)), ("kept", sum(len(new) - 1 for new, _ in chosen))):  # fmt: skip
                    tally[key] = tally.get(key, 0) + count
            for b in [b for b in range(B) if b not in rows]:
                cache.rewind(b, before[b])
            for b, (new, new_logprobs) in zip(rows, chosen):
                accepted = len(new) - 1  # proposals kept; the last token is the model's own
                cache.rewind(b, before[b] + 1 + accepted)  # the fed last token and the kept proposals stay
                if drafter is not None:
                    drafter.rewind(b, before[b] + 1 + accepted)
                _take(b, new, new_logprobs, history, tokens, logprobs, done, eos_id)
    finally:
        stage.keep([cache])  # for the next stream of the same shapes
        if drafter is not None:
            drafter.stage.keep([drafter.cache])
            stage.draft = drafter.stage


def _choose(
    logits: torch.Tensor, counts: list[int], proposals: list[list[int]], temperature: float, top_p: float,
    generator: Optional[torch.Generator], q: Optional[list[torch.Tensor]] = None,
) -> list[tuple[list[int], list[float]]]:  # fmt: skip
    """Per row: the kept proposals and the model's next token, with their log-probabilities.

    logits: [sum(counts), V], row r's counts[r] positions back to back; position i of a row
    predicts the token after its i-th fed token, so proposal i is checked at position i.
    q: per row, the distributions [len(proposal), V] its proposals were drawn from (a draft
    model's); without, each proposal is certain (prompt lookup).

    The host reads the device once: every position's verdict, the token that replaces a
    rejected proposal (or follows the last), both log-probabilities, and whether the logits
    were finite, come back together; a MistralError if they were not.
    """
    logprobs = torch.log_softmax(logits, dim=-1)
    finite = torch.isfinite(logits).all()
    # Each position's proposal (0 where there is none), copied without waiting for the forward call.
    flat = to_device([t for p in proposals for t in p + [0]], logits.device)
    has_proposal = to_device([i < len(p) for p in proposals for i in range(len(p) + 1)], logits.device)
    if temperature == 0:
        choice = logits.argmax(dim=-1)
        keep = choice == flat
    else:
        # Non-finite logits would fail inside torch.multinomial (on CUDA, killing the process):
        # such a step draws from uniform numbers, and the flag read with the results raises.
        probs = probabilities(torch.where(finite, logits, 0.0), temperature, top_p)
        probs = probs / probs.sum(dim=-1, keepdim=True)
        if q is None:
            proposed = torch.zeros_like(probs).scatter_(-1, flat[:, None], 1.0) * has_proposal[:, None]
        else:
            proposed = torch.cat([torch.cat([qr.to(probs.dtype), probs.new_zeros(1, probs.shape[-1])]) for qr in q])
        uniform = torch.rand(logits.shape[0], generator=generator, device=logits.device)
        # Keep x with probability min(1, p(x) / q(x)); a rejected one is replaced by a draw from (p - q)+,
        # normalized; after the last proposal, from p itself.
        keep = uniform * proposed.gather(-1, flat[:, None]).squeeze(-1) < probs.gather(-1, flat[:, None]).squeeze(-1)
        draw_from = torch.where(has_proposal[:, None], (probs - proposed).clamp(min=0), probs)
        draw_from = torch.where(draw_from.sum(-1, keepdim=True) > 0, draw_from, probs)  # p was all on the proposal
        choice = torch.multinomial(draw_from, 1, generator=generator).squeeze(-1)
    lp_proposed, lp_choice = (logprobs.gather(-1, t[:, None]).squeeze(-1) for t in (flat, choice))
    read = torch.stack([t.double() for t in (keep & has_proposal, choice, lp_proposed, lp_choice, finite.expand_as(choice))]).tolist()
    kept_at, choice_at, lp_proposed_at, lp_choice_at, finite_at = read  # the one read of the device this step
    if not all(finite_at):
        raise MistralError(NON_FINITE)
    out, start = [], 0
    for count, proposal in zip(counts, proposals):
        new, new_logprobs = [], []
        for at in range(start, start + count):
            if kept_at[at]:
                new.append(proposal[at - start])
                new_logprobs.append(lp_proposed_at[at])
            else:
                new.append(int(choice_at[at]))
                new_logprobs.append(lp_choice_at[at])
                break
        out.append((new, new_logprobs))
        start += count
    return out


class Drafter:
    """Proposals from a draft model: a smaller model of the same vocabulary, run on its own
    Stage and cache (W + k slots a row too), that drafts each row's next tokens one by one.

    Its cache holds what the target's does, and whatever it drafted since; each round first
    feeds what it has not seen of the history (the last token, after a fully kept run also
    its own last draft), then its drafts, each call a verify step of the draft (replayed
    from its graphs on CUDA); `rewind` follows the target's.
    """

    def __init__(self, draft: Transformer, prompts: list[list[int]], max_tokens: int, k: int, chunk: int, compile: bool,
                 stage: Optional[Stage] = None):  # fmt: skip
        """stage: the draft's Stage of an earlier stream, whose caches and graphs it reuses where the shapes agree."""
        self.stage = stage if stage is not None and stage.model is draft else Stage(draft)
        longest = max(len(p) for p in prompts)
        (self.cache,) = self.stage.caches([len(prompts)], longest, max_tokens, lookahead=k)
        self.stage.begin([self.cache])
        self.runner = self.stage.runner(self.cache, len(prompts), compile=compile)
        for call in prefill_calls([p[:-1] for p in prompts], chunk):  # all but the last token, which `propose` feeds
            self.stage.forward(self.runner, call.input_ids, call.seqlens, [])

    def propose(
        self, history: list[list[int]], budgets: dict[int, int], temperature: float, top_p: float,
        generator: Optional[torch.Generator],
    ) -> tuple[dict[int, list[int]], dict[int, torch.Tensor]]:  # fmt: skip
        """Per row b, up to budgets[b] drafted tokens, and the distributions [n, V] they were drawn from."""
        B = len(history)
        drafted: dict[int, list[int]] = {b: [] for b in budgets}
        q: dict[int, list[torch.Tensor]] = {b: [] for b in budgets}
        unseen = {b: history[b][self.cache.lengths[b] :] for b, n in budgets.items() if n > 0}
        while unseen:
            # A verify step of the draft (a graph per n, as the target's); the filler taken back.
            n, ids = _filled(unseen, history)
            before = list(self.cache.lengths[:B])
            out = self.stage.forward(self.runner, ids, verify=n)
            assert out is not None
            logits = out[to_device([b * n + len(unseen[b]) - 1 for b in sorted(unseen)], out.device)]  # each row's last token's
            for b in range(B):
                self.cache.rewind(b, before[b] + len(unseen.get(b, ())))
            if temperature == 0:
                chosen = logits.argmax(dim=-1)
                dists = [None] * len(unseen)
            else:
                probs = probabilities(logits, temperature, top_p)
                probs = probs / probs.sum(dim=-1, keepdim=True)
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
                dists = list(probs)
            for b, t, dist in zip(sorted(unseen), chosen.tolist(), dists):
                drafted[b].append(t)
                if dist is not None:
                    q[b].append(dist)
            unseen = {b: [drafted[b][-1]] for b in sorted(unseen) if len(drafted[b]) < budgets[b]}
        empty = torch.empty(0, self.stage.model.args.vocab_size, device=self.stage.model.device)
        return drafted, {b: torch.stack(d) if d else empty for b, d in q.items()}

    def rewind(self, row: int, length: int) -> None:
        """Keep what the target keeps, of what this cache holds."""
        if self.cache.lengths[row] > length:
            self.cache.rewind(row, length)


def _filled(fed: dict[int, list[int]], history: list[list[int]]) -> tuple[int, list[int]]:
    """A verify step's n and tokens: n tokens in every row (a shape its graph replays), row b's
    fed[b] filled up with its last token, which nothing reads (the caller takes it back)."""
    n = max(map(len, fed.values()))
    return n, [t for b, h in enumerate(history) for t in (fed.get(b, []) + [h[-1]] * n)[:n]]


def _send(link: Link, tokens: torch.Tensor, logprobs: torch.Tensor) -> None:
    """The sampling rank's choice to every other rank, which waits for it now (a send still
    pending at the end of the stream would never arrive)."""
    link.send_tokens(tokens, logprobs)
    link.flush()


def _packed(chosen: list[tuple[list[int], list[float]]], counts: list[int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's kept tokens in the counts[r] places it was fed, -1 after them: one message of known size."""
    tokens, logprobs = [], []
    for (new, new_logprobs), count in zip(chosen, counts):
        tokens += new + [-1] * (count - len(new))
        logprobs += new_logprobs + [0.0] * (count - len(new))
    return torch.tensor(tokens, device=device), torch.tensor(logprobs, device=device)


def _unpacked(tokens: torch.Tensor, logprobs: torch.Tensor, counts: list[int]) -> list[tuple[list[int], list[float]]]:
    """What `_packed` packed."""
    out = []
    for row, row_logprobs in zip(tokens.split(counts), logprobs.split(counts)):
        n = int((row >= 0).sum())
        out.append((row[:n].tolist(), row_logprobs[:n].tolist()))
    return out


def _take(b: int, new: list[int], new_logprobs: list[float], history: list[list[int]], tokens: list[list[int]],
          logprobs: list[list[float]], done: list[bool], eos_id: Optional[int]) -> None:  # fmt: skip
    """Row b's new tokens, up to its first eos."""
    for t, lp in zip(new, new_logprobs):
        history[b].append(t)
        tokens[b].append(t)
        logprobs[b].append(lp)
        if t == eos_id:
            done[b] = True
            return


def _step(s: int, tokens: list[list[int]], logprobs: list[list[float]], eos_id: Optional[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Step s of every row, on the host (as `stream` yields it): its token, or eos (log-probability 0) past a row's end."""
    ts = [row[s] if s < len(row) else eos_id for row in tokens]
    lps = [row[s] if s < len(row) else 0.0 for row in logprobs]
    return torch.tensor(ts), torch.tensor(lps)


def _check_finite(finite: torch.Tensor) -> None:
    if not bool(finite):
        raise MistralError(NON_FINITE)
