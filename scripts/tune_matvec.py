"""Write mistral/matvec_configs.json: the matrix-vector kernel's best config per shape on this GPU.

Runs two decode steps of each model below with random weights (bfloat16, int8 and int4,
and Mixtral's experts alone), which autotunes the kernel for every shape they use, and
writes what the autotuner chose, under this GPU's name, beside the entries of other
GPUs already in the file. With the file, a fresh machine's first run compiles one
config per shape instead of timing 17 (mistral/kernels.py, MATVEC_CONFIGS).

    python scripts/tune_matvec.py            # one H200: about a minute
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MISTRAL_7B  # noqa: E402

from mistral import ModelArgs, Transformer, generate, kernels  # noqa: E402
from mistral import DEFAULT_MODEL  # noqa: E402
from mistral.linear import quantize_int4, quantize_int8  # noqa: E402

KEYS = ["N", "K", "HAS_SCALES", "EXPERTS", "NORM", "GLU", "GROUP"]  # the autotuner's key, then the tensors' dtypes


def main() -> None:
    device = torch.device("cuda")
    kernels.MATVEC_CONFIGS.pop(torch.cuda.get_device_name(device), None)  # tune every shape anew, known ones too
    for quantization in (None, {"method": "int8"}, {"method": "int4", "group_size": 128}):
        args = ModelArgs(**dict(MISTRAL_7B, quantization=quantization))
        model = Transformer.random(args, device=device, dtype=torch.bfloat16)
        generate([[1, 2, 3]], model, max_tokens=3)
        del model
    generate([[1, 2, 3]], Transformer.from_folder(DEFAULT_MODEL, device=device, dtype=torch.bfloat16), max_tokens=3)
    x, experts = torch.randn(2, 4096, device=device, dtype=torch.bfloat16), torch.tensor([5, 2], device=device)
    for n, k, glu in ((2 * 14336, 4096, True), (4096, 14336, False)):  # Mixtral 8x7B's w1|w3 and w2
        w = torch.randn(8, n, k, device=device, dtype=torch.bfloat16) / k**0.5
        x = x if k == 4096 else torch.randn(2, k, device=device, dtype=torch.bfloat16)
        kernels.expert_matvec(x, w, experts, glu=glu)
        q, s = quantize_int8(w)
        kernels.expert_matvec(x, q, experts, s.to(x.dtype), glu=glu)
        q, s, m = quantize_int4(w, 128)
        kernels.expert_matvec(x, q, experts, s.to(x.dtype), m.to(x.dtype), glu=glu)
        del w, q
    torch.cuda.synchronize()
    found = {}
    for key, config in kernels._matvec_kernel.cache.items():
        N, K, *flags, group = key[: len(KEYS)]
        x_dtype, w_dtype = key[len(KEYS) : len(KEYS) + 2]
        name = kernels.matvec_key(N, K, getattr(torch, x_dtype.split(".")[-1]), getattr(torch, w_dtype.split(".")[-1]),
                                  **dict(zip(KEYS[2:-1], map(bool, flags))), **({"GROUP": group} if group else {}))  # fmt: skip
        found[name] = [config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_warps]
    path = Path(kernels.__file__).with_name("matvec_configs.json")
    table = json.loads(path.read_text()) if path.is_file() else {}
    known = table.get(torch.cuda.get_device_name(device), {})
    table[torch.cuda.get_device_name(device)] = dict(sorted({**known, **found}.items()))
    path.write_text(json.dumps(table, indent=1) + "\n")
    print(f"wrote {len(found)} shapes for {torch.cuda.get_device_name(device)} into {path}")
    print(json.dumps(found, indent=1))


if __name__ == "__main__":
    main()
