"""Mistral's checkpoint folder: params.json + consolidated.safetensors (+ tokenizer.model).

The tensor names are those of Mistral's released checkpoints, so a real folder loads
unchanged. Older folders hold consolidated.00.pth instead; it is read only through
torch.load(weights_only=True), which cannot run code hidden in the pickle.
"""

from pathlib import Path
from typing import Callable, Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

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


def read_weights(
    folder: Union[str, Path],
    expected: Shapes,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
    allow_extra: bool = False,
    progress: Optional[Progress] = None,
) -> dict[str, torch.Tensor]:
    """Read the tensors named in `expected`, after checking every name and shape.

    allow_extra: tolerate tensors the caller did not ask for (a pipeline rank reads
    only its own layers from the shared file).
    """
    path = weights_path(folder)
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                _check(path, {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}, expected, allow_extra)
                return _read_each(expected, lambda n: f.get_tensor(n).to(dtype), progress)
        except SafetensorError as e:
            raise MistralError(f"{path}: unreadable safetensors file ({e})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle; all mean the same to a user
        raise MistralError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None
    if not isinstance(state, dict):
        raise MistralError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    _check(path, {n: tuple(t.shape) for n, t in state.items()}, expected, allow_extra)
    return _read_each(expected, lambda n: state[n].to(device=device, dtype=dtype), progress)


def _read_each(names: Shapes, read: Callable[[str], torch.Tensor], progress: Optional[Progress]) -> dict[str, torch.Tensor]:
    tensors, nbytes = {}, 0
    for n in names:
        tensors[n] = read(n)
        nbytes += tensors[n].nbytes
        if progress is not None:
            progress(len(tensors), len(names), nbytes)
    return tensors


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


def write_folder(folder: Union[str, Path], args: ModelArgs, state_dict: dict[str, torch.Tensor]) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    args.to_json(folder / PARAMS)
    save_file({n: t.detach().contiguous().cpu() for n, t in state_dict.items()}, str(folder / SAFETENSORS))
