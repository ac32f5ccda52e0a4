"""Import Hugging Face MistralForCausalLM / MixtralForCausalLM checkpoints.

This module is the one place that knows Hugging Face's names. An HF folder holds
config.json and model.safetensors (or shards model-0000x-of-0000y.safetensors listed
in model.safetensors.index.json); `convert` streams its tensors one at a time into
our folder: params.json + consolidated.safetensors (+ its tokenizer file).

Two things differ from a rename:

- HF's q_proj / k_proj rows are permuted so that its rotate-half rotary embedding
  acts on the pairs (x[j], x[j + Dh/2]) of a head; ours (Meta's and Mistral's
  layout) rotates interleaved pairs (x[2j], x[2j+1]). `unpermute` undoes it.
- Mixtral's experts come in two layouts. `save_pretrained` of transformers 5.x
  (5.24 checked) writes the original per-expert tensors
  `block_sparse_moe.experts.E.w{1,2,3}.weight`, although the model in memory holds
  them fused: `mlp.experts.gate_up_proj` [E, 2*hidden_dim, dim] (w1 of each expert,
  then w3) and `mlp.experts.down_proj` [E, dim, hidden_dim] (w2), with the router
  at `mlp.gate.weight`. `save_pretrained(save_original_format=False)` writes the
  fused layout to disk, so both are read.
"""

import re
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch
from safetensors import SafetensorError, safe_open

from mistral.args import ModelArgs, MoeArgs, read_json
from mistral.checkpoint import check_writable, count_layers, tensor_shapes, write_folder
from mistral.errors import MistralError, is_int, is_number
from mistral.model import checkpoint_shapes
from mistral.tokenizer import TOKENIZER_FILES

CONFIG = "config.json"
HF_SAFETENSORS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
ARCHITECTURES = {"MistralForCausalLM": "mistral", "MixtralForCausalLM": "mixtral"}

# (HF name, our name); {L} stands for a layer index, {E} for an expert index.
NAMES: list[tuple[str, str]] = [
    ("model.embed_tokens.weight", "tok_embeddings.weight"),
    ("model.layers.{L}.input_layernorm.weight", "layers.{L}.attention_norm.weight"),
    ("model.layers.{L}.self_attn.q_proj.weight", "layers.{L}.attention.wq.weight"),
    ("model.layers.{L}.self_attn.k_proj.weight", "layers.{L}.attention.wk.weight"),
    ("model.layers.{L}.self_attn.v_proj.weight", "layers.{L}.attention.wv.weight"),
    ("model.layers.{L}.self_attn.o_proj.weight", "layers.{L}.attention.wo.weight"),
    ("model.layers.{L}.post_attention_layernorm.weight", "layers.{L}.ffn_norm.weight"),
    ("model.layers.{L}.mlp.gate_proj.weight", "layers.{L}.feed_forward.w1.weight"),
    ("model.layers.{L}.mlp.down_proj.weight", "layers.{L}.feed_forward.w2.weight"),
    ("model.layers.{L}.mlp.up_proj.weight", "layers.{L}.feed_forward.w3.weight"),
    ("model.layers.{L}.block_sparse_moe.gate.weight", "layers.{L}.feed_forward.gate.weight"),
    ("model.layers.{L}.block_sparse_moe.experts.{E}.w1.weight", "layers.{L}.feed_forward.experts.{E}.w1.weight"),
    ("model.layers.{L}.block_sparse_moe.experts.{E}.w2.weight", "layers.{L}.feed_forward.experts.{E}.w2.weight"),
    ("model.layers.{L}.block_sparse_moe.experts.{E}.w3.weight", "layers.{L}.feed_forward.experts.{E}.w3.weight"),
    # The fused layout's router; its experts are split by `_fused_experts`.
    ("model.layers.{L}.mlp.gate.weight", "layers.{L}.feed_forward.gate.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "output.weight"),
]
FUSED_EXPERTS = re.compile(r"model\.layers\.(?P<L>\d+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)")
# Which of our tensors HF permuted for its rotary layout, and their number of heads.
PERMUTED = {"attention.wq.weight": "n_heads", "attention.wk.weight": "n_kv_heads"}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)"))


_TO_OURS = [(_pattern(hf), ours) for hf, ours in NAMES]
_TO_HF = [(_pattern(ours), hf) for hf, ours in NAMES]


def _rename(name: str, table: list[tuple[re.Pattern, str]]) -> Optional[str]:
    for pattern, template in table:
        match = pattern.fullmatch(name)
        if match:
            return template.format(**match.groupdict())
    return None


def hf_name(ours: str) -> Optional[str]:
    """Our tensor name -> HF's (the per-expert layout for Mixtral's experts)."""
    return _rename(ours, _TO_HF)


