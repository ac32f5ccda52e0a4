"""Command line: `mistral generate [MODEL_DIR] "prompt" ...` and `mistral chat [MODEL_DIR]`."""

import functools
import inspect
import json as jsonlib
import os
import signal
import sys
import time
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import fire
import torch
from fire import decorators, parser

from mistral import launch, parallel
from mistral.cache import RotatingBufferCache
from mistral.checkpoint import DEFAULT_MODEL, read_args
from mistral.errors import MistralError, check_positive_int, is_int, is_number
from mistral.checks import check_options
from mistral.generation import stream
from mistral.options import HELP, check_arguments
from mistral.prewarm import Prewarm
from mistral.hf import convert as convert_hf
from mistral.loading import check_device
from mistral.model import Transformer
from mistral.quantize import quantize_folder
from mistral.stage import Stage
from mistral.text import Completion
from mistral.tokenizer import TOKENIZER_FILES, ChatTokenizer, Message, check_text, check_vocabulary, load_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(
    model_dir: Union[str, Path],
    device: Optional[str],
    dtype: Optional[str],
    num_pipeline_ranks: int = 1,
    num_tensor_ranks: int = 1,
    lora: Optional[str] = None,
    warm_up: Optional[dict[str, float]] = None,
    expert_parallel: bool = False,
) -> tuple[Transformer, ChatTokenizer]:
    """The folder's model on this rank's device, and its tokenizer. On a GPU the libraries and
    kernels of a first call warm up meanwhile (mistral/prewarm.py): any wait for them past the
    load goes into warm_up["libraries"]."""
    folder = Path(model_dir)
    if not is_dir(folder):
        raise MistralError(f"{folder}: model folder not found")
    tokenizer = load_tokenizer(folder)  # before the weights: a folder without one fails at once
    device = check_device(device)
    rank = 0
    if num_pipeline_ranks != 1 or num_tensor_ranks != 1:
        # One process per rank (started by mistral's launcher or torchrun): each reads and runs its own part only.
        layout, local = parallel.init(num_pipeline_ranks, num_tensor_ranks, None if device is None else device.split(":")[0])
        rank, device = layout.world_rank, str(local)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise MistralError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    prewarm = Prewarm(read_args(folder), torch.device(device), DTYPES[dtype])
    try:
        with LoadProgress(folder) as progress:
            model = Transformer.from_folder(
                folder, device=device, dtype=DTYPES[dtype], progress=progress if rank == 0 else None,
                num_pipeline_ranks=num_pipeline_ranks, num_tensor_ranks=num_tensor_ranks, lora_path=lora,
                expert_parallel=expert_parallel,
            )
    finally:  # also when the load fails: not a thread inside CUDA while the process ends
        waited = prewarm.join()
    if warm_up is not None and waited >= 0.01:
        warm_up["libraries"] = waited
    check_vocabulary(folder, tokenizer, model.args.vocab_size)
    if rank > 0:
        parallel.silence()  # rank 0 prints the results
    return model, tokenizer


def check_ranks(world_size: int, num_tensor_ranks: int, expert_parallel: bool) -> None:
    """Parallel options that would otherwise do nothing, silently."""
    if expert_parallel and num_tensor_ranks == 1:
        raise MistralError("--expert_parallel places whole experts on tensor ranks: give --num_tensor_ranks N (N > 1) too")
    started = os.environ.get("WORLD_SIZE", "1")
    if world_size == 1 and started != "1" and launch.started_by_a_launcher():  # torchrun's N copies would each run it all
        raise MistralError(
            f"torchrun started {started} processes for a command of one: give --num_tensor_ranks and/or "
            f"--num_pipeline_ranks (of product {started}), or run it without torchrun"
        )


def check_layout(
    folder: Path, num_pipeline_ranks: int, num_tensor_ranks: int, micro_batches: Optional[int], expert_parallel: bool = False
) -> None:
    """A layout that the folder's model divides, checked before any rank starts."""
    if not is_dir(folder):
        raise MistralError(f"{folder}: model folder not found")
    args = read_args(folder)
    parallel.check_tensor_split(num_tensor_ranks, args, expert_parallel)
    parallel.Layout(0, num_pipeline_ranks).layers(args.n_layers)  # at least one layer a stage
    if micro_batches is not None:
        check_positive_int(micro_batches, "micro_batches")


