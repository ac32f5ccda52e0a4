"""The independent reference: tiny random HF MistralForCausalLM / MixtralForCausalLM.

Their sizes match conftest's tiny_args, except that the Mistral model sets head_dim=32
apart from hidden_size / num_attention_heads = 16 (as Mistral NeMo does), so that the
converter's head_dim handling is exercised too.
"""

from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

from helpers import DEVICE, tiny_args
from mistral import Transformer
from mistral.hf import convert

HFModel = Union[MistralForCausalLM, MixtralForCausalLM]
W = 8  # sliding window: prompts run past it, and past n_layers * (W - 1), the reach of two windowed layers


# Mixtral's rope theta, and Mistral's since v0.2; tests pass 1e4 (HF's default) too.
ROPE_THETA = 1e6


def hf_model(
    *, moe: bool, sliding_window: Optional[int] = W, seed: int = 0, attn: str = "eager", rope_theta: float = ROPE_THETA,
    **config: Any,
) -> HFModel:
    """float32 on the CPU, weights ~ N(0, dim^-0.5) (norm weights included) so logits are far from uniform.

    config: more settings of the HF config (tie_word_embeddings, say).

    rope_theta: not HF's default of 1e4 unless asked, so that a theta lost on the way
    (in conversion or in our model) shows as wrong logits.
    """
    ours = tiny_args()  # the same shapes, in HF's words
    common = dict(
        vocab_size=ours.vocab_size,
        hidden_size=ours.dim,
        intermediate_size=ours.hidden_dim,
        num_hidden_layers=ours.n_layers,
        num_attention_heads=ours.n_heads,
        num_key_value_heads=ours.n_kv_heads,
        rms_norm_eps=ours.norm_eps,
        sliding_window=sliding_window,
        attn_implementation=attn,
        **config,
    )
    if moe:
        config = MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2, rope_theta=rope_theta)
        cls = MixtralForCausalLM
    else:
        config = MistralConfig(**common, head_dim=32, rope_theta=rope_theta)
        cls = MistralForCausalLM
    return random_hf(cls, config, seed)


def random_hf(cls: type, config: Any, seed: int) -> torch.nn.Module:
    """An HF model of this config with random weights ~ N(0, dim^-0.5), as ours get."""
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=config.hidden_size**-0.5)
    return model.eval()


@torch.no_grad()
def hf_logits(model: HFModel, prompts: list[list[int]]) -> list[torch.Tensor]:
    """Each prompt alone (batch of one, no padding), on the test device in float32: [len, V] each.

    Moves the model to the test device: save it before, not after.
    """
    model = model.to(device=DEVICE, dtype=torch.float32)
    return [model(torch.tensor([p], device=DEVICE)).logits[0].float() for p in prompts]


def converted(model: HFModel, tmp_path: Path, **save_kwargs) -> Transformer:
    """model -> save_pretrained -> mistral.hf.convert -> Transformer.from_folder, on the test device in float32."""
    model.save_pretrained(tmp_path / "hf", **save_kwargs)
    convert(tmp_path / "hf", tmp_path / "ours")
    return Transformer.from_folder(tmp_path / "ours", device=DEVICE, dtype=torch.float32).eval()
