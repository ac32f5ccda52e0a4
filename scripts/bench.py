"""Benchmark: Mistral 7B / Mixtral 8x7B speed against the physical floor and HF transformers.

Random weights of the real shapes are built directly on the device (no files). One run
measures, for each model: prefill of one long prompt and of packed prompts, time to
first token, decode tok/s at several batch sizes (the CUDA-graph path of
mistral/decode.py as generate() runs it, uncompiled, and compiled / eager for comparison), end-to-end generation, peak
memory; the floors (measured copy bandwidth and matmul rate turned into minimum times);
and HF transformers on the same shapes, eager and with a compiled static cache.
The table of ratios is printed last; everything goes to <out>/bench.json.

    python scripts/bench.py --models mistral --out $OUT                      # H100, with HF: ~5 min
    python scripts/bench.py --models mixtral --mixtral-layers 16 --skip-hf   # H100: half the layers fit
    python scripts/bench.py --models mixtral --hf-b1-only --out $OUT         # H200: the whole Mixtral
    python scripts/bench.py --models mistral --quant none,int8,int4 --skip-hf --out $OUT  # bf16, int8, int4 side by side
    python scripts/bench.py --models mixtral --quant int8,int4 --skip-hf --out $OUT      # H100: quantized Mixtral fits one
    python scripts/bench.py --device cpu --tiny [--quant none,int8,int4-32]  # any machine, ~15 s a format
    python scripts/bench.py --models mixtral --table-from notes/bench/v4_h200_mixtral.json --device cpu
"""

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from mistral import ModelArgs, MoeArgs, Transformer
from mistral.attention import BACKENDS, Backend
from mistral.decode import Runner, compiled_block, fast_path_applies
from mistral.generation import generate
from mistral.stage import Stage

MISTRAL_7B = dict(
    dim=4096, n_layers=32, head_dim=128, hidden_dim=14336, n_heads=32, n_kv_heads=8, norm_eps=1e-5, vocab_size=32000,
    rope_theta=10000.0, sliding_window=4096, max_batch_size=64,
)  # fmt: skip
MIXTRAL_8X7B = dict(MISTRAL_7B, rope_theta=1e6, sliding_window=None, moe=MoeArgs(num_experts=8, num_experts_per_tok=2), max_batch_size=32)
# ../shared/RELEASES.md: 141B parameters, 282 GB in bfloat16 (T = 4 on H200s at the least).
MIXTRAL_8X22B = dict(MIXTRAL_8X7B, dim=6144, n_layers=56, n_heads=48, hidden_dim=16384, vocab_size=32768)
TINY = dict(
    dim=64, n_layers=2, head_dim=16, hidden_dim=96, n_heads=4, n_kv_heads=2, norm_eps=1e-5, vocab_size=97,
    rope_theta=10000.0, sliding_window=32, max_batch_size=8,
)  # fmt: skip
TINY_MOE = dict(TINY, rope_theta=1e6, sliding_window=None, moe=MoeArgs(num_experts=4, num_experts_per_tok=2))

RESULTS: dict[str, Any] = {}


def log(*parts: Any) -> None:
    print(*parts, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, reps: int, warmup: int = 1) -> float:
    """Median wall seconds of fn(), device work included."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextmanager
def section(name: str, out: Path) -> Iterator[dict]:
    """Record a section's results (or its error) and keep going: one failure must not cost the run."""
    entry: dict[str, Any] = {}
    RESULTS[name] = entry
    t0 = time.perf_counter()
    log(f"== {name}")
    try:
        yield entry
    except Exception as e:  # noqa: BLE001 - a benchmark reports and moves on
        entry["error"] = f"{type(e).__name__}: {e}"
        entry["traceback"] = traceback.format_exc()[-3000:]
        log(f"!! {name}: {entry['error']}\n{entry['traceback']}")
    entry["section_s"] = round(time.perf_counter() - t0, 1)
    if torch.cuda.is_available():
        entry.setdefault("peak_mem_gb", round(torch.cuda.max_memory_allocated() / 1e9, 2))
        torch.cuda.reset_peak_memory_stats()
    log(f"   {name}: { {k: v for k, v in entry.items() if k != 'traceback'} }")
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(RESULTS, indent=1, default=str))


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------- floors