class LoadProgress:
    """Tensors and bytes read so far, on one stderr line, once loading has taken a second.

    A small model loads before anything is shown; a 7B checkpoint shows its progress.
    Used as a context, it ends a line that a failed read left open: the error after it
    starts a line of its own.
    """

    def __init__(self, folder: Path, after_s: float = 1.0):
        self.folder, self.after_s = folder, after_s
        self.start = self.last = time.perf_counter()
        self.open = False  # a line shown, and not yet ended
        self.live = sys.stderr.isatty()  # a terminal: a line rewritten in place; a log or a pipe: the last line only

    def __enter__(self) -> "LoadProgress":
        return self

    def __exit__(self, *exception: Any) -> None:
        if self.open:
            print(file=sys.stderr)
            self.open = False

    def __call__(self, done: int, total: int, nbytes: int) -> None:
        now = time.perf_counter()
        if now - self.start < self.after_s or (done < total and now - self.last < 0.2):
            return
        if done < total and not self.live:
            return
        self.last, self.open = now, done < total
        print(f"\rloading {self.folder}: {done}/{total} tensors, {nbytes / 2**30:.2f} GiB", end="\n" if done == total else "",
              file=sys.stderr, flush=True)



def is_dir(path: Path) -> bool:
    """Path.is_dir, but False for a name the system refuses (too long, say): a prompt may be one."""
    try:
        return path.is_dir()
    except OSError:
        return False


def split_model_and_prompts(inputs: Sequence[str]) -> tuple[Path, list[str]]:
    """The first input is a model folder when it is an existing directory, or looks like a
    path (contains a path separator and no whitespace); otherwise all are prompts for
    the default model. A mistyped folder such as /nonexistent thus fails clearly."""
    if inputs:
        first = inputs[0]
        separators = [s for s in (os.sep, os.altsep) if s]
        if is_dir(Path(first)) or (any(s in first for s in separators) and not any(c.isspace() for c in first)):
            return Path(first), list(inputs[1:])
    return DEFAULT_MODEL, list(inputs)


@dataclass
class Timing:
    """Where a command's time went, each phase once: warm-up (what runs once per shape,
    by kind: see decode.Runner) is booked apart from the prefill and decoding it fell in."""

    load_s: float = 0.0
    prefill_s: float = 0.0  # until each batch's first token
    decode_s: float = 0.0  # the steps after it
    decoded: int = 0  # the tokens those steps produced
    warm_up: dict[str, float] = field(default_factory=dict)
    speculation: dict[str, int] = field(default_factory=dict)  # stream's counts, where it speculates

    @property
    def warm_up_s(self) -> float:
        return sum(self.warm_up.values())


def complete(
    model: Transformer,
    tokenizer: ChatTokenizer,
    completions: list[Completion],
    on_step: Callable[[], None],
    cache: Optional[RotatingBufferCache] = None,
    timing: Optional[Timing] = None,
    **options: Any,
) -> None:
    """Stream tokens into `completions` (one batch), calling on_step after each step; the time goes into `timing`."""
    timing = timing or Timing()
    warm_up: dict[str, float] = {}
    start = time.perf_counter()
    first = last = warm_before = 0.0
    steps = 0
    if options.get("speculate"):
        options["speculation"] = timing.speculation
    for tokens, logprobs in stream([c.prompt_tokens for c in completions], model, eos_id=tokenizer.eos_id, cache=cache,
                                   warm_up=warm_up, **options):  # fmt: skip
        new = 0
        for c, token, logprob in zip(completions, tokens.tolist(), logprobs.tolist()):
            if c.finish_reason is None:
                if token == tokenizer.eos_id:
                    c.finish_reason = "eos"
                else:
                    c.tokens.append(token)
                    c.logprobs.append(logprob)
                    new += 1
        last = time.perf_counter() - start
        if steps == 0:
            first, warm_before = last, sum(warm_up.values())
        else:
            timing.decoded += new
        steps += 1
        on_step()
    for c in completions:
        c.finish_reason = c.finish_reason or "length"
    if steps:
        timing.prefill_s += first - warm_before
        timing.decode_s += last - first - (sum(warm_up.values()) - warm_before)
    for kind, seconds in warm_up.items():
        timing.warm_up[kind] = timing.warm_up.get(kind, 0.0) + seconds


def write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def text_arguments(command: Callable) -> Callable:
    """Hand the model folder and the prompts to `command` exactly as typed.

    fire reads every argument as a Python literal when it can: the prompt "3.10" would
    arrive as the float 3.1, "1e3" as 1000.0, '"Hi"' without its quotes, and a folder named
    "123" as an int. Parameters with a default (the options) keep fire's parsing.
    """
    # fire keeps these parse settings in an attribute of the function, which its --help
    # then lists as a "group" named FIRE_METADATA; a dunder name keeps it out of help.
    decorators.FIRE_METADATA = "__fire_metadata__"
    params = inspect.signature(command).parameters.items()
    options = [name for name, p in params if p.default is not p.empty and name != "model_dir"]
    # --help writes Optional[...] around the type of an option whose default is None: give
    # it "int" for "int | None", or it shows Optional[int | None].
    for name, p in params:
        if p.default is None:
            command.__annotations__[name] = next(t for t in typing.get_args(p.annotation) if t is not type(None))
    command = decorators.SetParseFn(str)(command)  # default: the positionals and *prompts
    # With no names, SetParseFn would replace the default instead.
    return decorators.SetParseFn(parser.DefaultParseValue, *options)(command) if options else command


