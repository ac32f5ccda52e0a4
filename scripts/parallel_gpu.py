"""Parallel runs (mistral/parallel.py) on several GPUs: correctness, then speed.

One torchrun job of N processes (one per GPU) runs every layout of N ranks in turn:
tensor parallelism T = N, pipeline stages P = N (plain, and micro-batched), and for
Mixtral expert parallelism EP = N (whole experts a rank, attention split by heads).

1. check: a small Mixtral-shaped model gives, on N ranks, the greedy tokens (float32:
   exactly) and logits of one rank's whole model, with and without micro-batches; and
   in bfloat16 on the fast path (compiled blocks, CUDA graphs with the all-reduces
   inside) the same tokens as one GPU's fast path, step by step. The weights are equal
   on both sides without any file: Transformer.random seeds each tensor by its name.
2. speed: Mixtral 8x7B's shapes with random bf16 weights, built sharded straight on
   the GPUs (about 47 GB each on 2), a 512-token prompt then 128 new tokens, at batch
   1, 8 and 32. Reported: time to first token, decode tokens/s (steady: after the graph
   capture of the first decode step; and with it), peak memory per GPU, and the floor:
   the bytes a decode step must read (weights touched at that batch, plus the KV cache)
   over the copy bandwidth measured in the same run, times T for tensor parallelism
   (every GPU reads its share at once); a pipeline's stages run one after another, so
   its floor is one GPU's.
3. Mistral 7B at T = N against one GPU (rank 0 alone), batch 1, in the same run.

    torchrun --nproc-per-node 2 scripts/parallel_gpu.py --out $OUT
    torchrun --nproc-per-node 4 scripts/parallel_gpu.py --mixtral 8x22b --skip check,mistral --out $OUT   # H200s
    torchrun --nproc-per-node 2 scripts/parallel_gpu.py --tiny --device cpu      # the logic, on a CPU (gloo)

Rank 0 prints a table and writes <out>/parallel.json after each part.
"""

import argparse
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from bench import MISTRAL_7B, MIXTRAL_8X7B, MIXTRAL_8X22B, TINY, TINY_MOE, decode_floor, measure_ceilings, random_prompts, sync
from mistral import ModelArgs, Transformer, parallel
from mistral.decode import Runner
from mistral.generation import generate, stream

# The small model of the check: Mixtral-shaped, big enough for real kernels.
CHECK = dict(MIXTRAL_8X7B, dim=256, n_layers=4, head_dim=32, hidden_dim=512, n_heads=8, n_kv_heads=2, sliding_window=64)
TINY_CHECK = dict(TINY_MOE, n_layers=3, sliding_window=16)


def log(*parts: Any) -> None:
    if dist.get_rank() == 0:
        print(*parts, flush=True)


