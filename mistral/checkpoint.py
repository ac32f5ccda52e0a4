"""Mistral's checkpoint folder: params.json + consolidated.safetensors (+ tokenizer.model).

The tensor names are those of Mistral's released checkpoints, so a real folder loads
unchanged. Older folders hold consolidated.00.pth instead; it is read only through
torch.load(weights_only=True), which cannot run code hidden in the pickle.
"""

import ctypes
import dataclasses
import json
import math
import os
import shutil
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open

from mistral.args import ModelArgs
from mistral.errors import MistralError, shown

# The small model that ships with the package (see default_model/README.md): what
# `mistral generate "prompt"` and `mistral chat` run when no model folder is given.
DEFAULT_MODEL = Path(__file__).resolve().parent / "default_model"

PARAMS = "params.json"
SAFETENSORS = "consolidated.safetensors"
PTH = "consolidated.00.pth"
TOKENIZER = "tokenizer.model"

Shapes = dict[str, tuple[int, ...]]
# progress(tensors read, tensors in all, bytes read): told after each tensor.
Progress = Callable[[int, int, int], None]


def read_args(folder: Union[str, Path]) -> ModelArgs:
    if not isinstance(folder, (str, os.PathLike)):
        raise MistralError(f"a model folder is a path (str or Path), got {type(folder).__name__}")
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


def check_dimensions(folder: Union[str, Path], args: ModelArgs) -> None:
    """The layer count, vocabulary, widths and experts that params.json gives, against the weights
    file's names and shapes, before the model is allocated: params.json saying n_layers: 1000000
    would otherwise allocate (or fail to) for minutes before the names are compared."""
    path = weights_path(folder)
    shapes = tensor_shapes(path)
    layers = count_layers(shapes, "layers.")
    if layers and args.n_layers > layers:  # more in the file: load_into names the extra tensors
        raise MistralError(f"{path}: holds {layers} layers, but params.json says n_layers={args.n_layers}")
    columns = args.dim // 2 if args.quantization is not None and args.quantization.method == "int4" else args.dim  # two a byte
    implied = {
        "tok_embeddings.weight": [args.vocab_size, args.dim],
        "layers.0.attention.wq.weight": [args.n_heads * args.head_dim, columns],
        "layers.0.attention.wk.weight": [args.n_kv_heads * args.head_dim, columns],
        "layers.0.feed_forward.w1.weight": [args.hidden_dim, columns],
        "layers.0.feed_forward.experts.0.w1.weight": [args.hidden_dim, columns],
    }
    if args.moe is not None:
        implied["layers.0.feed_forward.gate.weight"] = [args.moe.num_experts, args.dim]  # the router: a row per expert
    for name, shape in implied.items():
        found = shapes.get(name)
        if found is not None and found != shape:
            raise MistralError(f"{path}: {name} is {found}, params.json implies {shown(shape)}")


def tensor_shapes(path: Path) -> dict[str, Optional[list]]:
    """The names of a weights file's tensors and their shapes (None where a header says none),
    read from a safetensors header, or from a .pth's pickle (its tensors memory-mapped)."""
    if path.suffix != ".safetensors":
        return {name: list(t.shape) for name, t in read_pth(path).items()}
    header = _header(path)[0]
    return {
        name: info.get("shape") if isinstance(info, dict) else None for name, info in header.items() if name != "__metadata__"
    }


def count_layers(shapes: dict, prefix: str) -> int:
    """How many layers the names `{prefix}N. ...` number (HF's: prefix "model.layers.")."""
    parts = [name[len(prefix) :].split(".")[0] for name in shapes if name.startswith(prefix)]
    return len({part for part in parts if part.isascii() and part.isdigit()})