@text_arguments
def generate(
    *inputs: str,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = 0,
    chunk_size: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    json: bool = False,
    num_pipeline_ranks: int = 1,
    num_tensor_ranks: int = 1,
    micro_batches: int | None = None,
    lora: str | None = None,
    speculate: int = 0,
    draft: str | None = None,
    expert_parallel: bool = False,
) -> None:
    """Complete prompts: [MODEL_DIR] PROMPT [PROMPT ...]. Prints the text as it is generated, then a speed summary on stderr.

    Without MODEL_DIR the small model shipped in the package runs (a Mixtral-style model
    trained on Python's standard library: try "def fibonacci(n):"). With one prompt the
    completion streams token by token. Several prompts are packed and decoded together;
    each completion is printed whole, after its prompt and followed by a line "=====",
    as soon as it and those before it have finished, so the output keeps the prompts' order.

    Args:
        inputs: [MODEL_DIR] PROMPT [PROMPT ...]. The first is a model folder (params.json,
            consolidated.safetensors, a tokenizer file) when it is an existing directory, or
            contains a "/" and no whitespace (so a mistyped folder is an error, not a prompt);
            otherwise every input is a prompt for the default model.
        max_tokens: most new tokens per prompt.
        temperature: 0 samples greedily; higher values sample more freely.
        top_p: nucleus sampling: sample among the most likely tokens holding this much probability mass.
        seed: random seed for sampling (reproducible runs).
        chunk_size: prefill prompts in chunks of this many tokens (default: the sliding window).
        device: "cpu", "cuda", "cuda:1", ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU).
        json: a switch (--json, no value): print one JSON object instead of text: per prompt its completion, token ids and
            their log-probabilities, and the timings.
        num_pipeline_ranks: split the layers over this many pipeline stages, one process per
            GPU, which mistral starts on this machine (or torchrun starts, on several nodes).
        num_tensor_ranks: split every layer's heads and hidden units over this many processes
            (tensor parallelism, one GPU each, within one node), which read the weights together.
            With both, num_pipeline_ranks x num_tensor_ranks processes run.
        micro_batches: with num_pipeline_ranks > 1, run the prompts as this many groups that
            follow each other through the stages; by default one group per stage.
        lora: a LoRA adapter (lora.safetensors, with the rank and scaling in the `lora` section
            of the params.json beside it) to merge into the weights at load.
        speculate: propose up to this many tokens a step by prompt lookup (what followed the last
            words where they occurred before), checked in one forward call; greedy output is the same,
            token for token, and sampled output follows the same distribution.
        draft: with --speculate, a model folder of a smaller model with the same tokenizer, whose
            own tokens are the proposals instead of prompt lookup's.
        expert_parallel: a switch (--expert_parallel), with num_tensor_ranks > 1: a Mixtral's ranks
            hold whole experts (E / num_tensor_ranks each) instead of a slice of every expert.
    """
    folder, prompts = split_model_and_prompts([str(i) for i in inputs])
    if folder != DEFAULT_MODEL and not is_dir(folder):  # a prompt such as "print(1/2)" looks like a folder
        typed = str(inputs[0])  # as given: the Path drops a "./" or a trailing "/", which a prompt keeps
        raise MistralError(
            f'{typed}: model folder not found (an input with a "/" and no spaces is read as MODEL_DIR; for a prompt '
            f'like it, name the model first: mistral generate {DEFAULT_MODEL} "{typed}")'
        )
    if not prompts:
        raise MistralError('no prompt given: mistral generate [MODEL_DIR] "prompt" [more prompts]')
    for i, p in enumerate(prompts):
        if not p.strip():
            raise MistralError(f"prompt {i} is empty")
        check_text(p, f"prompt {i}")
    check_options([[0]], 1, max_tokens=max_tokens, temperature=temperature, top_p=top_p, chunk_size=chunk_size, seed=seed,
                  speculate=speculate)  # fmt: skip
    if temperature == 0 and top_p != 1:
        print("note: --top_p has no effect at --temperature 0, which decodes greedily", file=sys.stderr)
    world_size = check_positive_int(num_pipeline_ranks, "num_pipeline_ranks") * check_positive_int(num_tensor_ranks, "num_tensor_ranks")
    check_ranks(world_size, num_tensor_ranks, expert_parallel)
    if speculate and micro_batches not in (None, 1):
        raise MistralError("--speculate runs the prompts in one micro-batch: leave out --micro_batches")
    if draft is not None and world_size > 1:
        raise MistralError("--draft runs on one process (--speculate alone runs on several): leave out --num_tensor_ranks and --num_pipeline_ranks")
    if draft is not None and not speculate:
        raise MistralError("--draft proposes tokens for speculative decoding: give --speculate K too")
    if draft is not None and not is_dir(Path(str(draft))):
        raise MistralError(f"{draft}: draft model folder not found")
    if world_size > 1 and not launch.started_by_a_launcher():
        check_device(device)
        check_layout(folder, num_pipeline_ranks, num_tensor_ranks, micro_batches, expert_parallel)
        sys.exit(launch.run_ranks(world_size, sys.argv[1:]))  # this command again, once per rank
    start = time.perf_counter()
    libraries: dict[str, float] = {}
    model, tokenizer = load(folder, device, dtype, num_pipeline_ranks, num_tensor_ranks, None if lora is None else str(lora), libraries,
                            expert_parallel=expert_parallel)  # fmt: skip
    draft_model = None if draft is None else Transformer.from_folder(str(draft), device=model.device, dtype=model.dtype)
    load_s = time.perf_counter() - start - sum(libraries.values())
    completions = [Completion(tokenizer, tokenizer.encode(p, bos=True)) for p in prompts]
    n = model.args.max_batch_size
    if len(prompts) > n:
        print(f"note: {len(prompts)} prompts run as {-(-len(prompts) // n)} batches of at most max_batch_size={n}", file=sys.stderr)

    printed = 0  # completions written so far (several prompts)

    def show(final: bool = False) -> None:
        nonlocal printed
        if json:
            return
        if len(prompts) == 1:
            # The prompt is echoed with the first token, not before: an error while reading
            # it (the cache does not fit, the logits are NaN) comes before any output.
            if not printed:
                write(prompts[0])
                printed = 1
            write(completions[0].unshown(final))
            return
        while printed < len(prompts) and (final or completions[printed].finish_reason == "eos"):
            write(f"{prompts[printed]}{completions[printed].unshown(final=True)}\n=====\n")
            printed += 1

    timing = Timing(load_s=load_s, warm_up=libraries)
    options = dict(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, chunk_size=chunk_size, seed=seed, micro_batches=micro_batches,
        speculate=speculate, draft=draft_model,
        stage=Stage(model),  # one for every batch: a later batch of the same shapes runs on the first's caches
    )
    for first in range(0, len(prompts), n):
        complete(model, tokenizer, completions[first : first + n], show, timing=timing, **options)
    show(final=True)
    if len(prompts) == 1 and not json:
        write("\n")

    n_prompt = sum(len(c.prompt_tokens) for c in completions)
    n_new = sum(len(c.tokens) for c in completions)
    # The first token of each sequence comes out of the prefill; the rest are decoded.
    timings = dict(
        load_s=round(timing.load_s, 4),
        warm_up_s=round(timing.warm_up_s, 4),
        warm_up={kind: round(s, 4) for kind, s in timing.warm_up.items()},
        prefill_s=round(timing.prefill_s, 4),
        decode_s=round(timing.decode_s, 4),
        prompt_tokens=n_prompt,
        generated_tokens=n_new,
        prefill_tokens_per_s=rate(n_prompt, timing.prefill_s),
        decode_tokens_per_s=rate(timing.decoded, timing.decode_s),
    )
    if timing.speculation:
        timings["speculation"] = dict(timing.speculation)
    if json:
        results = [
            dict(prompt=p, completion=c.text, prompt_tokens=c.prompt_tokens, tokens=c.tokens, logprobs=c.logprobs,
                 finish_reason=c.finish_reason)
            for p, c in zip(prompts, completions)
        ]
        print(jsonlib.dumps(dict(model=str(folder), results=results, timings=timings), indent=2))
    print(timing_line(n_prompt, n_new, timing), file=sys.stderr)


