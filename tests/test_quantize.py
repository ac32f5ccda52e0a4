"""int8 weight-only quantization (mistral/quantize.py): what it writes, what loads, what it costs.

Quantization error is measured against the float model it came from: each weight is
rounded to the nearest of 255 levels of its row's scale, so each is off by at most half a
step, and the logits of these tiny models move by well under 2% (relative).
"""

import json
import math
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import edit_tensors, random_model, rel_error, tiny_args
from make_tiny_model import make_tiny_model
from mistral import DEFAULT_MODEL, MistralError, Transformer, generate
from mistral.checkpoint import PARAMS, SAFETENSORS
from mistral.loading import tensor_split_dim
from mistral.quantize import is_quantized, quantize_folder
from mistral.tokenizer import load_tokenizer

# Relative error of logits between a tiny float model and its int8 copy (measured 0.6-0.7%).
QUANT_RTOL = 2e-2


def quantized_pair(tmp_path: Path, moe: bool) -> tuple[Transformer, Transformer]:
    model = random_model(tiny_args(moe=moe, vocab_size=4096)).to("cpu")  # the default model's tokenizer
    model.save(tmp_path / "float")
    shutil.copyfile(DEFAULT_MODEL / "tokenizer.model", tmp_path / "float" / "tokenizer.model")  # quantize copies it along
    quantize_folder(tmp_path / "float", tmp_path / "int8")
    return model, Transformer.from_folder(tmp_path / "int8")


def test_quantized_logits_are_close_to_the_float_models(tmp_path: Path, moe: bool) -> None:
    model, quantized = quantized_pair(tmp_path, moe)
    assert quantized.args.quantization is not None and quantized.args.quantization.method == "int8"
    ids = torch.randint(0, model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = model(ids, [40]), quantized(ids, [40])
    assert 1e-4 < rel_error(got, want) < QUANT_RTOL  # quantized, and close
    # The cached decode path (matrix-vector products of int8 rows) agrees with the prefill path.
    assert generate([ids[:30].tolist()], quantized, max_tokens=6)[0] == generate([ids[:30].tolist()], quantized, max_tokens=6, chunk_size=7)[0]


def test_each_weight_is_within_half_a_step(tmp_path: Path, moe: bool) -> None:
    model, quantized = quantized_pair(tmp_path, moe)
    floats, ints = model.state_dict(), quantized.state_dict()
    names = [n for n in floats if is_quantized(n)]
    assert len(names) == len([n for n in ints if n.endswith(".scales")]) > 0
    for name in names:
        q, scales = ints[name], ints[name.removesuffix("weight") + "scales"]
        assert q.dtype == torch.int8 and scales.shape == q.shape[:-1]
        step = scales[..., None].float()
        assert bool(((q.float() * step - floats[name]).abs() <= step / 2 + 1e-7).all()), name
        assert int(q.abs().max()) == 127  # each row uses the whole range
    for name in set(floats) - set(names):  # embeddings, norms, router, output: untouched
        assert torch.equal(ints[name], floats[name])


def test_quantized_folder_round_trips(tmp_path: Path, moe: bool) -> None:
    _, quantized = quantized_pair(tmp_path, moe)
    quantized.save(tmp_path / "again")
    assert json.loads((tmp_path / "again" / PARAMS).read_text())["quantization"] == {"method": "int8"}
    loaded = Transformer.from_folder(tmp_path / "again").state_dict()
    want = quantized.state_dict()
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[n], want[n]) for n in want)


def test_scales_split_with_their_rows() -> None:
    """Tensor parallelism splits wq by rows and wo by columns; their scales (one per row) follow the rows."""
    assert tensor_split_dim("layers.0.attention.wq.scales") == 0
    assert tensor_split_dim("layers.0.feed_forward.experts.3.w3.scales") == 0
    assert tensor_split_dim("layers.0.attention.wo.scales") is None
    assert tensor_split_dim("layers.0.feed_forward.w2.scales") is None
    assert tensor_split_dim("layers.0.attention.wo.weight") == 1


