"""Cold start: what a user waits for in a one-shot `mistral generate`, phase by phase.

Writes a model folder of a released model's shapes with random weights (Mistral 7B by
default; the default model's tokenizer, so vocab 4096), then runs `mistral generate ...
--json` in fresh processes: first with empty Triton and Inductor caches (a fresh
machine; the file itself is in the page cache, just written), then with the caches that
run left, for one short prompt, one of 4096 tokens and 8 prompts, and the default model
likewise. For each run: the wall time of the process, the phases of its timing line
(load, warm-up by kind, prefill, decode), the rest (the interpreter, imports, exit), the
load's GB/s and the process's peak resident memory. Last, in this process, the steady
batch-1 decode step of the same model (scripts/bench.py's step_time), uncompiled as the
CLI runs it and compiled, so the one-shot run's decode rate reads against it.

    python scripts/cold_start.py --out $OUT                 # one H200: about 3 minutes
    python scripts/cold_start.py --model mixtral-8x7b --work /dev/shm/cold --out $OUT   # one H200 (93 GB: in RAM
                                                            # where the disk is smaller); the short prompt only
    python scripts/cold_start.py --model mixtral-8x7b --layers 16 --work /dev/shm/cold --out $OUT   # one H100: half of it
    python scripts/cold_start.py --tiny --device cpu        # any machine: checks the script
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import MISTRAL_7B, MIXTRAL_8X7B, TINY, step_time  # noqa: E402

from mistral import ModelArgs, Transformer  # noqa: E402
from mistral import DEFAULT_MODEL  # noqa: E402
from mistral.tokenizer import load_tokenizer  # noqa: E402

SHAPES = {"mistral-7b": MISTRAL_7B, "mixtral-8x7b": MIXTRAL_8X7B, "tiny": TINY}


def write_model(name: str, folder: Path, device: str, layers: int = 0) -> Path:
    """A folder of `name`'s shapes (its first `layers` only, if given), random bf16 weights (float32 on
    a CPU), and the default model's tokenizer."""
    tokenizer = DEFAULT_MODEL / "tokenizer.model"
    shapes = dict(SHAPES[name], vocab_size=load_tokenizer(DEFAULT_MODEL).n_words) | ({"n_layers": layers} if layers else {})
    args = ModelArgs(**shapes)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    shutil.rmtree(folder, ignore_errors=True)  # a --work folder of an earlier run
    Transformer.random(args, device=device, dtype=dtype).save(folder)
    shutil.copyfile(tokenizer, folder / tokenizer.name)
    print(f"wrote {folder} ({gb(folder)} GB) in {time.perf_counter() - start:.1f} s", flush=True)
    return folder


def gb(folder: Path) -> float:
    return round(sum(f.stat().st_size for f in folder.iterdir()) / 1e9, 2)


def long_prompt(tokens: int) -> str:
    """Python source of about `tokens` tokens of the default tokenizer."""
    tokenizer = load_tokenizer(DEFAULT_MODEL)
    text = "".join(Path(m.__file__).read_text() for m in (json.decoder, json.encoder, argparse, statistics, subprocess))
    return tokenizer.decode(tokenizer.encode(text, bos=False)[: tokens - 1])


# `python -m mistral`, and the process's peak resident memory on its last stderr line: its
# VmHWM (getrusage's maxrss would count the pages of the parent it was forked from).
MAIN_WITH_RSS = (
    "import atexit, sys; "
    "atexit.register(lambda: print('max_rss_kb', next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1], "
    "file=sys.stderr)); sys.argv[0] = 'mistral'; from mistral.main import main; main()"
)


def run(label: str, folder: Path, prompts: list[str], caches: Path, device: str, max_tokens: int) -> dict[str, Any]:
    """One fresh process of `mistral generate --json`, its wall time and peak memory."""
    env = dict(os.environ, TRITON_CACHE_DIR=str(caches / "triton"), TORCHINDUCTOR_CACHE_DIR=str(caches / "inductor"))
    command = [sys.executable, "-c", MAIN_WITH_RSS, "generate", str(folder), *prompts, "--max_tokens", str(max_tokens),
               "--json", "--device", device]  # fmt: skip
    start = time.perf_counter()
    child = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        raise RuntimeError(f"{label}: exit {child.returncode}: {child.stderr[-2000:]}")
    *lines, rss = child.stderr.strip().splitlines()
    t = json.loads(child.stdout)["timings"]
    phases = t["load_s"] + t["warm_up_s"] + t["prefill_s"] + t["decode_s"]
    row = dict(
        run=label, wall_s=round(wall, 2), other_s=round(wall - phases, 2), **t,
        load_gb_s=round(gb(folder) / t["load_s"], 2) if t["load_s"] else None,
        to_first_token_s=round(t["warm_up_s"] + t["prefill_s"], 3),
        max_rss_gb=round(int(rss.split()[-1]) / 1e6, 2),  # kB
        line=lines[-1],
    )  # fmt: skip
    print(json.dumps(row), flush=True)
    return row