def timing_line(n_prompt: int, n_new: int, timing: Timing) -> str:
    """prompt tokens: 11, generated tokens: 64, load: 2.9 s, warm-up: 0.4 s (kernels 0.3 s, graph capture 0.1 s),
    prefill: 0.02 s (550.0 tokens/s), decode: 0.29 s (217.2 tokens/s)"""
    warm_up = ", ".join(f"{kind} {s:.2f} s" for kind, s in timing.warm_up.items())
    return (
        f"prompt tokens: {n_prompt}, generated tokens: {n_new}, load: {timing.load_s:.2f} s, "
        + (f"warm-up: {timing.warm_up_s:.2f} s ({warm_up}), " if warm_up else "")
        + f"prefill: {timing.prefill_s:.2f} s ({rate(n_prompt, timing.prefill_s)} tokens/s), "
        + f"decode: {timing.decode_s:.2f} s ({rate(timing.decoded, timing.decode_s)} tokens/s)"
        + (speculation_line(timing.speculation) if timing.speculation else "")
    )


def speculation_line(counts: dict[str, int]) -> str:
    """, speculation: 1.92 tokens a row per verify step (kept 312 of 480 proposals)"""
    per_row = counts["tokens"] / counts["rows"] if counts.get("rows") else 0.0
    return f", speculation: {per_row:.2f} tokens a row per verify step (kept {counts.get('kept', 0)} of {counts.get('proposed', 0)} proposals)"


