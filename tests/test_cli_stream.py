"""The CLI as a user sees it: streamed text, --json, chat turns kept in the KV cache,
and the default model that `mistral generate "prompt"` runs with no model folder.

All on the shipped default model (5.5M parameters, a few seconds on a CPU).
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from mistral.generation import generate
from mistral.text import Completion
from mistral.main import DEFAULT_MODEL, Conversation, Timing, load, main, split_model_and_prompts, timing_line
from mistral.model import Transformer

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def fibonacci(n):"


@pytest.fixture(scope="module")
def default_model() -> tuple:
    return load(DEFAULT_MODEL, "cpu", "float32")


class Recorder:
    """Stands in for sys.stdout: keeps each write with the number of forward calls made so far."""

    def __init__(self, calls: list[int]):
        self.calls, self.writes = calls, []

    def write(self, text: str) -> int:
        self.writes.append((text, self.calls[0]))
        return len(text)

    def flush(self) -> None:
        pass

    @property
    def text(self) -> str:
        return "".join(t for t, _ in self.writes)


def run_main(monkeypatch: pytest.MonkeyPatch, *args: str) -> tuple[Recorder, list[int]]:
    """Run `mistral ARGS` in-process, counting forward calls of the real model (each runs Transformer.step once)."""
    calls = [0]
    step = Transformer.step

    def counting_step(self: Transformer, *a: Any, **kw: Any) -> torch.Tensor:
        calls[0] += 1
        return step(self, *a, **kw)

    monkeypatch.setattr(Transformer, "step", counting_step)
    out = Recorder(calls)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "argv", ["mistral", *args])
    main()
    return out, calls


def test_single_prompt_streams_while_generating(monkeypatch: pytest.MonkeyPatch, default_model: tuple) -> None:
    out, calls = run_main(monkeypatch, "generate", PROMPT, "--max_tokens", "16", "--device", "cpu")
    model, tokenizer = default_model
    prompt_tokens = tokenizer.encode(PROMPT, bos=True)
    (tokens,), _ = generate([prompt_tokens], model, max_tokens=16, eos_id=tokenizer.eos_id)
    completion = tokenizer.decode(prompt_tokens + tokens)[len(tokenizer.decode(prompt_tokens)) :]
    assert out.text == PROMPT + completion + "\n"
    # Completion text was written at several moments, the first while the model still had steps to run.
    moments = sorted({n for text, n in out.writes[1:] if text.strip()})
    assert len(moments) > 1 and moments[0] < calls[0], out.writes


def test_json_matches_generate(monkeypatch: pytest.MonkeyPatch, default_model: tuple) -> None:
    prompts = [PROMPT, "import os\n"]
    out, _ = run_main(monkeypatch, "generate", *prompts, "--max_tokens", "8", "--json", "--device", "cpu")
    result = json.loads(out.text)
    model, tokenizer = default_model
    encoded = [tokenizer.encode(p, bos=True) for p in prompts]
    tokens, logprobs = generate(encoded, model, max_tokens=8, eos_id=tokenizer.eos_id)
    assert Path(result["model"]) == DEFAULT_MODEL
    assert [r["prompt"] for r in result["results"]] == prompts
    assert [r["prompt_tokens"] for r in result["results"]] == encoded
    assert [r["tokens"] for r in result["results"]] == tokens
    for r, want in zip(result["results"], logprobs):
        assert r["logprobs"] == pytest.approx(want, rel=1e-6)
    for r, p in zip(result["results"], encoded):
        assert r["completion"] == tokenizer.decode(p + r["tokens"])[len(tokenizer.decode(p)) :]
    assert result["timings"]["generated_tokens"] == sum(len(t) for t in tokens)


def test_chat_keeps_conversation_in_cache(default_model: tuple) -> None:
    model, tokenizer = default_model
    chat = Conversation(model, tokenizer, max_context=4096, max_tokens=40, temperature=0.0, top_p=1.0)
    fed: list[int] = []
    first_layer = next(iter(model.layers.values()))
    hook = first_layer.register_forward_pre_hook(lambda module, args: fed.append(args[0].shape[0]))  # tokens of each call
    try:
        first = chat.say("Write a function that parses a path.")
        held = chat.cache.lengths[0]
        fed.clear()
        second = chat.say("Now one that joins two paths.")
    finally:
        hook.remove()
    # The cache held turn 1 but its last sampled token (never fed back), so turn 2 prefilled
    # only that token, the closing eos (when turn 1 stopped at max_tokens, not at a sampled
    # eos) and the new instruction: far fewer than the whole conversation.
    stopped_at_eos = first.finish_reason == "eos"
    assert held == len(first.prompt_tokens) + len(first.tokens) + stopped_at_eos - 1
    instruction = tokenizer.encode("[INST] Now one that joins two paths. [/INST]", bos=False)
    assert fed[0] == len(second.prompt_tokens) - held == len(instruction) + (1 if stopped_at_eos else 2)
    assert len(second.prompt_tokens) > model.args.sliding_window  # the rolling buffer has wrapped
    # Turn 2's answer equals a fresh generation over the whole conversation.
    (fresh,), _ = generate([second.prompt_tokens], model, max_tokens=40, eos_id=tokenizer.eos_id)
    assert second.tokens == fresh


def test_streamed_text_never_splits_a_character(default_model: tuple) -> None:
    _, tokenizer = default_model
    tokens = tokenizer.encode("x = 'café → naïve'", bos=True)
    prompt, rest = tokens[:3], tokens[3:]  # <s> x = | ...
    assert any(tokenizer.sp.IsByte(t) for t in rest)  # é, → and ï are spelled in UTF-8 bytes
    completion = Completion(tokenizer, prompt)
    pieces = []
    for token in rest:
        completion.tokens.append(token)
        pieces.append(completion.unshown())
    pieces.append(completion.unshown(final=True))
    assert "".join(pieces) == " 'café → naïve'"
    assert not any("\ufffd" in p for p in pieces)


def test_first_input_is_a_folder_only_when_it_looks_like_one(tmp_path: Path) -> None:
    assert split_model_and_prompts([str(tmp_path), "hi"]) == (tmp_path, ["hi"])
    assert split_model_and_prompts(["/nonexistent", "hi"]) == (Path("/nonexistent"), ["hi"])
    assert split_model_and_prompts(["x = a/b", "hi"]) == (DEFAULT_MODEL, ["x = a/b", "hi"])
    assert split_model_and_prompts([PROMPT]) == (DEFAULT_MODEL, [PROMPT])


def test_default_model_writes_python() -> None:
    """`mistral generate "prompt"` with nothing else: the shipped model, trained, not noise."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-m", "mistral", "generate", PROMPT, "--max_tokens", "24", "--json"],
        capture_output=True, text=True, env=env, timeout=120,  # cwd inherited: the installed (or mutated) package
    )
    assert result.returncode == 0, result.stderr
    (answer,) = json.loads(result.stdout)["results"]
    assert len(answer["tokens"]) > 0
    # An untrained model of this vocabulary averages about -ln(4096) = -8.3 per token.
    assert sum(answer["logprobs"]) / len(answer["logprobs"]) > -2.0, answer
    assert "tokens/s" in result.stderr


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in ci if "pytest" in line)
    assert f"```sh\n{command}\n```" in readme


