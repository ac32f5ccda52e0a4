"""Micro-benchmark of the decode step's pieces on one GPU: each candidate kernel per shape.

Each row times one piece for all 32 layers of Mistral 7B (distinct weights and caches,
so nothing is served from L2) inside a CUDA graph, and reports the rate against the
copy bandwidth measured in the same run:

- matrix-vector products (batch 1) of each projection, bfloat16, int8 and int4 (groups of
  128): cuBLAS, mistral/kernels.py's Triton kernel (also with the RMSNorm and SwiGLU it
  takes in), an Inductor-generated reduction, and for int4 PyTorch's own kernel
  (torch.ops.aten._weight_int4pack_mm, gpt-fast's) on the same weights, its result checked
  against ours; Mixtral's int8 and int4 experts (2 of 8 at batch 1);
- the decode attention of a layer: xformers (two index copies, split-KV flash and its
  merge) against kernels.decode_attention (one kernel);
- the attention of a first prefill (mask 1) of prompts of one length: xformers against
  backend "auto" (a batched causal product, cuDNN's kernel through PyTorch), timed
  eagerly, host time included, as a prefill runs.

    python scripts/kernel_bench.py --out $OUT     # H100: ~2 min
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from bench import measure_ceilings  # scripts/ is this script's first import path
from mistral import kernels
from mistral.attention import attend
from mistral.cache import Decode
from mistral.masks import prefill_mask
from mistral.linear import quantize_int4, quantize_int8

LAYERS = 32
SHAPES = {"wqkv": (6144, 4096), "wo": (4096, 4096), "w13": (28672, 4096), "w2": (4096, 14336), "output": (32000, 4096)}
GROUP = 128  # int4's group size, `mistral quantize`'s default
INT4_BYTES = 0.5 + 4 / GROUP  # a weight's half byte, and its group's bfloat16 scale and minimum


def held(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """A quantized weight's tensors as a bfloat16 model holds them: its codes, its scales (and mins) in bfloat16."""
    return tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in tensors)