def measure_ceilings(device: torch.device) -> dict[str, float]:
    """Copy bandwidth (bytes read + written) and bf16 matmul rate, measured here."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    x = torch.empty(n, dtype=torch.uint8, device=device).random_()
    y = torch.empty_like(x)
    t = timed(lambda: y.copy_(x), device, reps=10)
    m = 8192 if device.type == "cuda" else 256
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    tm = timed(lambda: a @ b, device, reps=10, warmup=3)
    return {"copy_bytes_per_s": 2 * n / t, "matmul_flop_per_s": 2 * m**3 / tm}


def param_counts(args: ModelArgs) -> dict[str, float]:
    """Parameters read per token: shared (attention, norms, gate, output) and per expert; attention's share of the shared."""
    D, F, L = args.dim, args.hidden_dim, args.n_layers
    attn = D * args.n_heads * args.head_dim * 2 + D * args.n_kv_heads * args.head_dim * 2
    ffn = 3 * D * F
    E = args.moe.num_experts if args.moe else 1
    shared = L * (attn + 2 * D + (D * E if args.moe else 0)) + D + args.vocab_size * D  # + output matrix
    return {"shared": shared, "attn": L * attn, "ffn": L * ffn, "experts": E, "k": args.moe.num_experts_per_tok if args.moe else 1}


def decode_floor(args: ModelArgs, B: int, context: float, ceil: dict, bytes_per: int = 2) -> dict[str, float]:
    """Fewest seconds per step: every weight read once (expected experts touched by B tokens), the KV read once.

    A quantized model (args.quantization) reads its projections (attention, experts) at 1 byte a weight
    (int8), or half a byte and a bfloat16 scale and minimum per group of G (int4: 0.5 + 4 / G).
    """
    p = param_counts(args)
    E, k = p["experts"], p["k"]
    touched = E * (1 - (1 - k / E) ** B) if E > 1 else 1  # experts read per layer, random routing
    quant = args.quantization
    projection_bytes = bytes_per if quant is None else 1 if quant.method == "int8" else 0.5 + 4 / quant.group_size
    weights = ((p["shared"] - p["attn"]) * bytes_per + (p["attn"] + p["ffn"] * touched) * projection_bytes
               + B * args.dim * bytes_per)  # + embedding rows; fmt: skip
    kv = B * context * args.n_layers * 2 * args.n_kv_heads * args.head_dim * bytes_per
    flops = 2 * B * (p["shared"] + p["ffn"] * k) + 4 * B * context * args.n_heads * args.head_dim * args.n_layers
    t = max((weights + kv) / ceil["copy_bytes_per_s"], flops / ceil["matmul_flop_per_s"])
    return {"s_per_step": t, "tok_per_s": B / t, "bytes": weights + kv}


def prefill_floor(args: ModelArgs, seqlens: list[int], ceil: dict, bytes_per: int = 2) -> dict[str, float]:
    p = param_counts(args)
    T = sum(seqlens)
    W = args.sliding_window or max(seqlens)
    pairs = sum(sum(min(i + 1, W) for i in range(s)) for s in seqlens)  # causal (windowed) query-key pairs
    flops = 2 * T * (p["shared"] + p["ffn"] * p["k"]) + 4 * pairs * args.n_heads * args.head_dim * args.n_layers
    weights = (p["shared"] + p["ffn"]) * bytes_per
    t = max(flops / ceil["matmul_flop_per_s"], weights / ceil["copy_bytes_per_s"])
    return {"s": t, "tok_per_s": T / t, "flops": flops}


# ---------------------------------------------------------------- models


def build_ours(args: ModelArgs, device: torch.device, dtype: torch.dtype, attention_backend: Backend = "auto") -> Transformer:
    """Random weights straight on the device, in dtype: no float32 copy of 7B parameters."""
    return Transformer.random(args, device=device, dtype=dtype, attention_backend=attention_backend)


