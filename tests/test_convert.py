"""HF checkpoint import (mistral.hf, `mistral convert`) against HF transformers itself.

Each layout save_pretrained writes converts to a folder whose logits equal HF's: one
file, shards with an index, Mixtral's fused experts, bfloat16 tensors. Bad folders fail
with a MistralError that names the file and the key or tensor.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import DEVICE, F32_RTOL, edit_tensors, random_prompts, rel_error
from hf_reference import converted, hf_logits, hf_model
from mistral import MistralError, Transformer
from mistral.checkpoint import SAFETENSORS, TOKENIZER
from mistral.hf import args_from_hf_config, convert, unpermute

PROMPTS = random_prompts([21, 30], seed=2)


def assert_same_logits(ours: Transformer, hf: torch.nn.Module) -> None:
    for prompt, want in zip(PROMPTS, hf_logits(hf, PROMPTS)):
        with torch.no_grad():
            got = ours(torch.tensor(prompt, device=DEVICE), [len(prompt)])
        assert rel_error(got, want) < F32_RTOL


def test_sharded_checkpoint_converts_from_the_command_line(tmp_path: Path) -> None:
    hf = hf_model(moe=False)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("model-*-of-*.safetensors"))) > 1
    (tmp_path / "hf" / TOKENIZER).write_bytes(b"a sentencepiece model")
    run = subprocess.run(
        [sys.executable, "-m", "mistral", "convert", str(tmp_path / "hf"), str(tmp_path / "ours")],
        capture_output=True, text=True,
    )
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "ours" / TOKENIZER).read_bytes() == b"a sentencepiece model"
    assert_same_logits(Transformer.from_folder(tmp_path / "ours", device=DEVICE), hf)


def test_sharded_mixtral_converts(tmp_path: Path) -> None:
    hf = hf_model(moe=True, seed=1)
    ours = converted(hf, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "ours" / TOKENIZER).exists()
    assert_same_logits(ours, hf)


def test_fused_experts_convert(tmp_path: Path) -> None:
    """transformers 5 holds Mixtral's experts as gate_up_proj / down_proj and writes them so on request."""
    hf = hf_model(moe=True, seed=2)
    ours = converted(hf, tmp_path, save_original_format=False)
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
    assert_same_logits(ours, hf)


