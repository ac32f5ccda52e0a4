"""Weight-only quantization: `mistral quantize MODEL_DIR OUT_DIR [--method int8|int4] [--group_size 128]`.

Each projection weight W [out, in] (wq, wk, wv, wo, w1, w2, w3, every expert's) becomes
codes and scales (mistral/linear.py has the formats):
- int8: q int8 with one scale per output row, symmetric: s = max|W_row| / 127, W ~ q * s.
- int4: q in 0..15, two to a byte, with a scale and a minimum per group of group_size
  (32, 64, 128) consecutive input columns, asymmetric: s = (max - min) / 15, W ~ q * s + min.
A decode step reads every weight once, so 1 byte (int8) or about half a byte (int4) per
weight instead of 2 lowers the floor. The embeddings, norms, the router and the output
layer stay in the checkpoint's dtype (a small share of the bytes, and the most sensitive).

The folder written has the same tensor names, each quantized weight beside a tensor
`<name>.scales` (and int4's `<name>.mins`), and params.json records
{"quantization": {"method": "int8"}} or {"method": "int4", "group_size": 128}.

The source is read, quantized and written one tensor at a time: the host holds one
tensor of the source and its quantized form, never the model (Mixtral's would be 47 GB).
"""

import dataclasses
from pathlib import Path
from typing import Iterator, Optional, Union

import torch

from mistral.args import QUANTIZATION_METHODS, ModelArgs, QuantArgs
from mistral.checkpoint import (
    DTYPES, PARAMS, Progress, Specs, TensorStream, check_dimensions, check_writable, open_tensors, read_args, weights_path, write_folder,
)  # fmt: skip
from mistral.errors import MistralError
from mistral.linear import quantize
from mistral.model import checkpoint_shapes
from mistral.tokenizer import check_vocabulary, load_tokenizer

QUANTIZED = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
# Rows of a weight quantized at a time: their float32 copy and its temporaries stay small
# (1024 rows of Mixtral's 14336 x 4096 experts: 16 MB each), whatever the weight's size.
ROWS = 1024


def is_quantized(name: str) -> bool:
    """Whether `mistral quantize` turns this checkpoint tensor into codes and scales."""
    part, kind = name.split(".")[-2:]
    return part in QUANTIZED and kind == "weight"


def quantize_folder(
    src: Union[str, Path],
    dst: Union[str, Path],
    method: str = "int8",
    group_size: Optional[int] = None,
    progress: Optional[Progress] = None,
) -> None:
    """Write the quantized copy of the model folder src into dst (its tokenizer files copied).

    group_size: int4's columns per scale (default 128); int8 takes none. A source whose
    tensors differ from what its params.json implies (names, shapes, dtypes) is refused
    before anything is written, as is one without a tokenizer; one that holds values that
    are not finite, when the stream meets them, and the half-written folder goes.
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
    quantization = QuantArgs(method, 128 if method == "int4" and group_size is None else group_size)
    quantized_args = dataclasses.replace(args, quantization=quantization)  # a group size the widths refuse is named here
    check_dimensions(src, args)  # before the shapes of params.json's model are made (n_layers: 1000000 takes minutes)
    # The tokenizer that generate would read, read here: a folder with a broken one would not run.
    check_vocabulary(src, load_tokenizer(src), args.vocab_size)
    tokenizers = [p for p in src.iterdir() if p.is_file() and (p.name.startswith("tokenizer") or p.name == "tekken.json")]
    path = weights_path(src)
    with open_tensors(path) as (specs, read):
        _check_source(path, args, specs)

        def tensors() -> Iterator[tuple[str, torch.Tensor]]:
            nbytes = 0
            for i, name in enumerate(specs):
                tensor = read(name)
                if not bool(torch.isfinite(tensor).all()):
                    raise MistralError(f"{path}: {name} holds values that are not finite (NaN or inf)")
                for out, t in _quantized(name, tensor, quantization).items():
                    nbytes += t.nbytes
                    yield out, t
                if progress is not None:
                    progress(i + 1, len(specs), nbytes)

        write_folder(dst, quantized_args, TensorStream(_written(specs, quantization), tensors()), tokenizers=tokenizers)


def _check_source(path: Path, args: ModelArgs, specs: Specs) -> None:
    """The source's tensors are the names and shapes its params.json implies, each of a float dtype."""
    expected = checkpoint_shapes(args)
    missing, extra = sorted(set(expected) - set(specs)), sorted(set(specs) - set(expected))
    if missing or extra:
        what = f"missing tensors {', '.join(missing[:5])}" if missing else f"unexpected tensors {', '.join(extra[:5])}"
        raise MistralError(f"{path}: {what} (does params.json match?)")
    for name, (dtype, shape) in specs.items():
        if shape != expected[name]:
            raise MistralError(f"{path}: {name} is {list(shape)}, params.json implies {list(expected[name])}")
        if not dtype.is_floating_point:
            raise MistralError(f"{path}: {name} holds {dtype} values, where a float weight belongs")
        if dtype not in DTYPES.values():  # a .pth's float8, say: no model weight, and no safetensors name here
            raise MistralError(f"{path}: {name} holds {dtype} values, which no model weight has")


def _quantized(name: str, tensor: torch.Tensor, quantization: QuantArgs) -> dict[str, torch.Tensor]:
    """A source tensor as the tensors written for it: a projection's codes and scales (a few rows at a
    time, see ROWS), in the order of `_written`; anything else as it is."""
    if not is_quantized(name):
        return {name: tensor}
    parts = [quantize(rows, quantization) for rows in tensor.split(ROWS)]
    return {name.removesuffix("weight") + kind: torch.cat([p[kind] for p in parts]) for kind in parts[0]}


def _written(specs: Specs, quantization: QuantArgs) -> Specs:
    """The dtype and shape of each tensor the quantized folder holds, in the order `_quantized` makes
    them: a projection's as `quantize` makes them of its shape alone (on the meta device)."""
    written = {}
    for name, (dtype, shape) in specs.items():
        if is_quantized(name):
            made = quantize(torch.empty(shape, device="meta"), quantization)
            written |= {name.removesuffix("weight") + kind: (t.dtype, tuple(t.shape)) for kind, t in made.items()}
        else:
            written[name] = (dtype, shape)
    return written