def read_pth(path: Path) -> dict[str, torch.Tensor]:
    """A consolidated.00.pth's tensors by name, memory-mapped; a MistralError if it holds anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for a bad pickle; all mean the same to a user
        raise MistralError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})".splitlines()[0]) from None
    if not isinstance(state, dict):
        raise MistralError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    if not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise MistralError(f"{path}: expected a dict of tensors, found {sorted({type(t).__name__ for t in state.values()})}")
    names = [n for n in state if not isinstance(n, str)]
    if names:  # sorting or matching them with the model's names would fail further on
        raise MistralError(f"{path}: expected tensors by name, found the key {shown(names[0])}")
    return state


def _header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data begins."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 << 20:  # the format caps headers at 100 MB
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(f.read(length))
    except OSError as e:
        raise MistralError(f"{path}: cannot read ({e.strerror or e})") from None
    except (struct.error, ValueError, RecursionError) as e:
        raise MistralError(f"{path}: unreadable safetensors file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(header, dict):
        raise MistralError(f"{path}: unreadable safetensors file (its header is not a JSON object)")
    return header, 8 + length


# Per checkpoint tensor: the view of the model it is read into, and the dimension along
# which a tensor-parallel rank holds one of num_tensor_ranks equal slices of it (None: the whole tensor).
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

    A tensor-parallel rank reads only its rows of a tensor split by rows (the whole rows,
    of one split by columns), in pieces that go straight into place through a small
    staging buffer: loading never holds a second copy of the model. allow_extra: tolerate tensors not asked for (a pipeline stage reads only its
    own layers from the shared file).
    """
    expected: Shapes = {}
    for name, (view, dim) in slices.items():
        shape = list(view.shape)
        if dim is not None:
            shape[dim] *= num_tensor_ranks
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
            with safe_open(str(path), framework="pt") as f:  # reads and checks the header only
                _check(path, {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}, expected, allow_extra)
                dtypes = {n: f.get_slice(n).get_dtype() for n in slices}
        except SafetensorError as e:
            raise MistralError(f"{path}: unreadable safetensors file ({e})") from None
        _check_quantized(path, dtypes, slices)
        _check_float(path, dtypes, slices)
        return _read_safetensors(path, slices, tensor_rank, progress)
    state = read_pth(path)
    _check(path, {n: tuple(t.shape) for n, t in state.items()}, expected, allow_extra)
    names = {dtype: name for name, dtype in DTYPES.items()}
    dtypes = {n: names.get(state[n].dtype, str(state[n].dtype)) for n in slices}
    _check_quantized(path, dtypes, slices)
    _check_float(path, dtypes, slices)
    _copy_each(slices, lambda n: state[n][part(n)], progress)


# Per tensor of a file: its dtype and shape (the header of a safetensors file; what a stream will write).
Specs = dict[str, tuple[torch.dtype, tuple[int, ...]]]


@contextmanager
def open_tensors(path: Path) -> Iterator[tuple[Specs, Callable[[str], torch.Tensor]]]:
    """A weights file's tensors, to read one at a time: (their dtypes and shapes, in the file's order; read(name)).

    A safetensors file's header is read (and checked by safetensors) first, and each tensor
    read into memory of its own, which goes when the caller lets the tensor go: a memory
    map (safetensors' own reading) would keep every page read so far resident, the whole
    file by the end. A .pth is memory-mapped (its pickle has no header to read apart).
    """
    if path.suffix != ".safetensors":
        state = read_pth(path)
        yield {n: (t.dtype, tuple(t.shape)) for n, t in state.items()}, state.__getitem__
        return
    try:
        with safe_open(str(path), framework="pt") as f:  # reads and checks the header only
            names = list(f.keys())
    except SafetensorError as e:
        raise MistralError(f"{path}: unreadable safetensors file ({e})") from None
    header, base = _header(path)
    for n in names:
        if header[n]["dtype"] not in DTYPES:
            raise MistralError(f"{path}: {n} has dtype {header[n]['dtype']}, which no model weight has")
    names.sort(key=lambda n: header[n]["data_offsets"][0])  # one pass through the file
    specs = {n: (DTYPES[header[n]["dtype"]], tuple(header[n]["shape"])) for n in names}

    def read(name: str) -> torch.Tensor:
        begin, end = header[name]["data_offsets"]
        data = torch.empty(end - begin, dtype=torch.uint8)
        try:
            _read_into(file, base + begin, data, path)
        except OSError as e:
            raise MistralError(f"{path}: cannot read ({e.strerror or e})") from None
        dtype, shape = specs[name]
        return data.view(dtype).view(shape)

    with open(path, "rb", buffering=0) as file:
        yield specs, read


# safetensors' names of the dtypes a checkpoint may hold.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip

# Reading: each of READERS threads reads pieces of at most CHUNK bytes of the file into a
# staging buffer of its own (pinned host memory for a GPU, so the copy runs by DMA,
# asynchronously on the thread's own stream) and copies them into place while the next
# piece is read. The reads release the GIL, so several run at once: one thread reads a
# warm page cache at 2-4 GB/s, the host's memory several times that. Safetensors' own
# loading (memory-mapping the file, then one copy per tensor) ran at 1.4 GB/s onto an
# H200 and left the whole file mapped in the process (14.6 GB resident for Mistral 7B);
# here the host holds READERS x CHUNK bytes.
READERS = 8
CHUNK = 32 << 20


