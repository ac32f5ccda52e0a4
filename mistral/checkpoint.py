"""Mistral's checkpoint folder: params.json + consolidated.safetensors (+ tokenizer.model).

The tensor names are those of Mistral's released checkpoints, so a real folder loads
unchanged. Older folders hold consolidated.00.pth instead; it is read only through
torch.load(weights_only=True), which cannot run code hidden in the pickle.
"""

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from mistral.args import ModelArgs
from mistral.errors import MistralError

PARAMS = "params.json"
SAFETENSORS = "consolidated.safetensors"
PTH = "consolidated.00.pth"
TOKENIZER = "tokenizer.model"

Shapes = dict[str, tuple[int, ...]]
# progress(tensors read, tensors in all, bytes read): told after each tensor.
Progress = Callable[[int, int, int], None]


def read_args(folder: Union[str, Path]) -> ModelArgs:
    folder = Path(folder)
    if not folder.is_dir():
        raise MistralError(f"{folder}: model folder not found")
    return ModelArgs.from_json(folder / PARAMS)


def weights_path(folder: Union[str, Path]) -> Path:
    folder = Path(folder)
    for name in (SAFETENSORS, PTH):
        if (folder / name).is_file():
            return folder / name
    raise MistralError(f"{folder}: no {SAFETENSORS} (or {PTH}) in the model folder")


# Per checkpoint tensor: the view of the model it is read into, and the dimension along
# which a tensor-parallel rank holds one of T equal slices of it (None: the whole tensor).
Slices = dict[str, tuple[torch.Tensor, Optional[int]]]


def load_into(
    folder: Union[str, Path],
    slices: Slices,
    tensor_rank: int = 0,
    num_tensor_ranks: int = 1,
    *,
    allow_extra: bool = False,
    progress: Optional[Progress] = None,
) -> None:
    """Read each named tensor (or this rank's slice of it) into its view, after checking every name and shape.

    Only the slice is read from the file (safetensors reads slices without the whole
    tensor), and each goes straight into place: loading never holds a second copy of the
    model. allow_extra: tolerate tensors not asked for (a pipeline stage reads only its
    own layers from the shared file).
    """
    T = num_tensor_ranks
    expected: Shapes = {}
    for name, (view, dim) in slices.items():
        shape = list(view.shape)
        if dim is not None:
            shape[dim] *= T
        expected[name] = tuple(shape)

    def part(name: str) -> tuple[slice, ...]:
        view, dim = slices[name]
        if dim is None:
            return ()
        n = view.shape[dim]
        return (slice(None),) * dim + (slice(tensor_rank * n, (tensor_rank + 1) * n),)

    path = weights_path(folder)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device=str(next(iter(slices.values()))[0].device)) as f:
                _check(path, {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}, expected, allow_extra)
                _check_int8(path, {n: f.get_slice(n).get_dtype() == "I8" for n in slices}, slices)
                return _copy_each(slices, lambda n: f.get_slice(n)[part(n)] if part(n) else f.get_tensor(n), progress)
        except SafetensorError as e:
            raise MistralError(f"{path}: unreadable safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle; all mean the same to a user
        raise MistralError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None
    if not isinstance(state, dict):
        raise MistralError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    _check(path, {n: tuple(t.shape) for n, t in state.items()}, expected, allow_extra)
    _check_int8(path, {n: state[n].dtype == torch.int8 for n in slices}, slices)
    _copy_each(slices, lambda n: state[n][part(n)], progress)


def _copy_each(slices: Slices, read: Callable[[str], torch.Tensor], progress: Optional[Progress]) -> None:
    nbytes = 0
    with torch.no_grad():
        for i, (name, (view, _)) in enumerate(slices.items()):
            view.copy_(read(name))
            nbytes += view.nbytes
            if progress is not None:
                progress(i + 1, len(slices), nbytes)


def _check(path: Path, found: Shapes, expected: Shapes, allow_extra: bool) -> None:
    def listing(names: list[str], shapes: Shapes) -> str:
        shown = ", ".join(f"{n} {list(shapes[n])}" for n in names[:5])
        return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    missing = sorted(set(expected) - set(found))
    if missing:
        raise MistralError(f"{path}: missing tensors {listing(missing, expected)}")
    extra = [] if allow_extra else sorted(set(found) - set(expected))
    if extra:
        raise MistralError(f"{path}: unexpected tensors {listing(extra, found)} (does params.json match?)")
    wrong = [n for n in sorted(expected) if found[n] != expected[n]]
    if wrong:
        detail = ", ".join(f"{n} is {list(found[n])}, params.json implies {list(expected[n])}" for n in wrong[:5])
        raise MistralError(f"{path}: wrong shapes: {detail}" + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""))


