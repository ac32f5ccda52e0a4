"""Serving benchmark: requests arriving at random on the continuous-batching engine, against
the same requests run as static batches through generate().

For each arrival rate, the same requests (prompts of 128-1024 tokens, answers of 64-512,
drawn once with a seed) arrive as a Poisson process and run on mistral/engine.py as
`mistral serve` runs them: they join the batch between forward calls and leave it when
done. Measured: throughput (answer tokens over the time from the first arrival to the
last token), time to first token (TTFT, from arrival) and time between tokens (TBT), p50
and p99. The reference rates: the steady decode rate of the engine's full bucket
(max_batch rows decoding, replayed from its graph on CUDA), after prompts of 3 tokens,
after prompts of the workload's mean context (a prompt and half an answer: the keys its
busy rows read in every step) and with rows of contexts spread as the workload's are
(its quantiles: what unequal rows cost a step), and the same requests as
static batches of max_batch through generate() (every batch runs until its longest
answer is done; only the answers' own tokens count).

Random weights of Mistral 7B's shapes built on the device (no files); answers run to
their length (no eos). Weights and prompts are random, so the tokens mean nothing: only
the times do.

    python scripts/serve_bench.py --out $OUT                      # GPU, Mistral 7B shapes, ~4 min on an H200
    python scripts/serve_bench.py --temperature 1 --out $OUT      # sampled requests, each with its own seed
    python scripts/serve_bench.py --device cpu --tiny              # any machine: checks the script, ~20 s
    python scripts/serve_bench.py --requests 48 --rates inf --profile trace --out $OUT   # where the time goes

Each run also gives the host's time launching each kind of call (a chunk call runs its
layers eagerly; a decode step replays a graph). --profile runs only the saturated run, under
cProfile (host: by Python function) or torch.profiler (trace: by operator, host and GPU),
into profile.txt; --compile compiles the engine's blocks.
"""

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from bench import MISTRAL_7B, TINY, sync
from mistral import ModelArgs, Transformer
from mistral.engine import Engine, Request
from mistral.generation import generate
from mistral.stage import Stage


def log(*parts: Any) -> None:
    print(*parts, file=sys.stderr, flush=True)


def workload(n: int, prompt_range: tuple[int, int], answer_range: tuple[int, int], vocab: int, seed: int) -> list[tuple[list[int], int]]:
    """n (prompt, answer length) pairs, uniform in the ranges."""
    rng = random.Random(seed)
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(*prompt_range))], rng.randint(*answer_range)) for _ in range(n)]


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": math.nan, "p99": math.nan}
    if len(values) == 1:
        return {"p50": values[0], "p99": values[0]}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p99": q[98]}


def prompt_tokens_left(engine: Engine) -> int:
    """Prompt tokens not read yet, of the requests running and waiting."""
    return sum(len(r.prompt) - r.read for r in [*engine.waiting, *engine.rows] if r is not None)


