"""Making a Transformer: from a model folder, from random numbers, and back to a folder.

Every way builds the model in place first (`empty`: its memory allocated on the device,
nothing written), then writes each checkpoint tensor, or a tensor-parallel rank's slice of
it, straight into its view (`checkpoint_slices`). `Transformer.from_folder`, `.random`
and `.save` call these, handing in the class.
"""

import zlib
from pathlib import Path
from typing import Any, Optional, TypeVar, Union

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mistral.args import ModelArgs
from mistral.attention import Backend
from mistral.checkpoint import Progress, check_dimensions, load_into, read_args, write_folder
from mistral.errors import MistralError, is_int
from mistral.linear import quantize
from mistral.lora import merge_lora
from mistral.parallel import Layout, check_tensor_split

# The model class (model.Transformer), handed in by its methods: this module builds and fills
# it, and imports nothing of the math above it.
Model = TypeVar("Model", bound=nn.Module)

# Tensor parallelism's split of each checkpoint tensor, by its name's last part
# (Megatron-LM): wq, wk, wv, w1, w3 by output rows (whole heads, hidden units); wo, w2
# by input columns. Everything else (embeddings, norms, the router, output) is whole on every rank.
TENSOR_SPLIT_DIM = {"wq": 0, "wk": 0, "wv": 0, "w1": 0, "w3": 0, "wo": 1, "w2": 1}


def tensor_split_dim(name: str, ndim: int) -> Optional[int]:
    """The dimension along which tensor parallelism splits a checkpoint tensor of ndim dimensions, or None (whole on every rank).

    A quantized weight's scales (and int4's mins) follow its dimensions where they have them:
    int8's, one per output row [out], split with wq's rows and whole beside wo's columns;
    int4's, one per group of input columns [out, in / group_size], split with wq's rows and
    with wo's columns (whole groups to a rank: parallel.check_tensor_split). An int4 weight's
    bytes [out, in / 2] split by columns as its columns do.
    """
    dim = TENSOR_SPLIT_DIM.get(name.split(".")[-2])
    return dim if dim is not None and dim < ndim else None


def checkpoint_slices(model: Any) -> dict[str, tuple[torch.Tensor, Optional[int]]]:
    """Per checkpoint tensor: the view of this rank's part of it, and the dimension it is split along (or None)."""
    layout = model.layout

    def whole(name: str) -> bool:  # one rank, or an expert of expert parallelism
        return layout.num_tensor_ranks == 1 or (layout.expert_parallel and ".experts." in name)

    return {name: (view, None if whole(name) else tensor_split_dim(name, view.dim())) for name, view in model.state_dict().items()}


class _Uninitialized(TorchFunctionMode):
    """Modules built inside hold memory of `dtype` on `device` that nothing has written.

    Loading writes every weight, so the initial values a module draws in its __init__
    would be wasted: a Mixtral's worth of float32 random numbers first. Building on the
    "meta" device instead, and then allocating, would be PyTorch's usual way, but meta
    tensors run their shape functions in Python through torch._dynamo, whose import
    alone takes 1.3 s, as long as everything else of a short run on a CPU. So here the
    factories (empty, ones, zeros, randn) allocate and the in-place initializers do nothing.
    """

    _FACTORIES = (torch.empty, torch.ones, torch.zeros, torch.randn)
    _INITIALIZERS = (torch.Tensor.normal_, torch.Tensor.uniform_, nn.init.normal_, nn.init.kaiming_uniform_)

    def __init__(self, device: torch.device, dtype: torch.dtype):
        super().__init__()
        self.device, self.dtype = device, dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = dict(kwargs or {})
        if func in self._FACTORIES:
            kwargs["device"] = self.device
            kwargs["dtype"] = kwargs.get("dtype") or self.dtype  # a quantized weight stays int8 (uint8 for int4)
            return torch.empty(*args, **kwargs)
        if func in self._INITIALIZERS:  # nn.init's functions name the tensor; Tensor's methods take it first
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def check_device(device: Any) -> Optional[str]:
    """A device (--device; device= of from_folder and random) as torch names it (None: not given),
    if it is one the model runs on here: torch's own error for mps or xpu is an assertion, and meta loads no values."""
    if device is None:  # not `device or ...`: fire hands "--device 0" over as the int 0
        return None
    if is_int(device) and 0 <= device < 2**31:
        device = f"cuda:{device}"  # what torch.device(0) means, said without asking for a GPU
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):  # and "--device 1e999" as a float, 2**63 as too large an int
        raise MistralError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    # meta holds no values; mps, xpu: not run here; torch keeps an index in 8 bits (cuda:200 reads cuda:-56)
    if parsed.type not in ("cpu", "cuda") or not 0 <= (parsed.index or 0) < 128:
        raise MistralError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise MistralError(f"device {str(parsed)!r}: no CUDA GPU is available")
    return str(parsed)


