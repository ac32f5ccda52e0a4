"""Weights fused for speed, shown under the checkpoint's names.

The model keeps some checkpoint tensors as one (wq | wk | wv, w1 | w3, a Mixtral layer's
experts stacked): one product reads them together. `CheckpointNames` makes such a
module's `state_dict()` list the checkpoint's own tensors as views into the fused ones,
so saving writes Mistral's names and loading writes each tensor straight into place.
"""

import torch
from torch import nn


def split_views(fused: dict[str, torch.Tensor], name: str, parts: dict[str, int]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors `part.weight` (and `part.scales`, `part.mins` when quantized) as views of
    consecutive rows of `name.weight` (`name.scales`, `name.mins`); parts: part -> its rows."""
    views = {}
    for kind in ("weight", "scales", "mins"):
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

    fused: tuple[str, ...] = ()  # the submodules whose parameters (weight, and scales, mins if quantized) are fused

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