def rate(tokens: int, seconds: float) -> float:
    """Tokens per second; 0 when nothing ran (--max_tokens 0 has no prefill to time)."""
    return round(tokens / seconds, 1) if seconds > 0 else 0.0


class Conversation:
    """A chat in the model folder's own format (its tokenizer's encode_chat), kept in
    the KV cache between turns.

    Each turn encodes the whole conversation as the format has it, with the answers so
    far as the model sampled them (the format's encoding of their text could split
    them otherwise), and reads only what the cache has not seen: the last token of the
    previous answer (sampled, never fed back), its eos and the new instruction. Where
    the format rewrites an earlier turn (v2 and v3 put the system prompt before the
    last user message) the cache rewinds to where the two encodings part.
    """

    def __init__(self, model: Transformer, tokenizer: ChatTokenizer, max_context: int, system: Optional[str] = None,
                 **options: Any):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        # A windowed model's rolling buffer holds W slots, whatever max_context says.
        window = model.args.sliding_window
        self.cache = model.make_cache(1, max_context if window is None else window)
        self.stage = Stage(model)  # whose decode graph, captured on the cache, every turn replays
        self.max_context = max_context
        self.messages: list[Message] = [{"role": "system", "content": system}] if system else []
        self.prompt: list[int] = []  # the last turn's prompt, then its sampled answer:
        self.answer: list[int] = []  # the cache holds a prefix of the two

    def say(self, text: str, on_step: Callable[["Completion"], None] = lambda c: None) -> Completion:
        """Add a user turn; returns the answer, streamed through on_step as it grows."""
        messages = self.messages + [{"role": "user", "content": text}]
        tokens = self.tokenizer.encode_chat(messages)
        if self.answer and tokens[: len(self.prompt)] == self.prompt:
            # The format kept the previous prompt: the answer's text follows up to its eos.
            tokens = self.prompt + self.answer + tokens[tokens.index(self.tokenizer.eos_id, len(self.prompt)) :]
        if self.model.args.sliding_window is None and len(tokens) + self.options["max_tokens"] > self.max_context:
            raise MistralError(
                f"the conversation would pass max_context={self.max_context} tokens, which a model without a "
                "sliding window must keep in its cache: start a new chat or raise --max_context"
            )
        cached = (self.prompt + self.answer)[: self.cache.lengths[0]]
        same = next((i for i, (a, b) in enumerate(zip(tokens, cached)) if a != b), min(len(tokens) - 1, len(cached)))
        self.cache.rewind(0, same)
        answer = Completion(self.tokenizer, tokens)
        complete(self.model, self.tokenizer, [answer], lambda: on_step(answer), cache=self.cache, stage=self.stage, **self.options)
        self.messages, self.prompt, self.answer = messages, tokens, answer.tokens
        # The answer's text as mistral-inference's chat keeps it: its tokens decoded alone.
        # An empty one is left out, and the next user message joins this one, as
        # mistral_common joins neighbouring messages of one role.
        content = self.tokenizer.decode(answer.tokens)
        if content.strip():
            self.messages.append({"role": "assistant", "content": content})
        else:
            self.answer = []
        return answer


# The longest input line chat reads: input piped from an endless source (/dev/zero, a
# stuck producer) would otherwise be read into memory until the system kills the process.
MAX_LINE = 1 << 20


def read_line(number: int) -> Optional[str]:
    """Line `number` of the input, without its newline (after a "> " prompt on a terminal; piped
    input gets none, so the output is the answers alone); None at the end of input."""
    if sys.stdin is None:  # started with stdin closed (<&-)
        return None
    try:
        if sys.stdin.isatty():  # input() edits the line (arrows, history) on a terminal
            return input("> ")
        line = sys.stdin.readline(MAX_LINE + 1)
    except EOFError:
        return None
    except UnicodeDecodeError:
        raise MistralError(f"line {number} of the input is not UTF-8 text") from None
    text = line.removesuffix("\n")
    if len(text) > MAX_LINE:
        raise MistralError(f"line {number} of the input is longer than {MAX_LINE:,} characters")
    return text if line else None


