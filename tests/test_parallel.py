"""Parallel runs (mistral/parallel.py) against the single-process model.

Pipeline stages, tensor-parallel ranks and both together run on the CPU over gloo,
whatever MISTRAL_TEST_DEVICE says: spawning a group is the slow part, so each group
runs every check in one go (the `group` fixture) and the tests below compare what each
rank saw with the plain model. 5 layers; P pipeline stages x T tensor ranks; five
prompts, the longest past the window of 8, in a cache that wraps.
"""

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import torch.multiprocessing as mp

from helpers import assert_greedy, random_model, rel_error, tiny_args
from mistral import MistralError, ModelArgs, Transformer, parallel
from mistral.engine import Engine, Request
from mistral.generation import generate, stream
from mistral.loading import checkpoint_slices
from mistral.tokenizer import Tokenizer

# Both sides compute in float32 on the CPU: the logits agree to rounding (summed in another order across ranks).
RTOL = 1e-5
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
MICRO_BATCHES = (1, 2, 5, None)  # None: the default
SAMPLING = dict(temperature=0.9, top_p=0.95, seed=123)
# (P, T): pipeline stages x tensor ranks. T = 3 needs heads that 3 divides.
LAYOUTS = [(2, 1), (3, 1), (1, 2), (1, 3), (2, 2)]


def heads(T: int) -> tuple[int, int]:
    return (6, 3) if T == 3 else (4, 2)


def model_args(kind: str, T: int) -> ModelArgs:
    n_heads, n_kv_heads = heads(T)
    return dataclasses.replace(tiny_args(moe=kind == "mixtral", n_layers=N_LAYERS), n_heads=n_heads, n_kv_heads=n_kv_heads)


def packed(prompts: list[list[int]]) -> tuple[torch.Tensor, list[int]]:
    return torch.tensor(sum(prompts, [])), [len(p) for p in prompts]


def cached_calls() -> list[tuple[torch.Tensor, list[int]]]:
    """Two prefill chunks (rows 1 and 4 get none in the second), then two decode steps."""
    calls = [packed([p[:6] for p in PROMPTS]), packed([p[6:] for p in PROMPTS])]
    return calls + [packed([[b + 3] for b in range(len(PROMPTS))]), packed([[b + 7] for b in range(len(PROMPTS))])]


def run_checks(model: Transformer) -> dict[str, Any]:
    """Everything we compare, computed by a parallel rank or by the single-process model."""
    out: dict[str, Any] = {"logits": model(*packed(PROMPTS))}
    # 160 (token, expert) pairs: past the matrix-vector products' 128, a Mixtral's prefill path
    out["long_logits"] = model(*packed([[1 + t % 90 for t in range(80)]]))
    cache = model.make_cache(len(PROMPTS), 40)
    out["cache_shape"] = tuple(cache.k.shape)
    out["cached_logits"] = [model(ids, seqlens, cache) for ids, seqlens in cached_calls()]
    for m in MICRO_BATCHES:
        out[f"greedy_{m}"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, micro_batches=m)
    out["chunked"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, chunk_size=5, micro_batches=2)
    # A stream left after two steps, a call's tokens still on their way to the ranks that do not
    # sample: the next call's first tokens must be its own, not those.
    early = stream(PROMPTS, model, max_tokens=MAX_TOKENS, micro_batches=2)
    next(early), next(early)
    early.close()
    out["after_early"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, micro_batches=2)
    # An eos that greedy decoding reaches early in prompt 1 and late in prompt 2 (or never).
    out["eos_id"] = eos_id = out["greedy_1"][0][1][2]
    out["eos"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, eos_id=eos_id, micro_batches=2)
    out["sampled_1"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, micro_batches=1, **SAMPLING)
    out["sampled_2"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, micro_batches=2, **SAMPLING)
    out["sampled_alone"] = generate(PROMPTS[:1], model, max_tokens=MAX_TOKENS, **SAMPLING)
    out["speculated"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, speculate=3)
    out["speculated_sampled"] = generate(PROMPTS, model, max_tokens=MAX_TOKENS, speculate=3, **SAMPLING)
    out["engine"] = engine_run(model)
    out["engine_nan"] = engine_after_nan(model)
    return out