def run_arrivals(engine: Engine, jobs: list[tuple[list[int], int]], rate: float, seed: int, temperature: float = 0.0) -> dict[str, Any]:
    """The jobs arriving as a Poisson process of `rate` requests/s (inf: all at once), run to the end.

    Where the time went, by kind of forward call: chunk calls (prompt tokens read beside the
    decoding rows) and decode steps, each the host's launch of the call (a step's time but its
    wait in `_read`, which is for the call before) and then the wait for its results, in the
    next step; the rest is waiting for arrivals and the loop's own.
    Saturated: the calls made while requests waited for a row (every row busy), whose rate
    leaves out the ramp and the tail (the last answers running on with rows free)."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in jobs:
        arrivals.append(t)
        t += 0.0 if math.isinf(rate) else rng.expovariate(rate)
    # Sampled requests each with a seed of its own (a generator per row), as clients that set one.
    requests = [Request(prompt, max_tokens=n, temperature=temperature, seed=i if temperature else None) for i, (prompt, n) in enumerate(jobs)]
    calls = {"chunk": [0, 0.0, 0, 0.0], "decode": [0, 0.0, 0, 0.0]}  # kind: [calls, seconds, prompt tokens read, seconds launching]
    waited = [0.0]  # in this step, for the call before
    read_results = engine._read

    def timed_read(sampled: Any) -> list[Request]:
        before = time.perf_counter()
        try:
            return read_results(sampled)
        finally:
            waited[0] += time.perf_counter() - before

    engine._read = timed_read  # type: ignore[method-assign]
    try:
        times: dict[int, list[float]] = {i: [] for i in range(len(jobs))}
        index = {id(r): i for i, r in enumerate(requests)}
        start = time.perf_counter()
        nxt, steps, busy_rows, last_kind_name = 0, 0, 0, "decode"
        saturated = [0, 0.0]  # tokens, seconds
        while nxt < len(jobs) or engine.busy:
            now = time.perf_counter() - start
            while nxt < len(jobs) and arrivals[nxt] <= now:
                engine.submit(requests[nxt])
                nxt += 1
            if not engine.busy:
                time.sleep(max(arrivals[nxt] - now, 0))
                continue
            running = engine.running
            left, before, waited[0] = prompt_tokens_left(engine), time.perf_counter(), 0.0
            changed = engine.step()  # launches a call, then waits for the call before it and reads its tokens
            took, read = time.perf_counter() - before, left - prompt_tokens_left(engine)
            # The wait is the call before's, counted as its kind; the launch (the rest) this call's.
            # The last step launches none, it only reads.
            if steps:
                calls[last_kind_name][1] += waited[0]
            if engine.pending is not None:  # launched a call
                steps, busy_rows = steps + 1, busy_rows + running
                last_kind_name = "chunk" if read else "decode"
                kind, launch = calls[last_kind_name], took - waited[0]
                kind[0], kind[1], kind[2], kind[3] = kind[0] + 1, kind[1] + launch, kind[2] + read, kind[3] + launch
            if engine.waiting:  # still some after the call took its rows: every row was busy
                # (a token each: no request here ends on eos, which samples none)
                saturated[0], saturated[1] = saturated[0] + len(changed), saturated[1] + took
            now = time.perf_counter() - start
            for r in changed:
                times[index[id(r)]] += [now] * (len(r.tokens) - len(times[index[id(r)]]))
    finally:
        del engine._read  # the class's again
    elapsed = time.perf_counter() - start
    ttft = [times[i][0] - arrivals[i] for i in times if times[i]]
    tbt = [b - a for i in times for a, b in zip(times[i], times[i][1:])]
    generated = sum(len(r.tokens) for r in requests)
    assert generated == sum(n for _, n in jobs), "a request ended early"
    return {
        "rate_per_s": rate, "requests": len(jobs), "generated_tokens": generated, "seconds": elapsed,
        "tokens_per_s": generated / elapsed, "steps": steps, "mean_busy_rows": busy_rows / max(steps, 1),
        "ttft_s": percentiles(ttft), "tbt_s": percentiles(tbt),
        "chunk_calls": calls["chunk"][0], "chunk_seconds": calls["chunk"][1], "chunk_prompt_tokens": calls["chunk"][2],
        "chunk_launch_seconds": calls["chunk"][3],
        "decode_steps": calls["decode"][0], "decode_seconds": calls["decode"][1], "decode_launch_seconds": calls["decode"][3],
        "saturated_seconds": saturated[1], "saturated_tokens_per_s": saturated[0] / saturated[1] if saturated[1] else None,
    }  # fmt: skip


def steady_decode(engine: Engine, steps: int, device: torch.device, contexts: list[int]) -> tuple[float, float]:
    """Tokens/s of one request per entry of `contexts` decoding together, each with about that
    many keys (read in every step), after their prompts and the graph's capture; and the mean
    keys a row held over the timed steps (the prompt, the tokens made while the others'
    prompts were read, half the steps)."""
    prompts = [max(1, context - steps // 2) for context in contexts]
    room = engine.max_context - max(prompts)  # a request's tokens, while the others' prompts are read and after
    if room < 10 + steps:
        sys.exit(f"steady decode after {max(prompts)} prompt tokens: max_context={engine.max_context} leaves {room} tokens, under {steps} steps and a margin")
    requests = [engine.submit(Request([5 + i] + [7] * (prompt - 1), max_tokens=room)) for i, prompt in enumerate(prompts)]
    while not all(r.tokens for r in requests):  # the prompts
        engine.step()
    for _ in range(5):  # the capture, a few replays
        engine.step()
    steps = min(steps, room - max(len(r.tokens) for r in requests) - 2)
    if steps <= 0:
        sys.exit(f"steady decode after {max(prompts)} prompt tokens: no room left in max_context={engine.max_context} after reading the prompts")
    keys = statistics.mean(prompts) + statistics.mean(len(r.tokens) for r in requests) + steps / 2
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        engine.step()
    sync(device)
    seconds = time.perf_counter() - start
    assert all(not r.finished for r in requests)  # every row decoded throughout
    for r in requests:
        engine.finish(r)
    return len(contexts) * steps / seconds, keys


def static_batches(model: Transformer, jobs: list[tuple[list[int], int]], rows: int, temperature: float = 0.0) -> dict[str, Any]:
    """The jobs as consecutive batches of `rows` through generate(), each run to its longest answer."""
    stage = Stage(model)
    sync(model.device)
    start = time.perf_counter()
    for first in range(0, len(jobs), rows):
        batch = jobs[first : first + rows]
        generate([p for p, _ in batch], model, max_tokens=max(n for _, n in batch), stage=stage, temperature=temperature, seed=first)
    sync(model.device)
    elapsed = time.perf_counter() - start
    generated = sum(n for _, n in jobs)
    return {"generated_tokens": generated, "seconds": elapsed, "tokens_per_s": generated / elapsed}


def profile(engine: Engine, jobs: list[tuple[list[int], int]], cfg: argparse.Namespace) -> None:
    """The saturated run under cProfile (where the host's time goes, by function) or torch.profiler
    (by operator, on the host and on the GPU)."""
    import cProfile
    import io
    import pstats

    text = io.StringIO()
    if cfg.profile == "host":
        profiler = cProfile.Profile()
        run = profiler.runcall(run_arrivals, engine, jobs, math.inf, cfg.seed + 1, cfg.temperature)
        for key in ("tottime", "cumulative"):
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(40)
    else:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        with torch.profiler.profile(activities=activities) as trace:
            run = run_arrivals(engine, jobs, math.inf, cfg.seed + 1, cfg.temperature)
        events = trace.key_averages()
        for key in ("self_cpu_time_total", "self_device_time_total")[: len(activities)]:
            text.write(events.table(sort_by=key, row_limit=30, max_name_column_width=60) + "\n")
    summary = (f"{vars(cfg)}\nprofiled ({cfg.profile}): {run['tokens_per_s']:.1f} tokens/s, {run['chunk_calls']} chunk calls launched in "
               f"{run['chunk_launch_seconds'] / max(run['chunk_calls'], 1) * 1e3:.2f} ms each, {run['decode_steps']} decode steps in "
               f"{run['decode_launch_seconds'] / max(run['decode_steps'], 1) * 1e3:.2f} ms\n\n")
    log(summary)
    print(text.getvalue())
    if cfg.out:
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "profile.txt").write_text(summary + text.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes and workload: checks the script, measures nothing real")
    p.add_argument("--out", type=Path, default=None, help="folder for serve_bench.json")
    p.add_argument("--rates", default="1,4,16,inf", help="arrival rates in requests/s (inf: all at once, the saturated server)")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--prompt", default="128,1024", help="prompt lengths: min,max")
    p.add_argument("--answer", default="64,512", help="answer lengths: min,max")
    p.add_argument("--chunk-size", type=int, default=None, help="prompt tokens per forward call (default: the engine's)")
    p.add_argument("--steady-steps", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0, help="every request's (0: greedy); sampled ones each seeded")
    p.add_argument("--compile", action="store_true", help="the engine's blocks compiled (torch.compile), in its warm-up")
    p.add_argument("--eager-chunks", action="store_true", help="chunk calls run eagerly, not from graphs (Engine's chunk_graphs=False)")
    p.add_argument("--profile", choices=["host", "trace"], default=None,
                   help="only the saturated run, under cProfile (host: the host's time by function) or torch.profiler "
                        "(trace: each operator's host and GPU time, the host's waits for the GPU among them), into profile.txt")
    cfg = p.parse_args()
    if cfg.tiny:
        cfg.requests, cfg.max_batch, cfg.prompt, cfg.answer, cfg.steady_steps = 24, 8, "8,40", "4,24", 10
    device = torch.device(cfg.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = ModelArgs(**dict(TINY if cfg.tiny else MISTRAL_7B, max_batch_size=cfg.max_batch))
    log(f"building random weights of {'tiny' if cfg.tiny else 'Mistral 7B'} shapes on {device}")
    model = Transformer.random(args, device=device, dtype=dtype)
    prompt_range = tuple(int(v) for v in cfg.prompt.split(","))
    answer_range = tuple(int(v) for v in cfg.answer.split(","))
    jobs = workload(cfg.requests, prompt_range, answer_range, args.vocab_size, cfg.seed)  # type: ignore[arg-type]
    engine = Engine(model, max_batch=cfg.max_batch, max_context=prompt_range[1] + answer_range[1], chunk_size=cfg.chunk_size, compile=cfg.compile,
                    chunk_graphs=False if cfg.eager_chunks else None)  # fmt: skip
    warm_up_s = engine.warm_up()  # as `mistral serve` does before it listens
    print(f"engine warm-up: {warm_up_s:.2f} s", flush=True)
    results: dict[str, Any] = {"config": vars(cfg) | {"torch": torch.__version__}, "device": str(device), "warm_up_s": warm_up_s}
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(device)
    log("warm-up: every bucket of rows, prompts of every length read beside decoding rows")
    run_arrivals(engine, jobs[: cfg.max_batch + 3], math.inf, cfg.seed, cfg.temperature)
    if cfg.profile:
        profile(engine, jobs, cfg)
        return
    results["steady_decode_tokens_per_s"], keys = steady_decode(engine, cfg.steady_steps, device, [3] * cfg.max_batch)
    log(f"steady decode, {cfg.max_batch} rows of {keys:.0f} keys: {results['steady_decode_tokens_per_s']:.1f} tokens/s")
    # The same at the workload's mean context, over its tokens (a busy row's keys, step by
    # step: a prompt and half an answer, weighted by the answer's steps).
    mean_context = round(sum(n * (len(p) + n / 2) for p, n in jobs) / sum(n for _, n in jobs))
    rate, keys = steady_decode(engine, cfg.steady_steps, device, [mean_context] * cfg.max_batch)
    results["steady_decode_at_mean_context"] = {"context": mean_context, "keys": keys, "tokens_per_s": rate}
    log(f"steady decode, {cfg.max_batch} rows of {keys:.0f} keys (the workload's mean {mean_context}): {rate:.1f} tokens/s")
    # And rows of contexts spread as the workload's steps are (its quantiles, same mean): what
    # rows of unequal lengths cost a decode step, apart from the coming and going of requests.
    # (At most what leaves a request room for the timed steps after its prompt: steady_decode's need.)
    contexts = sorted(min(len(p) + t, engine.max_context - cfg.steady_steps - 10) for p, n in jobs for t in range(n))
    spread = [contexts[(2 * i + 1) * len(contexts) // (2 * cfg.max_batch)] for i in range(cfg.max_batch)]
    rate, keys = steady_decode(engine, cfg.steady_steps, device, spread)
    results["steady_decode_at_spread_contexts"] = {"contexts": spread, "keys": keys, "tokens_per_s": rate}
    log(f"steady decode, {cfg.max_batch} rows of {min(spread)}-{max(spread)} keys (the workload's spread, mean {keys:.0f}): {rate:.1f} tokens/s")
    results["static"] = static_batches(model, jobs, cfg.max_batch, cfg.temperature)
    log(f"static batches of {cfg.max_batch}: {results['static']['tokens_per_s']:.1f} tokens/s")
    results["runs"] = []
    for rate in (float(r) for r in cfg.rates.split(",")):
        run = run_arrivals(engine, jobs, rate, cfg.seed + 1, cfg.temperature)
        results["runs"].append(run)
        log(f"rate {rate:g}/s: {run['tokens_per_s']:.1f} tokens/s, TTFT p50 {run['ttft_s']['p50']:.3f} s p99 {run['ttft_s']['p99']:.3f} s, "
            f"TBT p50 {run['tbt_s']['p50'] * 1e3:.1f} ms p99 {run['tbt_s']['p99'] * 1e3:.1f} ms, {run['mean_busy_rows']:.1f} rows busy; "
            f"of {run['seconds']:.2f} s: {run['chunk_calls']} chunk calls {run['chunk_seconds']:.2f} s "
            f"({run['chunk_prompt_tokens'] / max(run['chunk_seconds'], 1e-9):,.0f} prompt tokens/s), "
            f"{run['decode_steps']} decode steps {run['decode_seconds']:.2f} s ({run['decode_seconds'] / max(run['decode_steps'], 1) * 1e3:.2f} ms each); "
            f"the host launching them: chunk calls {run['chunk_launch_seconds'] / max(run['chunk_calls'], 1) * 1e3:.2f} ms each, "
            f"decode steps {run['decode_launch_seconds'] / max(run['decode_steps'], 1) * 1e3:.2f} ms")  # fmt: skip
    if cfg.out:
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "serve_bench.json").write_text(json.dumps(results, indent=1, default=str))
    steady, at_context = results["steady_decode_tokens_per_s"], results["steady_decode_at_mean_context"]["tokens_per_s"]
    at_spread = results["steady_decode_at_spread_contexts"]["tokens_per_s"]
    print("| arrivals (requests/s) | tokens/s | / steady decode | while saturated / steady | / steady at the mean context "
          "| / steady at the spread contexts | / static batches | TTFT p50 | TTFT p99 | TBT p50 | TBT p99 | rows busy |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for run in results["runs"]:
        saturated, saturated_at_context, saturated_at_spread = (
            (f"{run['saturated_tokens_per_s'] / steady:.2f} ({run['saturated_seconds']:.1f} s)", f"{run['saturated_tokens_per_s'] / at_context:.2f}",
             f"{run['saturated_tokens_per_s'] / at_spread:.2f}")
            if run["saturated_seconds"] else ("-", "-", "-")
        )  # fmt: skip
        print(f"| {run['rate_per_s']:g} | {run['tokens_per_s']:,.1f} | {run['tokens_per_s'] / steady:.2f} | {saturated} | {saturated_at_context} | {saturated_at_spread} | "
              f"{run['tokens_per_s'] / results['static']['tokens_per_s']:.2f} | {run['ttft_s']['p50']:.3f} s | {run['ttft_s']['p99']:.3f} s | "
              f"{run['tbt_s']['p50'] * 1e3:.1f} ms | {run['tbt_s']['p99'] * 1e3:.1f} ms | {run['mean_busy_rows']:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
