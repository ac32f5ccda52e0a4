"""The model's hyper-parameters: a dataclass that mirrors Mistral's params.json."""

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from mistral.errors import MistralError, check_positive_int, is_int, is_number, shown


@dataclass
class MoeArgs:
    num_experts: int
    num_experts_per_tok: int

    def __post_init__(self) -> None:
        for name in ("num_experts", "num_experts_per_tok"):
            _check_positive_int(self, name)


# Weight-only quantization methods this code reads (params.json "quantization": {"method": ...}),
# each projection weight stored as (mistral/linear.py has the formats):
# int8: int8 codes with one scale per output row (W = q * scale);
# int4: 4-bit codes, two a byte, with a scale and a minimum per group of `group_size`
#       consecutive input columns (W = q * scale + min).
QUANTIZATION_METHODS = ("int8", "int4")
INT4_GROUP_SIZES = (32, 64, 128)


@dataclass
class QuantArgs:
    method: str
    group_size: Optional[int] = None  # int4's input columns per scale; int8 has none (a scale per row)

    def __post_init__(self) -> None:
        if self.method not in QUANTIZATION_METHODS:
            raise MistralError(
                f"quantization method {self.method!r} is not one this version reads ({', '.join(QUANTIZATION_METHODS)}): "
                "re-quantize the original folder with `mistral quantize`"
            )
        sizes = ", ".join(map(str, INT4_GROUP_SIZES[:-1])) + f" or {INT4_GROUP_SIZES[-1]}"
        if self.method == "int4" and self.group_size is None:
            raise MistralError(f"quantization method 'int4' needs a group_size ({sizes})")
        if self.method == "int4" and (not is_int(self.group_size) or self.group_size not in INT4_GROUP_SIZES):
            raise MistralError(f"group_size {shown(self.group_size)}: int4 groups are {sizes} input columns")
        if self.method != "int4" and self.group_size is not None:
            raise MistralError(f"group_size {shown(self.group_size)}: {self.method} has one scale per output row (group sizes are int4's)")


@dataclass
class LoraArgs:
    """The `lora` section of a LoRA adapter's params.json: its rank, and the factor on B @ A."""

    rank: int
    scaling: float

    def __post_init__(self) -> None:
        _check_positive_int(self, "rank")
        if not is_number(self.scaling) or self.scaling <= 0:
            raise MistralError(f"LoraArgs.scaling must be a positive number, got {self.scaling!r}")


