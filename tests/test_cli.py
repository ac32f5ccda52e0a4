"""The `mistral` command end to end, on a tiny random checkpoint folder.

What it prints must be the greedy continuation that generate() computes for the same
prompts on the same folder, each after its prompt; errors are one line. A few runs are
real subprocesses, as a user would start them; the many bad-input cases run the same
entry point in-process, which saves the ~3 s import of each subprocess.
"""

import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from make_tiny_model import make_tiny_model

from mistral import DEFAULT_MODEL
from mistral.checkpoint import PARAMS, TOKENIZER
from mistral.generation import generate
from mistral.main import main
from mistral.model import Transformer
from mistral.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny") / "model"))


def run_cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    # The CPU, as in the rest of this file. The working directory is inherited, not this
    # repository's: `mistral` is the installed package (or, under scripts/mutate.py, its mutant).
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "mistral", *args], input=stdin, capture_output=True, text=True, env=env, timeout=120)


def greedy(folder: Path, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    tokenizer = Tokenizer(folder / TOKENIZER)
    tokens, _ = generate(prompts, Transformer.from_folder(folder), max_tokens=max_tokens, eos_id=tokenizer.eos_id)
    return tokens


def continuation(tokenizer: Tokenizer, prompt: list[int], tokens: list[int]) -> str:
    """The text of tokens after prompt: decoded with the prompt, then cut after it (as
    sentencepiece folds a word's leading space into its first piece)."""
    return tokenizer.decode(prompt + tokens)[len(tokenizer.decode(prompt)) :]


def expected_output(folder: Path, prompts: list[str], max_tokens: int) -> str:
    """What `mistral generate` prints for several prompts: each prompt, its completion, a line =====."""
    tokenizer = Tokenizer(folder / TOKENIZER)
    encoded = [tokenizer.encode(p, bos=True) for p in prompts]
    texts = [continuation(tokenizer, e, t) for e, t in zip(encoded, greedy(folder, encoded, max_tokens))]
    return "".join(f"{p}{t}\n=====\n" for p, t in zip(prompts, texts))


def run_in_process(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["mistral", *args])
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_subprocess(model_dir: Path) -> None:
    # Prompts that look like Python literals must reach the model as typed, not as 3.1 or quoteless.
    prompts = ["The json module", "3.10", "'quoted'"]
    result = run_cli("generate", str(model_dir), *prompts, "--max_tokens", "5", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == expected_output(model_dir, prompts, 5)
    assert "tokens/s" in result.stderr


def test_chat_subprocess(model_dir: Path) -> None:
    """Two turns in Mistral's instruct format, written out here: each answer is the greedy
    continuation of the whole conversation so far, its previous answer closed by eos."""
    lines = ["Hello there", "And then?"]
    result = run_cli("chat", str(model_dir), "--max_tokens", "4", "--temperature", "0", "--device", "cpu", stdin="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    tokenizer = Tokenizer(model_dir / TOKENIZER)
    conversation: list[int] = []
    want = ""
    for line in lines:
        conversation += tokenizer.encode(f"[INST] {line} [/INST]", bos=not conversation)
        (answer,) = greedy(model_dir, [conversation], 4)
        want += f"{continuation(tokenizer, conversation, answer)}\n"
        conversation += answer + [tokenizer.eos_id]
    assert result.stdout == want  # the answers alone: piped input gets no "> " prompts


def test_bad_input_subprocess_has_no_traceback(tmp_path: Path) -> None:
    result = run_cli("generate", str(tmp_path / "missing"), "hi")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing'}: model folder not found (an input with a \"/\" and no spaces is read as MODEL_DIR; "
        f"for a prompt like it, name the model first: mistral generate {DEFAULT_MODEL} \"{tmp_path / 'missing'}\")"
    ]


@pytest.fixture(scope="module")
def no_tokenizer_dir(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("no_tokenizer")
    for f in model_dir.iterdir():
        if f.name != TOKENIZER:
            shutil.copy(f, folder / f.name)
    return folder


BAD_INPUTS = {
    "missing-folder": (["generate", "{missing}", "hi"], "model folder not found"),
    "no-prompt": (["generate", "{model}"], "no prompt given"),
    # A prompt alone that holds a "/" and no spaces reads as a folder: the error says how to give it.
    "prompt-like-a-folder": (["generate", "print(1/2)"], 'print(1/2): model folder not found (an input with a "/" and no spaces is read as MODEL_DIR'),
    # ... and is named as typed, in the error and in the command it suggests.
    "prompt-like-a-folder-as-typed": (["generate", "./ls/"], './ls/: model folder not found (an input with a "/"'),
    "no-tokenizer": (["generate", "{no_tokenizer}", "hi"], "no tokenizer file in the model folder, expected exactly one of"),
    "empty-prompt": (["generate", "{model}", "hi", ""], "prompt 1 is empty"),
    "blank-prompt": (["generate", "{model}", "   "], "prompt 0 is empty"),
    "negative-max-tokens": (["generate", "{model}", "hi", "--max_tokens", "-1"], "max_tokens must be a non-negative integer"),
    "negative-max-tokens=": (["generate", "{model}", "hi", "--max_tokens=-3"], "max_tokens must be a non-negative integer"),
    "negative-temperature": (["generate", "{model}", "hi", "--temperature", "-0.5"], "temperature must be >= 0"),
    "top-p-zero": (["generate", "{model}", "hi", "--top_p", "0"], r"top_p must be in (0, 1]"),
    "top-p-above-one": (["generate", "{model}", "hi", "--top_p", "1.5"], r"top_p must be in (0, 1]"),
    "seed-not-an-integer": (["generate", "{model}", "hi", "--seed", "abc"], "seed must be an integer, got 'abc'"),
    "bad-device": (["generate", "{model}", "hi", "--device", "xyz"], "device must be cpu, cuda or cuda:N, got 'xyz'"),
    "chat-negative-temperature": (["chat", "{model}", "--temperature", "-1"], "temperature must be >= 0"),
    "chat-missing-folder": (["chat", "{missing}"], "model folder not found"),
    "chat-seed-not-an-integer": (["chat", "{model}", "--seed", "x1"], "seed must be an integer, got 'x1'"),
    # fire would read "123" as an int; the folder name must reach the converter as typed.
    "convert-numeric-folder-name": (["convert", "123", "{missing}"], "123: HF model folder not found"),
}
if not torch.cuda.is_available():
    BAD_INPUTS["cuda-without-gpu"] = (["generate", "{model}", "hi", "--device", "cuda"], "no CUDA GPU is available")


@pytest.mark.parametrize("args, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_a_one_line_error(
    args: list[str],
    message: str,
    model_dir: Path,
    no_tokenizer_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
) -> None:
    folders = dict(model=model_dir, no_tokenizer=no_tokenizer_dir, missing=tmp_path / "missing")
    code, out, err = run_in_process(monkeypatch, capsys, *(a.format(**folders) for a in args))
    assert code != 0
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_more_prompts_than_max_batch_size_run_in_batches(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    small = tmp_path / "small_batch"
    shutil.copytree(model_dir, small)
    params = json.loads((small / PARAMS).read_text())
    params["max_batch_size"] = 2
    (small / PARAMS).write_text(json.dumps(params))
    prompts = ["The first prompt", "A second one", "Third", "Fourth and last"]
    code, out, err = run_in_process(monkeypatch, capsys, "generate", str(small), *prompts, "--max_tokens", "3", "--device", "cpu")
    assert code == 0, err
    assert "2 batches" in err and "max_batch_size=2" in err
    assert out == expected_output(small, prompts, 3)
    assert "tokens/s" in err


@pytest.mark.parametrize("command", ["generate", "chat", "convert", "quantize"])
def test_help_shows_each_option_whole(command: str) -> None:
    """fire reads a docstring line such as "stages (default: one per stage)." as a new
    argument and cuts the text before it: every option's help is its whole docstring text."""
    from mistral.main import COMMANDS

    doc = inspect.getdoc(COMMANDS[command]) or ""
    described = {}
    for block in re.split(r"\n(?=    \w+: )", doc.split("Args:\n", 1)[1]):
        name, text = block.strip().split(":", 1)
        described[name] = " ".join(text.split())
    shown = " ".join((lambda r: r.stdout + r.stderr)(run_cli(command, "--help")).split())
    for name, text in described.items():
        assert text in shown, f"--{name}: {text!r}"


def test_speculate_prints_what_plain_decoding_prints(model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    prompts = ["The json module. The json module", "import os"]
    code, out, err = run_in_process(monkeypatch, capsys, "generate", str(model_dir), *prompts, "--max_tokens", "12", "--speculate", "3", "--device", "cpu")
    assert code == 0, err
    assert out == expected_output(model_dir, prompts, 12)
    # What a user judges the speculation by: its counts, on the timing line and in --json.
    code, out, err = run_in_process(monkeypatch, capsys, "generate", str(model_dir), *prompts, "--max_tokens", "12", "--speculate", "3",
                                    "--device", "cpu", "--json")  # fmt: skip
    counts = json.loads(out)["timings"]["speculation"]
    assert counts["tokens"] == counts["rows"] + counts["kept"] and counts["kept"] <= counts["proposed"] <= 3 * counts["rows"]
    assert counts["steps"] <= counts["rows"] <= 2 * counts["steps"]
    # Each row's first token comes from the prefill; the verify steps give the rest (to 12, or to eos).
    assert sum(len(r["tokens"]) for r in json.loads(out)["results"]) - 2 <= counts["tokens"] <= 2 * 11
    per_row = counts["tokens"] / counts["rows"]
    assert err.strip().splitlines()[-1].endswith(f"speculation: {per_row:.2f} tokens a row per verify step (kept {counts['kept']} of {counts['proposed']} proposals)")
    code, out, err = run_in_process(monkeypatch, capsys, "generate", str(model_dir), prompts[1], "--max_tokens", "4", "--device", "cpu", "--json")
    assert "speculation" not in json.loads(out)["timings"] and "speculation" not in err
