"""Command line: `mistral generate MODEL_DIR "prompt" ...` and `mistral chat MODEL_DIR`."""

import inspect
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import fire
import torch
from fire import decorators, parser

from mistral.checkpoint import TOKENIZER
from mistral.errors import MistralError
from mistral.generate import check_options, stream
from mistral.hf import convert as convert_hf
from mistral.model import Transformer
from mistral.tokenizer import Tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load(model_dir: str, device: Optional[str], dtype: Optional[str]) -> tuple[Transformer, Tokenizer]:
    folder = Path(model_dir)
    if not folder.is_dir():
        raise MistralError(f"{folder}: model folder not found")
    if not (folder / TOKENIZER).is_file():
        raise MistralError(f"{folder}: no {TOKENIZER} in the model folder")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = str(torch.device(device))  # fire hands "--device 0" over as an int
    except RuntimeError:
        raise MistralError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MistralError(f"device {device!r}: no CUDA GPU is available")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    if dtype not in DTYPES:
        raise MistralError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    tokenizer = Tokenizer(folder / TOKENIZER)
    model = Transformer.from_folder(folder, device=device, dtype=DTYPES[dtype])
    if tokenizer.n_words != model.args.vocab_size:
        raise MistralError(f"{folder}: {TOKENIZER} has {tokenizer.n_words} tokens but params.json says vocab_size={model.args.vocab_size}")
    return model, tokenizer


def text_arguments(command: Callable) -> Callable:
    """Hand the model folder and the prompts to `command` exactly as typed.

    fire reads every argument as a Python literal when it can: the prompt "3.10" would
    arrive as the float 3.1, "1e3" as 1000.0, '"Hi"' without its quotes, and a folder named
    "123" as an int. Parameters with a default (the options) keep fire's parsing.
    """
    options = [name for name, p in inspect.signature(command).parameters.items() if p.default is not p.empty]
    command = decorators.SetParseFn(str)(command)  # default: the positionals and *prompts
    return decorators.SetParseFn(parser.DefaultParseValue, *options)(command)


@text_arguments
def generate(
    model_dir: str,
    *prompts: str,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: Optional[int] = 0,
    chunk_size: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
) -> None:
    """Complete each prompt and print the completions, then a one-line speed summary.

    Args:
        model_dir: folder with params.json, consolidated.safetensors and tokenizer.model.
        prompts: one or more prompts; they are packed and decoded together.
        max_tokens: most new tokens per prompt.
        temperature: 0 samples greedily; higher values sample more freely.
        top_p: nucleus sampling: sample among the most likely tokens holding this much probability mass.
        seed: random seed for sampling (reproducible runs).
        chunk_size: prefill prompts in chunks of this many tokens (default: the sliding window).
        device: "cpu", "cuda", "cuda:1", ... (default: cuda when available).
        dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU).
    """
    if not prompts:
        raise MistralError("no prompt given: mistral generate MODEL_DIR \"prompt\" [more prompts]")
    for i, p in enumerate(prompts):
        if not str(p).strip():
            raise MistralError(f"prompt {i} is empty")
    check_options([[0]], 1, max_tokens=max_tokens, temperature=temperature, top_p=top_p, chunk_size=chunk_size, seed=seed)
    model, tokenizer = load(model_dir, device, dtype)
    encoded = [tokenizer.encode(str(p), bos=True) for p in prompts]
    n = model.args.max_batch_size
    if len(encoded) > n:
        print(f"note: {len(encoded)} prompts run as {-(-len(encoded) // n)} batches of at most max_batch_size={n}", file=sys.stderr)

    completions: list[list[int]] = []
    prefill_s = decode_s = 0.0
    for first in range(0, len(encoded), n):
        batch = encoded[first : first + n]
        steps = []
        start = time.perf_counter()
        for i, (tokens, _) in enumerate(
            stream(batch, model, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                   chunk_size=chunk_size, eos_id=tokenizer.eos_id, seed=seed)
        ):
            steps.append(tokens.tolist())
            if i == 0:
                prefill_s += time.perf_counter() - start
                start = time.perf_counter()
        decode_s += time.perf_counter() - start if steps else 0.0
        for b in range(len(batch)):
            toks = [s[b] for s in steps]
            completions.append(toks[: toks.index(tokenizer.eos_id)] if tokenizer.eos_id in toks else toks)

    for prompt, completion in zip(prompts, completions):
        print(f"{prompt}{tokenizer.decode(completion)}")
        print("=====")
    n_prompt = sum(len(e) for e in encoded)
    n_new = sum(len(c) for c in completions)
    decode_tokens = max(n_new - len(completions), 0)
    print(
        f"prompt tokens: {n_prompt}, generated tokens: {n_new}, "
        f"prefill: {n_prompt / max(prefill_s, 1e-9):.1f} tokens/s, "
        f"decode: {decode_tokens / max(decode_s, 1e-9):.1f} tokens/s",
        file=sys.stderr,
    )


@text_arguments
def chat(
    model_dir: str,
    max_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.9,
    seed: Optional[int] = None,
    device: Optional[str] = None,
    dtype: Optional[str] = None,
) -> None:
    """Talk with the model; an empty line or end of input quits.

    Args:
        model_dir: folder with params.json, consolidated.safetensors and tokenizer.model.
        max_tokens: most new tokens per answer.
        temperature: 0 samples greedily; higher values sample more freely.
        top_p: nucleus sampling mass.
        seed: random seed for sampling.
        device: "cpu", "cuda", ... (default: cuda when available).
        dtype: float32, bfloat16 or float16.
    """
    check_options([[0]], 1, max_tokens=max_tokens, temperature=temperature, top_p=top_p, chunk_size=None, seed=seed)
    model, tokenizer = load(model_dir, device, dtype)
    history: list[int] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history += tokenizer.encode(f"[INST] {line} [/INST]", bos=not history)
        answer: list[int] = []
        for tokens, _ in stream([history], model, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                                eos_id=tokenizer.eos_id, seed=seed):
            token = int(tokens[0])
            if token == tokenizer.eos_id:
                break
            answer.append(token)
        print(tokenizer.decode(answer))
        history += answer + [tokenizer.eos_id]


def convert(hf_dir: str, out_dir: str) -> None:
    """Convert a Hugging Face MistralForCausalLM / MixtralForCausalLM folder into a model folder.

    Args:
        hf_dir: HF folder with config.json and model.safetensors (or model-0000x-of-0000y.safetensors
            shards with model.safetensors.index.json), as save_pretrained writes it.
        out_dir: folder to write params.json and consolidated.safetensors into; tokenizer.model is
            copied too when hf_dir has one. Tensors keep their dtype.
    """
    args = convert_hf(hf_dir, out_dir)
    kind = "Mixtral" if args.moe else "Mistral"
    print(f"wrote {out_dir}: {kind}, {args.n_layers} layers, dim {args.dim}, vocab {args.vocab_size}", file=sys.stderr)


def main() -> None:
    try:
        fire.Fire({"generate": generate, "chat": chat, "convert": convert})
    except MistralError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