# Keys of released params.json files that describe something this model does not need
# (max_seq_len: the context it was trained for; our cache is sized by the caller).
IGNORED_KEYS = ("max_seq_len", "model_type")
# Keys of released params.json files for checkpoints this code cannot run, and why.
UNSUPPORTED_KEYS = {
    "vision_encoder": "a multimodal checkpoint (its image encoder is not supported, only text models)",
}


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    head_dim: int
    hidden_dim: int
    n_heads: int
    n_kv_heads: int
    norm_eps: float
    vocab_size: int
    rope_theta: float = 10000.0
    # Query i attends to keys i-W+1 .. i. None means full causal attention.
    sliding_window: Optional[int] = None
    # Rows of the KV cache: how many sequences one generate() call decodes together.
    max_batch_size: int = 32
    # Mixtral: a sparse mixture of experts replaces each feed-forward.
    moe: Optional[MoeArgs] = None
    # A LoRA adapter's params.json: the rank and scaling of its lora.safetensors.
    lora: Optional[LoraArgs] = None
    # A folder written by `mistral quantize`: its projections' weights are quantized.
    quantization: Optional[QuantArgs] = None

    def __post_init__(self) -> None:
        for name, kind in (("moe", MoeArgs), ("lora", LoraArgs), ("quantization", QuantArgs)):
            value = getattr(self, name)
            if isinstance(value, dict):
                value = _build(kind, value, f"'{name}'")
                setattr(self, name, value)
            if value is not None and not isinstance(value, kind):
                raise MistralError(f"ModelArgs.{name} must be an object or null, got {value!r}")
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size", "max_batch_size"):
            _check_positive_int(self, name)
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            # JSON reads 10000 as an int and Infinity as a float: one is a fine theta, the other garbage.
            if not is_number(value) or not 0 < value < math.inf or _overflows(value):
                raise MistralError(f"ModelArgs.{name} must be a finite positive number, got {shown(value)}")
            setattr(self, name, float(value))
        if self.sliding_window is not None:  # null: full attention
            _check_positive_int(self, "sliding_window")
        if self.n_heads % self.n_kv_heads:
            raise MistralError(f"ModelArgs.n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise MistralError(f"ModelArgs.head_dim={self.head_dim} must be even for rotary embeddings")
        if self.moe is not None and not 0 < self.moe.num_experts_per_tok <= self.moe.num_experts:
            raise MistralError(
                f"ModelArgs.moe: num_experts_per_tok={self.moe.num_experts_per_tok} must be in 1..num_experts={self.moe.num_experts}"
            )
        group = self.quantization.group_size if self.quantization is not None else None
        widths = (("dim", self.dim, "wq, wk, wv, w1, w3"), ("n_heads * head_dim", self.n_heads * self.head_dim, "wo"),
                  ("hidden_dim", self.hidden_dim, "w2"))  # fmt: skip
        for name, width, reads in widths:
            if group is not None and width % group:
                fits = [str(g) for g in INT4_GROUP_SIZES if all(w % g == 0 for _, w, _ in widths)]
                hint = f"group sizes that do: {', '.join(fits)}" if fits else f"none of {', '.join(map(str, INT4_GROUP_SIZES))} does"
                raise MistralError(f"int4 group_size={group} does not divide the model's {name}={width} (the input width of {reads}); {hint}")

    @classmethod
    def from_json(cls, path: Path) -> "ModelArgs":
        params = read_json(Path(path))
        for key, why in UNSUPPORTED_KEYS.items():
            if params.get(key):
                raise MistralError(f"{path}: '{key}' makes this {why}")
        quantization = params.get("quantization")
        if quantization and not (isinstance(quantization, dict) and "method" in quantization):  # a released fp8 folder, say
            raise MistralError(
                f"{path}: 'quantization' makes this a quantized checkpoint of a format this code does not read "
                f"(it reads those of `mistral quantize`: {', '.join(QUANTIZATION_METHODS)})"
            )
        return _build(cls, {k: v for k, v in params.items() if k not in IGNORED_KEYS}, str(path))

    def to_json(self, path: Path) -> None:
        params = dataclasses.asdict(self)
        if self.quantization is not None:  # no "group_size": null for int8
            params["quantization"] = {k: v for k, v in params["quantization"].items() if v is not None}
        Path(path).write_text(json.dumps(params, indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    """The JSON object in a file, or a MistralError naming the file and what is wrong with it."""
    try:
        params = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MistralError(f"{path}: file not found") from None
    except OSError as e:  # a folder, unreadable, ...
        raise MistralError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise MistralError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise MistralError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise MistralError(f"{path}: JSON nested too deeply to be a model's parameters") from None
    except ValueError as e:  # an integer of more digits than Python converts
        raise MistralError(f"{path}: not usable JSON ({str(e).splitlines()[0][:120]})") from None
    if not isinstance(params, dict):
        raise MistralError(f"{path}: expected a JSON object, got {type(params).__name__}")
    return params


def _overflows(value: Any) -> bool:
    """An integer that no float holds (JSON allows 1 followed by 400 zeros)."""
    try:
        float(value)
    except OverflowError:
        return True
    return False


def _check_positive_int(args: Any, name: str) -> None:
    check_positive_int(getattr(args, name), f"{type(args).__name__}.{name}")


def _build(cls: type, params: dict[str, Any], where: str) -> Any:
    """cls(**params), but unknown keys warn and missing or mistyped keys name themselves."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - set(fields))
    if unknown:
        warnings.warn(f"{where}: ignoring unknown keys {unknown}", stacklevel=3)
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in params]
    if missing:
        raise MistralError(f"{where}: missing required keys {missing}")
    known = {k: v for k, v in params.items() if k in fields}
    try:
        return cls(**known)
    except MistralError as e:  # name the file too
        raise MistralError(f"{where}: {e}") from None
