"""Mistral 7B and Mixtral 8x7B inference: sliding-window attention, a rolling-buffer KV
cache, packed and chunked prefill, and sparse mixture-of-experts, in plain PyTorch.

The names below are imported at their first use, not with the package: the command
line imports the package before it can catch a Ctrl-C, and torch's import takes seconds.
"""

import importlib
import logging
from typing import TYPE_CHECKING, Any

# xformers warns at import when its C++ extension was built for another torch. We use
# its attention biases (pure Python) and, on CUDA, its flash path, which runs on
# PyTorch's own kernels: the warning would only confuse users. Set before any import
# of xformers, which all go through this package.
logging.getLogger("xformers").setLevel(logging.ERROR)

_MODULES = {
    "DEFAULT_MODEL": "checkpoint", "ModelArgs": "args", "MoeArgs": "args", "MistralError": "errors",
    "RotatingBufferCache": "cache", "Stage": "stage", "Tokenizer": "tokenizer", "Transformer": "model",
    "generate": "generation", "stream": "generation",
}  # fmt: skip
__all__ = sorted(_MODULES)

if TYPE_CHECKING:
    from mistral.args import ModelArgs, MoeArgs
    from mistral.cache import RotatingBufferCache
    from mistral.checkpoint import DEFAULT_MODEL
    from mistral.errors import MistralError
    from mistral.generation import generate, stream
    from mistral.model import Transformer
    from mistral.stage import Stage
    from mistral.tokenizer import Tokenizer


def __getattr__(name: str) -> Any:
    if name not in _MODULES:
        raise AttributeError(f"module 'mistral' has no attribute {name!r}")
    return getattr(importlib.import_module(f"mistral.{_MODULES[name]}"), name)
