"""Weight-only quantization (mistral/quantize.py): what it writes, what loads, what it costs.

Quantization error is measured against the float model it came from: int8 rounds each
weight to the nearest of 255 levels of its row's scale, int4 to the nearest of 16 levels
of its group's range, so each weight is off by at most half a step. The quantized model
computes exactly with the weights its codes stand for (spelled out in helpers.dequantized,
apart from the model's code), and its logits move from the float model's by well under
2% (int8) and 12% (int4, groups of 32) on these tiny random models.
"""

import dataclasses
import json
import math
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import DEVICE, DTYPE, QUANTIZATIONS, RTOL, dequantized, edit_tensors, random_model, rel_error, tiny_args
from make_tiny_model import make_tiny_model
from mistral import DEFAULT_MODEL, MistralError, Transformer, generate
from mistral import quantize as quantize_module
from mistral.args import QuantArgs
from mistral.checkpoint import PARAMS, SAFETENSORS, TensorStream, write_safetensors
from mistral.linear import quantize
from mistral.loading import tensor_split_dim
from mistral.model import checkpoint_shapes
from mistral.quantize import is_quantized, quantize_folder
from mistral.tokenizer import load_tokenizer

# Relative error of logits between a tiny float model and its quantized copy: (at least, at most).
# Measured: int8 0.4-1.2%, int4 in groups of 32 6.1-7.3% (3 seeds, both kinds).
QUANT_RTOL = {"int8": (1e-4, 2e-2), "int4": (1e-2, 0.12)}
METHODS = pytest.mark.parametrize("method", list(QUANTIZATIONS))


def quantized_pair(tmp_path: Path, moe: bool, method: str) -> tuple[Transformer, Transformer]:
    model = random_model(tiny_args(moe=moe, vocab_size=4096)).to("cpu")  # the default model's tokenizer
    model.save(tmp_path / "float")
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", tmp_path / "float" / "tokenizer.model")  # quantize copies it along
    quantize_folder(tmp_path / "float", tmp_path / method, method, QUANTIZATIONS[method].get("group_size"))
    return model, Transformer.from_folder(tmp_path / method)


