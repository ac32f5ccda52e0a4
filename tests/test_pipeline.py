"""Pipeline sharding (mistral/pipeline.py) against the single-process model.

Process groups of 2 and 3 ranks run on the CPU over gloo, whatever MISTRAL_TEST_DEVICE
says: spawning a group is the slow part, so each group runs every check in one go (the
`groups` fixture) and the tests below compare what each rank saw with the plain model.
5 layers split 2+3 and 2+2+1 ranks; five prompts, the longest past the window of 8.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

from conftest import random_model, rel_error, tiny_args
from mistral import MistralError, Transformer, pipeline
from mistral.generate import generate
from mistral.tokenizer import Tokenizer

# Both sides compute in float32 on the CPU, with the same shapes: the logits agree to rounding.
RTOL = 1e-4
KINDS = ("mistral", "mixtral")
N_LAYERS = 5
PROMPTS = [
    [1, 5, 7, 9, 11, 3, 4, 5, 6, 7, 8, 9, 10, 2, 30, 31, 32, 33, 34],  # past the window of 8
    [1, 2, 3],
    [1, 50, 60, 70, 80, 90, 91, 92, 93, 94, 95, 96],
    [1, 40, 41, 42, 43, 44, 45, 46, 47],
    [1],
]
MAX_TOKENS = 12
MICRO_BATCHES = (1, 2, 5, None)  # None: the default, one per rank
SAMPLING = dict(temperature=0.9, top_p=0.95, seed=123)


def packed(prompts: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    return torch.tensor(sum(prompts, [])), [len(p) for p in prompts]


def cached_calls() -> list[tuple[torch.Tensor, list[int]]]:
    """Two prefill chunks (rows 1 and 4 get none in the second), then two decode steps."""
    calls = [packed([p[:6] for p in PROMPTS]), packed([p[6:] for p in PROMPTS])]
    return calls + [packed([[b + 3] for b in range(len(PROMPTS))]), packed([[b + 7] for b in range(len(PROMPTS))])]


def run_checks(model: Transformer) -> dict[str, Any]:
    """Everything we compare, computed by a pipeline rank or by the single-process model."""
    out: dict[str, Any] = {"logits": model(*packed(PROMPTS))}
    cache = model.make_cache(len(PROMPTS), 40)
    out["cache_layers"] = cache.k.shape[0]
    out["cached_logits"] = [model(ids, seqlens, cache) for ids, seqlens in cached_calls()]
    for m in MICRO_BATCHES:
        out[f"greedy_{m}"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, micro_batches=m)
    out["chunked"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, chunk_size=5, micro_batches=2)
    # An eos that greedy decoding reaches early in prompt 1 and late in prompt 2 (or never).
    out["eos_id"] = eos_id = out["greedy_1"][0][1][2]
    out["eos"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, eos_id=eos_id, micro_batches=2)
    out["sampled_1"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, micro_batches=1, **SAMPLING)
    out["sampled_2"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, micro_batches=2, **SAMPLING)
    return out


def worker(rank: int, P: int, port: int, folders: dict[str, Path], out_dir: Path) -> None:
    """One rank of a group: run the checks on every model kind, save what it saw."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(P), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    assert pipeline.init(P, "cpu") == (rank, torch.device("cpu"))
    results: dict[str, Any] = {}
    for kind, folder in folders.items():
        model = Transformer.from_folder(folder, pipeline_rank=rank, num_pipeline_ranks=P)
        r = results[kind] = run_checks(model)
        r["names"] = sorted(model.state_dict())
        shard = Transformer.random(model.args, seed=5, pipeline_rank=rank, num_pipeline_ranks=P)
        whole = Transformer.random(model.args, seed=5).state_dict()
        r["random_shard_is_whole"] = all(torch.equal(t, whole[n]) for n, t in shard.state_dict().items())
    errors = results["errors"] = {}
    for name, bad in {
        "world": lambda: Transformer(tiny_args(n_layers=N_LAYERS), pipeline_rank=rank, num_pipeline_ranks=P + 1),
        "init": lambda: pipeline.init(P + 1),
        "micro_batches": lambda: generate(PROMPTS, model, max_tokens=2, micro_batches=0),
    }.items():
        try:
            bad()
        except MistralError as e:
            errors[name] = str(e)
    torch.save(results, out_dir / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for kind in KINDS:
        folder = out[kind] = tmp_path_factory.mktemp(kind)
        model = random_model(tiny_args(moe=kind == "mixtral", n_layers=N_LAYERS))
        model.to("cpu").save(folder)
    return out


@pytest.fixture(scope="module")
def reference(folders: dict[str, Path]) -> dict[str, dict[str, Any]]:
    out = {}
    for kind, folder in folders.items():
        model = Transformer.from_folder(folder)
        out[kind] = run_checks(model)
        out[kind]["names"] = sorted(model.state_dict())
    return out


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def group(request: pytest.FixtureRequest, folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each rank of a P-process group saw."""
    P, out_dir = request.param, tmp_path_factory.mktemp(f"group{request.param}")
    context = mp.start_processes(worker, args=(P, free_port(), folders, out_dir), nprocs=P, join=False, start_method="spawn")
    deadline = time.monotonic() + 150
    while not context.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the {P} pipeline ranks did not finish: a send without its receive?")
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(P)]


def test_layers_split_as_evenly_as_possible() -> None:
    assert [list(pipeline.layer_range(5, r, 3)) for r in range(3)] == [[0, 1], [2, 3], [4]]
    for n in range(1, 9):
        for P in range(1, n + 1):
            sizes = [len(pipeline.layer_range(n, r, P)) for r in range(P)]
            assert sum((list(pipeline.layer_range(n, r, P)) for r in range(P)), []) == list(range(n))
            assert max(sizes) - min(sizes) <= 1


def test_more_ranks_than_layers_is_an_error() -> None:
    with pytest.raises(MistralError, match="num_pipeline_ranks=3 exceeds the model's n_layers=2"):
        Transformer(tiny_args(n_layers=2), pipeline_rank=0, num_pipeline_ranks=3)


def test_pipeline_without_a_process_group_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MistralError, match="needs a torch.distributed process group"):
        Transformer(tiny_args(n_layers=2), pipeline_rank=0, num_pipeline_ranks=2)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(MistralError, match="torchrun --nproc-per-node 2"):
        pipeline.init(2)


def test_each_rank_holds_only_its_layers(group: list[dict], reference: dict) -> None:
    P = len(group)
    for kind in KINDS:
        seen: list[str] = []
        for rank, r in enumerate(group):
            names = r[kind]["names"]
            layers = {int(n.split(".")[1]) for n in names if n.startswith("layers.")}
            assert layers == set(pipeline.layer_range(N_LAYERS, rank, P))
            assert ("tok_embeddings.weight" in names) == (rank == 0)
            assert ("output.weight" in names) == ("norm.weight" in names) == (rank == P - 1)
            assert r[kind]["cache_layers"] == len(layers)
            seen += names
        assert sorted(seen) == reference[kind]["names"]  # each tensor on exactly one rank


def test_random_shards_are_the_whole_models_tensors(group: list[dict]) -> None:
    assert all(r[kind]["random_shard_is_whole"] for r in group for kind in KINDS)


def test_logits_equal_single_process(group: list[dict], reference: dict) -> None:
    for kind in KINDS:
        want = reference[kind]
        for r in group:
            assert rel_error(r[kind]["logits"], want["logits"]) < RTOL
            for got, expected in zip(r[kind]["cached_logits"], want["cached_logits"], strict=True):
                assert rel_error(got, expected) < RTOL


@pytest.mark.parametrize("check", [f"greedy_{m}" for m in MICRO_BATCHES] + ["chunked", "eos"])
def test_greedy_tokens_equal_single_process(group: list[dict], reference: dict, check: str) -> None:
    for kind in KINDS:
        tokens, logprobs = reference[kind][check]
        for r in group:
            assert r[kind]["eos_id"] == reference[kind]["eos_id"]
            assert r[kind][check][0] == tokens
            for got, want in zip(r[kind][check][1], logprobs):
                assert got == pytest.approx(want, rel=RTOL, abs=RTOL)
    assert any(len(t) < MAX_TOKENS for t in reference["mistral"]["eos"][0])  # eos did stop a sequence


def test_sampling_is_the_same_on_every_rank(group: list[dict], reference: dict) -> None:
    for kind in KINDS:
        # One micro-batch draws exactly as the single process does.
        assert all(r[kind]["sampled_1"][0] == reference[kind]["sampled_1"][0] for r in group)
        # Micro-batches draw in another order, but every rank returns the last rank's draws.
        assert all(r[kind]["sampled_2"][0] == group[-1][kind]["sampled_2"][0] for r in group)
        assert reference[kind]["sampled_1"][0] != reference[kind]["greedy_1"][0]


def test_bad_pipeline_options_are_clear_errors(group: list[dict]) -> None:
    P = len(group)
    for r in group:
        errors = r["errors"]
        assert errors["world"] == (
            f"num_pipeline_ranks={P + 1} but the process group has {P} processes: "
            f"start one process per rank: torchrun --nproc-per-node {P + 1} ..."
        )
        assert errors["init"].startswith(f"num_pipeline_ranks={P + 1} but torchrun started {P} processes")
        assert errors["micro_batches"] == "micro_batches must be a positive integer, got 0"


def test_torchrun_command_line_prints_once_and_matches_one_process(tmp_path: Path) -> None:
    from make_tiny_model import make_tiny_model

    folder = make_tiny_model(str(tmp_path / "model"), n_layers=3, moe=True)
    prompts = ["def fibonacci(n):", "import os", "class Path:"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        "-m", "mistral", "generate", str(folder), *prompts, "--num_pipeline_ranks", "2", "--max_tokens", "10", "--json",
        "--device", "cpu",  # gloo on any machine: the reference below runs on the CPU too
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stderr
    results = json.loads(done.stdout)["results"]  # one JSON object: rank 1 printed nothing

    tokenizer = Tokenizer(folder / "tokenizer.model")
    model = Transformer.from_folder(folder)
    encoded = [tokenizer.encode(p, bos=True) for p in prompts]
    tokens, _ = generate(encoded, model, max_tokens=10, eos_id=tokenizer.eos_id, seed=0)
    assert [r["tokens"] for r in results] == tokens
    assert [r["prompt_tokens"] for r in results] == encoded


def test_gpu_script_runs_on_cpu(tmp_path: Path) -> None:
    """scripts/pipeline_gpu.py with tiny shapes over gloo: its 1-rank vs 2-rank check holds."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "pipeline_gpu.py"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        str(script), "--tiny", "--device", "cpu", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=150, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "pipeline.json").read_text())
    check = results["check"]
    assert check["tokens_equal_micro_batches_1"] and check["tokens_equal_micro_batches_2"]
    assert check["logits_rel_error"] < RTOL
    assert results["b4"]["micro"]["micro_batches"] == 2 and results["b4"]["plain"]["e2e_tok_s"] > 0
