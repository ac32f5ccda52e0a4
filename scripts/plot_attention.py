"""Draw what the library does with attention, into docs/*.png (needs the `plot` extra).

    python scripts/plot_attention.py [--window 4] [--seqlens 6,3,1] [--new 3,2,2] [--out docs]

- docs/masks.png: the three xformers masks (first prefill, a later chunk, decoding),
  built by mistral/masks.py through the cache's own per-call metadata and materialized.
- docs/rolling_buffer.png: a rolling-buffer cache row after n tokens: which position
  each slot holds, and the slot the next token overwrites. Filled by the real cache.
- docs/receptive_field.png: for the default model (window 64, 4 layers), which input
  positions influence the last position after each layer: the gradient of its hidden
  state w.r.t. the input embeddings, on the CPU reference path. With a sliding window
  W, each layer reaches W - 1 positions further back.
"""

import sysconfig
from pathlib import Path
from typing import Sequence

import fire
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from mistral import RotatingBufferCache  # noqa: E402
from mistral.cache import cache_inputs  # noqa: E402
from mistral.main import DEFAULT_MODEL, load  # noqa: E402

ATTENDS = ListedColormap(["#f4f4f4", "#3b6fb6"])
NAMES = "abcdefgh"


def _grid(ax: plt.Axes, allowed: np.ndarray, rows: list[str], cols: list[str], blocks: Sequence[int], kv_blocks: Sequence[int], title: str) -> None:
    ax.imshow(allowed, cmap=ATTENDS, vmin=0, vmax=1)
    ax.set_xticks(range(len(cols)), cols, fontsize=7, rotation=90)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_xticks(np.arange(-0.5, len(cols)), minor=True)
    ax.set_yticks(np.arange(-0.5, len(rows)), minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    # Sequence boundaries: the mask is block-diagonal.
    for r in np.cumsum(blocks)[:-1]:
        ax.axhline(r - 0.5, color="#d9534f", linewidth=1.5)
    for c in np.cumsum(kv_blocks)[:-1]:
        ax.axvline(c - 0.5, color="#d9534f", linewidth=1.5)
    ax.set_xlabel(title, fontsize=9, labelpad=8)  # below: the key labels take the top


def plot_masks(window: int, seqlens: list[int], new: list[int], path: Path) -> None:
    """Three calls on one cache of W slots per sequence: prefill `seqlens`, then a chunk of
    `new` tokens each, then one decode step."""
    size = window
    fig, axes = plt.subplots(1, 3, figsize=(14, 5.6), layout="constrained")

    prefill = cache_inputs(seqlens, [0] * len(seqlens), size, window, torch.device("cpu"))
    tokens = [f"{NAMES[b]}{p}" for b, s in enumerate(seqlens) for p in range(s)]
    T = sum(seqlens)
    allowed = prefill.mask.materialize((T, T), dtype=torch.float32).isfinite().numpy()
    _grid(axes[0], allowed, tokens, tokens, seqlens, seqlens,
          f"1. first prefill: seqlens={seqlens}, W={window}\nBlockDiagonalCausalMask + local attention")

    cached = list(seqlens)
    chunk = cache_inputs(new, cached, size, window, torch.device("cpu"))
    queries = [f"{NAMES[b]}{p}" for b, (c, s) in enumerate(zip(cached, new)) for p in range(c, c + s)]
    keys, kv_blocks = [], []
    for b, (c, s) in enumerate(zip(cached, new)):
        held = range(c - min(c, size), c)  # the cache's slots, unrolled in order
        keys += [f"{NAMES[b]}{p}*" for p in held] + [f"{NAMES[b]}{p}" for p in range(c, c + s)]
        kv_blocks.append(len(held) + s)
    allowed = chunk.mask.materialize((len(queries), chunk.n_keys), dtype=torch.float32).isfinite().numpy()
    _grid(axes[1], allowed, queries, keys, new, kv_blocks,
          f"2. next chunk: {new} new after {cached} (* = read from cache)\n"
          "BlockDiagonalMask, local attention from bottom right")

    lengths = [c + s for c, s in zip(cached, new)]
    decode = cache_inputs([1] * len(lengths), lengths, size, window, torch.device("cpu"))
    queries = [f"{NAMES[b]}{n}" for b, n in enumerate(lengths)]
    # After the decode step's write, slot i of row b holds the latest position p with p % size == i.
    keys = []
    for b, n in enumerate(lengths):
        for slot in range(size):
            held = [p for p in range(n + 1) if p % size == slot]
            keys.append(f"{NAMES[b]}{held[-1]}@{slot}" if held else f"empty@{slot}")
    allowed = decode.mask.materialize((len(lengths), len(lengths) * size), dtype=torch.float32).isfinite().numpy()
    _grid(axes[2], allowed, queries, keys, [1] * len(lengths), [size] * len(lengths),
          f"3. decode: 1 new token each, keys = W={size} cache slots\n"
          "BlockDiagonalCausalWithOffsetPaddedKeysMask (token@slot)")
    fig.supxlabel("blue: the query (row) attends to the key (column); red lines: sequence boundaries", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rolling_buffer(window: int, path: Path, steps: Sequence[int] = (3, 4, 6, 9, 13)) -> None:
    """Feed tokens whose key is their own position through a real one-layer cache, one decode
    step at a time, and read back what each slot holds."""
    cache = RotatingBufferCache(1, 1, 10**6, window, 1, 1)
    snapshots = {}
    for n in range(1, max(steps) + 1):
        inputs = cache.prepare([1])
        position = torch.tensor([[[n - 1.0]]])  # [T=1, H_kv=1, D=1]
        inputs.update(cache.k[0], cache.v[0], position, position)  # layer 0's write
        cache.advance([1])
        if n in steps:
            filled = min(n, window)
            snapshots[n] = [int(cache.k[0, 0, slot, 0, 0]) if slot < filled else None for slot in range(window)]

    fig, ax = plt.subplots(figsize=(2.0 + 0.9 * window, 1.2 + 0.6 * len(steps)))
    for row, (n, slots) in enumerate(snapshots.items()):
        for slot, p in enumerate(slots):
            ax.add_patch(plt.Rectangle((slot + 0.03, row + 0.05), 0.94, 0.9, color="#f4f4f4" if p is None else "#3b6fb6"))
            ax.text(slot + 0.5, row + 0.5, "empty" if p is None else f"pos {p}", ha="center", va="center",
                    color="black" if p is None else "white", fontsize=9)
        # The next token (position n) goes to slot n mod W, over the oldest token once the row is full.
        ax.add_patch(plt.Rectangle((n % window + 0.03, row + 0.05), 0.94, 0.9, fill=False, edgecolor="#d9534f", lw=3))
    ax.set_xlim(0, window)
    ax.set_ylim(len(steps), 0)
    ax.set_xticks([s + 0.5 for s in range(window)], [f"slot {s}" for s in range(window)], fontsize=8)
    ax.set_yticks([r + 0.5 for r in range(len(steps))], [f"after {n} tokens" for n in snapshots], fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_title(f"Rolling-buffer cache row, W={window}:\nposition p is stored in slot p mod W", fontsize=10)
    ax.set_xlabel("red frame: where the next token is written (over the oldest)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def receptive_field(model_dir: Path, n_tokens: int = 256) -> tuple[np.ndarray, int]:
    """[n_layers, n_tokens]: |d h_l[last] / d embedding[j]| for the default model on a
    held-out module's source."""
    model, tokenizer = load(model_dir, "cpu", "float32")
    # copy.py was held out of training (see default_model/training.json).
    text = (Path(sysconfig.get_paths()["stdlib"]) / "copy.py").read_text()
    ids = torch.tensor(tokenizer.encode(text, bos=True)[:n_tokens])
    captured: dict[str, torch.Tensor] = {}
    hooks = [model.tok_embeddings.register_forward_hook(lambda m, a, out: captured.__setitem__("emb", out))]
    for i, layer in model.layers.items():
        hooks.append(layer.register_forward_hook(lambda m, a, out, i=i: captured.__setitem__(i, out)))
    model(ids, [len(ids)])
    for h in hooks:
        h.remove()
    rows = []
    for i in model.layers:
        (grad,) = torch.autograd.grad(captured[i][-1].pow(2).sum(), captured["emb"], retain_graph=True)
        rows.append(grad.norm(dim=-1).numpy())
    return np.stack(rows), model.args.sliding_window


def plot_receptive_field(path: Path, model_dir: Path = DEFAULT_MODEL) -> None:
    influence, window = receptive_field(model_dir)
    n_layers, T = influence.shape
    fig, ax = plt.subplots(figsize=(10, 0.9 + 0.55 * n_layers))
    shown = np.where(influence > 0, np.log10(np.maximum(influence, 1e-30)), np.nan)
    finite = shown[np.isfinite(shown)]
    image = ax.imshow(shown, aspect="auto", cmap="viridis", vmin=np.percentile(finite, 5), vmax=finite.max(),
                      interpolation="nearest")
    ax.set_facecolor("#f4f4f4")
    for layer in range(n_layers):
        reach = T - 1 - (layer + 1) * (window - 1)  # the first position the window lets through
        first = int(np.flatnonzero(influence[layer] > 0)[0])
        ax.plot([max(reach, 0) - 0.5] * 2, [layer - 0.5, layer + 0.5], color="#d9534f", lw=2)
        ax.text(T + 1, layer, f"from {first}", va="center", fontsize=8)
    ax.set_yticks(range(n_layers), [f"after layer {i + 1}" for i in range(n_layers)], fontsize=8)
    ax.set_xlabel(f"input position (the last output is position {T - 1})", fontsize=8)
    ax.set_title(f"Receptive field of the last position, default model (W={window}): "
                 f"each layer reaches W-1={window - 1} positions further back\n"
                 "colour: log10 |d hidden(last) / d embedding(j)|; grey: no influence; red: T-1-l(W-1)", fontsize=9)
    fig.colorbar(image, ax=ax, pad=0.08, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_attention(out: str = "docs", window: int = 4, seqlens: str = "6,3,1", new: str = "3,2,2") -> None:
    """Write masks.png, rolling_buffer.png and receptive_field.png into `out`.

    Args:
        out: folder for the PNGs.
        window: sliding window W of the mask and rolling-buffer pictures.
        seqlens: prompt lengths of the first prefill, comma-separated.
        new: tokens each sequence adds in the next chunk, comma-separated.
    """
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    as_list = lambda s: [int(x) for x in str(s).strip("()[]").split(",")]  # noqa: E731 (fire may hand a tuple)
    plot_masks(window, as_list(seqlens), as_list(new), folder / "masks.png")
    plot_rolling_buffer(window, folder / "rolling_buffer.png")
    plot_receptive_field(folder / "receptive_field.png")
    for name in ("masks.png", "rolling_buffer.png", "receptive_field.png"):
        print(folder / name)


if __name__ == "__main__":
    fire.Fire(plot_attention)