def steady(folder: Path, device: str, steps: int) -> dict[str, float]:
    """Batch-1 decode tok/s of replayed steps, uncompiled (the CLI's default) and compiled; and an in-process load."""
    if device != "cuda":
        return {}
    torch.cuda.synchronize()
    start = time.perf_counter()
    model = Transformer.from_folder(folder, device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    prompts = [list(range(1, 17))]
    out = dict(in_process_load_s=round(load_s, 3), in_process_load_gb_s=round(gb(folder) / load_s, 2))
    for label, compiled in (("uncompiled", False), ("compiled", True)):
        out[f"steady_b1_{label}_tok_s"] = round(1 / step_time(model, prompts, torch.device(device), steps, compile=compiled), 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="folder for cold_start.json")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (to check the script)")
    parser.add_argument("--model", choices=("mistral-7b", "mixtral-8x7b"), default="mistral-7b")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=None, help="where the folder and caches go (default: a temporary folder)")
    parser.add_argument("--layers", type=int, default=0, help="fewer layers than the model has, where it does not fit (say so, and scale)")
    parser.add_argument("--no-steady", dest="steady", action="store_false", help="leave out the in-process steady decode")
    cfg = parser.parse_args()
    work = cfg.work or Path(tempfile.mkdtemp(prefix="cold_start."))
    name = "tiny" if cfg.tiny else cfg.model
    if not 0 <= cfg.layers <= SHAPES[name]["n_layers"]:
        parser.error(f"--layers {cfg.layers}: {name} has {SHAPES[name]['n_layers']} layers")
    folder = write_model(name, work / name, cfg.device, cfg.layers)
    caches = work / "caches"
    shutil.rmtree(caches, ignore_errors=True)  # a fresh machine's: nothing compiled yet
    short, n = ["def fibonacci(n):"], cfg.max_tokens
    rows = [
        run(f"{name}, caches cold", folder, short, caches, cfg.device, n),
        run(f"{name}, caches warm", folder, short, caches, cfg.device, n),
    ]
    if name != "mixtral-8x7b":  # its target is the short prompt's wall time; each run reads 93 GB
        rows += [
            run(f"{name}, caches warm, 4096-token prompt", folder, [long_prompt(4096)], caches, cfg.device, n),
            run(f"{name}, caches warm, 8 prompts", folder, [f"def f{i}(x):" + " x" * (7 * i) for i in range(8)], caches, cfg.device, n),
        ]
        shutil.rmtree(caches, ignore_errors=True)
        rows += [
            run("default model, caches cold", DEFAULT_MODEL, short, caches, cfg.device, n),
            run("default model, caches warm", DEFAULT_MODEL, short, caches, cfg.device, n),
        ]
    import_s = []
    for _ in range(3):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], check=True)
        import_s.append(time.perf_counter() - start)
    result = dict(
        device=torch.cuda.get_device_name() if cfg.device == "cuda" else "cpu", model=name, folder_gb=gb(folder),
        python_import_torch_s=round(min(import_s), 2), layers=cfg.layers or SHAPES[name]["n_layers"],
        runs=rows, **(steady(folder, cfg.device, steps=200) if cfg.steady else {}),
    )  # fmt: skip
    print()
    print("| run | wall s | other s | load s (GB/s) | warm-up s | prefill s | decode tok/s | peak RSS GB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        warm = ", ".join(f"{k} {v:.2f}" for k, v in r["warm_up"].items())
        print(f"| {r['run']} | {r['wall_s']} | {r['other_s']} | {r['load_s']:.2f} ({r['load_gb_s']}) | "
              f"{r['warm_up_s']:.2f} ({warm}) | {r['prefill_s']:.2f} | {r['decode_tokens_per_s']} | {r['max_rss_gb']} |")  # fmt: skip
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if cfg.out is not None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / "cold_start.json").write_text(json.dumps(result, indent=1))
    if cfg.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