def build_hf(args: ModelArgs, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(
        vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.hidden_dim, num_hidden_layers=args.n_layers,
        num_attention_heads=args.n_heads, num_key_value_heads=args.n_kv_heads, head_dim=args.head_dim,
        rms_norm_eps=args.norm_eps, rope_theta=args.rope_theta, sliding_window=args.sliding_window,
        max_position_embeddings=32768,
    )  # fmt: skip
    if args.moe:
        config = MixtralConfig(**common, num_local_experts=args.moe.num_experts, num_experts_per_tok=args.moe.num_experts_per_tok)
        cls = MixtralForCausalLM
    else:
        config = MistralConfig(**common)
        cls = MistralForCausalLM
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    return model.eval()


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g).tolist()


# ---------------------------------------------------------------- our measurements


def bench_ours(name: str, args: ModelArgs, cfg: argparse.Namespace, device: torch.device, dtype: torch.dtype, out: Path) -> None:
    model = build_ours(args, device, dtype, cfg.attention_backend)
    V, P, N = args.vocab_size, cfg.prompt_len, cfg.new_tokens
    with section(f"{name}/ours/prefill", out) as r, torch.inference_mode():
        for label, seqlens in ((f"1x{cfg.prefill_len}", [cfg.prefill_len]), (f"8x{cfg.prefill_len // 8}", [cfg.prefill_len // 8] * 8)):
            ids = torch.randint(0, V, (sum(seqlens),), device=device)
            cache = model.make_cache(len(seqlens), max(seqlens))
            eager, fast = Runner(model, cache, len(seqlens), compile=False), Runner(model, cache, len(seqlens))
            t = timed(lambda: (cache.reset(), eager.prefill(ids, seqlens)), device, reps=cfg.reps)
            r[f"eager_prefill_{label}_tok_s"] = sum(seqlens) / t
            last = [sum(seqlens[: b + 1]) - 1 for b in range(len(seqlens))]  # generate's prefill: each prompt's last logits
            t = timed(lambda: (cache.reset(), fast.prefill(ids, seqlens, last)), device, reps=cfg.reps, warmup=2)
            r[f"prefill_{label}_tok_s"] = sum(seqlens) / t
        if device.type == "cuda" and cfg.profile:
            ids = torch.randint(0, V, (cfg.prefill_len,), device=device)
            cache = model.make_cache(1, cfg.prefill_len)
            runner = Runner(model, cache, 1)
            r["profile_prefill"] = profile(lambda: (cache.reset(), runner.prefill(ids, [cfg.prefill_len])))
    stage = Stage(model)  # as a process that calls generate() again and again would hold it
    with section(f"{name}/ours/ttft", out) as r:
        for length in (P, cfg.prefill_len):
            prompts = random_prompts(1, length, V)
            r[f"ttft_{length}_ms"] = 1e3 * timed(lambda: generate(prompts, model, max_tokens=1, stage=stage), device, reps=cfg.reps)
            if fast_path_applies(model):
                eager = dict(compile=False, cuda_graphs=False)
                r[f"eager_ttft_{length}_ms"] = 1e3 * timed(lambda: generate(prompts, model, max_tokens=1, stage=stage, **eager), device, reps=cfg.reps)
    with section(f"{name}/ours/check_graph_vs_eager", out) as r:
        if fast_path_applies(model):
            r.update(check_graph(model, device, V, B=4, steps=16))
    for B in cfg.batches:
        if B > args.max_batch_size:
            continue
        with section(f"{name}/ours/decode_b{B}", out) as r:
            prompts = random_prompts(B, P, V, seed=B)
            variants: list[tuple[str, Optional[bool], Optional[bool]]] = [("graph", None, None)]  # the defaults
            if B in (1, max(cfg.batches)) and device.type == "cuda":
                variants += [("graph_compiled", True, True)] * cfg.compiled + [("eager", False, False)]
            for label, graphs, compiled in variants:
                fast = dict(compile=compiled, cuda_graphs=graphs)
                if graphs is not False and fast_path_applies(model):
                    r[f"{label}_step_ms"] = 1e3 * step_time(model, prompts, device, steps=cfg.steps, **fast)
                # Medians of cfg.reps calls each: single calls, on a busy host, once timed the N-token call shorter than the 1-token one.
                t1 = timed(lambda: generate(prompts, model, max_tokens=1, stage=stage, **fast), device, reps=cfg.reps)
                stage.clear()  # a first call: caches made, the decode graph captured
                first = timed(lambda: generate(prompts, model, max_tokens=N, stage=stage, **fast), device, reps=1, warmup=0)
                r[f"{label}_first_decode_tok_s"] = B * (N - 1) / (first - t1)
                tn = timed(lambda: generate(prompts, model, max_tokens=N, stage=stage, **fast), device, reps=cfg.reps)  # the next calls
                r[f"{label}_decode_tok_s"] = B * (N - 1) / (tn - t1)
                r[f"{label}_e2e_{B}x{N}_tok_s"] = B * N / tn
                if label == "graph" and fast_path_applies(model):
                    r["graph_steady_tok_s"] = B / (r["graph_step_ms"] / 1e3)
    if not args.moe:
        with section(f"{name}/ours/throughput_32x{N}", out) as r:
            B = min(32, args.max_batch_size)
            prompts = random_prompts(B, cfg.short_prompt, V, seed=7)
            t = timed(lambda: generate(prompts, model, max_tokens=N, stage=stage), device, reps=2)
            r[f"e2e_{B}x{cfg.short_prompt}+{N}_tok_s"] = B * N / t
    if device.type == "cuda" and cfg.profile:
        with section(f"{name}/ours/profile_decode_b1", out) as r, torch.inference_mode():
            cache = model.make_cache(1, P + 8)
            model(torch.randint(0, V, (P,), device=device), [P], cache)
            tokens = torch.zeros(1, dtype=torch.long, device=device)
            # One step of the compiled blocks, uncaptured (a graph's kernels do not show one by one).
            r["profile_decode_b1"] = profile(lambda: model.step(tokens, cache.prepare([1]), cache, compiled_block()))
    if cfg.micro and not args.moe and not args.quantization and device.type == "cuda":
        with section(f"{name}/ours/micro_gemv", out) as r:
            r.update(micro_gemv(model, device))
    del model
    free()


@torch.inference_mode()
def step_time(model: Transformer, prompts: list[list[int]], device: torch.device, steps: int, **fast: Any) -> float:
    """Seconds per replayed decode step (steady state: capture excluded)."""
    B, P = len(prompts), len(prompts[0])
    cache = model.make_cache(B, P + steps + 8)
    model(torch.tensor(sum(prompts, []), device=device), [P] * B, cache)
    runner = Runner(model, cache, B, **fast)
    tokens = torch.zeros(B, dtype=torch.long, device=device)
    sync(device)
    t0 = time.perf_counter()
    runner.decode(tokens)  # capture
    sync(device)
    RESULTS.setdefault("capture_s", {})[f"B{B}_{fast}"] = time.perf_counter() - t0
    for _ in range(3):
        runner.decode(tokens)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(steps):
        runner.decode(tokens)
    end.record()
    sync(device)
    return start.elapsed_time(end) / 1e3 / steps


@torch.inference_mode()
def check_graph(model: Transformer, device: torch.device, V: int, B: int, steps: int) -> dict[str, float]:
    """Teacher-forced: the graph path's logits against the eager path's, same tokens, step after step."""
    prompts = random_prompts(B, 100, V, seed=3)
    caches = [model.make_cache(B, 100 + steps + 1) for _ in range(2)]
    for cache in caches:
        model(torch.tensor(sum(prompts, []), device=device), [100] * B, cache)
    runner = Runner(model, caches[1], B)
    tokens = torch.randint(0, V, (B,), device=device)
    errors, agree = [], 0
    for _ in range(steps):
        want = model(tokens, [1] * B, caches[0])
        got = runner.decode(tokens)
        errors.append(((got - want).norm() / want.norm()).item())
        agree += int((got.argmax(-1) == want.argmax(-1)).sum())
        tokens = want.argmax(-1)
    return {"max_rel_err_logits": max(errors), "argmax_agreement": agree / (B * steps)}


def profile(fn: Callable[[], Any], top: int = 25) -> list[dict[str, Any]]:
    """Device time per kernel name over one call (after a warm call)."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    rows = []
    total = 0.0
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if us > 0:
            rows.append({"kernel": e.key[:90], "ms": us / 1e3, "calls": e.count})
            total += us / 1e3
    rows.sort(key=lambda x: -x["ms"])
    return [{"kernel": "TOTAL device", "ms": total, "calls": sum(r["calls"] for r in rows)}] + rows[:top]


@torch.inference_mode()
def micro_gemv(model: Transformer, device: torch.device) -> dict[str, float]:
    """Batch-1 matmuls of one layer: separate wq/wk/wv and w1/w3 against fused, in GB/s."""
    layer = model.layers["0"]
    w = layer.state_dict()  # the checkpoint's tensors: views into the fused ones
    res = {}
    for label, ws in (("qkv_separate", [w["attention.wq.weight"], w["attention.wk.weight"], w["attention.wv.weight"]]),
                      ("qkv_fused", [layer.attention.wqkv.weight]), ("w13_separate", [w["feed_forward.w1.weight"], w["feed_forward.w3.weight"]]),
                      ("w13_fused", [layer.feed_forward.w13.weight]), ("w2", [w["feed_forward.w2.weight"]]),
                      ("output", [model.output.weight])):  # fmt: skip
        x = torch.randn(1, ws[0].shape[1], device=device, dtype=model.dtype)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(20):
                for w in ws:
                    torch.nn.functional.linear(x, w)
        t = timed(graph.replay, device, reps=5, warmup=2) / 20
        res[f"{label}_us"] = t * 1e6
        res[f"{label}_GB_s"] = sum(w.numel() * w.element_size() for w in ws) / t / 1e9
    return res


# ---------------------------------------------------------------- HF transformers


def bench_hf(name: str, args: ModelArgs, cfg: argparse.Namespace, device: torch.device, dtype: torch.dtype, out: Path) -> None:
    model = build_hf(args, device, dtype)
    V, P, N = args.vocab_size, cfg.prompt_len, cfg.new_tokens
    RESULTS.setdefault("hf_attn_implementation", model.config._attn_implementation)
    with section(f"{name}/hf/prefill", out) as r, torch.inference_mode():
        for label, shape in ((f"1x{cfg.prefill_len}", (1, cfg.prefill_len)), (f"8x{cfg.prefill_len // 8}", (8, cfg.prefill_len // 8))):
            ids = torch.randint(0, V, shape, device=device)
            t = timed(lambda: model(ids, use_cache=False), device, reps=cfg.reps)
            r[f"prefill_{label}_tok_s"] = shape[0] * shape[1] / t
        ids = torch.randint(0, V, (1, P), device=device)
        r[f"ttft_{P}_ms"] = 1e3 * timed(lambda: hf_generate(model, ids, 1), device, reps=cfg.reps)
    hf_batches = [b for b in cfg.batches if b <= args.max_batch_size] if not cfg.hf_b1_only else [1]
    for B in hf_batches:
        with section(f"{name}/hf/decode_b{B}", out) as r:
            ids = torch.randint(0, V, (B, P), device=device)
            t1 = timed(lambda: hf_generate(model, ids, 1), device, reps=1)
            tn = timed(lambda: hf_generate(model, ids, N), device, reps=1, warmup=0)
            r["eager_decode_tok_s"] = B * (N - 1) / (tn - t1)
            r[f"eager_e2e_{B}x{N}_tok_s"] = B * N / tn
    if not cfg.skip_hf_static and not args.moe:
        with section(f"{name}/hf/static_compiled_b1", out) as r:
            ids = torch.randint(0, V, (1, P), device=device)
            t0 = time.perf_counter()
            hf_generate(model, ids, N, cache_implementation="static")  # compiles
            sync(device)
            r["compile_and_first_run_s"] = time.perf_counter() - t0
            t1 = timed(lambda: hf_generate(model, ids, 1, cache_implementation="static"), device, reps=1)
            tn = timed(lambda: hf_generate(model, ids, N, cache_implementation="static"), device, reps=2, warmup=0)
            r["static_decode_tok_s"] = (N - 1) / (tn - t1)
    del model
    free()


@torch.inference_mode()
def hf_generate(model: torch.nn.Module, ids: torch.Tensor, n: int, **kwargs: Any) -> torch.Tensor:
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, **kwargs
    )


# ---------------------------------------------------------------- table


def table(names: list[str], ceil: dict, cfgs: dict[str, ModelArgs], cfg: argparse.Namespace) -> list[list[str]]:
    rows = [["metric", "ours", "floor", "ours/floor", "HF eager", "HF static", "ours/HF"]]

    def get(path: str, key: str) -> Optional[float]:
        return RESULTS.get(path, {}).get(key)

    def add(metric: str, ours: Optional[float], floor: Optional[float], hf: Optional[float], hf_static: Optional[float] = None, lower_better: bool = False) -> None:
        def f(v: Optional[float]) -> str:
            return "-" if v is None else (f"{v:,.1f}" if v < 1e4 else f"{v:,.0f}")

        def ratio(a: Optional[float], b: Optional[float]) -> str:
            if a is None or b is None:
                return "-"
            return f"{(b / a if lower_better else a / b):.2f}"

        best_hf = max([v for v in (hf, hf_static) if v is not None], default=None) if not lower_better else hf
        rows.append([metric, f(ours), f(floor), ratio(ours, floor), f(hf), f(hf_static), ratio(ours, best_hf)])

    P, N, L = cfg.prompt_len, cfg.new_tokens, cfg.prefill_len
    for name in names:
        args = cfgs[name]
        for label, seqlens in ((f"1x{L}", [L]), (f"8x{L // 8}", [L // 8] * 8)):
            add(f"{name} prefill {label} tok/s", get(f"{name}/ours/prefill", f"prefill_{label}_tok_s"),
                prefill_floor(args, seqlens, ceil)["tok_per_s"], get(f"{name}/hf/prefill", f"prefill_{label}_tok_s"))  # fmt: skip
        add(f"{name} TTFT {P} ms", get(f"{name}/ours/ttft", f"ttft_{P}_ms"), 1e3 * prefill_floor(args, [P], ceil)["s"],
            get(f"{name}/hf/prefill", f"ttft_{P}_ms"), lower_better=True)  # fmt: skip
        for B in cfg.batches:
            if B > args.max_batch_size:
                continue
            floor = decode_floor(args, B, P + N / 2, ceil)["tok_per_s"]
            hf_static = get(f"{name}/hf/static_compiled_b1", "static_decode_tok_s") if B == 1 else None
            add(f"{name} decode b{B} tok/s (steady)", get(f"{name}/ours/decode_b{B}", "graph_steady_tok_s"), floor,
                get(f"{name}/hf/decode_b{B}", "eager_decode_tok_s"), hf_static)  # fmt: skip
            add(f"{name} decode b{B} tok/s (generate)", get(f"{name}/ours/decode_b{B}", "graph_decode_tok_s"), floor,
                get(f"{name}/hf/decode_b{B}", "eager_decode_tok_s"), hf_static)  # fmt: skip
            add(f"{name} decode b{B} tok/s (1st: capture)", get(f"{name}/ours/decode_b{B}", "graph_first_decode_tok_s"), floor, None)
        if not args.moe:
            B = min(32, args.max_batch_size)
            key = f"e2e_{B}x{cfg.short_prompt}+{N}_tok_s"
            pre = prefill_floor(args, [cfg.short_prompt] * B, ceil)["s"]
            dec = sum(decode_floor(args, B, cfg.short_prompt + i, ceil)["s_per_step"] for i in range(N - 1))
            add(f"{name} {B} prompts x{cfg.short_prompt} +{N} e2e tok/s", get(f"{name}/ours/throughput_32x{N}", key),
                B * N / (pre + dec), get(f"{name}/hf/decode_b{B}", f"eager_e2e_{B}x{N}_tok_s"))  # fmt: skip
    return rows


def quantization(quant: str) -> Optional[dict[str, Any]]:
    """--quant's name of a format as params.json's section: none, int8, int4 (groups of 128), int4-G."""
    if quant == "none":
        return None
    method, _, group = quant.partition("-")
    return {"method": "int8"} if method == "int8" else {"method": method, "group_size": int(group or 128)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes: checks the script, measures nothing real")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    p.add_argument("--models", default="mistral,mixtral")
    p.add_argument("--mixtral-layers", type=int, default=0, help="0: all 32; fewer where memory is short (say so and scale)")
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--quant", default="none", help="weight formats, comma-separated: none (the dtype's), int8, int4 (groups of "
                   "128) or int4-G (groups of G), as `mistral quantize` makes them; --tiny's widths take int4-32")  # fmt: skip
    p.add_argument("--skip-ours", action="store_true")
    p.add_argument("--attention-backend", choices=BACKENDS, default="auto", help="xformers: its kernels for every mask (decode steps and batches of causal prompts too), to compare")
    p.add_argument("--skip-hf-static", action="store_true")
    p.add_argument("--hf-b1-only", action="store_true", help="HF decode at batch 1 only (time)")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--mixtral-batches", default="1,32")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--short-prompt", type=int, default=128, help="prompt length of the 32-prompt throughput run")
    p.add_argument("--prefill-len", type=int, default=4096)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=100, help="replayed steps timed per batch size")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-profile", dest="profile", action="store_false")
    p.add_argument("--no-micro", dest="micro", action="store_false")
    p.add_argument("--no-compiled", dest="compiled", action="store_false", help="leave out the compiled decode variant (a compile costs 20-40 s)")
    p.add_argument("--table-from", help="print the table of an earlier run's bench.json (same options) and exit")
    cfg = p.parse_args()
    if cfg.table_from:
        RESULTS.update(json.loads(Path(cfg.table_from).read_text()))
    device = torch.device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(cfg.out)
    if cfg.tiny:
        cfg.prompt_len, cfg.short_prompt, cfg.prefill_len, cfg.new_tokens, cfg.steps, cfg.reps = 24, 8, 64, 6, 4, 1
        cfg.batches, cfg.mixtral_batches = "1,4", "1,4"
    batches = [int(b) for b in cfg.batches.split(",")]
    RESULTS.setdefault("config", vars(cfg) | {"torch": torch.__version__, "argv": sys.argv})
    if device.type == "cuda":
        RESULTS["device_name"] = torch.cuda.get_device_name()

    if cfg.table_from:
        ceil = {k: RESULTS["ceilings"][k] for k in ("copy_bytes_per_s", "matmul_flop_per_s")}
        cfg.skip_ours = cfg.skip_hf = True
    else:
        with section("ceilings", out) as r:
            ceil = measure_ceilings(device)
            r.update(ceil)
    cfgs: dict[str, ModelArgs] = {}
    for model in cfg.models.split(","):
        params = dict(TINY if cfg.tiny else MISTRAL_7B) if model == "mistral" else dict(TINY_MOE if cfg.tiny else MIXTRAL_8X7B)
        if model == "mixtral" and cfg.mixtral_layers:
            params["n_layers"] = cfg.mixtral_layers
        for quant in cfg.quant.split(","):
            name = model if quant == "none" else f"{model}-{quant}"
            args = cfgs[name] = ModelArgs(**params, quantization=quantization(quant))
            cfg.batches = batches if model == "mistral" else [int(b) for b in cfg.mixtral_batches.split(",")]
            if not cfg.skip_ours:
                bench_ours(name, args, cfg, device, dtype, out)
            if not cfg.skip_hf and not args.quantization:
                bench_hf(name, args, cfg, device, dtype, out)
    cfg.batches = batches
    RESULTS["dynamo_counters"] = {k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in ("stats", "graph_break")}
    rows = []
    for name in cfgs:
        cfg.batches = batches if name.startswith("mistral") else [int(b) for b in cfg.mixtral_batches.split(",")]
        rows += table([name], ceil, cfgs, cfg)[(1 if rows else 0) :]
    RESULTS["table"] = rows
    if not cfg.table_from:
        (out / "bench.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    log(f"\ndevice {RESULTS.get('device_name', cfg.device)}: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"matmul {ceil['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s; mixtral layers: {cfgs.get('mixtral') and cfgs['mixtral'].n_layers}")  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        log("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))))


if __name__ == "__main__":
    main()