@dataclass
class _Piece:
    """Rows [start, stop) (along dimension 0) of this rank's part of one checkpoint tensor."""

    view: torch.Tensor  # this rank's part of the tensor, in the model
    dtype: torch.dtype  # the file's
    row_shape: tuple[int, ...]  # of one row in the file (a 1-D tensor's rows are its elements)
    offset: int  # in the file, of row 0 of this rank's part
    start: int
    stop: int
    columns: Optional[slice]  # this rank's columns, for a tensor-parallel slice along dimension 1

    @property
    def row_bytes(self) -> int:
        return self.dtype.itemsize * int(torch.Size(self.row_shape).numel())


def _pieces(header: dict, base: int, slices: Slices, tensor_rank: int) -> list[list[_Piece]]:
    """Per tensor, the pieces of at most CHUNK bytes that its reads take."""
    tensors = []
    for name, (view, dim) in slices.items():
        info = header[name]
        dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"]) or (1,)
        view = view.view(1) if view.dim() == 0 else view
        rows = view.shape[0]
        first_row = tensor_rank * rows if dim == 0 else 0  # rows of other ranks come before
        columns = slice(tensor_rank * view.shape[1], (tensor_rank + 1) * view.shape[1]) if dim == 1 else None
        piece = _Piece(view, dtype, shape[1:], base + info["data_offsets"][0], 0, 0, columns)
        piece.offset += first_row * piece.row_bytes
        step = max(1, CHUNK // max(piece.row_bytes, 1))
        tensors.append([dataclasses.replace(piece, start=a, stop=min(a + step, rows)) for a in range(0, rows, step)])
    return tensors


def _read_safetensors(path: Path, slices: Slices, tensor_rank: int, progress: Optional[Progress]) -> None:
    header, base = _header(path)
    tensors = _pieces(header, base, slices, tensor_rank)
    device = next(iter(slices.values()))[0].device
    cuda = device.type == "cuda"
    size = max([CHUNK] + [piece.row_bytes for pieces in tensors for piece in pieces])  # a piece holds a row at least
    local = threading.local()
    streams: list[torch.cuda.Stream] = []
    files: list = []  # every thread's, closed at the end

    def read(piece: _Piece) -> int:
        if not hasattr(local, "file"):  # each thread: its file, its staging buffer, its stream
            local.file = open(path, "rb", buffering=0)
            files.append(local.file)
            local.buffer = torch.empty(size, dtype=torch.uint8, pin_memory=cuda)
            local.stream = torch.cuda.Stream(device) if cuda else None
            if local.stream is not None:
                streams.append(local.stream)
                torch.cuda.set_stream(local.stream)  # the thread's own current stream, for its copies
        if local.stream is not None:
            local.stream.synchronize()  # the buffer's previous copy is done
        rows = piece.stop - piece.start
        staged = local.buffer[: rows * piece.row_bytes]
        _read_into(local.file, piece.offset + piece.start * piece.row_bytes, staged, path)
        source = staged.view(piece.dtype).view(rows, *piece.row_shape)
        if piece.columns is not None:
            source = source[:, piece.columns]
        target = piece.view[piece.start : piece.stop]
        with torch.no_grad():
            target.copy_(source, non_blocking=cuda)
        return target.nbytes

    nbytes = 0
    try:
        with ThreadPoolExecutor(min(READERS, sum(map(len, tensors))) or 1, thread_name_prefix="mistral-load") as pool:
            done = pool.map(read, [piece for pieces in tensors for piece in pieces])  # in order
            for i, pieces in enumerate(tensors):
                nbytes += sum(next(done) for _ in pieces)
                if progress is not None:
                    progress(i + 1, len(tensors), nbytes)
    finally:
        for stream in streams:
            stream.synchronize()
        for file in files:
            file.close()


def _read_into(file, offset: int, buffer: torch.Tensor, path: Path) -> None:  # type: ignore[no-untyped-def]
    """Fill buffer (uint8, on the host) with the file's bytes from offset on."""
    view = memoryview((ctypes.c_char * buffer.numel()).from_address(buffer.data_ptr())).cast("B")
    file.seek(offset)
    done = 0
    while done < len(view):
        n = file.readinto(view[done:])
        if not n:
            raise MistralError(f"{path}: the file ends before its tensors do (truncated?)")
        done += n


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


def _check_float(path: Path, dtypes: dict[str, str], slices: Slices) -> None:
    """Integer tensors copied into float weights would load and generate nonsense."""
    for n, (view, _) in slices.items():
        if dtypes[n] not in DTYPES:
            raise MistralError(f"{path}: {n} has dtype {dtypes[n]}, which no model weight has")
        if view.dtype.is_floating_point and not DTYPES[dtypes[n]].is_floating_point:
            raise MistralError(f"{path}: {n} holds {dtypes[n]} values, where a float weight belongs")


# The dtypes of quantized weights (mistral/linear.py), as an error names them.
QUANTIZED_DTYPES = {torch.int8: "int8", torch.uint8: "int4 (uint8, two codes a byte)"}


def _check_quantized(path: Path, dtypes: dict[str, str], slices: Slices) -> None:
    """A quantized tensor goes only where params.json says one of its kind is (copied into a float
    weight, or int8 codes read as int4 pairs, it would run, wrongly)."""
    for n, (view, _) in slices.items():
        found = DTYPES.get(dtypes[n])
        if (found in QUANTIZED_DTYPES or view.dtype in QUANTIZED_DTYPES) and found != view.dtype:
            held = QUANTIZED_DTYPES.get(found) or ("a float tensor" if found is not None and found.is_floating_point else dtypes[n])
            implied = QUANTIZED_DTYPES.get(view.dtype, "a float tensor")
            raise MistralError(f"{path}: {n} is {held}, but params.json's 'quantization' implies {implied}")


@dataclass
class TensorStream:
    """Tensors to write one at a time: each one's dtype and shape known first (`specs`, in the
    file's order), then `tensors` yields (name, tensor) in that order, each made just before it
    is written and let go after, so a writer holds one tensor at a time, not the model."""

    specs: Specs
    tensors: Iterable[tuple[str, torch.Tensor]]

    @classmethod
    def of(cls, state_dict: Mapping[str, torch.Tensor]) -> "TensorStream":
        return cls({n: (t.dtype, tuple(t.shape)) for n, t in state_dict.items()}, state_dict.items())


def write_safetensors(path: Path, stream: TensorStream) -> None:
    """A safetensors file, written a tensor at a time: the header first (8 bytes of its length,
    little-endian, then JSON: per tensor its dtype, shape and data_offsets [begin, end) in the
    data, padded with spaces to a multiple of 8 bytes), then each tensor's bytes, back to back."""
    names = {dtype: name for name, dtype in DTYPES.items()}
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, (dtype, shape) in stream.specs.items():
        end = offset + dtype.itemsize * math.prod(shape)
        header[name] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [offset, end]}
        offset = end
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for (name, tensor), (want, (dtype, shape)) in zip(stream.tensors, stream.specs.items(), strict=True):
            assert (name, tensor.dtype, tuple(tensor.shape)) == (want, dtype, shape), (name, want)
            f.write(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())


