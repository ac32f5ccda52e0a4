"""Train the small Mixtral-style model that ships in mistral/default_model/.

    python scripts/train_tiny.py [--out mistral/default_model] [--minutes 20] [--init FOLDER]

It learns from the source code of Python's standard library (PSF license), which
every Python installation carries, so it needs nothing from the network. The model
is built from this package's own modules (mistral.Transformer) and exercises what
the library is about: a sliding window (64) smaller than the training context (256),
so the rolling-buffer cache wraps while it generates, and a sparse mixture of 4
experts with top-2 routing. Training runs on the CPU: each step packs several
sequences back to back, and the forward without a cache applies the block-diagonal
sliding-window mask, the same path as a first prefill.

Every 20th module is held out; at the end the script reports the held-out perplexity
next to a unigram baseline (train-set token frequencies, add-one smoothing, same
tokenizer) and writes them, with the run's other numbers, into the folder's training.json.
"""

import json
import math
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import Optional

import fire
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_tiny_model import train_tokenizer  # noqa: E402

from mistral import ModelArgs, MoeArgs, Transformer  # noqa: E402
from mistral.checkpoint import TOKENIZER, write_folder  # noqa: E402
from mistral.tokenizer import Tokenizer  # noqa: E402

CONTEXT = 256
# Generated data, not prose or code written by people.
SKIPPED = ("_sysconfigdata", "this.py", "antigravity.py")
# Mistral's own tokenizer keeps text as it is (no whitespace folding), which code needs.
CODE_TOKENIZER = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
)


def stdlib_sources() -> list[tuple[str, str]]:
    """(file name, text) of the top-level modules of this Python's standard library."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in lib.glob("*.py") if not p.name.startswith(SKIPPED))
    return [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in files]


def split_sources() -> tuple[list[str], list[str], list[str]]:
    """(train texts, held-out texts, held-out module names): every 20th module is held out."""
    sources = stdlib_sources()
    held = [i % 20 == 0 for i in range(len(sources))]
    return (
        [text for (_, text), h in zip(sources, held) if not h],
        [text for (_, text), h in zip(sources, held) if h],
        [name for (name, _), h in zip(sources, held) if h],
    )


def encode(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """The texts' tokens back to back, each between bos and eos."""
    return torch.tensor([t for text in texts for t in tokenizer.encode(text, bos=True, eos=True)])


def lr_scale(progress: float, warmup: float = 0.03) -> float:
    """The learning rate's factor at this fraction of the training time: linear warm-up, then a cosine to 2%."""
    scale = progress / warmup if progress < warmup else 0.5 * (1 + math.cos(math.pi * (progress - warmup) / (1 - warmup)))
    return max(scale, 0.02)


def tiny_args(vocab_size: int, n_layers: int = 4, experts: bool = True) -> ModelArgs:
    return ModelArgs(
        dim=192,
        n_layers=n_layers,
        head_dim=32,
        hidden_dim=384,
        n_heads=6,
        n_kv_heads=2,
        norm_eps=1e-5,
        vocab_size=vocab_size,
        rope_theta=10000.0,
        sliding_window=64,
        max_batch_size=8,
        moe=MoeArgs(num_experts=4, num_experts_per_tok=2) if experts else None,
    )


