"""What quantized weights cost in quality: held-out perplexity and top-1 agreement, float against each method.

    python scripts/quant_quality.py [--methods int8,int4-128,int4-64,int4-32] [--minutes 4] [--out notes/bench/quant_quality.json]

A method is int8, or int4-G: int4 in groups of G input columns (int4 alone: G = 128, the
default of `mistral quantize`). Two models, each evaluated on the modules of Python's
standard library that scripts/train_tiny.py holds out (every 20th; neither saw them):

- the default model that ships in mistral/default_model (Mixtral-style, 4 experts, 192
  wide: int4 in groups of 128 does not divide it, and is reported so);
- a Hugging Face `MistralForCausalLM` (dense, 256 wide, so that every group size divides
  it) trained here for `minutes` on the CPU (the other modules, the default model's
  tokenizer), saved by transformers and converted with `mistral convert`: its weights
  reach `mistral quantize` through the HF import (names mapped, the rotary rows of wq
  and wk unpermuted).

Each model folder is quantized as `mistral quantize` does it, and every folder loads
through `Transformer.from_folder` on the CPU in float32. Needs the test extras
(transformers): `pip install -e '.[test]'`.
"""

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

import fire
import torch
from transformers import MistralConfig, MistralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import CONTEXT, encode, evaluate, lr_scale, split_sources  # noqa: E402

from mistral import DEFAULT_MODEL, MistralError, Transformer  # noqa: E402
from mistral.checkpoint import TOKENIZER  # noqa: E402
from mistral.hf import convert  # noqa: E402
from mistral.quantize import quantize_folder  # noqa: E402
from mistral.tokenizer import Tokenizer  # noqa: E402


def train_hf(
    tokens: torch.Tensor, vocab_size: int, minutes: float, seed: int, lr: float = 3e-3, batch: int = 8
) -> tuple[MistralForCausalLM, dict[str, float]]:
    """A small dense Mistral in HF's own code, trained for `minutes` of wall-clock time (AdamW, cosine),
    and how far it got (steps, last loss: a busy machine trains fewer steps in the same time)."""
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, head_dim=32, rms_norm_eps=1e-5, rope_theta=1e4, sliding_window=None,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )  # fmt: skip
    model = MistralForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    start, step, budget = time.time(), 0, minutes * 60
    while (progress := (time.time() - start) / budget) < 1:
        for group in opt.param_groups:
            group["lr"] = lr * lr_scale(progress)
        offsets = torch.randint(0, len(tokens) - CONTEXT, (batch,)).tolist()
        windows = torch.stack([tokens[o : o + CONTEXT] for o in offsets])
        loss = model(windows, labels=windows).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 50 == 0:
            print(f"HF model: step {step}, {time.time() - start:.0f} s, loss {loss.item():.3f}", flush=True)
    return model.eval(), dict(train_minutes=minutes, train_steps=step, last_loss=round(loss.item(), 3))


def parse_method(method: str) -> tuple[str, Optional[int]]:
    """'int8' -> ('int8', None); 'int4' -> ('int4', 128); 'int4-64' -> ('int4', 64)."""
    name, _, group = method.partition("-")
    return name, int(group) if group else (128 if name == "int4" else None)


@torch.no_grad()
def compare(folder: Path, held_out: torch.Tensor, windows: int, methods: list[str]) -> dict[str, dict[str, Union[float, str]]]:
    """Per method: the perplexity of the float folder and of its quantization, and how often their top-1 predictions agree."""
    tokens = held_out[: windows * CONTEXT]
    float_model = Transformer.from_folder(folder)
    nll_float = evaluate(float_model, tokens)
    top1 = [float_model(w, [CONTEXT]).argmax(-1) for w in tokens.view(-1, CONTEXT)]
    results: dict[str, dict[str, Union[float, str]]] = {}
    for method in methods:
        quantized = folder.parent / f"{folder.name}-{method}"
        try:
            quantize_folder(folder, quantized, *parse_method(method))
        except MistralError as e:  # a group size the model's widths do not take
            results[method] = {"not run": str(e)}
            print(f"{folder.name} {method}: {e}", flush=True)
            continue
        model = Transformer.from_folder(quantized)
        nll = evaluate(model, tokens)
        agree = sum((model(w, [CONTEXT]).argmax(-1) == t).sum().item() for w, t in zip(tokens.view(-1, CONTEXT), top1))
        results[method] = dict(
            held_out_tokens=len(tokens),
            perplexity_float=round(math.exp(nll_float), 3),
            perplexity=round(math.exp(nll), 3),
            perplexity_increase=round(math.exp(nll - nll_float) - 1, 5),
            top1_agreement=round(agree / len(tokens), 4),
        )
        print(f"{folder.name} {method}: {results[method]}", flush=True)
    return results


def main(
    methods: str = "int8,int4-128,int4-64,int4-32", minutes: float = 4.0, windows: int = 64, seed: int = 0, threads: int = 2,
    out: Optional[str] = None,
) -> None:  # fmt: skip
    """methods: comma-separated (int8, int4, int4-G); minutes: training time of the HF model; windows: held-out windows of 256 tokens."""
    torch.set_num_threads(threads)
    chosen = methods.split(",") if isinstance(methods, str) else list(methods)  # fire reads "a,b" as a tuple
    tokenizer = Tokenizer(DEFAULT_MODEL / TOKENIZER)
    train_src, held_src, _ = split_sources()
    train, held_out = encode(tokenizer, train_src), encode(tokenizer, held_src)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        default = Path(tmp) / "default"
        shutil.copytree(DEFAULT_MODEL, default)
        results["default model"] = compare(default, held_out, windows, chosen)

        hf_dir, ours = Path(tmp) / "hf", Path(tmp) / "converted"
        hf, training = train_hf(train, tokenizer.n_words, minutes, seed)
        hf.save_pretrained(hf_dir)
        convert(hf_dir, ours)
        shutil.copy(DEFAULT_MODEL / TOKENIZER, ours / TOKENIZER)
        # The import is exact: our float model of the converted folder gives HF's logits.
        window = held_out[:CONTEXT]
        with torch.no_grad():
            want = hf(window[None]).logits[0]
            got = Transformer.from_folder(ours)(window, [CONTEXT])
        conversion_error = ((got - want).norm() / want.norm()).item()
        results["converted HF model"] = compare(ours, held_out, windows, chosen)
        results["converted HF model"]["model"] = training | dict(conversion_rel_error=conversion_error)
    if out is not None:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
