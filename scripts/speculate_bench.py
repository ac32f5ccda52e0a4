"""Speculative decoding by prompt lookup, measured: tokens per target forward call and wall speedup.

The default model, greedy, continues held-out Python (the modules scripts/train_tiny.py
kept out of its training: every 20th of the standard library): each prompt is the
first `--prompt_tokens` tokens of a module, and `--max_tokens` are generated with
speculate=0 (plain decoding) and k = 2..8. The output must be the same tokens for every
k (the script checks it, in float32: in bfloat16 a verify step of n tokens rounds unlike n
decode steps, and a near tie may go the other way, so it reports the share of prompts whose
tokens are the same); what changes is how many forward calls produce them.

    python scripts/speculate_bench.py [--prompts 8] [--prompt_tokens 512] [--max_tokens 128] [--device cpu] [--out FILE]
    python scripts/speculate_bench.py --draft DRAFT_DIR ...   # proposals by a draft model (scripts/train_tiny.py --layers 2 ...)

Prints one row per k: forward calls after the prefill, tokens per call, milliseconds per
call (the device's and the host's work together, a draft's calls included), the seconds
of the calls after the prefill, and the speedup over plain decoding in the same process.

    python scripts/speculate_bench.py --shapes mistral-7b ...   # a GPU: random weights of Mistral 7B's shapes

runs the same on a model of Mistral 7B's shapes with random weights (the default model's
vocabulary), in place of the default model: its proposals mean nothing (a random model
soon repeats itself, and prompt lookup follows), but what a verify step costs against a
decode step, the host's work per step included, is what Mistral 7B's costs.

    python scripts/speculate_bench.py --verify --out FILE      # a GPU: Mistral 7B's shapes, random weights

times instead one verify step (a row's last token and n - 1 proposals, n = 1..9, after a
512-token prompt) against one decode step of the same model replayed from its CUDA graph
as generation runs it: the verify step as a chunk call (eager, how speculation ran it
before), as cache.Verify eagerly, and replayed from its graph as speculation runs it
(decode.Runner.verify). From the ratio, the speedup that t tokens kept per step would
yield: t * decode / verify.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_tiny import split_sources  # noqa: E402

from bench import MISTRAL_7B, sync  # noqa: E402

from mistral import DEFAULT_MODEL, ModelArgs, Transformer, generate, stream  # noqa: E402
from mistral.decode import Runner  # noqa: E402
from mistral.stage import Stage  # noqa: E402
from mistral.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=8, help="held-out modules, one prompt each")
    parser.add_argument("--prompt_tokens", type=int, default=512)
    parser.add_argument("--max_tokens", type=int, default=128)
    parser.add_argument("--ks", default="0,2,3,4,5,6,8", help="speculate values; 0 is plain decoding")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA (its decode kernels and graphs), else float32")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here too")
    parser.add_argument("--draft", type=Path, help="a draft model's folder (same tokenizer): its proposals instead of prompt lookup's")
    parser.add_argument("--shapes", choices=["mistral-7b"], help="random weights of these shapes instead of the default model")
    parser.add_argument("--verify", action="store_true", help="time verify steps against a decode step (Mistral 7B's shapes)")
    options = parser.parse_args()
    if options.verify:
        return verify_steps(options.device, options.out)

    torch.set_num_threads(min(torch.get_num_threads(), 4))
    dtype = getattr(torch, options.dtype or ("bfloat16" if options.device.startswith("cuda") else "float32"))
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    if options.shapes:
        model = Transformer.random(ModelArgs(**dict(MISTRAL_7B, vocab_size=tokenizer.n_words)), device=options.device, dtype=dtype)
    else:
        model = Transformer.from_folder(DEFAULT_MODEL, device=options.device, dtype=dtype)
    draft = None if options.draft is None else Transformer.from_folder(options.draft, device=options.device, dtype=dtype)
    _, held_out, names = split_sources()
    prompts = [tokenizer.encode(text, bos=True)[: options.prompt_tokens] for text in held_out[: options.prompts]]

    rows, reference = [], None
    for k in map(int, options.ks.split(",")):
        stage = Stage(model)
        proposer = dict(speculate=k, draft=draft if k else None)
        # Warm-up: a whole run, which meets most verify widths (a graph each, on CUDA), the draft's too.
        generate(prompts[:1], model, max_tokens=options.max_tokens, stage=stage, **proposer)
        decode_s = 0.0
        outputs = []
        tally: dict[str, int] = {}  # the verify steps' counts (mistral generate's timing line)
        for prompt in prompts:  # one at a time: batch 1, where a step reads every weight once
            tokens, seconds = decoded(prompt, model, options.max_tokens, stage, proposer, tally)
            decode_s += seconds
            outputs.append(tokens)
        reference = reference or outputs
        after_first = sum(len(t) for t in outputs) - len(prompts)  # the first token comes with the prefill
        steps = tally.get("steps", after_first)  # plain decoding: a call per token
        rows.append(dict(
            speculate=k, same_tokens=sum(o == r for o, r in zip(outputs, reference)) / len(prompts), forward_calls=steps,
            tokens_per_call=round(after_first / max(steps, 1), 3), seconds=round(decode_s, 3),
            ms_per_call=round(1000 * decode_s / max(steps, 1), 3),  # what a step costs the host and the device together
        ))  # fmt: skip
    plain = rows[0]["seconds"]
    for r in rows:
        r["speedup"] = round(plain / r["seconds"], 3)
    print(f"proposals by {'prompt lookup' if draft is None else f'the draft model {options.draft}'}")
    print(f"{options.shapes or 'default model'} in {dtype}, greedy, {len(prompts)} held-out modules ({', '.join(names[: len(prompts)])}), "
          f"{options.prompt_tokens}-token prompts, {options.max_tokens} new tokens each, {options.device}")  # fmt: skip
    print(f"{'k':>3} {'same':>5} {'calls':>6} {'tok/call':>9} {'ms/call':>8} {'seconds':>8} {'speedup':>8}")
    for r in rows:
        print(f"{r['speculate']:>3} {r['same_tokens']:>5.2f} {r['forward_calls']:>6} {r['tokens_per_call']:>9} {r['ms_per_call']:>8} {r['seconds']:>8} {r['speedup']:>8}")
    if options.out:
        options.out.write_text(json.dumps(dict(device=options.device, shapes=options.shapes, dtype=str(dtype), draft=str(options.draft) if options.draft else None,
                                               modules=names[: len(prompts)], rows=rows), indent=2))  # fmt: skip
    if dtype == torch.float32 and not all(r["same_tokens"] == 1 for r in rows):
        sys.exit("speculative decoding changed the greedy tokens")


def decoded(prompt: list[int], model: Transformer, max_tokens: int, stage: Stage, proposer: dict, tally: dict[str, int]) -> tuple[list[int], float]:
    """The tokens of one prompt and the seconds of the steps after the first token (the
    prefill's), less warm-up: a graph captured for a width the warm-up run did not meet."""
    warm_up: dict[str, float] = {}
    steps = stream([prompt], model, max_tokens=max_tokens, stage=stage, speculation=tally, warm_up=warm_up, **proposer)
    first = [next(steps)]
    sync(model.device)
    start, booked = time.perf_counter(), sum(warm_up.values())
    rest = list(steps)
    sync(model.device)
    seconds = time.perf_counter() - start - (sum(warm_up.values()) - booked)
    return torch.cat([t for t, _ in first + rest]).tolist(), seconds


def _seconds(fn, steps: int, device: str) -> float:
    """Wall seconds per call of fn, synchronized (what a launch-bound step costs the host too)."""
    fn()
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


@torch.inference_mode()
def verify_steps(device: str, out: Path | None, context: int = 512, steps: int = 50) -> None:
    if not device.startswith("cuda"):
        sys.exit("--verify times GPU steps: run it on a GPU")
    model = Transformer.random(ModelArgs(**MISTRAL_7B), device=device, dtype=torch.bfloat16)
    prompt = torch.randint(0, model.args.vocab_size, (context,), device=device)
    cache = model.make_cache(1, context + 4 * steps, lookahead=9)
    eager = Runner(model, cache, 1, cuda_graphs=False)
    eager.prefill(prompt, [context])
    graphed = Runner(model, cache, 1)
    token = prompt[:1]

    decode_s = _seconds(lambda: graphed.decode(token), steps, device)  # steps + 1 tokens on from the prompt
    cache.rewind(0, context)
    rows = []
    for n in range(1, 10):
        x = prompt[:n]
        row: dict = dict(tokens=n)
        for kind, call in (("chunk_eager", lambda: eager.prefill(x, [n])), ("verify_eager", lambda: eager.verify(x, n)),
                           ("verify_graph", lambda: graphed.verify(x, n))):  # fmt: skip

            def step(call=call) -> None:  # type: ignore[no-untyped-def]
                call()
                cache.rewind(0, context)

            row[f"{kind}_ms"] = round(_seconds(step, steps, device) * 1e3, 3)
            row[f"{kind}_vs_decode"] = round(row[f"{kind}_ms"] / (decode_s * 1e3), 3)
        rows.append(row)
    print(f"Mistral 7B shapes, bf16, batch 1 after {context} tokens, {torch.cuda.get_device_name(device)}: "
          f"decode step (graph) {decode_s * 1e3:.3f} ms")  # fmt: skip
    print(f"{'n':>3} {'chunk ms':>9} {'x decode':>9} {'verify ms':>10} {'x decode':>9} {'graph ms':>9} {'x decode':>9}   speedup at 1.6 / 2.0 tokens kept per step")
    for r in rows:
        best = r["verify_graph_vs_decode"]
        print(f"{r['tokens']:>3} {r['chunk_eager_ms']:>9} {r['chunk_eager_vs_decode']:>9} {r['verify_eager_ms']:>10} "
              f"{r['verify_eager_vs_decode']:>9} {r['verify_graph_ms']:>9} {best:>9}   {1.6 / best:.2f} / {2.0 / best:.2f}")  # fmt: skip
    if out:
        out.write_text(json.dumps(dict(device=torch.cuda.get_device_name(device), context=context,
                                       decode_graph_ms=round(decode_s * 1e3, 3), rows=rows), indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
