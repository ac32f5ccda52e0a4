"""LoRA adapters in Mistral's released format, merged into the weights at load.

An adapter is lora.safetensors, one pair of tensors per adapted weight W of the
checkpoint (`layers.0.attention.wq.weight` [out, in] has
`layers.0.attention.wq.lora_A.weight` [r, in] and `...lora_B.weight` [out, r]),
and the `lora` section of the params.json beside it gives r and the scaling s.
Merging once, W += s * B @ A, leaves the forward pass untouched: the model runs
exactly as fast as without an adapter.
"""

from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from mistral.args import ModelArgs
from mistral.checkpoint import PARAMS
from mistral.errors import MistralError

LORA_A, LORA_B = ".lora_A.weight", ".lora_B.weight"  # the suffixes of an adapter's two tensors


def merge_lora(model: nn.Module, path: Union[str, Path]) -> None:
    """Add the adapter at `path` into the model's weights, in place.

    model.state_dict() holds the checkpoint's tensors as views into the model's fused
    weights (see mistral/views.py), so adding into a view updates the model.
    """
    path = Path(path)
    if not path.is_file():
        raise MistralError(f"{path}: LoRA file not found")
    lora = ModelArgs.from_json(path.parent / PARAMS).lora
    if lora is None:
        raise MistralError(f"{path.parent / PARAMS}: no 'lora' section (rank, scaling) for {path.name}")
    weights = model.state_dict()
    try:
        path.open("rb").close()  # safetensors reports a file it may not read as "No such file or directory"
    except OSError as e:
        raise MistralError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if not names:
                raise MistralError(f"{path}: holds no tensors: an adapter that changes nothing")
            for name in sorted(names):
                if not name.endswith((LORA_A, LORA_B)):
                    raise MistralError(f"{path}: {name} is neither a lora_A nor a lora_B weight")
                target = name[: -len(LORA_A)] + ".weight"
                if target not in weights:
                    raise MistralError(f"{path}: {name} adapts {target}, which the model does not have")
                if weights[target].dim() != 2:
                    raise MistralError(f"{path}: {name} adapts {target}, of shape {list(weights[target].shape)}: "
                                       "LoRA adapts projection weights (matrices), not norms")  # fmt: skip
                other = name[: -len(LORA_A)] + (LORA_B if name.endswith(LORA_A) else LORA_A)
                if other not in names:
                    raise MistralError(f"{path}: {name} has no {other}")
            for name in sorted(n for n in names if n.endswith(LORA_A)):
                w = weights[name[: -len(LORA_A)] + ".weight"]
                if not w.dtype.is_floating_point:  # int8, int4
                    raise MistralError(f"{path}: a LoRA adapter merges into float weights: merge it before `mistral quantize`")
                a, b = f.get_tensor(name), f.get_tensor(name[: -len(LORA_A)] + LORA_B)
                for n, t in ((name, a), (name[: -len(LORA_A)] + LORA_B, b)):
                    if not t.is_floating_point():  # would merge as numbers, and generate nonsense
                        raise MistralError(f"{path}: {n} holds {t.dtype} values, where a float weight belongs")
                if a.shape != (lora.rank, w.shape[1]) or b.shape != (w.shape[0], lora.rank):
                    raise MistralError(
                        f"{path}: {name} is {list(a.shape)} and its lora_B {list(b.shape)}, rank {lora.rank} and the "
                        f"weight's {list(w.shape)} imply {[lora.rank, w.shape[1]]} and {[w.shape[0], lora.rank]}"
                    )
                with torch.no_grad():  # float32 product: a bfloat16 one would round the small delta twice
                    w.add_((b.to(w.device, torch.float32) @ a.to(w.device, torch.float32) * lora.scaling).to(w.dtype))
    except SafetensorError as e:
        raise MistralError(f"{path}: unreadable safetensors file ({e})") from None