@text_arguments
def chat(
    model_dir: str | None = None,
    *,
    max_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: int | None = None,
    device: str | None = None,
    dtype: str | None = None,
    max_context: int = 32768,
    system: Optional[str] = None,
    lora: Optional[str] = None,
) -> None:
    """Talk with a model: mistral chat [MODEL_DIR]. The folder's own chat format; an empty line or end of input quits.

    The conversation stays in the KV cache between turns, so each turn reads only the
    new message. Answers stream as they are generated. The default model (no MODEL_DIR)
    was never taught to chat: it continues Python code, so expect code, not answers.

    Args:
        model_dir: folder with params.json, consolidated.safetensors and one tokenizer file
            (tokenizer.model, tokenizer.model.v1/v2/v3/v7/v7m1 or tekken.json), whose version
            decides the chat format; by default the small model shipped in the package.
        max_tokens: most new tokens per answer.
        temperature: 0 samples greedily; higher values sample more freely.
        top_p: nucleus sampling: sample among the most likely tokens holding this much probability mass.
        seed: random seed for sampling (turn i uses seed + i).
        device: "cpu", "cuda", ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU).
        max_context: longest conversation in tokens for a model without a sliding window,
            whose cache keeps every token; a windowed model's rolling cache holds W tokens
            and the conversation may run on forever.
        system: a system prompt, placed where the folder's format puts it.
        lora: a LoRA adapter (lora.safetensors, with the rank and scaling in the `lora` section
            of the params.json beside it) to merge into the weights at load.
    """
    check_options([[0]], 1, max_tokens=max_tokens, temperature=temperature, top_p=top_p, chunk_size=None, seed=seed)
    if temperature == 0 and top_p != 0.9:  # a --top_p given (0.9 is chat's own), which greedy decoding ignores
        print("note: --top_p has no effect at --temperature 0, which decodes greedily", file=sys.stderr)
    check_positive_int(max_context, "max_context")
    model, tokenizer = load(DEFAULT_MODEL if model_dir is None else str(model_dir), device, dtype,
                            lora=None if lora is None else str(lora))
    system = None if system is None else str(system)  # fire reads --system 42 as an int
    conversation = Conversation(
        model, tokenizer, max_context, system=system, max_tokens=max_tokens, temperature=temperature, top_p=top_p
    )
    turn = 0
    while True:
        line = read_line(turn + 1)
        if line is None or not line.strip():
            break
        check_text(line, f"line {turn + 1} of the input")
        conversation.options["seed"] = None if seed is None else (seed + turn) % 2**64
        answer = conversation.say(line, on_step=lambda c: write(c.unshown()))
        write(answer.unshown(final=True) + "\n")
        turn += 1


@text_arguments
def convert(hf_dir: str, out_dir: str) -> None:
    """Convert a Hugging Face MistralForCausalLM / MixtralForCausalLM folder into a model folder.

    Args:
        hf_dir: HF folder with config.json and model.safetensors (or model-0000x-of-0000y.safetensors
            shards with model.safetensors.index.json), as save_pretrained writes it.
        out_dir: folder to write params.json and consolidated.safetensors into; the tokenizer
            file (tekken.json, tokenizer.model.v7/v3/v2/v1 or tokenizer.model, the first found)
            is copied too when hf_dir has one. Tensors keep their dtype.
    """
    args = convert_hf(hf_dir, out_dir)
    kind = "Mixtral" if args.moe else "Mistral"
    print(f"wrote {out_dir}: {kind}, {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size}", file=sys.stderr)
    if not any((Path(out_dir) / name).is_file() for name in TOKENIZER_FILES):
        print(f"note: {hf_dir} holds no tokenizer file ({', '.join(TOKENIZER_FILES)}), as save_pretrained writes none: "
              f"copy the model's own into {out_dir}, which generate and chat need", file=sys.stderr)  # fmt: skip


@text_arguments
def quantize(model_dir: str, out_dir: str, *, method: str = "int8", group_size: int | None = None) -> None:
    """Quantize a model folder's weights into a new folder, which generate and chat run unchanged.

    Args:
        model_dir: folder with params.json and consolidated.safetensors (or consolidated.00.pth).
        out_dir: folder to write: params.json records the method, consolidated.safetensors holds
            the quantized weights with their scales, and the tokenizer files are copied.
        method: int8 (each projection weight: attention, feed-forward, experts, as int8 with one
            scale per output row) or int4 (two 4-bit codes a byte, a scale and a minimum per group
            of input columns); embeddings, norms, router and output unchanged.
        group_size: int4 only, the input columns per scale: 32, 64 or 128 (128 when not given),
            which must divide the model's widths; 32 or 64 for the default model, 192 wide.
    """
    start = time.perf_counter()
    with LoadProgress(Path(model_dir)) as progress:  # the source is read as the output is written: a failed write ends mid-line
        quantize_folder(model_dir, out_dir, str(method), group_size, progress=progress)
    print(f"wrote {out_dir} ({method}) in {time.perf_counter() - start:.1f} s", file=sys.stderr)