def layouts(N: int, num_experts: int) -> dict[str, tuple[int, int, bool]]:
    """(P, T, expert_parallel) by name: every expert split over N ranks, N stages, N ranks of whole
    experts, and from 4 GPUs on 2 stages of N / 2 tensor ranks."""
    out = {f"T={N}": (1, N, False), f"P={N}": (N, 1, False)} | ({f"EP={N}": (1, N, True)} if num_experts % N == 0 else {})
    return out | ({f"P=2xT={N // 2}": (2, N // 2, False)} if N >= 4 and N % 2 == 0 else {})


@torch.inference_mode()
def check_all_reduce(N: int, device: torch.device) -> dict[str, Any]:
    """The tensor-parallel sum (one-shot in symmetric memory on CUDA, else the process group)
    against NCCL's all-reduce, eagerly and replayed from a CUDA graph, at decode's and prefill's sizes."""
    from mistral.parallel import _AllReduce, _groups

    reducer = _AllReduce(_groups(1, N)[0])
    out: dict[str, Any] = {}
    for rows in (1, 32, 1024):
        g = torch.Generator(device).manual_seed(dist.get_rank() * 100 + rows)
        x = torch.randn(rows, 4096, device=device, dtype=torch.bfloat16, generator=g)
        want = x.clone()
        dist.all_reduce(want)
        got = reducer(None, (), x.clone())  # type: ignore[arg-type]
        out[f"eager_{rows}_max_abs_diff"] = (got.float() - want.float()).abs().max().item()
        if device.type == "cuda" and rows <= 32:
            static = torch.zeros_like(x)
            reducer(None, (), static.clone())  # warm-up outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                result = reducer(None, (), static)
            diffs = []
            for k in range(3):
                static.copy_(x * (k + 1))
                graph.replay()
                expected = (x * (k + 1)).clone()
                dist.all_reduce(expected)
                diffs.append((result.float() - expected.float()).abs().max().item())
            out[f"graph_{rows}_max_abs_diff"] = max(diffs)
    out["one_shot"] = reducer.buffers.get(torch.bfloat16) is not None
    return out


def check_prompts(args: ModelArgs) -> list[list[int]]:
    return random_prompts(6, 40, args.vocab_size, seed=1) + random_prompts(2, 100, args.vocab_size, seed=2)


def check(args: ModelArgs, N: int, device: torch.device) -> dict[str, Any]:
    """Greedy tokens and logits of N ranks against one rank's whole model (same weights)."""
    prompts = check_prompts(args)
    ids, seqlens = torch.tensor(sum(prompts, []), device=device), [len(p) for p in prompts]
    out: dict[str, Any] = {}
    for name, (P, T, ep) in layouts(N, args.moe.num_experts if args.moe else 1).items():
        sharded = Transformer.random(args, seed=3, device=device, num_pipeline_ranks=P, num_tensor_ranks=T, expert_parallel=ep)
        got = {M: generate(prompts, sharded, max_tokens=48, micro_batches=M)[0] for M in sorted({1, P})}
        with torch.inference_mode():
            logits = sharded(ids, seqlens)
        fast = None
        if device.type == "cuda":  # the bf16 fast path: compiled blocks, graphs with NCCL inside
            fast = generate(prompts, sharded.to(torch.bfloat16), max_tokens=48)[0]
            if P == 1:
                out[name] = {"bf16_fast_vs_eager_max_rel_error": fast_vs_eager(sharded, prompts)}
        if dist.get_rank() == 0:  # the single-process reference, while the other ranks wait
            whole = Transformer.random(args, seed=3, device=device)
            want = generate(prompts, whole, max_tokens=48)[0]
            with torch.inference_mode():
                reference = whole(ids, seqlens)
            r = out.setdefault(name, {})
            r |= {f"tokens_equal_micro_batches_{M}": tokens == want for M, tokens in got.items()}
            r["tokens"] = got[1]  # for a check outside this script
            r["logits_rel_error"] = ((logits - reference).norm() / reference.norm()).item()
            if fast is not None:
                want_fast = generate(prompts, whole.to(torch.bfloat16), max_tokens=48)[0]
                same = sum(a == b for x, y in zip(fast, want_fast) for a, b in zip(x, y))
                # bf16 rounds differently when the sums are split: tokens may part where two logits tie.
                r["bf16_fast_path_token_agreement"] = same / sum(len(x) for x in want_fast)
            del whole
        del sharded
        dist.barrier()
    return out


@torch.inference_mode()
def fast_vs_eager(model: Transformer, prompts: list[list[int]], steps: int = 16) -> float:
    """Teacher-forced, on one stage's ranks: logits of the captured graph (the all-reduces
    inside) against the eager forward of the same sharded model, same tokens, step after step."""
    B, n = len(prompts), max(len(p) for p in prompts)
    prompts = [p[:n] + [1] * (n - len(p)) for p in prompts]
    caches = [model.make_cache(B, n + steps + 1) for _ in range(2)]
    ids = torch.tensor(sum(prompts, []), device=model.device)
    runner = Runner(model, caches[1], B)
    want, got = model(ids, [n] * B, caches[0]), runner.prefill(ids, [n] * B)
    errors = [((got - want).norm() / want.norm()).item()]
    tokens = want.view(B, n, -1)[:, -1].argmax(-1)
    for _ in range(steps):
        want, got = model(tokens, [1] * B, caches[0]), runner.decode(tokens)
        errors.append(((got - want).norm() / want.norm()).item())
        tokens = want.argmax(-1)
    return max(errors)


def timed_run(model: Transformer, prompts: list[list[int]], new_tokens: int, micro_batches: int, device: torch.device) -> dict:
    """One timed generation; every rank takes part, rank 0's clock counts."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    sync(device)
    start = time.perf_counter()
    marks = {}
    for step, _ in enumerate(stream(prompts, model, max_tokens=new_tokens, micro_batches=micro_batches)):
        if step in (0, 2):  # the first token; the first decode step (graph capture) done
            sync(device)
            marks[step] = time.perf_counter() - start
    sync(device)
    total = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    peaks: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak / 2**30)
    B = len(prompts)
    return {
        "ttft_ms": 1e3 * marks[0],
        "steady_decode_tok_s": B * (new_tokens - 3) / (total - marks[2]),
        "decode_tok_s": B * (new_tokens - 1) / (total - marks[0]),
        "peak_gib_per_gpu": [round(p, 2) for p in peaks],
    }


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: checks the script, measures nothing real")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--skip", default="", help="parts to skip: check, mixtral, mistral (comma-separated)")
    p.add_argument("--mixtral", choices=["8x7b", "8x22b"], default="8x7b", help="the Mixtral shapes of the speed part")
    cfg = p.parse_args()
    N = int(os.environ.get("WORLD_SIZE", "1"))
    layout, device = parallel.init(1, N, cfg.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # ranks share the cores
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    results: dict[str, Any] = {"ranks": N, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    if cfg.tiny:
        cfg.prompt_len, cfg.new_tokens, cfg.batches = 24, 8, "1,4"
    out = Path(cfg.out)

    def save() -> None:
        if dist.get_rank() == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "parallel.json").write_text(json.dumps(results, indent=2) + "\n")

    skip = set(cfg.skip.split(","))
    results["all_reduce"] = check_all_reduce(N, device)
    log("all-reduce:", json.dumps(results["all_reduce"]))
    save()
    if "check" not in skip:
        results["check"] = check(ModelArgs(**(TINY_CHECK if cfg.tiny else CHECK)), N, device)
        log(f"check (1 rank vs {N} ranks):", json.dumps(results["check"]))
        save()
    ceilings = measure_ceilings(device)
    results["copy_GB_s"] = ceilings["copy_bytes_per_s"] / 1e9
    batches = [int(b) for b in cfg.batches.split(",")]

    if "mixtral" not in skip:
        args = ModelArgs(**(TINY_MOE if cfg.tiny else {"8x7b": MIXTRAL_8X7B, "8x22b": MIXTRAL_8X22B}[cfg.mixtral]))
        assert args.moe is not None
        for name, (P, T, ep) in layouts(N, args.moe.num_experts).items():
            start = time.perf_counter()
            model = Transformer.random(args, device=device, dtype=dtype, num_pipeline_ranks=P, num_tensor_ranks=T, expert_parallel=ep)
            sync(device)
            section = results[f"mixtral {name}"] = {"build_s": time.perf_counter() - start}
            for B in batches:
                prompts = random_prompts(B, cfg.prompt_len, args.vocab_size, seed=B)
                floor = decode_floor(args, B, cfg.prompt_len + cfg.new_tokens / 2, ceilings)
                entry = section[f"b{B}"] = {
                    "floor_decode_tok_s": floor["tok_per_s"] * T, "floor_bytes_per_step_GB": floor["bytes"] / 1e9
                }
                # One sequence cannot be split: its "micro-batched" run is the plain one.
                for label, M in (("plain", 1), ("micro", min(P, B))):
                    if label == "micro" and M == 1:
                        continue
                    generate(prompts, model, max_tokens=3, micro_batches=M)  # warm-up: compilation, communicators
                    entry[label] = timed_run(model, prompts, cfg.new_tokens, M, device) | {"micro_batches": M}
                    log(f"mixtral {name} batch {B} {label}:", json.dumps(entry[label]), f"floor {entry['floor_decode_tok_s']:.0f}")
                save()
            del model
            free()

    if "mistral" not in skip:
        args = ModelArgs(**(TINY if cfg.tiny else MISTRAL_7B))
        prompts = random_prompts(1, cfg.prompt_len, args.vocab_size, seed=1)
        section = results["mistral"] = {}
        model = Transformer.random(args, device=device, dtype=dtype, num_tensor_ranks=N)
        generate(prompts, model, max_tokens=3)
        section[f"T={N}"] = timed_run(model, prompts, cfg.new_tokens, 1, device)
        del model
        free()
        if dist.get_rank() == 0:  # one GPU, the others wait
            one = Transformer.random(args, device=device, dtype=dtype)
            generate(prompts, one, max_tokens=3)
            start, steps = time.perf_counter(), []
            for _ in stream(prompts, one, max_tokens=cfg.new_tokens):
                sync(device)
                steps.append(time.perf_counter() - start)
            section["one GPU"] = {"ttft_ms": 1e3 * steps[0], "steady_decode_tok_s": (cfg.new_tokens - 3) / (steps[-1] - steps[2])}
            section["speedup_b1"] = section[f"T={N}"]["steady_decode_tok_s"] / section["one GPU"]["steady_decode_tok_s"]
            del one
            free()
        dist.barrier()
        log("mistral:", json.dumps(section))
        save()
    log(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
    # Leave at once: a finished run must not wait on NCCL's teardown (init's exit handler
    # destroys the group; nothing else is pending).
    dist.destroy_process_group()
    os._exit(0)
