"""What int8 weights cost in quality: held-out perplexity and top-1 agreement, float against int8.

    python scripts/int8_quality.py [--minutes 4] [--out notes/bench/int8_quality.json]

Two models, each evaluated on the modules of Python's standard library that
scripts/train_tiny.py holds out (every 20th; the default model never saw them):

- the default model that ships in mistral/default_model (Mixtral-style, 4 experts);
- a Hugging Face `MistralForCausalLM` trained here for `minutes` on the CPU (the other
  modules, the default model's tokenizer), saved by transformers and converted with
  `mistral convert`: its weights reach `mistral quantize` through the HF import (names
  mapped, the rotary rows of wq and wk unpermuted).

Each model folder is quantized as `mistral quantize` does it, and the float and int8
folders both load through `Transformer.from_folder` on the CPU in float32. Needs the
test extras (transformers): `pip install -e '.[test]'`.
"""

import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import fire
import torch
from transformers import MistralConfig, MistralForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_tiny import CONTEXT, encode, evaluate, lr_scale, split_sources  # noqa: E402

from mistral import Transformer  # noqa: E402
from mistral.checkpoint import TOKENIZER  # noqa: E402
from mistral.hf import convert  # noqa: E402
from mistral import DEFAULT_MODEL  # noqa: E402
from mistral.quantize import quantize_folder  # noqa: E402
from mistral.tokenizer import Tokenizer  # noqa: E402


def train_hf(tokens: torch.Tensor, vocab_size: int, minutes: float, seed: int, lr: float = 3e-3, batch: int = 8) -> MistralForCausalLM:
    """A small dense Mistral in HF's own code, trained for `minutes` of wall-clock time (AdamW, cosine)."""
    torch.manual_seed(seed)
    config = MistralConfig(
        vocab_size=vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
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
    return model.eval()


@torch.no_grad()
def compare(folder: Path, held_out: torch.Tensor, windows: int) -> dict[str, float]:
    """Perplexity of the float folder and of its int8 quantization, and how often their top-1 predictions agree."""
    quantized = folder.parent / f"{folder.name}-int8"
    quantize_folder(folder, quantized)
    float_model, int8_model = Transformer.from_folder(folder), Transformer.from_folder(quantized)
    tokens = held_out[: windows * CONTEXT]
    nll_float, nll_int8 = evaluate(float_model, tokens), evaluate(int8_model, tokens)
    agree, total = 0, 0
    for w in tokens.view(-1, CONTEXT):
        agree += (float_model(w, [CONTEXT]).argmax(-1) == int8_model(w, [CONTEXT]).argmax(-1)).sum().item()
        total += CONTEXT
    return dict(
        held_out_tokens=len(tokens),
        perplexity_float=round(math.exp(nll_float), 3),
        perplexity_int8=round(math.exp(nll_int8), 3),
        perplexity_increase=round(math.exp(nll_int8 - nll_float) - 1, 5),
        top1_agreement=round(agree / total, 4),
    )


def main(minutes: float = 4.0, windows: int = 64, seed: int = 0, threads: int = 2, out: Optional[str] = None) -> None:
    """minutes: training time of the HF model; windows: held-out windows of 256 tokens to evaluate on."""
    torch.set_num_threads(threads)
    tokenizer = Tokenizer(DEFAULT_MODEL / TOKENIZER)
    train_src, held_src, _ = split_sources()
    train, held_out = encode(tokenizer, train_src), encode(tokenizer, held_src)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        default = Path(tmp) / "default"
        shutil.copytree(DEFAULT_MODEL, default)
        results["default model"] = compare(default, held_out, windows)
        print("default model:", results["default model"], flush=True)

        hf_dir, ours = Path(tmp) / "hf", Path(tmp) / "converted"
        hf = train_hf(train, tokenizer.n_words, minutes, seed)
        hf.save_pretrained(hf_dir)
        convert(hf_dir, ours)
        shutil.copy(DEFAULT_MODEL / TOKENIZER, ours / TOKENIZER)
        # The import is exact: our float model of the converted folder gives HF's logits.
        window = held_out[:CONTEXT]
        with torch.no_grad():
            want = hf(window[None]).logits[0]
            got = Transformer.from_folder(ours)(window, [CONTEXT])
        conversion_error = ((got - want).norm() / want.norm()).item()
        results["converted HF model"] = compare(ours, held_out, windows) | dict(
            train_minutes=minutes, conversion_rel_error=conversion_error
        )
        print("converted HF model:", results["converted HF model"], flush=True)
    if out is not None:
        Path(out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    fire.Fire(main)
