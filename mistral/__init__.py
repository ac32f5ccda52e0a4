"""Mistral 7B and Mixtral 8x7B inference: sliding-window attention, a rolling-buffer KV
cache, packed and chunked prefill, and sparse mixture-of-experts, in plain PyTorch."""

import logging

# xformers warns at import when its C++ extension was built for another torch. We use
# its attention biases (pure Python) and, on CUDA, its flash path, which runs on
# PyTorch's own kernels: the warning would only confuse users. Set before any import
# of xformers, which all go through this package.
logging.getLogger("xformers").setLevel(logging.ERROR)

# isort: split

from mistral.args import ModelArgs, MoeArgs
from mistral.cache import RotatingBufferCache
from mistral.checkpoint import DEFAULT_MODEL
from mistral.errors import MistralError
from mistral.generation import generate, stream
from mistral.model import Transformer
from mistral.tokenizer import Tokenizer

__all__ = ["DEFAULT_MODEL", "ModelArgs", "MoeArgs", "MistralError", "RotatingBufferCache", "Tokenizer", "Transformer", "generate", "stream"]
