"""Weight-only int8 quantization: `mistral quantize MODEL_DIR OUT_DIR`.

Each projection weight W [out, in] (wq, wk, wv, wo, w1, w2, w3, every expert's) becomes
int8 q with one scale per output row, symmetric: s = max|W_row| / 127, q = round(W / s),
W ~ q * s. A decode step reads every weight once, so reading 1 byte per weight instead
of 2 halves the floor. The embeddings, norms, the router and the output layer stay in
the checkpoint's dtype (a small share of the bytes, and the most sensitive).

The folder written has the same tensor names, each quantized weight beside a tensor
`<name>.scales`, and params.json records {"quantization": {"method": "int8"}}.
"""

import dataclasses
import pickle
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from mistral.args import QUANTIZATION_METHODS, QuantArgs
from mistral.checkpoint import (
    PARAMS, Progress, check_dimensions, check_writable, read_args, read_pth, weights_path, write_folder,
)
from mistral.errors import MistralError
from mistral.linear import quantize_int8
from mistral.model import checkpoint_shapes
from mistral.tokenizer import check_vocabulary, load_tokenizer

QUANTIZED = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def is_quantized(name: str) -> bool:
    """Whether `mistral quantize` turns this checkpoint tensor into int8."""
    part, kind = name.split(".")[-2:]
    return part in QUANTIZED and kind == "weight"


def quantize_folder(
    src: Union[str, Path], dst: Union[str, Path], method: str = "int8", progress: Optional[Progress] = None
) -> None:
    """Write the quantized copy of the model folder src into dst (its tokenizer files copied).

    A source whose tensors differ from what its params.json implies (names, shapes), or
    hold values that are not finite, is refused before anything is written, as is one
    without a tokenizer.
    """
    src, dst = Path(src), Path(dst)
    args = read_args(src)
    if args.quantization is not None:
        raise MistralError(f"{src / PARAMS}: already quantized ({args.quantization.method})")
    if src.resolve() == dst.resolve():
        raise MistralError(f"{dst}: write the quantized model into another folder than {src}")
    check_writable(dst)
    if method not in QUANTIZATION_METHODS:
        raise MistralError(f"--method {method!r}: this version quantizes with {', '.join(QUANTIZATION_METHODS)}")
    quantization = QuantArgs(method)
    check_dimensions(src, args)  # before the shapes of params.json's model are made (n_layers: 1000000 takes minutes)
    expected = checkpoint_shapes(args)
    # The tokenizer that generate would read, read here: a folder with a broken one would not run.
    check_vocabulary(src, load_tokenizer(src), args.vocab_size)
    tokenizers = [p for p in src.iterdir() if p.is_file() and (p.name.startswith("tokenizer") or p.name == "tekken.json")]
    path = weights_path(src)
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                tensors = _quantized(path, expected, list(f.keys()), f.get_tensor, progress)
        else:
            state = read_pth(path)
            tensors = _quantized(path, expected, list(state), state.__getitem__, progress)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise MistralError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None
    write_folder(dst, dataclasses.replace(args, quantization=quantization), tensors, tokenizers=tokenizers)


def _quantized(
    path: Path, expected: dict[str, tuple[int, ...]], names: list[str], read: Callable[[str], torch.Tensor],
    progress: Optional[Progress],
) -> dict[str, torch.Tensor]:  # fmt: skip
    missing, extra = sorted(set(expected) - set(names)), sorted(set(names) - set(expected))
    if missing or extra:
        what = f"missing tensors {', '.join(missing[:5])}" if missing else f"unexpected tensors {', '.join(extra[:5])}"
        raise MistralError(f"{path}: {what} (does params.json match?)")
    out: dict[str, torch.Tensor] = {}
    nbytes = 0
    for i, name in enumerate(names):
        tensor = read(name)
        if tuple(tensor.shape) != expected[name]:
            raise MistralError(f"{path}: {name} is {list(tensor.shape)}, params.json implies {list(expected[name])}")
        if not tensor.is_floating_point():
            raise MistralError(f"{path}: {name} holds {tensor.dtype} values, where a float weight belongs")
        if not bool(torch.isfinite(tensor).all()):
            raise MistralError(f"{path}: {name} holds values that are not finite (NaN or inf)")
        if is_quantized(name):
            q, scales = quantize_int8(tensor)
            out[name], out[name.removesuffix("weight") + "scales"] = q, scales
            nbytes += q.nbytes + scales.nbytes
        else:
            out[name] = tensor
            nbytes += tensor.nbytes
        if progress is not None:
            progress(i + 1, len(names), nbytes)
    return out