def test_tied_embeddings_convert(tmp_path: Path) -> None:
    """tie_word_embeddings: save_pretrained writes no lm_head.weight, the output layer is the
    embeddings; the converted folder holds it as output.weight and gives HF's logits."""
    hf = hf_model(moe=False, seed=4, tie_word_embeddings=True)
    try:
        ours = converted(hf, tmp_path)
    except MistralError as e:
        pytest.fail(f"a tied-embeddings model does not convert: {e}")
    with safe_open(str(tmp_path / "hf" / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()
    assert torch.equal(ours.output.weight, ours.tok_embeddings.weight)
    assert_same_logits(ours, hf)


def test_tensors_keep_their_dtype(tmp_path: Path) -> None:
    hf = hf_model(moe=False, seed=3).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    convert(tmp_path / "hf", tmp_path / "ours")
    hf_state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    state = load_file(str(tmp_path / "ours" / SAFETENSORS))
    assert {t.dtype for t in state.values()} == {torch.bfloat16}
    # A rename, or a reordering of rows: the same bits either way.
    assert torch.equal(state["layers.1.attention.wv.weight"], hf_state["model.layers.1.self_attn.v_proj.weight"])
    assert torch.equal(state["layers.1.attention.wk.weight"].sort(0).values, hf_state["model.layers.1.self_attn.k_proj.weight"].sort(0).values)


def test_unpermute_inverts_hf_permute() -> None:
    n_heads, head_dim, dim = 3, 8, 5
    w = torch.randn(n_heads * head_dim, dim)
    hf = w.view(n_heads, head_dim // 2, 2, dim).transpose(1, 2).reshape(n_heads * head_dim, dim)
    assert torch.equal(unpermute(hf, n_heads), w)


def test_args_from_hf_config() -> None:
    config = hf_model(moe=True).config.to_dict()
    config["sliding_window"] = None
    # The config.json of transformers < 5: rope_theta at the top level.
    del config["rope_parameters"]
    config["rope_theta"] = 1e6
    args = args_from_hf_config(config)
    assert (args.dim, args.n_layers, args.head_dim, args.hidden_dim) == (64, 2, 16, 96)
    assert (args.n_heads, args.n_kv_heads, args.vocab_size) == (4, 2, 97)
    assert (args.norm_eps, args.rope_theta, args.sliding_window) == (1e-5, 1e6, None)
    assert (args.moe.num_experts, args.moe.num_experts_per_tok) == (4, 2)


# --- Bad folders --------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path: Path) -> Path:
    hf_model(moe=True).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def edit_config(hf_dir: Path, **changes: object) -> None:
    config = json.loads((hf_dir / "config.json").read_text())
    config.update(changes)
    (hf_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not ...}))


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"architectures": ["LlamaForCausalLM"]}, r"unsupported architecture \['LlamaForCausalLM'\]"),
        ({"num_key_value_heads": ..., "vocab_size": ...}, r"missing keys \['num_key_value_heads', 'vocab_size'\]"),
        ({"num_local_experts": ...}, r"missing keys \['num_local_experts'\]"),
        ({"hidden_size": "64"}, r"'hidden_size' must be a positive integer, got '64'"),
        ({"rms_norm_eps": None}, r"'rms_norm_eps' must be a positive number"),
        ({"head_dim": 15}, r"head_dim=15 must be even"),
        ({"num_experts_per_tok": 5}, r"num_experts_per_tok=5"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}}, r"unsupported rotary scaling"),
        ({"rope_parameters": ...}, r"rope_theta"),
    ],
    ids=["architecture", "missing keys", "missing moe key", "str for int", "null eps", "odd head_dim", "top-k > experts", "rope scaling", "no rope_theta"],
)
def test_bad_config(hf_dir: Path, tmp_path: Path, changes: dict, message: str) -> None:
    edit_config(hf_dir, **changes)
    with pytest.raises(MistralError, match=rf"config\.json: .*({message})"):
        convert(hf_dir, tmp_path / "ours")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_hidden_layers": 1_000_000}, r"hf: the weights hold 2 layers, but config\.json says num_hidden_layers=1000000"),
        ({"num_local_experts": 1_000_000}, r"hf: model\.layers\.\d\.\S+gate\.weight is \[4, 64\], config\.json implies \[1000000, 64\]"),
    ],
    ids=["layers", "experts"],
)
def test_a_config_of_more_layers_or_experts_than_the_weights_fails_at_once(hf_dir: Path, tmp_path: Path, changes: dict, message: str) -> None:
    """Counted in the files' headers before anything is built: num_hidden_layers: 1000000 ran for minutes."""
    edit_config(hf_dir, **changes)
    with pytest.raises(MistralError, match=message):
        convert(hf_dir, tmp_path / "ours")


def test_missing_config(hf_dir: Path, tmp_path: Path) -> None:
    (hf_dir / "config.json").unlink()
    with pytest.raises(MistralError, match=r"hf: no config\.json"):
        convert(hf_dir, tmp_path / "ours")


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(MistralError, match="nowhere: HF model folder not found"):
        convert(tmp_path / "nowhere", tmp_path / "ours")