def test_bad_quantization_is_a_clear_error(tmp_path: Path) -> None:
    _, quantized = quantized_pair(tmp_path, moe=False)
    with pytest.raises(MistralError, match="already quantized"):
        quantize_folder(tmp_path / "int8", tmp_path / "twice")
    with pytest.raises(MistralError, match="--method 'int4': this version quantizes with int8"):
        quantize_folder(tmp_path / "float", tmp_path / "int4", method="int4")
    params = json.loads((tmp_path / "int8" / PARAMS).read_text())
    (tmp_path / "int8" / PARAMS).write_text(json.dumps(params | {"quantization": {"method": "nf4"}}))
    with pytest.raises(MistralError, match=r"params.json: 'quantization': quantization method 'nf4' is not one this version reads"):
        Transformer.from_folder(tmp_path / "int8")
    # int8 tensors where params.json promises float ones would load as garbage: refused.
    (tmp_path / "int8" / PARAMS).write_text(json.dumps(params | {"quantization": None}))
    state = load_file(str(tmp_path / "int8" / SAFETENSORS))
    save_file({n: t for n, t in state.items() if not n.endswith(".scales")}, str(tmp_path / "int8" / SAFETENSORS))
    with pytest.raises(MistralError, match=r"layers\.0\.attention\.wo\.weight is int8, but params.json's 'quantization' implies a float tensor"):
        Transformer.from_folder(tmp_path / "int8")


def test_command_line_quantizes_and_generates(tmp_path: Path) -> None:
    from make_tiny_model import make_tiny_model

    folder = make_tiny_model(str(tmp_path / "model"), n_layers=2, moe=True)
    run = [sys.executable, "-m", "mistral"]
    done = subprocess.run([*run, "quantize", str(folder), str(tmp_path / "q")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == sorted(p.name for p in folder.iterdir())
    done = subprocess.run([*run, "generate", str(tmp_path / "q"), "def f():", "--max_tokens", "6", "--json", "--device", "cpu"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)["results"][0]
    model = Transformer.from_folder(tmp_path / "q")
    eos_id = load_tokenizer(tmp_path / "q").eos_id
    assert [result["tokens"]] == generate([result["prompt_tokens"]], model, max_tokens=6, eos_id=eos_id)[0]


def test_default_model_keeps_its_quality(tmp_path: Path) -> None:
    """On Python source it never saw (the held-out module copy.py), int8 costs < 1% of
    perplexity and keeps >= 97% of the float model's top-1 predictions (measured: +0.01%, 99.6%)."""
    from train_tiny import CONTEXT, evaluate


    quantize_folder(DEFAULT_MODEL, tmp_path / "q")
    text = (Path(sysconfig.get_paths()["stdlib"]) / "copy.py").read_text()
    tokens = torch.tensor(load_tokenizer(DEFAULT_MODEL).encode(text, bos=False)[: 8 * CONTEXT])
    float_model, int8_model = Transformer.from_folder(DEFAULT_MODEL), Transformer.from_folder(tmp_path / "q")
    nll_float, nll_int8 = evaluate(float_model, tokens), evaluate(int8_model, tokens)
    assert math.exp(nll_int8 - nll_float) - 1 < 0.01
    with torch.no_grad():
        agree = (float_model(tokens, [len(tokens)]).argmax(-1) == int8_model(tokens, [len(tokens)]).argmax(-1)).float().mean()
    assert agree >= 0.97


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(output__weight=None), "missing tensors output.weight"),
        (dict(extra__weight=torch.zeros(3)), "unexpected tensors extra.weight"),
        (dict(layers__0__attention__wq__weight=torch.zeros(5, 5)), "layers.0.attention.wq.weight is [5, 5], params.json implies"),
        (dict(norm__weight=torch.full((192,), math.nan)), "norm.weight holds values that are not finite"),
        (dict(norm__weight=torch.ones(192, dtype=torch.int32)), "norm.weight holds torch.int32 values"),
    ],
    ids=["missing", "extra", "shape", "nan", "integers"],
)
def test_quantize_refuses_a_broken_source(tmp_path: Path, change: dict, message: str) -> None:
    """A source that is not what its params.json says is refused before anything is written."""
    src = tmp_path / "src"
    shutil.copytree(DEFAULT_MODEL, src)
    edit_tensors(src / SAFETENSORS, **change)
    with pytest.raises(MistralError, match=re.escape(message)):
        quantize_folder(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


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
