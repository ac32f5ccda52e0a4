"""What a first forward call on a GPU would wait for, done while the weights load.

A fresh process's first call pays once for CUDA's libraries and for Triton: cuBLAS makes
its handle and workspace, PyTorch's causal attention loads its kernels, Triton hashes its own
sources (its kernel cache's key) and loads each kernel from that cache. None of it needs
the weights, and reading them leaves the GIL free most of the time (the disk, the
copies on their own streams), so a thread does it meanwhile, through the same calls the
model makes (its norm, rotation and attention on a few tokens of its shapes).
"""

import threading
import time
from typing import Optional

import torch

from mistral.args import ModelArgs
from mistral.attention import causal_attention
from mistral.model import RMSNorm, apply_rotary_emb, rotary_cos_sin


class Prewarm:
    """Started on a CUDA device in half precision (where the Triton kernels run), else nothing."""

    def __init__(self, args: ModelArgs, device: torch.device, dtype: torch.dtype):
        self.thread: Optional[threading.Thread] = None
        if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
            self.thread = threading.Thread(target=_first_calls, args=(args, device, dtype), name="mistral-prewarm", daemon=True)
            self.thread.start()

    def join(self) -> float:
        """Wait for it to end; the seconds waited (by how much it outlasted the load)."""
        start = time.perf_counter()
        if self.thread is not None:
            self.thread.join()
        return time.perf_counter() - start


@torch.inference_mode()
def _first_calls(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> None:
    T = 16
    try:
        with torch.cuda.device(device):
            x = torch.ones(T, args.dim, device=device, dtype=dtype)
            x @ x.T  # cuBLAS
            RMSNorm(args.dim, args.norm_eps).to(device, dtype)(x)
            rope = rotary_cos_sin(torch.arange(T, device=device), args.head_dim, args.rope_theta)
            q = apply_rotary_emb(torch.ones(T, args.n_heads, args.head_dim, device=device, dtype=dtype), rope)
            kv = torch.ones(T, args.n_kv_heads, args.head_dim, device=device, dtype=dtype)
            causal_attention(q, kv, kv, {T: [0]}, remember=False)  # PyTorch's flash attention; a real prompt of T is still new
            torch.cuda.synchronize(device)
    except Exception:  # noqa: BLE001 - a head start only: whatever fails here fails again where it matters, with its error
        pass