def empty(
    cls: type[Model],
    args: ModelArgs,
    device: Union[str, torch.device],
    dtype: torch.dtype,
    attention_backend: Backend,
    *,
    num_pipeline_ranks: int,
    num_tensor_ranks: int,
    pipeline_rank: Optional[int],
    tensor_rank: Optional[int],
    expert_parallel: bool,
) -> Model:
    """This process's part of the model (its place: parallel.Layout.of's arguments), its memory
    allocated on the device but not written."""
    device = check_device(device) or "cpu"
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise MistralError(f"dtype must be a floating-point torch.dtype (torch.float32, torch.bfloat16, torch.float16), got {dtype!r}")
    check_tensor_split(num_tensor_ranks, args, expert_parallel)  # before anything is loaded, or a process group is asked for
    layout = Layout.of(num_pipeline_ranks, num_tensor_ranks, pipeline_rank, tensor_rank, expert_parallel)
    try:
        with _Uninitialized(torch.device(device), dtype):  # the weights are written straight into place
            model = cls(args, layout=layout, attention_backend=attention_backend)
    except MistralError:
        raise
    except (RuntimeError, OverflowError, TypeError, ValueError) as e:  # out of memory, or sizes past int64
        raise MistralError(f"the model of this params.json does not fit {device} ({str(e).splitlines()[0][:200]})") from None
    return model.eval()


def from_folder(
    cls: type[Model],
    folder: Union[str, Path],
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    attention_backend: Backend = "auto",
    progress: Optional[Progress] = None,
    num_pipeline_ranks: int = 1,
    num_tensor_ranks: int = 1,
    pipeline_rank: Optional[int] = None,
    tensor_rank: Optional[int] = None,
    lora_path: Optional[Union[str, Path]] = None,
    expert_parallel: bool = False,
) -> Model:
    """Load params.json and consolidated.safetensors (or consolidated.00.pth) from a folder.

    progress: called after each tensor is read (a CLI shows it while a large checkpoint loads).
    num_pipeline_ranks, num_tensor_ranks: this process holds one part of the model
    (see mistral/parallel.py) and reads only its own tensors and slices; its place is
    pipeline_rank and tensor_rank, or, when not given, its rank in the process group.
    expert_parallel: a Mixtral's tensor ranks hold whole experts (parallel.Layout).
    lora_path: a LoRA adapter (lora.safetensors) to merge into the weights (see mistral/lora.py).
    """
    args = read_args(folder)
    check_dimensions(folder, args)
    model = empty(cls, args, device, dtype, attention_backend, num_pipeline_ranks=num_pipeline_ranks,
                  num_tensor_ranks=num_tensor_ranks, pipeline_rank=pipeline_rank, tensor_rank=tensor_rank, expert_parallel=expert_parallel)  # fmt: skip
    layout = model.layout
    load_into(folder, checkpoint_slices(model), layout.tensor_rank, layout.num_tensor_ranks, progress=progress,
              allow_extra=layout.world_size > 1)  # fmt: skip
    if lora_path is not None:
        if layout.world_size > 1:
            raise MistralError(f"{lora_path}: LoRA adapters are not supported on several processes")
        merge_lora(model, lora_path)
    return model


def random(
    cls: type[Model],
    args: ModelArgs,
    *,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    attention_backend: Backend = "auto",
    num_pipeline_ranks: int = 1,
    num_tensor_ranks: int = 1,
    pipeline_rank: Optional[int] = None,
    tensor_rank: Optional[int] = None,
    expert_parallel: bool = False,
) -> Model:
    """Random weights (normal, std dim^-0.5) made directly on the device: benchmarks need no files.

    Each checkpoint tensor is drawn whole from a generator seeded by (seed, its name),
    then this rank's slice kept, so every parallel rank holds exactly its part of the
    model that one process would hold on the same device.
    """
    model = empty(cls, args, device, dtype, attention_backend, num_pipeline_ranks=num_pipeline_ranks,
                  num_tensor_ranks=num_tensor_ranks, pipeline_rank=pipeline_rank, tensor_rank=tensor_rank, expert_parallel=expert_parallel)  # fmt: skip
    layout, ranks = model.layout, model.layout.num_tensor_ranks
    slices = checkpoint_slices(model)
    with torch.no_grad():
        for name, (view, dim) in slices.items():
            if name.endswith((".scales", ".mins")):
                continue  # written with its weight
            shape = list(view.shape)
            if dim is not None:
                shape[dim] *= ranks
            if view.dtype == torch.uint8:
                shape[-1] *= 2  # an int4 weight: the float weight's columns, two codes a byte
            # One 32-bit number: the CPU's generator keeps only the low 32 bits of a seed.
            generator = torch.Generator(view.device).manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            whole = torch.empty(shape, device=view.device).normal_(std=args.dim**-0.5, generator=generator)
            mine = {name: whole}
            if args.quantization is not None and not view.dtype.is_floating_point:  # what `mistral quantize` makes of it
                mine = {name.removesuffix("weight") + kind: t for kind, t in quantize(whole, args.quantization).items()}
            for n, t in mine.items():
                part, part_dim = slices[n]
                part.copy_(t if part_dim is None else t.chunk(ranks, part_dim)[layout.tensor_rank])
    return model


def save(model: Any, folder: Union[str, Path]) -> None:
    """Write params.json and consolidated.safetensors, the layout from_folder reads."""
    if model.layout.world_size > 1:
        raise MistralError(f"rank {model.layout.world_rank} holds only part of the model: save it from one process")
    write_folder(folder, model.args, model.state_dict())
