"""Pipeline sharding (mistral/pipeline.py) on several GPUs: correctness, then speed.

1. check: a small model in float32 gives the same greedy tokens (and logits) on 1 rank
   and on all ranks, with and without micro-batches. The weights are equal on both
   sides without any file: Transformer.random seeds each tensor by its name.
2. speed: Mixtral 8x7B's shapes with random bf16 weights, built sharded straight on
   the GPUs (about 47 GB each on 2), a 512-token prompt then 128 new tokens, at batch
   1 and 32, with the plain schedule (micro_batches=1) and the micro-batched one
   (one micro-batch per rank). Reported: time to first token, decode and end-to-end
   tokens/s, peak memory per GPU, and the bandwidth floor: the bytes a decode step
   must read (weights touched at that batch, plus the KV cache) over the copy
   bandwidth measured on one GPU. Ranks run one after another within a step, so
   the pipeline's floor is a single GPU's.

    torchrun --nproc-per-node 2 scripts/pipeline_gpu.py --out $OUT
    torchrun --nproc-per-node 2 scripts/pipeline_gpu.py --tiny --device cpu      # the logic, on a CPU (gloo)

Rank 0 prints the results and writes <out>/pipeline.json.
"""

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench import MIXTRAL_8X7B, TINY_MOE, decode_floor, measure_ceilings, random_prompts, sync
from mistral import ModelArgs, Transformer, pipeline
from mistral.generate import generate, stream

# The small model of the check: Mixtral-shaped, big enough for real kernels, float32 so
# greedy tokens are exact whatever the batch shapes.
CHECK = dict(MIXTRAL_8X7B, dim=256, n_layers=4, head_dim=32, hidden_dim=512, n_heads=8, n_kv_heads=2, sliding_window=64)
TINY_CHECK = dict(TINY_MOE, n_layers=3, sliding_window=16)


def log(rank: int, *parts: Any) -> None:
    if rank == 0:
        print(*parts, flush=True)


def check(args: ModelArgs, rank: int, P: int, device: torch.device) -> dict[str, Any]:
    """Greedy tokens and logits of all ranks against one rank's whole model (same weights)."""
    prompts = random_prompts(6, 40, args.vocab_size, seed=1) + random_prompts(2, 100, args.vocab_size, seed=2)
    ids, seqlens = torch.tensor(sum(prompts, []), device=device), [len(p) for p in prompts]
    sharded = Transformer.random(args, seed=3, device=device, pipeline_rank=rank, num_pipeline_ranks=P)
    got = {M: generate(prompts, sharded, max_tokens=48, micro_batches=M)[0] for M in (1, P)}
    with torch.inference_mode():
        logits = sharded(ids, seqlens)
    out: dict[str, Any] = {}
    if rank == 0:  # the single-process reference, while the other ranks wait
        whole = Transformer.random(args, seed=3, device=device)
        want = generate(prompts, whole, max_tokens=48)[0]
        with torch.inference_mode():
            reference = whole(ids, seqlens)
        out = {f"tokens_equal_micro_batches_{M}": tokens == want for M, tokens in got.items()}
        out["logits_rel_error"] = ((logits - reference).norm() / reference.norm()).item()
        del whole
    dist.barrier()
    return out


def run(model: Transformer, prompts: list[list[int]], new_tokens: int, micro_batches: int, device: torch.device) -> dict:
    """One timed generation; every rank takes part, rank 0's clock counts."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    sync(device)
    start = time.perf_counter()
    first = 0.0
    for step, _ in enumerate(stream(prompts, model, max_tokens=new_tokens, micro_batches=micro_batches)):
        if step == 0:
            sync(device)
            first = time.perf_counter() - start
    sync(device)
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    peaks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak / 2**30)
    B = len(prompts)
    return {
        "ttft_ms": 1e3 * first,
        "decode_tok_s": B * (new_tokens - 1) / (total - first),
        "e2e_tok_s": B * new_tokens / total,
        "peak_gib_per_gpu": [round(p, 2) for p in peaks],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: checks the script, measures nothing real")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    cfg = p.parse_args()
    P = int(os.environ.get("WORLD_SIZE", "1"))
    rank, device = pipeline.init(P, cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # ranks share the cores
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict[str, Any] = {"ranks": P, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if cfg.tiny:
        cfg.prompt_len, cfg.new_tokens, cfg.batches = 24, 8, "1,4"

    results["check"] = check(ModelArgs(**(TINY_CHECK if cfg.tiny else CHECK)), rank, P, device)
    log(rank, "check (1 rank vs", P, "ranks):", results["check"])

    args = ModelArgs(**(TINY_MOE if cfg.tiny else MIXTRAL_8X7B))
    ceilings = measure_ceilings(device)
    results["copy_GB_s"] = ceilings["copy_bytes_per_s"] / 1e9
    start = time.perf_counter()
    model = Transformer.random(args, seed=0, device=device, dtype=dtype, pipeline_rank=rank, num_pipeline_ranks=P)
    sync(device)
    results["build_s"] = time.perf_counter() - start
    log(rank, f"built {args.n_layers} layers over {P} ranks in {results['build_s']:.1f} s")

    for B in (int(b) for b in cfg.batches.split(",")):
        prompts = random_prompts(B, cfg.prompt_len, args.vocab_size, seed=B)
        floor = decode_floor(args, B, cfg.prompt_len + cfg.new_tokens / 2, ceilings)
        entry = results[f"b{B}"] = {"floor_decode_tok_s": floor["tok_per_s"], "floor_bytes_per_step_GB": floor["bytes"] / 1e9}
        # One sequence cannot be split: its "micro-batched" run is the plain one.
        for label, M in (("plain", 1), ("micro", min(P, B))):
            if label == "micro" and M == 1:
                continue
            generate(prompts, model, max_tokens=2, micro_batches=M)  # warm-up: kernels, allocator, communicators
            entry[label] = run(model, prompts, cfg.new_tokens, M, device)
            entry[label]["micro_batches"] = M
            log(rank, f"batch {B} {label}:", json.dumps(entry[label]))
        log(rank, f"batch {B} floor: {floor['tok_per_s']:.0f} tok/s ({floor['bytes'] / 1e9:.1f} GB per step)")

    if rank == 0:
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "pipeline.json").write_text(json.dumps(results, indent=2) + "\n")
        print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
