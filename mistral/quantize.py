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
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import safe_open

from mistral.args import QuantArgs
from mistral.checkpoint import PARAMS, Progress, read_args, weights_path, write_folder
from mistral.errors import MistralError

QUANTIZED = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def is_quantized(name: str) -> bool:
    """Whether `mistral quantize` turns this checkpoint tensor into int8."""
    part, kind = name.split(".")[-2:]
    return part in QUANTIZED and kind == "weight"


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., out, in] -> (q int8 [..., out, in], scales float32 [..., out]), w ~ q * scales[..., None]."""
    w = w.float()
    scales = w.abs().amax(dim=-1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / scales[..., None]).clamp(-127, 127).to(torch.int8), scales


def quantize_folder(
    src: Union[str, Path], dst: Union[str, Path], method: str = "int8", progress: Optional[Progress] = None
) -> None:
    """Write the quantized copy of the model folder src into dst (its tokenizer files copied)."""
    src, dst = Path(src), Path(dst)
    args = read_args(src)
    if args.quantization is not None:
        raise MistralError(f"{src / PARAMS}: already quantized ({args.quantization.method})")
    if src.resolve() == dst.resolve():
        raise MistralError(f"{dst}: write the quantized model into another folder than {src}")
    quantization = QuantArgs(method)  # names an unknown method
    path = weights_path(src)
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            tensors = _quantized(list(f.keys()), f.get_tensor, progress)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        tensors = _quantized(list(state), state.__getitem__, progress)
    tokenizers = [p for p in src.iterdir() if p.is_file() and (p.name.startswith("tokenizer") or p.name == "tekken.json")]
    write_folder(dst, dataclasses.replace(args, quantization=quantization), tensors, tokenizers=tokenizers)


def _quantized(names: list[str], read: Callable[[str], torch.Tensor], progress: Optional[Progress]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    nbytes = 0
    for i, name in enumerate(names):
        tensor = read(name)
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