def sequence_loss(model: Transformer, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of windows [B, L], packed into one call of B*L tokens."""
    B, L = windows.shape
    logits = model(windows.flatten(), [L] * B).view(B, L, -1)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: Transformer, tokens: torch.Tensor, batch: int = 8) -> float:
    """Mean negative log-likelihood (nats/token) over consecutive CONTEXT-token windows."""
    windows = tokens[: len(tokens) // CONTEXT * CONTEXT].view(-1, CONTEXT)
    total = 0.0
    for i in range(0, len(windows), batch):
        total += sequence_loss(model, windows[i : i + batch]).item() * len(windows[i : i + batch])
    return total / len(windows)


def unigram_nll(train: torch.Tensor, held_out: torch.Tensor, vocab_size: int) -> float:
    """The same predicted tokens as `evaluate` (each window's first is not predicted)."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    targets = held_out[: len(held_out) // CONTEXT * CONTEXT].view(-1, CONTEXT)[:, 1:]
    return -logp[targets.flatten()].mean().item()


def train_tiny(
    out: str = "mistral/default_model",
    minutes: float = 20.0,
    vocab_size: int = 4096,
    batch: int = 4,
    lr: float = 3e-3,
    seed: int = 0,
    threads: int = 2,
    init: Optional[str] = None,
    layers: int = 4,
    experts: bool = True,
    tokenizer_of: Optional[str] = None,
) -> None:
    """Train for `minutes` of wall-clock time, then save weights (bfloat16), tokenizer and notes.

    Args:
        out: the model folder to write.
        minutes: training time; the learning rate follows a cosine over it.
        vocab_size: sentencepiece vocabulary.
        batch: sequences of CONTEXT tokens packed into one step.
        lr: peak AdamW learning rate.
        seed: torch seed for the initialization and the sampled windows.
        threads: CPU threads.
        init: continue training the model (and keep the tokenizer) of this folder; the
            steps, tokens and minutes of its training.json add up.
        layers, experts: the model's layers, and whether its feed-forward is the mixture of 4
            experts (else one dense SwiGLU of the same width).
        tokenizer_of: a new model with the tokenizer of this folder's (a draft model for
            speculative decoding must share its target's vocabulary):

            python scripts/train_tiny.py --out /tmp/draft --layers 2 --experts False --tokenizer_of mistral/default_model
    """
    if init is not None and (tokenizer_of is not None or layers != 4 or not experts):
        sys.exit("--init continues a model as it is: leave out --tokenizer_of, --layers and --experts")
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    folder = Path(out)
    # The folder is written whole at the end (write_folder refuses one that holds files, the
    # one continued in place included): until then the tokenizer lives beside the work.
    work = Path(tempfile.mkdtemp(prefix="train_tiny."))

    train_src, held_src, held_names = split_sources()
    t0 = time.time()
    before = dict(steps=0, tokens_seen=0, train_minutes=0.0)
    if tokenizer_of is not None:
        shutil.copy(Path(tokenizer_of) / TOKENIZER, work / TOKENIZER)
    elif init is None:
        train_tokenizer(work / TOKENIZER, vocab_size, "\n".join(train_src), **CODE_TOKENIZER)
    else:
        shutil.copy(Path(init) / TOKENIZER, work / TOKENIZER)
        before = {k: json.loads((Path(init) / "training.json").read_text())[k] for k in before}
    tokenizer = Tokenizer(work / TOKENIZER)
    train, held_out = encode(tokenizer, train_src), encode(tokenizer, held_src)
    print(f"tokenizer {time.time() - t0:.0f}s; train {len(train)} tokens, held out {len(held_out)} tokens "
          f"({len(held_names)} modules)", flush=True)

    if init is None:
        model = Transformer(tiny_args(tokenizer.n_words, layers, experts))
        for p in model.parameters():
            if p.dim() == 2:
                torch.nn.init.normal_(p, std=0.02)
    else:
        model = Transformer.from_folder(init)
    args = model.args
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters", flush=True)

    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95))
    budget = minutes * 60
    start = time.time()
    step, seen, smooth = 0, 0, None
    while (progress := (time.time() - start) / budget) < 1:
        for group in opt.param_groups:
            group["lr"] = lr * lr_scale(progress)
        offsets = torch.randint(0, len(train) - CONTEXT, (batch,))
        windows = torch.stack([train[o : o + CONTEXT] for o in offsets.tolist()])
        loss = sequence_loss(model, windows)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, seen = step + 1, seen + windows.numel()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step} {time.time() - start:.0f}s loss {smooth:.3f} lr {lr * lr_scale(progress):.2e} "
                  f"{seen / (time.time() - start):.0f} tokens/s", flush=True)
    train_s = time.time() - start

    # Ship bfloat16 weights, and measure the model as shipped.
    model = model.to(torch.bfloat16).float()
    model.eval()
    model_nll = evaluate(model, held_out)
    base_nll = unigram_nll(train, held_out, args.vocab_size)
    new = folder.with_name(folder.name + ".new")
    shutil.rmtree(new, ignore_errors=True)
    write_folder(new, args, model.to(torch.bfloat16).state_dict(), work / TOKENIZER)
    shutil.rmtree(work)
    shutil.copy(Path(sysconfig.get_paths()["stdlib"]) / "LICENSE.txt", new / "LICENSE-PSF.txt")
    if folder.is_dir():  # retrained in place: its README stays
        if (folder / "README.md").is_file():
            shutil.copy(folder / "README.md", new / "README.md")
        shutil.rmtree(folder)
    new.rename(folder)
    stats = dict(
        parameters=n_params,
        train_tokens=len(train),
        held_out_tokens=len(held_out),
        steps=before["steps"] + step,
        tokens_seen=before["tokens_seen"] + seen,
        train_minutes=round(before["train_minutes"] + train_s / 60, 1),
        held_out_perplexity=round(math.exp(model_nll), 2),
        unigram_perplexity=round(math.exp(base_nll), 2),
        held_out_modules=held_names,
        python=sys.version.split()[0],
    )
    (folder / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    fire.Fire(train_tiny)