def test_timing_books_each_phase_once() -> None:
    """--json's timings in a fresh process: load, warm-up, prefill and decode, none booked
    under another, adding up to no more than the process took; the line names each warm-up."""
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "mistral", "generate", PROMPT, "--max_tokens", "12", "--json", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    wall = time.perf_counter() - start
    t = json.loads(run.stdout)["timings"]
    assert {"load_s", "warm_up_s", "warm_up", "prefill_s", "decode_s"} <= set(t)
    assert t["warm_up"] == {} and t["warm_up_s"] == 0  # the CPU compiles nothing, captures no graph
    phases = [t["load_s"], t["prefill_s"], t["decode_s"]]
    assert all(p > 0 for p in phases) and sum(phases) < wall
    assert t["decode_tokens_per_s"] == pytest.approx((t["generated_tokens"] - 1) / t["decode_s"], rel=0.01)
    timing = Timing(load_s=2.5, prefill_s=0.02, decode_s=0.3, decoded=63, warm_up={"kernels": 0.31, "graph capture": 0.07})
    assert timing_line(11, 64, timing) == (
        "prompt tokens: 11, generated tokens: 64, load: 2.50 s, warm-up: 0.38 s (kernels 0.31 s, graph capture 0.07 s), "
        "prefill: 0.02 s (550.0 tokens/s), decode: 0.30 s (210.0 tokens/s)"
    )


def test_an_uncompiled_run_imports_neither_dynamo_nor_all_of_xformers() -> None:
    """A run of the default model on the CPU needs xformers' mask classes only, and no
    torch.compile: their imports took 1.5 s of a 3.2 s run (README: a quick start)."""
    code = (
        "import sys; from mistral.main import main; sys.argv = ['mistral', 'generate', 'def f():', '--max_tokens', '4'];\n"
        "try: main()\nexcept SystemExit: pass\n"
        "print([m for m in ('torch._dynamo', 'xformers.ops', 'mistral_common', 'triton') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}).stdout  # fmt: skip
    # Triton, where it is installed (with a CUDA build of torch), comes in with the kernels' module.
    triton = ["triton"] if importlib.util.find_spec("triton") is not None else []
    assert out.strip().splitlines()[-1] == str(triton)


def test_readme_python_example_runs_as_pasted(capsys: pytest.CaptureFixture) -> None:
    """The first code block under README's "The Python API", run as a user pastes it."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## The Python API") :]
    code = section[section.index("```python\n") + len("```python\n") : section.index("```", section.index("```python") + 9)]
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip()  # it printed a completion
