"""Write a tiny random-weight model folder (params.json, consolidated.safetensors,
tokenizer.model) for tests and quick runs on a CPU.

    python scripts/make_tiny_model.py /tmp/tiny [--moe] [--sliding_window 8]

The tokenizer is a sentencepiece model trained on docstrings of Python's standard
library, so it needs nothing from the network.
"""

import io
import pydoc
from pathlib import Path
from typing import Any, Optional

import fire
import sentencepiece as spm
import torch

from mistral import ModelArgs, MoeArgs, Transformer
from mistral.checkpoint import TOKENIZER

EOS_ID = 2  # Mistral's: unk 0, bos 1, eos 2
STDLIB_MODULES = ("json", "pathlib", "collections", "itertools", "functools", "argparse", "textwrap", "string", "re", "os")


def stdlib_text() -> str:
    """Docstrings of a few standard-library modules: English prose that ships with Python."""
    return "\n".join(pydoc.render_doc(name, renderer=pydoc.plaintext) for name in STDLIB_MODULES)


def train_tokenizer(path: Path, vocab_size: int, text: Optional[str] = None, **options: Any) -> None:
    """Train a sentencepiece model with Mistral's special ids (unk 0, bos 1, eos 2).

    options: more sentencepiece trainer settings (e.g. identity normalization for code).
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter((text or stdlib_text()).splitlines()),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=EOS_ID,
        pad_id=-1,
        minloglevel=2,
        **options,
    )
    path.write_bytes(model.getvalue())


def make_tiny_model(
    folder: str,
    *,
    moe: bool = False,
    sliding_window: Optional[int] = 8,
    vocab_size: int = 512,
    dim: int = 64,
    n_layers: int = 2,
    seed: int = 0,
    never_eos: bool = False,
) -> Path:
    """A random model small enough for a CPU test, with its tokenizer.

    never_eos: greedy decoding never ends on eos, for tests that need a run to go on: eos's
    row of the output layer is zero (logit 0) and two other rows are opposite, so one of
    their logits is above 0 whatever the hidden state. (Left to chance, a random model's
    greedy text ended on eos after 10 tokens on one machine and ran past 3000 on another:
    near-ties fall with the CPU's rounding.)
    """
    out = Path(folder)
    args = ModelArgs(
        dim=dim,
        n_layers=n_layers,
        head_dim=16,
        hidden_dim=2 * dim,
        n_heads=4,
        n_kv_heads=2,
        norm_eps=1e-5,
        vocab_size=vocab_size,
        sliding_window=sliding_window,
        max_batch_size=8,
        moe=MoeArgs(num_experts=4, num_experts_per_tok=2) if moe else None,
    )
    torch.manual_seed(seed)
    model = Transformer(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=dim**-0.5)
    if never_eos:
        with torch.no_grad():
            weight = model.output.weight
            weight[EOS_ID] = 0
            weight[EOS_ID + 2] = -weight[EOS_ID + 1]
    model.save(out)
    train_tokenizer(out / TOKENIZER, vocab_size)
    return out


if __name__ == "__main__":
    fire.Fire(make_tiny_model)