def aten_int4(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, inner_k_tiles: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Our int4 weight (mistral/linear.py) in the format of torch.ops.aten._weight_int4pack_mm: codes packed
    with column 2j in the high nibble (ours: the low one), tiled by _convert_weight_to_int4pack, and per
    group a (scale, zero) [K / G, N, 2] with W = (q - 8) * scale + zero, so zero = min + 8 * scale."""
    packed = torch.ops.aten._convert_weight_to_int4pack((q << 4) | (q >> 4), inner_k_tiles)
    return packed, torch.stack((scales, mins + 8 * scales), dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def graph_time(fn: Callable[[], None], reps: int = 20) -> float:
    """Seconds per call of fn (all layers), replayed from a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def matvecs(results: dict, bandwidth: float) -> None:
    inductor_sum = torch.compile(lambda x, w: (x.float() * w.float()).sum(-1).to(x.dtype)[None], dynamic=False)
    for name, (N, K) in SHAPES.items():
        x = torch.randn(1, K, device="cuda", dtype=torch.bfloat16)
        ws = [torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * K**-0.5 for _ in range(LAYERS)]
        qs = [held(quantize_int8(w.float())) for w in ws]
        fours = [held(quantize_int4(w.float(), GROUP)) for w in ws]
        atens = [aten_int4(*four) for four in fours]
        ours, theirs = kernels.linear(x, *fours[0]).float(), torch.ops.aten._weight_int4pack_mm(x, atens[0][0], GROUP, atens[0][1]).float()
        results[f"{name} int4 aten vs triton rel error"] = error = ((theirs - ours).norm() / ours.norm()).item()  # ~1e-2: bf16
        print(f"{name:6} int4 aten's product against ours: relative error {error:.1e}", flush=True)
        candidates = {
            "bf16 cublas": (lambda: [F.linear(x, w) for w in ws], 2),
            "bf16 triton": (lambda: [kernels.linear(x, w) for w in ws], 2),
            "bf16 inductor": (lambda: [inductor_sum(x[0], w) for w in ws], 2),
            "int8 triton": (lambda: [kernels.linear(x, q, s) for q, s in qs], 1),
            "int4 triton": (lambda: [kernels.linear(x, *four) for four in fours], INT4_BYTES),
            "int4 aten": (lambda: [torch.ops.aten._weight_int4pack_mm(x, w, GROUP, sz) for w, sz in atens], INT4_BYTES),
        }
        if name in ("wqkv", "w13", "output"):  # the products that take in the norm before them (and SwiGLU after w13)
            g, glu = torch.rand(K, device="cuda", dtype=torch.bfloat16) + 0.5, name == "w13"
            fused = "+norm+swiglu" if glu else "+norm"
            candidates |= {
                f"bf16 triton {fused}": (lambda: [kernels.linear(x, w, norm=g, eps=1e-5, glu=glu) for w in ws], 2),
                f"int8 triton {fused}": (lambda: [kernels.linear(x, q, s, norm=g, eps=1e-5, glu=glu) for q, s in qs], 1),
                f"int4 triton {fused}": (lambda: [kernels.linear(x, *four, norm=g, eps=1e-5, glu=glu) for four in fours], INT4_BYTES),
            }
        for M in (8, 32):
            xm = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            candidates |= {
                f"M={M} bf16 cublas": (lambda xm=xm: [F.linear(xm, w) for w in ws], 2),
                f"M={M} bf16 triton": (lambda xm=xm: [kernels._triton_small_linear(xm, w, None) for w in ws], 2),
                f"M={M} int8 triton": (lambda xm=xm: [kernels.linear(xm, q, s) for q, s in qs], 1),
                f"M={M} int4 triton": (lambda xm=xm: [kernels.linear(xm, *four) for four in fours], INT4_BYTES),
                f"M={M} int4 aten": (lambda xm=xm: [torch.ops.aten._weight_int4pack_mm(xm, w, GROUP, sz) for w, sz in atens], INT4_BYTES),
            }
        for label, (fn, itemsize) in candidates.items():
            try:
                seconds = graph_time(fn) / LAYERS
            except Exception as e:  # a candidate that fails must not cost the others
                results[f"{name} {label}"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                print(f"{name:5} {label:14} failed: {e}"[:200], flush=True)
                continue
            rate = N * K * itemsize / seconds
            results[f"{name} {label}"] = {"us": seconds * 1e6, "bytes_per_s": rate, "of_copy": rate / bandwidth}
            print(f"{name:6} {label:26} {seconds * 1e6:7.1f} us  {rate / 1e12:5.2f} TB/s  {rate / bandwidth:.2f} of copy", flush=True)
        del ws, qs, fours, atens
        torch.cuda.empty_cache()


def expert_matvecs(results: dict, bandwidth: float) -> None:
    """Mixtral's experts at batch 1 (2 of 8 per layer), int8 and int4, against the same rows as one plain matrix."""
    layers, E = 8, 8  # 8 distinct layers: 11 GB of int8 experts, far past the L2
    for name, (N, K) in {"w13": (28672, 4096), "w2": (4096, 14336)}.items():
        stacks, fours = [], []
        for _ in range(layers):
            w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16).float()
            stacks.append(held(quantize_int8(w)))
            fours.append(held(quantize_int4(w, GROUP)))
        del w
        x = torch.randn(2, K, device="cuda", dtype=torch.bfloat16)
        experts = torch.tensor([5, 2], device="cuda")
        glu = name == "w13"
        candidates = {
            "experts int8": (lambda: [kernels.expert_matvec(x, q, experts, s, glu=glu) for q, s in stacks], 1),
            "2 plain int8": (lambda: [[kernels.linear(x[p : p + 1], q[e], s[e]) for p, e in enumerate((5, 2))] for q, s in stacks], 1),
            "experts int4": (lambda: [kernels.expert_matvec(x, q, experts, s, m, glu=glu) for q, s, m in fours], INT4_BYTES),
        }
        for label, (fn, itemsize) in candidates.items():
            seconds = graph_time(fn) / layers
            rate = 2 * N * K * itemsize / seconds
            results[f"{name} {label}"] = {"us": seconds * 1e6, "bytes_per_s": rate, "of_copy": rate / bandwidth}
            print(f"{name:6} {label:26} {seconds * 1e6:7.1f} us  {rate / 1e12:5.2f} TB/s  {rate / bandwidth:.2f} of copy", flush=True)
        del stacks, fours
        torch.cuda.empty_cache()


def decode_attention(results: dict, bandwidth: float) -> None:
    """Per shape: xformers, and the decode kernel's tile shapes and split counts. "L=128-1536"
    is a server's batch (serve_bench.py's workload): rows of lengths spread evenly over that
    range, against rows all of their mean length."""
    H, H_kv, D = 32, 8, 128
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    spread = [128 + (1536 - 128) * i // 31 for i in range(32)]
    cases = [(4096, [512]), (4096, [2048]), (4096, [512] * 8), (4096, [512] * 32), (4096, [1024] * 64),
             (1536, spread), (1536, [round(sum(spread) / 32)] * 32)]  # fmt: skip
    for S, row_lengths in cases:
        B = len(row_lengths)
        ks = [torch.randn(B, S, H_kv, D, device="cuda", dtype=torch.bfloat16) for _ in range(LAYERS)]
        vs = [torch.randn_like(k) for k in ks]
        inputs = Decode([n - 1 for n in row_lengths], S, torch.device("cuda"), static=True)
        xq = torch.randn(B, H, D, device="cuda", dtype=torch.bfloat16)
        xk, xv = torch.randn(B, H_kv, D, device="cuda", dtype=torch.bfloat16), torch.randn(B, H_kv, D, device="cuda", dtype=torch.bfloat16)

        def xformers() -> None:
            for k, v in zip(ks, vs):
                inputs.attend(k, v, xq, xk, xv, "xformers")  # the cache update, then xformers' kernel

        def fused(block_s: int = 32, min_chunk: int = 128, warps: int = 4, splits: int | None = None) -> Callable[[], None]:
            lengths = inputs.mask.k_seqinfo.seqlen
            return lambda: [
                kernels._triton_decode_attention(xq, xk, xv, k, v, inputs.write_to, lengths, lengths, block_s, min_chunk, warps, splits)
                for k, v in zip(ks, vs)
            ]  # fmt: skip

        read = 2 * sum(row_lengths) * H_kv * D * 2  # keys and values read per layer
        # keys per loop step / fewest keys per program / warps
        shapes = [(32, 128, 4), (16, 128, 4), (64, 128, 4), (32, 128, 2), (32, 128, 8), (32, 64, 4)]
        # Programs per row and key head: as few as fill the GPU (the default: "fused 32/128/4"), and more.
        fill = kernels.triton.next_power_of_2(kernels.triton.cdiv(2 * sms, B * H_kv))
        variants = {"xformers": xformers} | {f"fused {b}/{c}/{w}": fused(b, c, w) for b, c, w in shapes}
        variants |= {f"fused splits={n}": fused(splits=n) for n in (2 * fill, 4 * fill, 8 * fill)}
        length = f"{min(row_lengths)}-{max(row_lengths)}" if len(set(row_lengths)) > 1 else row_lengths[0]
        for label, fn in variants.items():
            seconds = graph_time(fn) / LAYERS
            key = f"attention B={B} S={S} L={length} {label}"
            results[key] = {"us": seconds * 1e6, "of_copy": read / seconds / bandwidth}
            print(f"{key:52} {seconds * 1e6:7.1f} us per layer  {read / seconds / bandwidth:.2f} of copy", flush=True)
        del ks, vs
        torch.cuda.empty_cache()


def prefill_attention(results: dict, flops_per_s: float) -> None:
    H, H_kv, D = 32, 8, 128
    for B, L in [(1, 512), (1, 4096), (8, 512), (32, 128)]:
        q = torch.randn(B * L, H, D, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(B * L, H_kv, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        mask = prefill_mask([L] * B, 4096, q.device)
        flops = 4 * B * H * D * L * (L + 1) / 2  # the causal half of QK^T and PV
        for backend in ("xformers", "auto"):
            fn = lambda: attend(q, k, v, mask, backend)  # noqa: E731
            for _ in range(3):
                fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(20):
                fn()
            end.record()
            torch.cuda.synchronize()
            seconds = start.elapsed_time(end) / 1e3 / 20
            key = f"prefill attention {B}x{L} {backend}"
            results[key] = {"us": seconds * 1e6, "flop_per_s": flops / seconds, "of_matmul": flops / seconds / flops_per_s}
            print(f"{key:38} {seconds * 1e6:7.1f} us per layer  {flops / seconds / 1e12:5.0f} TFLOP/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="write kernel_bench.json here")
    parser.add_argument("--only", choices=["matvec", "experts", "attention", "prefill"], default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_bench.py needs a CUDA GPU")
    torch.manual_seed(0)
    ceilings = measure_ceilings(torch.device("cuda"))  # bench.py's, for the same floors
    bandwidth = ceilings["copy_bytes_per_s"]
    results: dict = {"device": torch.cuda.get_device_name(), "copy_bytes_per_s": bandwidth}
    print(f"{results['device']}: copy {bandwidth / 1e12:.2f} TB/s", flush=True)
    with torch.inference_mode():
        if args.only in (None, "prefill"):
            prefill_attention(results, ceilings["matmul_flop_per_s"])
        if args.only in (None, "attention"):
            decode_attention(results, bandwidth)
        if args.only in (None, "matvec"):
            matvecs(results, bandwidth)
        if args.only in (None, "experts"):
            expert_matvecs(results, bandwidth)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "kernel_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