def _check_int8(path: Path, int8: dict[str, bool], slices: Slices) -> None:
    """A quantized tensor goes only where params.json says one is (copying it into a float weight would run, wrongly)."""
    wrong = [n for n, (view, _) in slices.items() if int8[n] != (view.dtype == torch.int8)]
    if wrong:
        n = wrong[0]
        found, implied = ("int8", "a float tensor") if int8[n] else ("a float tensor", "int8")
        raise MistralError(f"{path}: {n} is {found}, but params.json's 'quantization' implies {implied}")


def write_folder(
    folder: Union[str, Path], args: ModelArgs, state_dict: dict[str, torch.Tensor], tokenizer: Optional[Path] = None
) -> None:
    """Write params.json and consolidated.safetensors (and a copy of `tokenizer`) into folder.

    The files are written into a temporary folder beside it and moved in at the end: a
    failure (a full disk) leaves no folder that looks like a model but holds only params.json.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise MistralError(f"{folder}: exists and is not a folder")
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        args.to_json(tmp / PARAMS)
        save_file({n: t.detach().contiguous().cpu() for n, t in state_dict.items()}, str(tmp / SAFETENSORS))
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / tokenizer.name)
        folder.mkdir(exist_ok=True)
        for file in tmp.iterdir():
            file.replace(folder / file.name)  # a rename on the same file system: nothing left to fail
    except OSError as e:
        raise MistralError(f"{folder}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def split_views(fused: dict[str, torch.Tensor], name: str, parts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors `part.weight` (and `part.scales` when quantized) as views of
    consecutive rows of `name.weight` (`name.scales`); parts: part -> its rows."""
    views = {}
    for kind in ("weight", "scales"):
        if f"{name}.{kind}" in fused:
            pieces = fused[f"{name}.{kind}"].split(list(parts.values()))
            views |= {f"{part}.{kind}": piece for part, piece in zip(parts, pieces)}
    return views


class CheckpointNames(nn.Module):
    """A module whose weights fuse several checkpoint tensors.

    `state_dict()` lists the checkpoint's tensors instead of the fused ones, each a view
    into its parameter, so `save()` writes Mistral's names and writing into the views
    loads the model in place; `load_state_dict()` takes the checkpoint's names.
    Subclasses say where each checkpoint tensor lives in `checkpoint_views`.
    """

    fused: tuple[str, ...] = ()  # the submodules whose parameters (weight, and scales if quantized) are fused

    def __init__(self) -> None:
        super().__init__()
        self._register_state_dict_hook(CheckpointNames._unfuse)
        self._register_load_state_dict_pre_hook(self._fuse)

    def checkpoint_views(self, fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _fused_parameters(self) -> dict[str, torch.Tensor]:
        return {f"{sub}.{kind}": p for sub in self.fused for kind, p in getattr(self, sub).named_parameters()}

    @staticmethod
    def _unfuse(module: "CheckpointNames", state: dict, prefix: str, metadata: dict) -> None:
        fused = {name: state.pop(prefix + name) for name in module._fused_parameters()}
        for name, view in module.checkpoint_views(fused).items():
            state[prefix + name] = view

    def _fuse(self, state: dict, prefix: str, *args: object) -> None:
        fused = {name: torch.empty_like(p) for name, p in self._fused_parameters().items()}
        views = self.checkpoint_views(fused)
        if not all(prefix + name in state for name in views):
            return  # load_state_dict reports what is missing
        for name, view in views.items():
            view.copy_(state.pop(prefix + name))
        for name, tensor in fused.items():
            state[prefix + name] = tensor