def write_folder(
    folder: Union[str, Path], args: ModelArgs, tensors: Union[Mapping[str, torch.Tensor], TensorStream],
    tokenizer: Optional[Path] = None, *, tokenizers: Sequence[Path] = (),
) -> None:  # fmt: skip
    """Write params.json and consolidated.safetensors (and copies of `tokenizer` / `tokenizers`) into folder.

    tensors: a state dict, or a stream that makes each tensor as it is written. The files
    are written into a temporary folder beside it and moved in at the end: a failure (a
    full disk, SIGTERM, a bad tensor that a stream meets) leaves no folder that looks like
    a model but holds only part of one, and no temporary folder either. A folder that
    already holds files is refused: merged into, it would hold two models' files (two
    tokenizers, say).
    """
    folder = Path(folder)
    check_writable(folder)
    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        args.to_json(tmp / PARAMS)
        write_safetensors(tmp / SAFETENSORS, tensors if isinstance(tensors, TensorStream) else TensorStream.of(tensors))
        for source in ([tokenizer] if tokenizer is not None else []) + list(tokenizers):
            shutil.copyfile(source, tmp / source.name)
        tmp.chmod(0o777 & ~_umask())  # what a folder made plainly gets (mkdtemp's is 0700)
        if folder.is_dir():
            folder.rmdir()  # empty (checked above)
        tmp.rename(folder)  # one rename of the whole folder: a SIGTERM leaves it complete or absent
    except OSError as e:
        raise MistralError(f"{folder}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def check_writable(folder: Path) -> None:
    """Whether a model folder may be written at `folder`: before any work that would be lost."""
    try:
        if folder.exists() and not folder.is_dir():
            raise MistralError(f"{folder}: exists and is not a folder")
        if folder.is_dir() and any(folder.iterdir()):
            raise MistralError(f"{folder}: the folder already holds files: write into a new or empty folder")
    except OSError as e:  # a folder we may not list
        raise MistralError(f"{folder}: cannot write ({e.strerror or e})") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