@text_arguments
def serve(
    model_dir: str | None = None,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_batch: int | None = None,
    max_context: int = 32768,
    max_queue: int = 256,
    chunk_size: int | None = None,
    model_name: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    grace_s: float = 10.0,
    num_tensor_ranks: int = 1,
    expert_parallel: bool = False,
) -> None:
    """Serve a model over HTTP with OpenAI's API: mistral serve [MODEL_DIR]. Needs the [serve] extra: pip install -e '.[serve]' in a clone.

    /v1/completions and /v1/chat/completions (the folder's chat format), whole or streamed,
    /v1/models and /health. Requests join the running batch between forward calls and
    leave it when they finish, so none waits for another to end (continuous batching).
    SIGTERM or Ctrl-C: nothing new is accepted, what runs may finish for --grace_s seconds.

    Args:
        model_dir: folder with params.json, consolidated.safetensors and one tokenizer file;
            by default the small model shipped in the package.
        host: address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).
        port: port to listen on (0: any free one, printed when the server is up).
        max_batch: requests running at once, each in a row of the KV cache (default: the model's max_batch_size).
        max_context: the longest a request may run, prompt and answer, in tokens; a model without
            a sliding window keeps that many in each row of its cache.
        max_queue: requests that may wait for a row; past that a request gets 429.
        chunk_size: prompt tokens read per forward call, beside the rows that decode (default: a row's slots).
        model_name: the model's name in the API (default: the folder's name).
        device: "cpu", "cuda", "cuda:1", ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU).
        grace_s: seconds that running requests may take to finish after SIGTERM, before they are ended.
        num_tensor_ranks: split every layer over this many processes (tensor parallelism, one GPU
            each), which mistral starts; rank 0 serves HTTP and every rank runs each forward call.
        expert_parallel: a switch (--expert_parallel), with num_tensor_ranks > 1: a Mixtral's ranks
            hold whole experts (E / num_tensor_ranks each) instead of a slice of every expert.
    """
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise MistralError("mistral serve needs the optional extra [serve] (starlette, uvicorn): pip install -e '.[serve]' in a clone of mistral") from None
    from mistral.engine import Engine
    from mistral.serve import Plans, follow, model_name_of, serve as run_server

    folder = DEFAULT_MODEL if model_dir is None else Path(str(model_dir))
    host = str(host)
    if not is_int(port) or not 0 <= port < 65536:
        raise MistralError(f"port must be an integer in 0..65535, got {port!r}")
    check_positive_int(max_context, "max_context")
    if not is_int(max_queue) or max_queue < 0:
        raise MistralError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    for name, value in (("max_batch", max_batch), ("chunk_size", chunk_size)):
        if value is not None:
            check_positive_int(value, name)
    if not is_number(grace_s) or not 0 <= grace_s < 1e6:
        raise MistralError(f"grace_s must be a number of seconds in [0, 1e6), got {grace_s!r}")
    ranks = check_positive_int(num_tensor_ranks, "num_tensor_ranks")
    check_ranks(ranks, ranks, expert_parallel)
    if not launch.started_by_a_launcher():  # before the model loads (a minute, for a big one); not on a rank, beside rank 0's
        check_address(host, port)
    if ranks > 1 and not launch.started_by_a_launcher():
        check_device(device)
        check_layout(folder, 1, ranks, None, expert_parallel)
        # The ranks have grace_s to end after a signal, and a few seconds more to say goodbye.
        sys.exit(launch.run_ranks(ranks, sys.argv[1:], seconds_to_end=grace_s + launch.SECONDS_TO_END))
    model, tokenizer = load(folder, device, dtype, num_tensor_ranks=ranks, expert_parallel=expert_parallel)
    engine = Engine(model, max_batch=max_batch, max_context=max_context, chunk_size=chunk_size)
    # Every bucket's graph and every kind of call's kernels before the first request, not during it.
    warm_up_s = engine.warm_up()
    if model.layout.world_rank == 0:
        print(f"mistral serve: warm-up {warm_up_s:.1f} s", file=sys.stderr, flush=True)
    plans = Plans() if ranks > 1 else None  # every rank makes the group, in the same order
    if plans is not None and model.layout.world_rank > 0:
        follow(engine, plans)
        return
    name = model_name_of(folder) if model_name is None else str(model_name)
    run_server(engine, tokenizer, name, host, port, max_queue, grace_s, plans)


def check_address(host: str, port: int) -> None:
    """One line for an address the server could not listen on (a port in use, a host not of this machine),
    found by binding it as uvicorn will: asyncio's create_server, every address the host names ("" all)."""
    import asyncio

    async def bind() -> None:
        server = await asyncio.get_running_loop().create_server(asyncio.Protocol, host, port)
        server.close()
        await server.wait_closed()

    try:
        asyncio.run(bind())
    except (OSError, UnicodeError) as e:  # a malformed host name fails its IDNA encoding
        raise MistralError(f"cannot serve on {host}:{port}: {bind_error(host, port, e)}") from None