def engine_run(model: Transformer) -> tuple[list[list[int]], list[list[float]]]:
    """PROMPTS and one sampled request through the serving engine on 2 rows (the others wait),
    prompts read 4 tokens a call beside the rows that decode, padded to a bucket of tokens where
    their rows read in place (chunk_graphs, as a server's on CUDA): every rank submits the same."""
    engine = Engine(model, max_batch=2, max_context=40, chunk_size=4, chunk_graphs=True)
    requests = [engine.submit(Request(p, max_tokens=MAX_TOKENS)) for p in PROMPTS]
    requests.append(engine.submit(Request(PROMPTS[0], max_tokens=MAX_TOKENS, **SAMPLING)))
    while engine.busy:
        engine.step()
    return [r.tokens for r in requests], [r.logprobs for r in requests]


def engine_after_nan(model: Transformer) -> tuple[Optional[str], int, list[int]]:
    """Logits that turn NaN from the engine's third call on (a hook on the last norm, on the
    last stage's ranks; the others learn it from the tokens): every rank fails the same read
    with the one-line error, ends its requests as a tensor-parallel server's ranks do
    (mistral/serve.py), and runs the next request. Returns the error, the steps to it, and
    that request's tokens."""
    engine = Engine(model, max_batch=2, max_context=40, chunk_size=4)
    requests = [engine.submit(Request(p, max_tokens=MAX_TOKENS)) for p in PROMPTS[:2]]
    calls: list[int] = []

    def nan_from_third(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return out if len(calls) < 3 else torch.full_like(out, float("nan"))

    hook = None if model.norm is None else model.norm.register_forward_hook(nan_from_third)
    error, steps = None, 0
    try:
        while engine.busy and error is None:
            steps += 1
            try:
                engine.step()
            except MistralError as e:
                error = str(e)
    finally:
        if hook is not None:
            hook.remove()
    for r in requests:
        if not r.finished:
            engine.finish(r, "error")
    after = engine.submit(Request(PROMPTS[2], max_tokens=4))
    while engine.busy:
        engine.step()
    return error, steps, after.tokens


def worker(rank: int, P: int, T: int, port: int, folders: dict[str, Path], out_dir: Path) -> None:
    """One rank of a group: run the checks on every model kind, save what it saw."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(P * T), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    layout, device = parallel.init(P, T, "cpu")
    assert (layout.world_rank, device) == (rank, torch.device("cpu"))
    results: dict[str, Any] = {"layout": layout}
    for kind, folder in folders.items():
        ranks = dict(num_pipeline_ranks=P, num_tensor_ranks=T, expert_parallel=kind.endswith("-ep"))  # whole experts a rank
        model = Transformer.from_folder(folder, **ranks)
        r = results[kind] = run_checks(model)
        r["shapes"] = {n: tuple(t.shape) for n, t in model.state_dict().items()}
        shard = Transformer.random(model.args, seed=5, **ranks)
        whole = Transformer.random(model.args, seed=5).state_dict()
        r["random_shard_is_whole"] = all(
            torch.equal(t, whole[n] if dim is None else whole[n].chunk(T, dim)[layout.tensor_rank])
            for n, (t, dim) in checkpoint_slices(shard).items()
        )
    errors = results["errors"] = {}
    for name, bad in {
        "world": lambda: Transformer.random(model_args("mistral", T), num_pipeline_ranks=P * T + 1),
        "init": lambda: parallel.init(P * T + 1),
        "split": lambda: Transformer.random(model_args("mistral", 2), num_tensor_ranks=3),
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


# int4 weights for T = 2 (the P1xT2 group): Mixtral's shape with hidden_dim 128, so that wo's 64
# and w2's 128 input columns split into whole groups of 32 a rank.
INT4 = dataclasses.replace(model_args("mixtral", 1), hidden_dim=128, quantization={"method": "int4", "group_size": 32})


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, int], Path]:
    """A model folder per kind and head count (T = 3 needs 6 / 3 heads), and one of int4 weights."""
    out = {}
    for kind in KINDS:
        for T in (1, 3):
            folder = out[kind, T] = tmp_path_factory.mktemp(f"{kind}{T}")
            random_model(model_args(kind, T)).to("cpu").save(folder)
    folder = out["int4", 2] = tmp_path_factory.mktemp("int4")
    Transformer.random(INT4, seed=4).save(folder)
    return out


@pytest.fixture(scope="module")
def reference(folders: dict[tuple[str, int], Path]) -> dict[tuple[str, int], dict[str, Any]]:
    """What the single process gives; its greedy tokens checked against whole forwards first."""
    out = {}
    for key, folder in folders.items():
        model = Transformer.from_folder(folder)
        out[key] = run_checks(model)
        for prompt, tokens in zip(PROMPTS, out[key]["greedy_1"][0]):
            assert_greedy(model, prompt, tokens, MAX_TOKENS)
    return out


@pytest.fixture(scope="module", params=LAYOUTS, ids=[f"P{P}xT{T}" for P, T in LAYOUTS])
def group(request: pytest.FixtureRequest, folders: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, int, list[dict]]:
    """(P, T, what each rank of a P x T process group saw)."""
    P, T = request.param
    out_dir = tmp_path_factory.mktemp(f"group{P}x{T}")
    mine = {kind: folders[kind, 3 if T == 3 else 1] for kind in KINDS}
    if (P, T) == (1, 2):  # int4 weights, and expert parallelism of bfloat16 and int4 experts
        mine |= {"int4": folders["int4", 2], "mixtral-ep": folders["mixtral", 1], "int4-ep": folders["int4", 2]}
    if (P, T) == (2, 2):  # expert parallelism within pipeline stages
        mine |= {"mixtral-ep": folders["mixtral", 1]}
    context = mp.start_processes(worker, args=(P, T, free_port(), mine, out_dir), nprocs=P * T, join=False, start_method="spawn")
    deadline = time.monotonic() + 240
    while not context.join(timeout=1):  # raises if a rank failed
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the {P} x {T} ranks did not finish: a send without its receive?")
    return P, T, [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(P * T)]


def want(reference: dict, kind: str, T: int) -> dict[str, Any]:
    return reference[kind, 3 if T == 3 else 1]


def test_layers_split_as_evenly_as_possible() -> None:
    assert [list(parallel.Layout(r, 3).layers(5)) for r in range(3)] == [[0, 1], [2, 3], [4]]
    for n in range(1, 9):
        for P in range(1, n + 1):
            ranges = [list(parallel.Layout(r, P).layers(n)) for r in range(P)]
            assert sum(ranges, []) == list(range(n))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1


def test_bad_layouts_are_errors_before_any_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(MistralError, match="num_pipeline_ranks=3 exceeds the model's n_layers=2"):
        Transformer(tiny_args(n_layers=2), layout=parallel.Layout(0, 3))
    with pytest.raises(MistralError, match="^num_tensor_ranks=3 does not divide the model's n_kv_heads=2$"):
        Transformer.random(tiny_args(), num_tensor_ranks=3)
    with pytest.raises(MistralError, match="^num_tensor_ranks=4 does not divide the model's hidden_dim=98$"):
        Transformer.random(dataclasses.replace(tiny_args(), n_heads=8, n_kv_heads=4, hidden_dim=96 + 2), num_tensor_ranks=4)
    int4 = dataclasses.replace(INT4, quantization={"method": "int4", "group_size": 64})
    with pytest.raises(MistralError, match="^num_tensor_ranks=2 splits wo's 64 input columns into 32 a rank, not a multiple of the int4 group_size=64$"):
        Transformer.random(int4, num_tensor_ranks=2)
    with pytest.raises(MistralError, match="^num_tensor_ranks=2 splits w2's 192 input columns into 96 a rank, not a multiple of the int4 group_size=64$"):
        Transformer.random(dataclasses.replace(int4, n_heads=8, hidden_dim=192), num_tensor_ranks=2)
    with pytest.raises(MistralError, match=r"^expert_parallel splits a mixture of experts \(Mixtral\): this model has none$"):
        Transformer.random(tiny_args(), num_tensor_ranks=2, expert_parallel=True)
    with pytest.raises(MistralError, match="^expert_parallel: num_tensor_ranks=3 does not divide the model's 4 experts$"):
        Transformer.random(tiny_args(moe=True), num_tensor_ranks=3, expert_parallel=True)
    # Whole experts leave the hidden units whole: a width that T does not divide is no error.
    odd = dataclasses.replace(tiny_args(moe=True), hidden_dim=97)
    with pytest.raises(MistralError, match="^num_tensor_ranks=2 does not divide the model's hidden_dim=97$"):
        parallel.check_tensor_split(2, odd)
    parallel.check_tensor_split(2, odd, expert_parallel=True)
    with pytest.raises(MistralError, match="^expert_parallel must be True or False, got 'yes'$"):
        parallel.Layout(expert_parallel="yes")  # type: ignore[arg-type]
    with pytest.raises(MistralError, match="needs a torch.distributed process group of 2 processes"):
        Transformer.random(tiny_args(n_layers=2), num_pipeline_ranks=2)
    with pytest.raises(MistralError, match="tensor_rank must be in 0..1, got 2"):
        parallel.Layout(0, 1, 2, 2)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(MistralError, match=r"torchrun --nproc-per-node 4 -m mistral generate MODEL_DIR \.\.\. --num_pipeline_ranks 2 --num_tensor_ranks 2"):
        parallel.init(2, 2)


def test_each_rank_holds_only_its_part(group: tuple) -> None:
    P, T, ranks = group
    for kind in KINDS:
        args = model_args(kind, T)
        H, H_kv = heads(T)
        for rank, r in enumerate(ranks):
            layout = r["layout"]
            assert (layout.pipeline_rank, layout.tensor_rank) == divmod(rank, T)
            shapes = r[kind]["shapes"]
            layers = {int(n.split(".")[1]) for n in shapes if n.startswith("layers.")}
            assert layers == set(layout.layers(N_LAYERS))
            assert ("tok_embeddings.weight" in shapes) == layout.is_first
            assert ("output.weight" in shapes) == ("norm.weight" in shapes) == layout.is_last
            L = min(layers)
            assert shapes[f"layers.{L}.attention.wq.weight"] == (H // T * args.head_dim, args.dim)
            assert shapes[f"layers.{L}.attention.wk.weight"] == (H_kv // T * args.head_dim, args.dim)
            assert shapes[f"layers.{L}.attention.wo.weight"] == (args.dim, H // T * args.head_dim)
            w2 = f"layers.{L}.feed_forward." + ("experts.0.w2.weight" if kind == "mixtral" else "w2.weight")
            assert shapes[w2] == (args.dim, args.hidden_dim // T)
            # Its cache: its layers, its KV heads.
            assert r[kind]["cache_shape"] == (len(layers), len(PROMPTS), 8, H_kv // T, args.head_dim)
        # Every tensor of the checkpoint is on some rank.
        assert {n for r in ranks for n in r[kind]["shapes"]} == set(Transformer.random(args).state_dict())


def test_random_shards_are_the_whole_models_slices(group: tuple) -> None:
    assert all(r[kind]["random_shard_is_whole"] for r in group[2] for kind in KINDS)


def test_logits_equal_single_process(group: tuple, reference: dict) -> None:
    P, T, ranks = group
    for kind in KINDS:
        expected = want(reference, kind, T)
        for r in ranks:
            assert rel_error(r[kind]["logits"], expected["logits"]) < RTOL
            for got, w in zip(r[kind]["cached_logits"], expected["cached_logits"], strict=True):
                assert rel_error(got, w) < RTOL


@pytest.mark.parametrize("check", [f"greedy_{m}" for m in MICRO_BATCHES] + ["chunked", "after_early", "eos"])
def test_greedy_tokens_equal_single_process(group: tuple, reference: dict, check: str) -> None:
    P, T, ranks = group
    for kind in KINDS:
        expected = want(reference, kind, T)
        tokens, logprobs = expected[check]
        for r in ranks:
            assert r[kind]["eos_id"] == expected["eos_id"]
            assert r[kind][check][0] == tokens
            for got, w in zip(r[kind][check][1], logprobs):
                assert got == pytest.approx(w, rel=1e-4, abs=1e-4)
    assert any(len(t) < MAX_TOKENS for t in want(reference, "mistral", T)["eos"][0])  # eos did stop a sequence


def test_the_engine_gives_every_rank_the_single_processes_tokens(group: tuple, reference: dict) -> None:
    """Requests that wait for rows and join between calls: every rank ends with the tokens
    the single process gives, which are generate()'s (the sampled one draws as generate's
    does with that seed; the single process's greedy tokens are held to whole forwards by `reference`)."""
    P, T, ranks = group
    for kind in KINDS:
        expected = want(reference, kind, T)
        tokens, logprobs = expected["engine"]
        assert tokens[: len(PROMPTS)] == expected["greedy_1"][0] and tokens[-1] == expected["sampled_alone"][0][0]
        for r in ranks:
            assert r[kind]["engine"][0] == tokens
            for got, w in zip(r[kind]["engine"][1], logprobs):
                assert got == pytest.approx(w, rel=1e-4, abs=1e-4)
        # NaN logits: every rank fails at the step the single process fails at, and serves on.
        error, steps, after = expected["engine_nan"]
        assert error is not None and "not finite" in error and after == expected["greedy_1"][0][2][:4]
        assert all(r[kind]["engine_nan"] == (error, steps, after) for r in ranks)


def test_speculation_gives_every_rank_the_single_processes_tokens(group: tuple, reference: dict) -> None:
    """Prompt lookup on several ranks: every rank proposes alike, the sampling rank chooses and
    tells the others, whose caches keep what it kept; greedy, plain greedy decoding's tokens."""
    P, T, ranks = group
    for kind in KINDS:
        expected = want(reference, kind, T)
        assert expected["speculated"][0] == expected["greedy_1"][0]
        for r in ranks:
            assert r[kind]["speculated"][0] == expected["speculated"][0]
            for got, w in zip(r[kind]["speculated"][1], expected["speculated"][1]):
                assert got == pytest.approx(w, rel=1e-4, abs=1e-4)
            assert r[kind]["speculated_sampled"][0] == expected["speculated_sampled"][0]


def test_int4_weights_split_by_tensor_ranks(group: tuple, reference: dict) -> None:
    """int4 weights on T = 2 ranks, each reading its rows of wq|wk|wv, w1, w3 (with their scales and
    mins) and its columns of wo and w2 (whole groups, with their groups' scales and mins): the logits
    and greedy tokens of one process, and Transformer.random's shards are the whole model's slices."""
    P, T, ranks = group
    if "int4" not in ranks[0]:
        pytest.skip("int4 weights run in the P1xT2 group")
    expected = reference["int4", 2]
    for r in ranks:
        got = r["int4"]
        assert rel_error(got["logits"], expected["logits"]) < RTOL
        for check in [f"greedy_{m}" for m in MICRO_BATCHES] + ["chunked", "eos"]:
            assert got[check][0] == expected[check][0]
        assert got["random_shard_is_whole"]
        # The rank's 32 of wq's 64 rows, 2 groups of 32 columns each; its 32 of wo's 64 columns (16 bytes a row),
        # one group; its 64 of w2's 128 columns, two groups.
        shapes = got["shapes"]
        assert shapes["layers.0.attention.wq.mins"] == (32, 2)
        assert shapes["layers.0.attention.wo.weight"] == (64, 16) and shapes["layers.0.attention.wo.scales"] == (64, 1)
        assert shapes["layers.0.feed_forward.experts.3.w2.mins"] == (64, 2)


def test_expert_parallel_ranks_hold_whole_experts_and_give_one_process_results(group: tuple, reference: dict) -> None:
    """Mixtral with expert_parallel on T = 2 ranks (float and int4 experts; and within 2 pipeline
    stages): tensor rank t holds experts 2t and 2t + 1 whole, and no part of the others; it routes
    every token as one process does and adds only its own experts' outputs, the all-reduce the
    rest. Logits (of few pairs and of many: the matrix-vector products, the grouped product,
    int4's expert loop), cached calls, greedy, chunked, eos, sampled, speculated and the serving
    engine's tokens are one process's."""
    P, T, ranks = group
    if "mixtral-ep" not in ranks[0]:
        pytest.skip("expert parallelism runs in the P1xT2 and P2xT2 groups")
    for kind, (base, base_T) in (("mixtral-ep", ("mixtral", 1)), ("int4-ep", ("int4", 2))):
        if kind not in ranks[0]:
            continue  # int4 in P1xT2 only
        expected = reference[base, base_T]
        whole = Transformer.random(model_args("mixtral", 1) if base == "mixtral" else INT4).state_dict()
        for rank, r in enumerate(ranks):
            got, t = r[kind], rank % T
            L = min(int(n.split(".")[1]) for n in got["shapes"] if n.startswith("layers."))
            experts = f"layers.{L}.feed_forward.experts."
            held = {int(n.removeprefix(experts).split(".")[0]) for n in got["shapes"] if n.startswith(experts) and n.endswith("w2.weight")}
            assert held == {2 * t, 2 * t + 1}, kind
            assert got["shapes"][f"{experts}{2 * t}.w2.weight"] == tuple(whole[f"{experts}0.w2.weight"].shape)
            assert got["random_shard_is_whole"]
            assert rel_error(got["logits"], expected["logits"]) < RTOL
            assert rel_error(got["long_logits"], expected["long_logits"]) < RTOL
            for g, w in zip(got["cached_logits"], expected["cached_logits"], strict=True):
                assert rel_error(g, w) < RTOL
            for check in [f"greedy_{m}" for m in MICRO_BATCHES] + ["chunked", "eos", "sampled_1", "speculated", "engine"]:
                assert got[check][0] == expected[check][0], (kind, check)
                for g, w in zip(got[check][1], expected[check][1]):
                    assert g == pytest.approx(w, rel=1e-4, abs=1e-4)


def test_sampling_is_the_same_on_every_rank(group: tuple, reference: dict) -> None:
    P, T, ranks = group
    for kind in KINDS:
        expected = want(reference, kind, T)
        # One micro-batch draws exactly as the single process does.
        assert all(r[kind]["sampled_1"][0] == expected["sampled_1"][0] for r in ranks)
        # Micro-batches draw in another order, but every rank returns the sampler's draws.
        sampler = ranks[(P - 1) * T][kind]["sampled_2"][0]
        assert all(r[kind]["sampled_2"][0] == sampler for r in ranks)
        assert expected["sampled_1"][0] != expected["greedy_1"][0]


def test_bad_parallel_options_are_clear_errors(group: tuple) -> None:
    P, T, ranks = group
    n = P * T
    for r in ranks:
        errors = r["errors"]
        assert errors["world"] == (
            f"num_pipeline_ranks={n + 1} x num_tensor_ranks=1 needs {n + 1} processes, but the process group has {n}: "
            f"torchrun --nproc-per-node {n + 1} -m mistral generate MODEL_DIR ... --num_pipeline_ranks {n + 1}"
        )
        assert errors["init"] == (
            f"num_pipeline_ranks={n + 1} x num_tensor_ranks=1 needs {n + 1} processes, but torchrun started {n} "
            "(nodes x --nproc-per-node)"
        )
        assert errors["split"] == "num_tensor_ranks=3 does not divide the model's n_kv_heads=2"
        assert errors["micro_batches"] == "micro_batches must be a positive integer, got 0"


def launched(launcher: str, *args: str) -> list[str]:
    """The command line of `mistral ARGS` on 2 ranks: started by torchrun, or by mistral itself (mistral/launch.py)."""
    if launcher == "mistral":
        return [sys.executable, "-m", "mistral", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "mistral", *args]


@pytest.mark.parametrize(
    "flag, launcher",
    [("--num_pipeline_ranks", "torchrun"), ("--num_tensor_ranks", "torchrun"), ("--num_tensor_ranks", "mistral"), ("--expert_parallel", "mistral")],
)
def test_parallel_command_line_prints_once_and_matches_one_process(tmp_path: Path, flag: str, launcher: str) -> None:
    from make_tiny_model import make_tiny_model

    folder = make_tiny_model(str(tmp_path / "model"), n_layers=3, moe=True)
    prompts = ["def fibonacci(n):", "import os", "class Path:"]
    layout = [flag, "2"] if flag != "--expert_parallel" else ["--num_tensor_ranks", "2", flag]  # a switch, with 2 ranks
    command = launched(
        launcher, "generate", str(folder), *prompts, *layout, "--max_tokens", "10", "--json",
        "--device", "cpu",  # gloo on any machine: the reference below runs on the CPU too
    )  # fmt: skip
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
    """scripts/parallel_gpu.py with tiny shapes over gloo: its 1-rank vs 2-rank checks hold, every part runs."""
    script = Path(__file__).resolve().parent.parent / "scripts" / "parallel_gpu.py"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        str(script), "--tiny", "--device", "cpu", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=200, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    results = json.loads((tmp_path / "parallel.json").read_text())
    # Not the script's own verdict: its 2-rank tokens against one process, computed here.
    from parallel_gpu import TINY_CHECK, check_prompts

    args = ModelArgs(**TINY_CHECK)
    want = generate(check_prompts(args), Transformer.random(args, seed=3), max_tokens=48)[0]
    for layout in ("T=2", "P=2", "EP=2"):
        check = results["check"][layout]
        assert check["tokens"] == want
        assert all(v for k, v in check.items() if k.startswith("tokens_equal")) and len(check) >= 3
        assert check["logits_rel_error"] < RTOL
        assert results[f"mixtral {layout}"]["b4"]["plain"]["steady_decode_tok_s"] > 0
    assert results["mixtral P=2"]["b4"]["micro"]["micro_batches"] == 2
    assert results["mistral"]["speedup_b1"] > 0


def test_an_error_of_every_rank_is_one_line(tmp_path: Path) -> None:
    """mistral's launcher: both ranks refuse the folder's broken tokenizer alike; the user reads
    it once, and nothing of a launcher's. A layout the model does not divide is refused before
    any rank starts."""
    from make_tiny_model import make_tiny_model

    folder = make_tiny_model(str(tmp_path / "model"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(launched("mistral", "generate", str(folder), "hi", "--num_tensor_ranks", "3", "--device", "cpu"),
                          capture_output=True, text=True, timeout=150, env=env)  # fmt: skip
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    assert done.stderr.strip().splitlines() == ["error: num_tensor_ranks=3 does not divide the model's n_kv_heads=2"], done.stderr
    (folder / "tokenizer.model").write_bytes(b"not a tokenizer")
    done = subprocess.run(launched("mistral", "generate", str(folder), "hi", "--num_tensor_ranks", "2", "--device", "cpu"),
                          capture_output=True, text=True, timeout=150, env=env)  # fmt: skip
    assert (done.returncode, done.stdout) == (2, ""), done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "tokenizer.model: not a sentencepiece model" in lines[0], done.stderr


@pytest.mark.parametrize("signum", ["SIGINT", "SIGKILL"])
def test_ctrl_c_or_a_kill_ends_every_rank_of_mistrals_launcher(tmp_path: Path, signum: str) -> None:
    """The ranks run in process groups of their own, so a terminal's Ctrl-C reaches the launcher
    only: it passes the signal on, and the run ends quietly (130) with no rank left running.
    A launcher killed outright takes its ranks with it (their parent-death signal)."""
    import signal
    import time

    from make_tiny_model import make_tiny_model

    folder = make_tiny_model(str(tmp_path / "model"), n_layers=2, seed=2, never_eos=True)  # generates on and on
    command = launched("mistral", "generate", str(folder), "hello", "--num_tensor_ranks", "2", "--max_tokens", "1000000", "--device", "cpu")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    ranks: list[str] = []

    def running(pid: str) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
        except OSError:
            return False

    try:
        assert process.stdout is not None and process.stdout.read(len("hello") + 20)  # both ranks decode
        ranks = subprocess.run(["ps", "-o", "pid=", "--ppid", str(process.pid)], capture_output=True, text=True).stdout.split()
        assert len(ranks) == 2, ranks
        process.send_signal(getattr(signal, signum))
        process.wait(timeout=60)
        time.sleep(1)
        alive = [pid for pid in ranks if running(pid)]
    finally:
        process.kill()
        for pid in ranks:  # whatever the outcome, none is left behind by the test
            subprocess.run(["kill", "-9", pid], capture_output=True)
    err = process.stderr.read() if process.stderr else b""
    assert not alive, "a rank outlived the launcher"
    assert process.returncode == (130 if signum == "SIGINT" else -signal.SIGKILL) and b"Traceback" not in err, err.decode()


def test_a_never_eos_model_decodes_on(tmp_path: Path) -> None:
    """The long-running tests below need a model whose greedy text never ends: eos's logit is 0,
    and some token's is above it whatever the input."""
    from make_tiny_model import EOS_ID, make_tiny_model

    model = Transformer.from_folder(make_tiny_model(str(tmp_path / "model"), n_layers=2, seed=2, never_eos=True))
    logits = model(torch.randint(0, 512, (300,)), [100, 200])
    assert (logits[:, EOS_ID] == 0).all() and (logits.max(dim=-1).values > 0).all()
    tokens, _ = generate([[1, 5, 9], [1, 300]], model, max_tokens=400, eos_id=EOS_ID)
    assert [len(t) for t in tokens] == [400, 400]


@pytest.mark.parametrize("launcher", ["torchrun", "mistral"])
def test_a_rank_that_stops_answering_ends_the_others_with_one_line(tmp_path: Path, launcher: str) -> None:
    """SIGSTOP one of two tensor-parallel ranks mid-generation: the other gives up after
    MISTRAL_TIMEOUT_S (20 s here) with one line naming itself, instead of waiting forever;
    mistral's own launcher then ends the stopped rank and names it."""
    import signal
    import threading
    import time

    from make_tiny_model import make_tiny_model

    folder = make_tiny_model(str(tmp_path / "model"), n_layers=2, seed=2, never_eos=True)
    command = launched(launcher, "generate", str(folder), "hello", "--num_tensor_ranks", "2", "--max_tokens", "1000000", "--device", "cpu")
    # 20 s, not less: on a busy 2-core machine one rank's start-up (imports, loading) can lead the other's by 10 s
    env = dict(os.environ, OMP_NUM_THREADS="1", MISTRAL_TIMEOUT_S="20", PYTHONUNBUFFERED="1")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    printed: list[str] = []
    errors: list[str] = []
    threading.Thread(target=lambda: printed.extend(iter(lambda: process.stdout.read(1), "")), daemon=True).start()  # type: ignore[union-attr]
    reader = threading.Thread(target=lambda: errors.append(process.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()

    def stderr() -> str:
        process.kill()
        reader.join(timeout=30)
        return "".join(errors)

    try:
        started = time.monotonic()
        while len(printed) < len("hello") + 20 and process.poll() is None and time.monotonic() - started < 120:
            time.sleep(0.1)  # 20 characters past the prompt: both ranks have loaded and decode together
        ranks = {}
        for pid in map(int, subprocess.run(["ps", "-o", "pid=", "--ppid", str(process.pid)], capture_output=True, text=True).stdout.split()):
            rank = next((int(v[5:]) for v in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if v.startswith(b"RANK=")), None)
            if rank is not None:
                ranks[rank] = pid
        # (>=, as the wait above: it stops at 20, and a check for 21 failed when it read no further in between)
        assert len(printed) >= len("hello") + 20 and sorted(ranks) == [0, 1], (ranks, "".join(printed), stderr())
        os.kill(ranks[1], signal.SIGSTOP)
        stopped = time.monotonic()
        while Path(f"/proc/{ranks[0]}").exists() and time.monotonic() - stopped < 90:
            time.sleep(0.2)
        waited = time.monotonic() - stopped
        if launcher == "torchrun":
            os.kill(ranks[1], signal.SIGKILL)  # what torchrun would do after its own 30 s grace
        code = process.wait(timeout=120)
    finally:
        process.kill()
    err = stderr()
    assert waited < 45, err
    assert "error: rank 0: another rank did not answer within 20 s (MISTRAL_TIMEOUT_S)" in err, err
    if launcher == "mistral":  # the ranks' lines, nothing else
        lines = err.strip().splitlines()
        assert lines[-1] == "error: rank 1 had not ended 5 s after rank 0 failed (stopped or hung): killed", err
        assert lines[-2].startswith("error: rank 0: another rank did not answer"), err
        assert "Traceback" not in err and code == 2, err
    else:
        assert "Traceback" not in err.split("error: rank 0")[0]  # rank 0 printed its line, no traceback before it (torchrun's after)


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-5", "soon", "1e7"])
def test_a_bad_timeout_is_named(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("MISTRAL_TIMEOUT_S", value)
    with pytest.raises(MistralError, match=f"MISTRAL_TIMEOUT_S must be a number of seconds in \\(0, 1e6\\], got '{value}'"):
        parallel.timeout()