def test_no_safetensors(hf_dir: Path, tmp_path: Path) -> None:
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    with pytest.raises(MistralError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        convert(hf_dir, tmp_path / "ours")


def test_index_names_missing_shard(tmp_path: Path) -> None:
    hf_model(moe=False).save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    shard = sorted((tmp_path / "hf").glob("model-*-of-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(MistralError, match=rf"index\.json: lists {shard.name}, which is not in the folder"):
        convert(tmp_path / "hf", tmp_path / "ours")


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model__layers__0__self_attn__q_norm__weight": torch.ones(16)}, r"unknown tensor model\.layers\.0\.self_attn\.q_norm\.weight"),
        ({"model__layers__1__block_sparse_moe__experts__2__w3__weight": None},
         r"hf: missing tensors model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight"),
        ({"lm_head__weight": None}, r"hf: missing tensors lm_head\.weight"),
        ({"model__layers__2__input_layernorm__weight": torch.ones(64)},
         r"tensor model\.layers\.2\.input_layernorm\.weight \(layers\.2\.attention_norm\.weight for us\) does not fit"),
        ({"model__layers__0__block_sparse_moe__experts__4__w1__weight": torch.ones(96, 64)}, r"experts\.4\.w1\.weight .* does not fit"),
        ({"model__norm__weight": torch.ones(65)}, r"model\.norm\.weight is \[65\], config\.json implies \[64\]"),
        ({"model__layers__0__mlp__experts__down_proj": torch.ones(4, 64, 96)}, r"already gave"),
        ({"model__layers__0__mlp__experts__gate_up_proj": torch.ones(4, 96, 64)},
         r"gate_up_proj is \[4, 96, 64\], config\.json implies \[4, 192, 64\]"),
        ({"model__norm__weight": torch.ones(64, dtype=torch.int32)}, r"model\.norm\.weight holds torch\.int32 values, where a float weight belongs"),
        ({"model__norm__weight": torch.full((64,), float("nan"))}, r"model\.norm\.weight holds values that are not finite"),
    ],
    ids=["unknown", "missing expert", "missing lm_head", "extra layer", "extra expert", "wrong shape", "given twice",
         "fused wrong shape", "integers", "nan"],
)
def test_bad_tensors(hf_dir: Path, tmp_path: Path, changes: dict, message: str) -> None:
    edit_tensors(hf_dir / "model.safetensors", **changes)
    with pytest.raises(MistralError, match=message):
        convert(hf_dir, tmp_path / "ours")
    assert not (tmp_path / "ours").exists(), "a failed conversion writes nothing"


def test_a_shard_index_naming_files_outside_the_folder_is_refused(tmp_path: Path) -> None:
    """model.safetensors.index.json is data: it may not point the reader at ../ or an absolute path."""
    hf_model(moe=False).save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    index = tmp_path / "hf" / "model.safetensors.index.json"
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copyfile(next((tmp_path / "hf").glob("model-*.safetensors")), outside)
    for name in ("../elsewhere.safetensors", str(outside)):
        data = json.loads(index.read_text())
        first = next(iter(data["weight_map"]))
        data["weight_map"][first] = name
        index.write_text(json.dumps(data))
        with pytest.raises(MistralError, match="not a file of the folder itself"):
            convert(tmp_path / "hf", tmp_path / "ours")
    assert not (tmp_path / "ours").exists()


def test_a_hub_cache_snapshot_of_symlinks_converts(tmp_path: Path) -> None:
    """Hugging Face's cache holds a snapshot as symlinks into ../../blobs: plain names, read through the links."""
    hf = hf_model(moe=False)
    hf.save_pretrained(tmp_path / "saved", max_shard_size="40KB")
    blobs, snapshot = tmp_path / "hub" / "blobs", tmp_path / "hub" / "snapshots" / "abc"
    blobs.mkdir(parents=True), snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted((tmp_path / "saved").iterdir())):
        shutil.copyfile(file, blobs / f"h{i}")
        (snapshot / file.name).symlink_to(Path("../../blobs") / f"h{i}")
    convert(snapshot, tmp_path / "ours")
    assert_same_logits(Transformer.from_folder(tmp_path / "ours", device=DEVICE), hf)