def unpermute(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of HF's w.view(H, Dh/2, 2, D).transpose(1, 2).reshape(H * Dh, D): rows back to interleaved pairs."""
    dim1, dim2 = w.shape
    return w.view(n_heads, 2, dim1 // n_heads // 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def args_from_hf_config(config: dict[str, Any], source: str = CONFIG) -> ModelArgs:
    """ModelArgs from the config.json of a MistralForCausalLM or MixtralForCausalLM."""
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise MistralError(f"{source}: 'architectures' must be a list of names, got {architectures!r}")
    if architectures:
        kind = ARCHITECTURES.get(architectures[0]) if len(architectures) == 1 else None
    else:
        kind = config.get("model_type") if config.get("model_type") in ARCHITECTURES.values() else None
    if kind is None:
        found = architectures or config.get("model_type")
        raise MistralError(f"{source}: unsupported architecture {found!r}, expected one of {sorted(ARCHITECTURES)}")

    required = ["hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "vocab_size", "sliding_window"]
    if kind == "mixtral":
        required += ["num_local_experts", "num_experts_per_tok"]
    missing = [k for k in required if k not in config]
    if missing:
        raise MistralError(f"{source}: missing keys {missing}")
    if config.get("hidden_act", "silu") != "silu":
        raise MistralError(f"{source}: unsupported hidden_act {config['hidden_act']!r}, expected 'silu'")

    # transformers 5 writes rope_parameters = {rope_type, rope_theta}; older versions rope_theta and rope_scaling.
    rope = config.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or config.get("rope_scaling"):
        raise MistralError(f"{source}: unsupported rotary scaling {rope or config['rope_scaling']}")
    rope_theta = rope.get("rope_theta", config.get("rope_theta"))
    if rope_theta is None:
        raise MistralError(f"{source}: missing key 'rope_parameters.rope_theta' (or 'rope_theta')")

    # Types are checked here, in HF's names; ModelArgs checks how the values fit together.
    for key, value in [(k, config[k]) for k in required] + [("rope_theta", rope_theta)]:
        if value is None and key in ("num_key_value_heads", "sliding_window"):
            continue
        real = key in ("rms_norm_eps", "rope_theta")
        if not (is_number(value) if real else is_int(value)) or value <= 0:
            raise MistralError(f"{source}: '{key}' must be a positive {'number' if real else 'integer'}, got {value!r}")

    n_heads = config["num_attention_heads"]
    try:
        return ModelArgs(
            dim=config["hidden_size"],
            n_layers=config["num_hidden_layers"],
            head_dim=config.get("head_dim") or config["hidden_size"] // n_heads,
            hidden_dim=config["intermediate_size"],
            n_heads=n_heads,
            # HF reads a null num_key_value_heads as plain multi-head attention.
            n_kv_heads=config["num_key_value_heads"] or n_heads,
            norm_eps=float(config["rms_norm_eps"]),
            vocab_size=config["vocab_size"],
            rope_theta=float(rope_theta),
            sliding_window=config["sliding_window"],
            moe=MoeArgs(config["num_local_experts"], config["num_experts_per_tok"]) if kind == "mixtral" else None,
        )
    except MistralError as e:
        raise MistralError(f"{source}: {e}") from None


def _weight_files(hf_dir: Path) -> list[Path]:
    if (hf_dir / HF_INDEX).is_file():
        try:
            files = sorted(set(read_json(hf_dir / HF_INDEX)["weight_map"].values()))
        except (KeyError, TypeError, AttributeError) as e:
            raise MistralError(f"{hf_dir / HF_INDEX}: not a safetensors index ({type(e).__name__}: {e})") from None
    elif (hf_dir / HF_SAFETENSORS).is_file():
        files = [HF_SAFETENSORS]
    else:
        raise MistralError(f"{hf_dir}: no {HF_SAFETENSORS} or {HF_INDEX} (only safetensors checkpoints are read)")
    for name in files:
        # A plain file name, no path: a hub cache's snapshot folder holds symlinks into
        # ../../blobs, which are fine, while "../x" or "/x" would read outside the folder.
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise MistralError(f"{hf_dir / HF_INDEX}: lists {name!r}, which is not a file of the folder itself")
        if not (hf_dir / name).is_file():
            raise MistralError(f"{hf_dir / HF_INDEX}: lists {name}, which is not in the folder")
    return [hf_dir / name for name in files]


def _fused_experts(match: re.Match, w: torch.Tensor, args: ModelArgs, where: Path) -> Iterator[tuple[str, torch.Tensor]]:
    assert args.moe is not None
    n_experts = args.moe.num_experts
    if match["kind"] == "gate_up_proj":
        shape = (n_experts, 2 * args.hidden_dim, args.dim)
    else:
        shape = (n_experts, args.dim, args.hidden_dim)
    if tuple(w.shape) != shape:
        raise MistralError(f"{where}: {match[0]} is {list(w.shape)}, {CONFIG} implies {list(shape)}")
    prefix = f"layers.{match['L']}.feed_forward.experts"
    for e in range(n_experts):
        # clone: each expert gets its own storage (safetensors refuses tensors sharing memory).
        if match["kind"] == "gate_up_proj":
            w1, w3 = w[e].chunk(2, dim=0)
            yield f"{prefix}.{e}.w1.weight", w1.clone()
            yield f"{prefix}.{e}.w3.weight", w3.clone()
        else:
            yield f"{prefix}.{e}.w2.weight", w[e].clone()


def _to_ours(name: str, w: torch.Tensor, args: ModelArgs, where: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """One HF tensor -> our tensor(s) of the same values; shapes are checked by the caller."""
    fused = FUSED_EXPERTS.fullmatch(name)
    if fused:
        if args.moe is None:
            raise MistralError(f"{where}: expert tensor {name} in a model without experts")
        yield from _fused_experts(fused, w, args, where)
        return
    ours = _rename(name, _TO_OURS)
    if ours is None:
        raise MistralError(f"{where}: unknown tensor {name}")
    yield ours, w


def convert(hf_dir: Union[str, Path], out_dir: Union[str, Path]) -> ModelArgs:
    """Write our model folder from an HF MistralForCausalLM / MixtralForCausalLM folder.

    Tensors keep their dtype and are read one at a time: only the converted output
    is ever held in memory as a whole.
    """
    hf_dir, out_dir = Path(hf_dir), Path(out_dir)
    if not hf_dir.is_dir():
        raise MistralError(f"{hf_dir}: HF model folder not found")
    if out_dir.resolve() == hf_dir.resolve():
        raise MistralError(f"{out_dir}: write the converted model into another folder than {hf_dir}")
    check_writable(out_dir)
    if not (hf_dir / CONFIG).is_file():
        raise MistralError(f"{hf_dir}: no {CONFIG} in the HF model folder")
    config = read_json(hf_dir / CONFIG)
    args = args_from_hf_config(config, str(hf_dir / CONFIG))
    files = _weight_files(hf_dir)
    # Layers and experts counted in the files' headers before the model's shapes are made: a
    # config.json saying num_hidden_layers (or num_local_experts): 1000000 would take minutes to make them.
    shapes = {name: shape for path in files for name, shape in tensor_shapes(path).items()}
    layers = count_layers(shapes, "model.layers.")
    if layers and args.n_layers > layers:
        raise MistralError(f"{hf_dir}: the weights hold {layers} layers, but {CONFIG} says num_hidden_layers={args.n_layers}")
    router = next((n for n in shapes if n.endswith((".block_sparse_moe.gate.weight", ".mlp.gate.weight"))), None)
    if args.moe is not None and router is not None and shapes[router] != [args.moe.num_experts, args.dim]:
        raise MistralError(f"{hf_dir}: {router} is {shapes[router]}, {CONFIG} implies {[args.moe.num_experts, args.dim]}")
    expected = checkpoint_shapes(args)

    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    if name.endswith("rotary_emb.inv_freq"):
                        continue  # a buffer some old checkpoints saved; we derive it from rope_theta
                    for ours, w in _to_ours(name, f.get_tensor(name), args, path):
                        if ours not in expected:
                            raise MistralError(f"{path}: tensor {name} ({ours} for us) does not fit {CONFIG}'s model")
                        if tuple(w.shape) != expected[ours]:
                            raise MistralError(
                                f"{path}: {name} is {list(w.shape)}, {CONFIG} implies {list(expected[ours])}"
                            )
                        if ours in state:
                            raise MistralError(f"{path}: {name} holds {ours}, which an earlier tensor already gave")
                        # Written as they are, these would make a folder that does not load, or does not run.
                        if not w.is_floating_point():
                            raise MistralError(f"{path}: {name} holds {w.dtype} values, where a float weight belongs")
                        if not bool(torch.isfinite(w).all()):
                            raise MistralError(f"{path}: {name} holds values that are not finite (NaN or inf)")
                        suffix = ours.split(".", 2)[-1]
                        state[ours] = unpermute(w, getattr(args, PERMUTED[suffix])) if suffix in PERMUTED else w
        except SafetensorError as e:
            raise MistralError(f"{path}: unreadable safetensors file ({e})") from None

    if isinstance(config, dict) and config.get("tie_word_embeddings") is True and "output.weight" not in state:
        # The output layer is the embeddings (save_pretrained writes no lm_head.weight);
        # Mistral's format has a tensor of its own for it. A copy: safetensors writes no shared tensors.
        if "tok_embeddings.weight" in state:
            state["output.weight"] = state["tok_embeddings.weight"].clone()
    missing = [n for n in expected if n not in state]
    if missing:
        shown = ", ".join(hf_name(n) or n for n in missing[:5])
        raise MistralError(f"{hf_dir}: missing tensors {shown}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    # Mistral's HF repos may hold several (7B v0.3: tokenizer.model and tokenizer.model.v3,
    # one vocabulary): the newest format is the one the model was tuned on, and a model
    # folder holds one.
    newest = next((name for name in reversed(TOKENIZER_FILES) if (hf_dir / name).is_file()), None)
    write_folder(out_dir, args, state, tokenizer=None if newest is None else hf_dir / newest)
    return args