def bind_error(host: str, port: int, e: Exception) -> str:
    """The OS's words for why create_server failed on host:port. asyncio's message names the
    address again; newer ones (3.13, late 3.12) pass over an address not of this machine
    (EADDRNOTAVAIL) and says "could not bind on any address", with no errno: a plain bind
    of the same addresses gets the OS's reason back."""
    import socket

    if not isinstance(e, OSError) or isinstance(e, socket.gaierror):  # getaddrinfo's errno is its own
        return getattr(e, "strerror", None) or str(e)
    if e.errno:
        return os.strerror(e.errno)
    try:
        for family, kind, proto, _, address in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            with socket.socket(family, kind, proto) as plain:
                plain.bind(address)
    except OSError as plain_error:
        return plain_error.strerror or str(e)
    return str(e)


COMMANDS = {"generate": generate, "chat": chat, "serve": serve, "convert": convert, "quantize": quantize}


def run(args: list[str]) -> None:
    """Check the whole command line, then let fire call the command (or show its help)."""
    if not args or args[0] in HELP:
        write(command_help(None) + "\n")
        return
    name, rest = args[0], args[1:]
    # --help anywhere before "--" shows the command's help, and runs nothing: fire would run
    # the command with the arguments before it and show help on what it returned.
    if name in COMMANDS and any(a in HELP for a in rest[: rest.index("--") if "--" in rest else None]):
        write(command_help(name) + "\n")
        return
    if name not in COMMANDS:
        raise MistralError(f"{name!r}: no such command: mistral {{{', '.join(COMMANDS)}}} ..., or mistral --help")
    command = COMMANDS[name]
    prompts: list[str] = []
    if name == "generate" and "--" in rest:  # what follows "--" is prompts, even "-x"
        rest, prompts = rest[: rest.index("--")], rest[rest.index("--") + 1 :]
    fire_args = check_arguments(command, name, rest)
    if prompts:
        command = with_inputs(command, prompts)
    fire.Fire({name: command}, command=[name, *fire_args], name="mistral")


def command_help(name: Optional[str]) -> str:
    """fire's help page of `mistral NAME` (of `mistral`, for None), without the line fire puts
    before it ("INFO: Showing help with the command 'mistral NAME -- --help'", a command that
    would run NAME on "--help")."""
    from fire import helptext, trace

    path = trace.FireTrace(COMMANDS, name="mistral")
    if name is None:
        return helptext.HelpText(COMMANDS, path)
    path.AddAccessedProperty(COMMANDS[name], name, [name], None, None)
    return helptext.HelpText(COMMANDS[name], path)


def with_inputs(command: Callable, extra: list[str]) -> Callable:
    """command with `extra` after the positional arguments fire gives it.

    fire reads "-x" as a flag wherever it stands, and what follows "--" as its own
    flags, so prompts given after "--" bypass it.
    """

    @functools.wraps(command)  # keeps fire's parse settings (text_arguments)
    def run(*inputs: str, **options: Any) -> None:
        command(*inputs, *extra, **options)

    return run


def _terminate(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """`mistral COMMAND ...`: exit 2 with one line for what the user typed wrong."""
    # What torch.compile and Triton tell their own developers ("Online softmax is
    # disabled on the fly ...") is no news to a user of the command.
    warnings.filterwarnings("ignore", module=r"torch\._inductor|triton")
    # Ours (params.json's unknown keys, say) as one line each, without Python's file and source line.
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    # SIGTERM ends the command as Ctrl-C does, through every `finally` on the way: a
    # folder being written (quantize, convert) takes its temporary files with it.
    previous = signal.signal(signal.SIGTERM, _terminate)
    if sys.stderr is None:  # started with stderr closed (2>&-): print(file=None) would write to stdout
        sys.stderr = open(os.devnull, "w")
    try:
        if sys.stdout is None:  # started with stdout closed (>&-)
            raise MistralError("stdout is closed: give the output somewhere to go (a file, a pipe)")
        run(sys.argv[1:])
    except MistralError as e:
        # The message may quote bytes that were not UTF-8 (lone surrogates) or control
        # characters (a \r or \n typed in an option): print them escaped, on one line.
        message = f"error: {e}".encode(errors="backslashreplace").decode()
        print("".join(c if c.isprintable() else repr(c)[1:-1] for c in message), file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: stop quietly, as a shell command does
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `mistral generate ... | head` stopped reading
        # Python flushes stdout again at exit; point it at /dev/null so that does not fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except OSError as e:
        if e.filename is not None:  # a file or folder met without a check of its own (one we may not read, say)
            print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
            sys.exit(2)
        # Writing the output failed (a full disk behind > file).
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"error: cannot write the output ({e.strerror or e})", file=sys.stderr)
        sys.exit(2)
    finally:
        signal.signal(signal.SIGTERM, previous)  # main() called in-process (tests) leaves the handler as it was


if __name__ == "__main__":
    main()
