"""Every released Mistral folder's shape: its params.json as published loads, and a tiny
random model with the same peculiarities (no rope_theta, a window or none, head_dim apart
from dim / n_heads, each vocabulary size, rope thetas up to 1e8, experts) converts from
HF's config and equals HF's logits.

The published params.json files are those of /work/shared/RELEASES.md.
"""

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

from helpers import DEVICE, F32_RTOL, random_prompts, rel_error
from hf_reference import converted, hf_logits, random_hf
from mistral import MistralError, ModelArgs, Transformer
from mistral.checkpoint import PARAMS

DENSE_7B = dict(dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8, norm_eps=1e-05)
LARGE_22B = dict(dim=6144, n_layers=56, head_dim=128, hidden_dim=16384, n_heads=48, n_kv_heads=8, norm_eps=1e-05)
TWO_OF_EIGHT = {"num_experts": 8, "num_experts_per_tok": 2}
PUBLISHED: dict[str, dict[str, Any]] = {
    "Mistral 7B v0.1": {**DENSE_7B, "vocab_size": 32000, "sliding_window": 4096},  # no rope_theta
    "Mistral 7B v0.2": {**DENSE_7B, "vocab_size": 32000, "rope_theta": 1000000.0},
    "Mistral 7B v0.3": {**DENSE_7B, "vocab_size": 32768, "rope_theta": 1000000.0},
    "Mixtral 8x7B": {**DENSE_7B, "vocab_size": 32000, "rope_theta": 1e6, "moe": TWO_OF_EIGHT},
    "Mixtral 8x22B": {**LARGE_22B, "vocab_size": 32768, "rope_theta": 1000000, "moe": TWO_OF_EIGHT},  # an int theta
    "Codestral 22B": {**LARGE_22B, "vocab_size": 32768, "rope_theta": 1000000.0},
    "Mistral Nemo 12B": dict(dim=5120, n_layers=40, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8,
                             norm_eps=1e-05, vocab_size=131072, rope_theta=1000000.0),
    "Mistral Small 24B": dict(dim=5120, n_layers=40, head_dim=128, hidden_dim=32768, n_heads=32, n_kv_heads=8,
                              norm_eps=1e-05, vocab_size=131072, rope_theta=100000000.0),
}

# The same peculiarities at dim 64, 2 layers: n_heads * head_dim is 64 except where the
# release has it apart from dim (Nemo, Small: 4 x 12 = 48 while dim / n_heads = 16).
TINY: dict[str, dict[str, Any]] = {
    "Mistral 7B v0.1": dict(vocab_size=32000, sliding_window=8),
    "Mistral 7B v0.2": dict(vocab_size=32000, rope_theta=1e6),
    "Mistral 7B v0.3": dict(vocab_size=32768, rope_theta=1e6),
    "Mixtral 8x7B": dict(vocab_size=32000, rope_theta=1e6, moe=dict(num_experts=4, num_experts_per_tok=2)),
    "Mixtral 8x22B": dict(vocab_size=32768, rope_theta=1e6, n_heads=8, n_kv_heads=2, head_dim=8,
                          moe=dict(num_experts=4, num_experts_per_tok=2)),
    "Codestral 22B": dict(vocab_size=32768, rope_theta=1e6, n_heads=8, n_kv_heads=2, head_dim=8),
    "Mistral Nemo 12B": dict(vocab_size=131072, rope_theta=1e6, head_dim=12),
    "Mistral Small 24B": dict(vocab_size=131072, rope_theta=1e8, head_dim=12, hidden_dim=256),
}


def tiny_params(name: str) -> dict[str, Any]:
    return {**dict(dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-05), **TINY[name]}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_params_json_loads(name: str, tmp_path: Path) -> None:
    (tmp_path / PARAMS).write_text(json.dumps(PUBLISHED[name]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no key of a release is unknown to us
        args = ModelArgs.from_json(tmp_path / PARAMS)
    assert args.rope_theta == PUBLISHED[name].get("rope_theta", 10000.0)
    assert args.sliding_window == PUBLISHED[name].get("sliding_window")
    assert (args.moe is not None) == ("moe" in PUBLISHED[name])
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in Transformer(args).state_dict().items()}
    q = args.n_heads * args.head_dim
    assert shapes["layers.0.attention.wq.weight"] == (q, args.dim)
    assert shapes["layers.0.attention.wo.weight"] == (args.dim, q)
    assert shapes["output.weight"] == (args.vocab_size, args.dim)


@pytest.mark.parametrize(
    "key, value, message",
    [("vision_encoder", {"hidden_size": 1024}, "multimodal"), ("quantization", {"qformat_weight": "fp8_e4m3"}, "quantized")],
)
def test_unsupported_release_keys_are_one_line_errors(tmp_path: Path, key: str, value: Any, message: str) -> None:
    (tmp_path / PARAMS).write_text(json.dumps({**PUBLISHED["Mistral Nemo 12B"], key: value}))
    with pytest.raises(MistralError, match=rf"params\.json: '{key}' makes this a {message}"):
        ModelArgs.from_json(tmp_path / PARAMS)


def test_informational_release_keys_are_ignored_silently(tmp_path: Path) -> None:
    (tmp_path / PARAMS).write_text(json.dumps({**PUBLISHED["Mistral Small 24B"], "max_seq_len": 32768, "model_type": "transformer"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ModelArgs.from_json(tmp_path / PARAMS).rope_theta == 1e8


def hf_from_params(params: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """The HF model whose config.json HF would publish for these params (float32, random ~ N(0, dim^-0.5))."""
    common = dict(
        vocab_size=params["vocab_size"], hidden_size=params["dim"], intermediate_size=params["hidden_dim"],
        num_hidden_layers=params["n_layers"], num_attention_heads=params["n_heads"],
        num_key_value_heads=params["n_kv_heads"], head_dim=params["head_dim"], rms_norm_eps=params["norm_eps"],
        rope_theta=params.get("rope_theta", 10000.0), sliding_window=params.get("sliding_window"), attn_implementation="eager",
    )
    if "moe" in params:
        moe = params["moe"]
        config, cls = MixtralConfig(**common, num_local_experts=moe["num_experts"],
                                    num_experts_per_tok=moe["num_experts_per_tok"]), MixtralForCausalLM
    else:
        config, cls = MistralConfig(**common), MistralForCausalLM
    return random_hf(cls, config, seed)


@pytest.mark.parametrize("name", TINY)
def test_tiny_release_converts_and_matches_hf(name: str, tmp_path: Path) -> None:
    params = tiny_params(name)
    hf = hf_from_params(params)
    ours = converted(hf, tmp_path)
    want_args = ModelArgs.from_json(tmp_path / "ours" / PARAMS)
    assert (want_args.head_dim, want_args.vocab_size, want_args.rope_theta) == (
        params["head_dim"], params["vocab_size"], params.get("rope_theta", 10000.0))
    assert want_args.sliding_window == params.get("sliding_window")
    prompts = random_prompts([12, 21], params["vocab_size"], seed=3)  # past the window of v0.1's tiny twin
    for prompt, want in zip(prompts, hf_logits(hf, prompts)):
        with torch.no_grad():
            got = ours(torch.tensor(prompt, device=DEVICE), [len(prompt)])
        assert rel_error(got, want) < F32_RTOL