def quantized_tensors(state: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors of one quantized weight `name` (its codes, scales and mins), keyed as Linear names them."""
    base = name.removesuffix("weight")
    return {kind: state[base + kind] for kind in ("weight", "scales", "mins") if base + kind in state}


@METHODS
def test_quantized_logits_are_close_to_the_float_models(tmp_path: Path, moe: bool, method: str) -> None:
    model, quantized = quantized_pair(tmp_path, moe, method)
    assert quantized.args.quantization == QuantArgs(**QUANTIZATIONS[method])
    ids = torch.randint(0, model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids, [40]), quantized(ids, [40])
    low, high = QUANT_RTOL[method]
    assert low < rel_error(got, want) < high  # quantized, and close
    # The cached decode path (matrix-vector products of quantized rows) agrees with the prefill path.
    assert generate([ids[:30].tolist()], quantized, max_tokens=6)[0] == generate([ids[:30].tolist()], quantized, max_tokens=6, chunk_size=7)[0]


@METHODS
def test_quantized_model_computes_with_the_weights_its_codes_stand_for(tmp_path: Path, moe: bool, method: str) -> None:
    """The quantized model's logits (a prefill, then decode steps of one row) are those of a float model given
    helpers.dequantized's weights: the format (nibble order, groups, scales, minimums) read as README says."""
    _, quantized = quantized_pair(tmp_path, moe, method)
    state = quantized.state_dict()
    weights = {n: dequantized(quantized_tensors(state, n)) if is_quantized(n) else t
               for n, t in state.items() if not n.endswith((".scales", ".mins"))}  # fmt: skip
    float_model = Transformer(dataclasses.replace(quantized.args, quantization=None))
    float_model.load_state_dict(weights)
    models = [quantized.to(DEVICE, DTYPE), float_model.to(DEVICE, DTYPE).eval()]
    ids = torch.randint(0, quantized.args.vocab_size, (20,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    caches = [m.make_cache(1, 32) for m in models]
    with torch.no_grad():
        got, want = (m(ids[:15], [15], cache) for m, cache in zip(models, caches))
        assert rel_error(got, want) < RTOL
        for token in ids[15:]:
            got, want = (m(token[None], [1], cache) for m, cache in zip(models, caches))
            assert rel_error(got, want) < RTOL


@METHODS
def test_each_weight_is_within_half_a_step(tmp_path: Path, moe: bool, method: str) -> None:
    model, quantized = quantized_pair(tmp_path, moe, method)
    floats, ints = model.state_dict(), quantized.state_dict()
    names = [n for n in floats if is_quantized(n)]
    assert len(names) == len([n for n in ints if n.endswith(".scales")]) > 0
    for name in names:
        tensors = quantized_tensors(ints, name)
        q, scales = tensors["weight"], tensors["scales"]
        if method == "int8":
            assert q.dtype == torch.int8 and scales.shape == q.shape[:-1]
            assert int(q.abs().max()) == 127  # each row uses the whole range
            step = scales[..., None]
        else:
            group = QUANTIZATIONS["int4"]["group_size"]
            assert q.dtype == torch.uint8 and q.shape[-1] * 2 == floats[name].shape[-1] == scales.shape[-1] * group
            codes = torch.stack((q % 16, q // 16), dim=-1).flatten(-2).unflatten(-1, (-1, group))
            assert (codes.amin(-1) == 0).all() and (codes.amax(-1) == 15).all()  # each group spans all 16 levels
            step = scales.repeat_interleave(group, dim=-1)
        assert bool(((dequantized(tensors) - floats[name]).abs() <= step / 2 + 1e-7).all()), name
    for name in set(floats) - set(names):  # embeddings, norms, router, output: untouched
        assert torch.equal(ints[name], floats[name])


@METHODS
def test_quantized_folder_round_trips(tmp_path: Path, moe: bool, method: str) -> None:
    _, quantized = quantized_pair(tmp_path, moe, method)
    quantized.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / PARAMS).read_text())["quantization"] == QUANTIZATIONS[method]
    loaded = Transformer.from_folder(tmp_path / "again").state_dict()
    want = quantized.state_dict()
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[n], want[n]) for n in want)


def test_scales_split_with_their_weights() -> None:
    """Tensor parallelism splits wq by rows and wo by columns; int8's scales (one per row) follow the
    rows, int4's scales and mins (one per group of columns) follow the rows and the columns."""
    assert tensor_split_dim("layers.0.attention.wq.scales", 1) == 0
    assert tensor_split_dim("layers.0.feed_forward.experts.3.w3.scales", 1) == 0
    assert tensor_split_dim("layers.0.attention.wo.scales", 1) is None
    assert tensor_split_dim("layers.0.feed_forward.w2.scales", 1) is None
    assert tensor_split_dim("layers.0.attention.wo.weight", 2) == 1
    assert tensor_split_dim("layers.0.attention.wq.mins", 2) == 0
    assert tensor_split_dim("layers.0.attention.wo.mins", 2) == 1
    assert tensor_split_dim("layers.0.feed_forward.experts.3.w2.scales", 2) == 1


def test_streamed_quantization_is_the_whole_tensors_and_loads_with_safetensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """quantize writes its file a tensor at a time (a few rows quantized at a time): safetensors itself
    reads it, and it holds what quantizing each whole tensor in memory gives. Transformer.save's file,
    written the same way, holds what safetensors' own writer writes of the same tensors."""
    monkeypatch.setattr(quantize_module, "ROWS", 7)  # uneven pieces of every weight
    quantize_folder(DEFAULT_MODEL, tmp_path / "int4", "int4", 64)
    source, written = load_file(str(DEFAULT_MODEL / SAFETENSORS)), load_file(str(tmp_path / "int4" / SAFETENSORS))
    want = {}
    for name, tensor in source.items():
        made = quantize(tensor, QuantArgs("int4", 64)) if is_quantized(name) else {"weight": tensor}
        want |= {name.removesuffix("weight") + kind: t for kind, t in made.items()}
    assert written.keys() == want.keys() and all(torch.equal(written[n], want[n]) for n in want)
    model = Transformer.from_folder(tmp_path / "int4")
    model.save(tmp_path / "saved")
    save_file(model.state_dict(), str(tmp_path / "theirs.safetensors"))
    ours, theirs = load_file(str(tmp_path / "saved" / SAFETENSORS)), load_file(str(tmp_path / "theirs.safetensors"))
    assert ours.keys() == theirs.keys() and all(ours[n].dtype == theirs[n].dtype and torch.equal(ours[n], theirs[n]) for n in ours)
    write_safetensors(tmp_path / "empty.safetensors", TensorStream.of({"x": torch.zeros(0, 3)}))
    assert load_file(str(tmp_path / "empty.safetensors"))["x"].shape == (0, 3)


def test_quantize_holds_one_tensor_at_a_time(tmp_path: Path) -> None:
    """A model of 48 layers (30M parameters in bfloat16, 60 MB, each tensor at most 2 MB) quantizes to
    int4 in a process whose peak memory rises by less than half the 25 MB it writes (measured: 3-5 MB):
    it holds one tensor and its codes at a time, and reads the source without keeping it mapped."""
    args = dataclasses.replace(tiny_args(n_layers=48, vocab_size=4096), dim=256, hidden_dim=512, n_heads=8, n_kv_heads=4, head_dim=32)
    src = tmp_path / "src"
    src.mkdir()
    args.to_json(src / PARAMS)
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", src / "tokenizer.model")
    shapes = checkpoint_shapes(args)
    noise = torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    tensors = ((n, noise[: math.prod(s)].view(s)) for n, s in shapes.items())
    write_safetensors(src / SAFETENSORS, TensorStream({n: (torch.bfloat16, s) for n, s in shapes.items()}, tensors))
    code = (
        "import sys, torch; torch.set_num_threads(1)\n"
        "from mistral import DEFAULT_MODEL\nfrom mistral.quantize import quantize_folder\n"
        "quantize_folder(DEFAULT_MODEL, sys.argv[2] + '-warm', 'int4', 32)  # every import, the meta device's first use\n"
        "kb = lambda key: int(next(line for line in open('/proc/self/status') if line.startswith(key)).split()[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')  # Linux: the peak resident memory so far forgotten\n"
        "before = kb('VmRSS')\n"
        "quantize_folder(sys.argv[1], sys.argv[2], 'int4', 32)\n"
        "print((kb('VmHWM') - before) * 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, str(src), str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    written = (tmp_path / "out" / SAFETENSORS).stat().st_size
    assert written > 20e6 and int(done.stdout) < written / 2, (int(done.stdout), written)


def test_bad_quantization_is_a_clear_error(tmp_path: Path) -> None:
    quantized_pair(tmp_path, moe=False, method="int8")
    with pytest.raises(MistralError, match="already quantized"):
        quantize_folder(tmp_path / "int8", tmp_path / "twice")
    for method, group_size, message in [
        ("nf4", None, "--method 'nf4': this version quantizes with int8, int4"),
        ("int4", 96, "^group_size 96: int4 groups are 32, 64 or 128 input columns$"),
        ("int4", "abc", "^group_size 'abc': int4 groups are"),
        ("int8", 64, "^group_size 64: int8 has one scale per output row"),
        ("int4", None, r"^int4 group_size=128 does not divide the model's dim=64 \(the input width of wq, wk, wv, w1, w3\); group sizes that do: 32$"),
    ]:
        with pytest.raises(MistralError, match=message):
            quantize_folder(tmp_path / "float", tmp_path / "out", method, group_size)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float", "int8"]
    params = json.loads((tmp_path / "int8" / PARAMS).read_text())
    for section, message in [
        ({"method": "nf4"}, "quantization method 'nf4' is not one this version reads"),
        ({"method": "int4"}, r"quantization method 'int4' needs a group_size \(32, 64 or 128\)"),
        ({"method": "int4", "group_size": 48}, "group_size 48: int4 groups are"),
    ]:
        (tmp_path / "int8" / PARAMS).write_text(json.dumps(params | {"quantization": section}))
        with pytest.raises(MistralError, match=rf"params.json: 'quantization': {message}"):
            Transformer.from_folder(tmp_path / "int8")
    # int8 codes read as int4 pairs: their shapes are not int4's.
    (tmp_path / "int8" / PARAMS).write_text(json.dumps(params | {"quantization": QUANTIZATIONS["int4"]}))
    with pytest.raises(MistralError, match=r"layers\.0\.attention\.wq\.weight is \[64, 64\], params.json implies \[64, 32\]"):
        Transformer.from_folder(tmp_path / "int8")
    # Quantized tensors where params.json promises float ones would load as garbage: refused.
    (tmp_path / "int8" / PARAMS).write_text(json.dumps(params | {"quantization": None}))
    state = load_file(str(tmp_path / "int8" / SAFETENSORS))
    save_file({n: t for n, t in state.items() if not n.endswith(".scales")}, str(tmp_path / "int8" / SAFETENSORS))
    with pytest.raises(MistralError, match=r"layers\.0\.attention\.wo\.weight is int8, but params.json's 'quantization' implies a float tensor"):
        Transformer.from_folder(tmp_path / "int8")
    edit_tensors(tmp_path / "float" / SAFETENSORS, norm__weight=torch.zeros(64, dtype=torch.uint8))
    with pytest.raises(MistralError, match=r"norm\.weight is int4 \(uint8, two codes a byte\), but params.json's 'quantization' implies a float"):
        Transformer.from_folder(tmp_path / "float")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_command_line_quantizes_and_generates(tmp_path: Path, method: str) -> None:
    folder = make_tiny_model(str(tmp_path / "model"), n_layers=2, moe=True)
    run = [sys.executable, "-m", "mistral"]
    options = ["--method", "int4", "--group_size", "32"] if method == "int4" else []  # int8: the default
    done = subprocess.run([*run, "quantize", str(folder), str(tmp_path / "q"), *options], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == sorted(p.name for p in folder.iterdir())
    assert json.loads((tmp_path / "q" / PARAMS).read_text())["quantization"] == QUANTIZATIONS[method]
    done = subprocess.run([*run, "generate", str(tmp_path / "q"), "def f():", "--max_tokens", "6", "--json", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["results"][0]
    model = Transformer.from_folder(tmp_path / "q")
    eos_id = load_tokenizer(tmp_path / "q").eos_id
    assert [result["tokens"]] == generate([result["prompt_tokens"]], model, max_tokens=6, eos_id=eos_id)[0]


# What quantizing the default model may cost on Python source it never saw (the held-out module
# copy.py, 2,048 tokens): (perplexity rise at most, top-1 agreement with the float model at least).
# Measured: int8 -0.05% and 99.4%; int4 in groups of 64 (the largest that divides its width of
# 192) +0.07% and 94.6% (on pprint.py: +0.5% and 94.6%).
QUALITY = {"int8": (0.01, 0.97), "int4": (0.03, 0.92)}


@pytest.fixture(scope="module")
def held_out() -> tuple[torch.Tensor, float, torch.Tensor]:
    """(tokens of copy.py, the float default model's mean negative log-likelihood on them, its top-1 predictions)."""
    from train_tiny import CONTEXT, evaluate

    text = (Path(sysconfig.get_paths()["stdlib"]) / "copy.py").read_text()
    tokens = torch.tensor(load_tokenizer(DEFAULT_MODEL).encode(text, bos=False)[: 8 * CONTEXT])
    model = Transformer.from_folder(DEFAULT_MODEL)
    with torch.no_grad():
        return tokens, evaluate(model, tokens), model(tokens, [len(tokens)]).argmax(-1)


@pytest.mark.parametrize("method, group_size", [("int8", None), ("int4", 64)], ids=["int8", "int4"])
def test_default_model_keeps_its_quality(tmp_path: Path, held_out: tuple, method: str, group_size: Optional[int]) -> None:
    """On Python source it never saw, quantization costs at most QUALITY's perplexity and top-1 agreement."""
    from train_tiny import evaluate

    tokens, nll_float, top1_float = held_out
    quantize_folder(DEFAULT_MODEL, tmp_path / "q", method, group_size)
    model = Transformer.from_folder(tmp_path / "q")
    rise, agreement = QUALITY[method]
    assert math.exp(evaluate(model, tokens) - nll_float) - 1 < rise
    with torch.no_grad():
        assert (model(tokens, [len(tokens)]).argmax(-1) == top1_float).float().mean() >= agreement


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(output__weight=None), "missing tensors output.weight"),
        (dict(extra__weight=torch.zeros(3)), "unexpected tensors extra.weight"),
        (dict(layers__0__attention__wq__weight=torch.zeros(5, 5)), "layers.0.attention.wq.weight is [5, 5], params.json implies"),
        (dict(norm__weight=torch.full((192,), math.nan)), "norm.weight holds values that are not finite"),
        (dict(layers__3__feed_forward__experts__3__w2__weight=torch.full((192, 384), math.inf)), "w2.weight holds values that are not finite"),
        (dict(norm__weight=torch.ones(192, dtype=torch.int32)), "norm.weight holds torch.int32 values"),
    ],
    ids=["missing", "extra", "shape", "nan", "inf-in-the-last-expert", "integers"],
)
def test_quantize_refuses_a_broken_source(tmp_path: Path, change: dict, message: str) -> None:
    """A source that is not what its params.json says is refused: before anything is written, or (values
    that are not finite) when the stream meets them, its half-written folder removed."""
    src = tmp_path / "src"
    shutil.copytree(DEFAULT_MODEL, src)
    edit_tensors(src / SAFETENSORS, **change)
    with pytest.raises(MistralError, match=re.escape(message)):
        quantize_folder(src, tmp_path / "out", "int4", 64)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # no folder, no temporary one


@pytest.mark.parametrize(
    "tokenizer, message",
    [(None, "no tokenizer file"), (b"garbage", "not a sentencepiece model"), ("tiny", "512 tokens but params.json says vocab_size=")],
    ids=["none", "garbage", "another-vocabulary"],
)
def test_quantize_refuses_a_source_without_a_working_tokenizer(tmp_path: Path, tokenizer: Any, message: str) -> None:
    """The tokenizer generate would read is read: a quantized folder that cannot run is not written."""
    src = tmp_path / "src"
    shutil.copytree(DEFAULT_MODEL, src)
    (src / "tokenizer.model").unlink()
    if isinstance(tokenizer, bytes):
        (src / "tokenizer.model").write_bytes(tokenizer)
    elif tokenizer == "tiny":  # another model's, of 512 tokens
        shutil.copy(make_tiny_model(str(tmp_path / "tiny")) / "tokenizer.model", src / "tokenizer.model")
    with pytest.raises(MistralError, match=message):
        quantize_folder(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
