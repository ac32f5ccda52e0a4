"""Issue 12: every input gets a clear answer, exit 2 and one line `error: ...`, or works.

Most runs are in-process on the shipped default model or a tiny random folder; a few
are subprocesses where only a real process shows the behaviour (a closed pipe).
"""

import errno
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from make_tiny_model import make_tiny_model
from safetensors.torch import load_file, save_file
from test_cli import run_in_process

import mistral
from helpers import tiny_args
from mistral import MistralError, ModelArgs, Transformer
from mistral.checkpoint import PARAMS, PTH, SAFETENSORS, write_folder
from mistral.quantize import quantize_folder

Run = tuple[int, str, str]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> Any:
    """cli(*args, stdin="") -> (exit code, stdout, stderr) of `mistral ARGS` run in-process."""

    def run(*args: str, stdin: Any = "") -> Run:  # text, or what sys.stdin is to be (None: closed)
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin) if isinstance(stdin, str) else stdin)
        return run_in_process(monkeypatch, capsys, *args)

    return run


def assert_error(result: Run, *fragments: str) -> None:
    code, out, err = result
    assert code == 2, (out, err)
    assert out == "" and "Traceback" not in err, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


@pytest.mark.parametrize(
    "args",
    [["generate", "def f():", "--expert_parallel"], ["generate", "def f():", "--num_pipeline_ranks", "2", "--expert_parallel"],
     ["serve", "--expert_parallel"]],
    ids=["generate", "pipeline", "serve"],
)  # fmt: skip
def test_expert_parallel_without_tensor_ranks_is_an_error_not_ignored(cli: Any, args: list[str]) -> None:
    assert_error(cli(*args), "--expert_parallel places whole experts on tensor ranks: give --num_tensor_ranks N")


def test_torchrun_around_a_single_process_command_is_an_error(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each of torchrun's 2 processes would run the whole command and print it all, interleaved."""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert_error(cli("generate", "def f():", "--max_tokens", "2"), "torchrun started 2 processes for a command of one")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process of torchrun: as good as none
    code, out, err = cli("generate", "def f():", "--max_tokens", "2")
    assert code == 0 and out.startswith("def f():"), err


def test_prompt_longer_than_a_file_name_runs(cli: Any) -> None:
    code, out, err = cli("generate", "word " * 52, "--max_tokens", "1")
    assert code == 0, err
    assert out.startswith("word word")


@pytest.mark.parametrize(
    "args, stdin, fragment",
    [
        (["generate", "def f():", "--max_token", "5"], "", "did you mean --max_tokens?"),
        (["chat", "--json"], "hi\n", "--json: no such option of `mistral chat`"),
        (["convert", "HF", "OUT", "--foo", "1"], "", "--foo: no such option of `mistral convert`"),
        (["chat", "a", "b"], "hi\n", "takes [MODEL_DIR], got 2"),
    ],
    ids=["generate", "chat", "convert", "chat-extra-argument"],
)
def test_unknown_options_fail_before_anything_runs(
    cli: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: list[str], stdin: str, fragment: str
) -> None:
    def no_work(*a: Any, **kw: Any) -> None:
        raise AssertionError("the command ran")

    monkeypatch.setattr("mistral.main.load", no_work)
    monkeypatch.setattr("mistral.main.convert_hf", no_work)
    monkeypatch.chdir(tmp_path)
    assert_error(cli(*args, stdin=stdin), fragment)
    assert not (tmp_path / "OUT").exists()


@pytest.mark.parametrize(
    "option, value, fragment",
    [
        ("temperature", "nan", "temperature must be >= 0 and finite, got 'nan'"),
        ("temperature", "inf", "temperature must be >= 0 and finite"),
        ("temperature", "1e999", "temperature must be >= 0 and finite, got inf"),
        ("top_p", "abc", "top_p must be in (0, 1], got 'abc'"),
        ("seed", str(10**30), "seed must be an integer"),
        ("max_tokens", "True", "max_tokens must be a non-negative integer"),
        ("device", str(2**63), "device must be cpu, cuda or cuda:N, got 9223372036854775808"),  # found by the fuzz below
        ("device", "meta", "device must be cpu, cuda or cuda:N, got 'meta'"),
        ("device", "mps", "device must be cpu, cuda or cuda:N, got 'mps'"),
        ("device", "xpu", "device must be cpu, cuda or cuda:N, got 'xpu'"),
        ("device", "cuda:200", "device must be cpu, cuda or cuda:N, got 'cuda:200'"),  # torch reads it as cuda:-56
        ("device", "200", "device must be cpu, cuda or cuda:N, got 'cuda:200'"),
    ],
)
def test_odd_option_values(cli: Any, option: str, value: str, fragment: str) -> None:
    assert_error(cli("generate", "hi", f"--{option}", value), fragment)


def test_non_utf8_prompt_and_chat_line(cli: Any) -> None:
    not_utf8 = b"caf\xe9".decode("utf-8", "surrogateescape")  # how Python hands such bytes over
    assert_error(cli("generate", not_utf8), "prompt 0 is not UTF-8 text")
    code, out, err = cli("chat", "--max_tokens", "2", stdin=f"hello\n{not_utf8}\n")
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == ["error: line 2 of the input is not UTF-8 text"]


@pytest.fixture(scope="module")
def windowless_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(str(tmp_path_factory.mktemp("windowless") / "model"), sliding_window=None)


def test_cache_larger_than_memory_says_what_fits(cli: Any, windowless_dir: Path) -> None:
    result = cli("generate", str(windowless_dir), "hi", "--max_tokens", str(10**12))
    assert_error(result, "the KV cache needs", "bytes free", "max_tokens=")
    fits = int(result[2].split("max_tokens=")[-1].split()[0])
    assert fits > 0


def test_the_kv_cache_leaves_room_for_the_rest_of_the_run(monkeypatch: pytest.MonkeyPatch, windowless_dir: Path) -> None:
    """A window-less cache may take 80% of the free memory, its CPU attention's copies counted: a run whose
    cache took all of it (max_tokens 10000000) was killed by the system without a word, exit 137."""
    model = Transformer.from_folder(windowless_dir)  # float32, on the CPU
    args, free = model.args, 10**8
    monkeypatch.setattr("mistral.cache.free_memory", lambda device: free)
    cache = 2 * args.n_layers * args.n_kv_heads * args.head_dim * 4  # keys and values of one position, every layer
    copies = 2 * args.n_heads * args.head_dim * 4  # one layer's, in float32, once for each query head
    fits = int(free * 0.8 // (cache + copies))
    model.make_cache(1, fits)
    with pytest.raises(MistralError, match=f"{fits:,} tokens per sequence fit"):
        model.make_cache(1, fits + 1)


def test_convert_file_errors(cli: Any, tmp_path: Path) -> None:
    (tmp_path / "a_file").write_text("x")
    args = tiny_args()
    state = Transformer(args).state_dict()
    with pytest.raises(MistralError, match="exists and is not a folder"):
        write_folder(tmp_path / "a_file", args, state)
    with pytest.raises(MistralError, match="cannot write"):  # as in a read-only place: root may write anywhere
        write_folder(tmp_path / "a_file" / "out", args, state)


def test_full_disk_leaves_no_half_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*a: Any, **kw: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mistral.checkpoint.write_safetensors", full)
    with pytest.raises(MistralError, match="out: cannot write \\(No space left on device\\)"):
        write_folder(tmp_path / "out", tiny_args(), Transformer(tiny_args()).state_dict())
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its temporary twin


def test_convert_onto_a_file_from_the_command_line(cli: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hf_reference import hf_model

    hf_model(moe=False).save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bar
    (tmp_path / "taken").write_text("x")
    assert_error(cli("convert", str(tmp_path / "hf"), str(tmp_path / "taken")), "taken: exists and is not a folder")


def test_convert_of_a_folder_without_a_tokenizer_says_what_to_copy(cli: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """save_pretrained writes no tokenizer file: the folder converts, and the user reads what generate and chat will miss."""
    from hf_reference import hf_model

    hf_model(moe=False).save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bar
    code, out, err = cli("convert", str(tmp_path / "hf"), str(tmp_path / "out"))
    assert (code, out) == (0, ""), err
    note = err.strip().splitlines()[-1]
    assert note.startswith(f"note: {tmp_path / 'hf'} holds no tokenizer file (tokenizer.model, ") and "tokenizer.model.v7m1" in note, err
    assert note.endswith(f"copy the model's own into {tmp_path / 'out'}, which generate and chat need"), err


@pytest.fixture
def copy_of(tmp_path: Path) -> Any:
    def copy(folder: Path) -> Path:
        return Path(shutil.copytree(folder, tmp_path / "copy"))

    return copy


def test_bad_params_json(cli: Any, copy_of: Any, windowless_dir: Path) -> None:
    folder = copy_of(windowless_dir)
    (folder / PARAMS).unlink()
    (folder / PARAMS).mkdir()
    assert_error(cli("generate", str(folder), "hi"), "params.json: cannot read")
    (folder / PARAMS).rmdir()
    (folder / PARAMS).write_bytes(b'{"dim": "\xff"}')
    assert_error(cli("generate", str(folder), "hi"), "params.json: not UTF-8 text")


def test_infinite_rope_theta_is_refused(cli: Any, copy_of: Any, windowless_dir: Path) -> None:
    folder = copy_of(windowless_dir)
    params = json.loads((folder / PARAMS).read_text())
    (folder / PARAMS).write_text(json.dumps({**params, "rope_theta": math.inf}))  # writes Infinity
    assert_error(cli("generate", str(folder), "hi"), "rope_theta must be a finite positive number, got inf")
    with pytest.raises(MistralError, match="ModelArgs.norm_eps must be a finite positive number"):
        ModelArgs(**{**params, "norm_eps": math.nan})


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_nan_weights_are_an_error(cli: Any, copy_of: Any, windowless_dir: Path, temperature: str) -> None:
    folder = copy_of(windowless_dir)
    state = load_file(str(folder / SAFETENSORS))
    state["norm.weight"] = torch.full_like(state["norm.weight"], math.nan)
    save_file(state, str(folder / SAFETENSORS))
    code, _, err = cli("generate", str(folder), "hi", "--json", "--temperature", temperature)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines() == ["error: the model's logits are not finite (NaN or inf): are its weights or params.json corrupt?"]


def test_max_tokens_zero_reports_no_speed(cli: Any) -> None:
    code, out, err = cli("generate", "hi", "--max_tokens", "0")
    assert code == 0, err
    assert "prefill: 0.00 s (0.0 tokens/s)" in err


def test_bare_value_option_is_an_error(cli: Any) -> None:
    assert_error(cli("generate", "hi", "--max_tokens"), "--max_tokens: the option needs a value")


def test_prompt_that_looks_like_a_flag(cli: Any) -> None:
    assert_error(cli("generate", "-x"), "a prompt that starts with '-' goes after '--'")
    code, out, err = cli("generate", "--max_tokens", "1", "--", "-x")
    assert code == 0, err
    assert out.startswith("-x")


def test_switch_does_not_swallow_the_prompt(cli: Any) -> None:
    code, out, err = cli("generate", "--json", "def f():", "--max_tokens", "1")
    assert code == 0, err
    assert json.loads(out)["results"][0]["prompt"] == "def f():"


class Interrupted(io.StringIO):
    def readline(self, size: Optional[int] = -1) -> str:
        raise KeyboardInterrupt


def test_ctrl_c_in_chat_is_quiet(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(prompt: str) -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr("builtins.input", interrupted)
    terminal = io.StringIO()
    terminal.isatty = lambda: True  # type: ignore[method-assign]
    for stdin in (terminal, Interrupted()):  # a line read by input() on a terminal, by readline from a pipe
        code, _, err = cli("chat", stdin=stdin)
        assert code == 130 and "Traceback" not in err


def test_an_endless_line_of_input_is_refused(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mistral chat < /dev/zero`: a line without end is not read into memory until the system kills the process."""
    monkeypatch.setattr("mistral.main.MAX_LINE", 100)  # of 2**20: a test prefills the longest line allowed
    code, out, err = cli("chat", "--max_tokens", "2", stdin="\0" * 250)  # had it no end, read in pieces it would chat on
    assert code == 2 and out == "", (out, err)
    assert err.strip().splitlines() == ["error: line 1 of the input is longer than 100 characters"]
    code, out, err = cli("chat", "--max_tokens", "2", stdin="x" * 100 + "\n")  # the longest line is read
    assert code == 0, err


def test_chat_on_a_windowed_model_runs_past_max_context(cli: Any) -> None:
    """max_context bounds a window-less model's cache only: the default model's rolling
    buffer (a window of 64) keeps its W slots and a turn longer than max_context runs."""
    code, out, err = cli("chat", "--max_context", "5", "--max_tokens", "4", stdin="hello there my friend, how are you today?\n")
    assert code == 0, err
    assert out.endswith("\n"), out  # the answer, ended by a newline


def test_chat_with_stdin_closed_ends(cli: Any) -> None:
    code, out, err = cli("chat", stdin=None)  # `mistral chat <&-`: no input, so no turn
    assert code == 0 and out == "", err


@pytest.mark.parametrize("args", [["generate", "hello", "--help"], ["generate", "hello", "--max_tokens", "3", "-h"], ["chat", "--help"]])
def test_help_after_other_arguments_shows_help_and_runs_nothing(cli: Any, args: list[str]) -> None:
    """fire would run `generate hello` and then show help on what it returned."""
    code, out, err = cli(*args)
    assert code == 0, err
    assert out.startswith(f"NAME\n    mistral {args[0]} - ") and "--max_tokens" in out, (out, err)
    assert err == "", err  # no model ran, and no "INFO: Showing help with the command ..." line


@pytest.mark.parametrize("importing", ["torch._C", "torch.nn", "mistral.model"])  # inside torch's imports, and ours
def test_ctrl_c_during_start_up_is_quiet(importing: str) -> None:
    """SIGINT while the package and torch import (the first second or two of a run): no traceback.
    The signal goes once Python reports that module imported (-X importtime), not at a fixed time,
    which on a busy machine may come before the package's handler or after the imports. The
    report's pipe holds one page, so that the process, blocked on it, is still importing when the
    signal comes: with the default 64 KB a busy reader fell so far behind that the imports were
    done, and a handler left out went unseen."""
    import fcntl
    import signal

    read_end, write_end = os.pipe()
    if hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux; before anything is in it (a smaller size than its content fails)
        fcntl.fcntl(write_end, fcntl.F_SETPIPE_SZ, 4096)
    process = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "mistral", "generate", "def f():", "--max_tokens", "2", "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=write_end,
    )  # fmt: skip
    os.close(write_end)
    with open(read_end) as stderr:
        while (line := stderr.readline()) and line.split("|")[-1].strip() != importing:
            pass
        assert line, f"{importing} was never imported"
        process.send_signal(signal.SIGINT)
        err = stderr.read()
    process.wait(timeout=60)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert process.returncode in (130, -signal.SIGINT, 0), (process.returncode, err[-2000:])  # stopped, or already done


def test_closed_pipe_is_quiet() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "mistral", "generate", "def f():", "--max_tokens", "200", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.read(1)  # as `| head -c 1` does
    process.stdout.close()
    err = process.stderr.read().decode()
    assert process.wait(timeout=120) == 1
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


def test_help_names_the_types() -> None:
    result = subprocess.run([sys.executable, "-m", "mistral", "generate", "--help"], capture_output=True, text=True,
                            env={**os.environ, "PAGER": "cat"}, timeout=120)
    code, out = result.returncode, result.stdout + result.stderr  # fire writes help to stderr when not a tty
    assert code == 0
    assert "Optional[int]" in out and "Optional[Optional" not in out and "| None]" not in out


def test_generate_and_stream_at_the_top_level() -> None:
    assert callable(mistral.generate) and callable(mistral.stream)
    from mistral import generate

    assert generate.__module__ == "mistral.generation"


# The command line, fuzzed: whatever the options, exit 0 or 2, never a traceback, and
# nothing generated before an error.
OPTIONS = ["max_tokens", "temperature", "top_p", "seed", "chunk_size", "device", "dtype", "json", "micro_batches",
           "num_pipeline_ranks", "max_context", "nope", "max-tokens", "x", "t"]
VALUES = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "nan", "-inf", "1e999", "True", "None", "[1]", "{}", "'2'", "cpu", "cuda", "float16", "--"]),
    st.text(max_size=8),
    st.binary(min_size=1, max_size=4).map(lambda b: b.decode("utf-8", "surrogateescape")),
)


def small_max_tokens(args: list[str]) -> bool:
    """Keeps the runs short: a numeric max_tokens above 2 would generate for long."""
    for i, a in enumerate(args):
        if a.replace("-", "_").lstrip("_").startswith("max_tokens") and i + 1 < len(args):
            try:
                if float(args[i + 1]) > 2:
                    return False
            except ValueError:
                pass
    return True


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    command=st.sampled_from(["generate", "chat"]),
    options=st.lists(st.tuples(st.sampled_from(OPTIONS), VALUES, st.booleans()), max_size=3),
)
def test_fuzzed_command_line(cli: Any, command: str, options: list[tuple[str, str, bool]]) -> None:
    args = [command] + (["def f():"] if command == "generate" else []) + ["--max_tokens", "2"]
    for name, value, equals in options:
        args += [f"--{name}={value}"] if equals else [f"--{name}", value]
    if not small_max_tokens(args):
        return
    code, out, err = cli(*args, stdin="hello\n")
    assert code in (0, 2), (args, err)
    assert "Traceback" not in err, (args, err)
    if code == 2:
        assert out == "", (args, out)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)


def test_writing_a_folder_refuses_one_that_holds_files(cli: Any, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """quantize and convert into a folder with files would merge two models (two tokenizers):
    refused, the folder left as it was; convert into its own source folder too."""
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert_error(cli("quantize", str(mistral.DEFAULT_MODEL), str(tmp_path / "taken")), "taken", "already holds files")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]
    from hf_reference import hf_model

    hf_model(moe=False).save_pretrained(tmp_path / "hf")
    capsys.readouterr()  # save_pretrained's progress bar
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert_error(cli("convert", str(tmp_path / "hf"), str(tmp_path / "hf")), "another folder")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before


def test_a_written_folder_is_readable_by_others(tmp_path: Path) -> None:
    """Every file of a written model folder gets the mode a plainly written file gets (safetensors' own is 0600)."""
    Transformer(tiny_args()).save(tmp_path / "out")
    mask = os.umask(0)
    os.umask(mask)
    assert {f.name: f.stat().st_mode & 0o777 for f in (tmp_path / "out").iterdir()} == {
        PARAMS: 0o666 & ~mask, SAFETENSORS: 0o666 & ~mask
    }


def test_quantize_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A file-size limit (what a full disk does to a write) in the middle of consolidated.safetensors:
    one line, exit 2, and neither the folder nor a temporary one, the tokenizer copied inside it or not at all."""
    code = (
        "import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000)); "
        f"sys.argv = ['mistral', 'quantize', {str(mistral.DEFAULT_MODEL)!r}, {str(tmp_path / 'out')!r}]; "
        "from mistral.main import main; main()"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    # The progress line of a read that took over a second (a busy machine) may come first.
    err = "".join(line for line in run.stderr.splitlines(keepends=True) if not line.startswith("loading "))
    assert_error((run.returncode, run.stdout, err), "out: cannot write")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_while_writing_leaves_no_temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM ends the command through its `finally`s (main's handler): the half-written temporary folder goes."""
    import signal

    from mistral import checkpoint
    from mistral.main import _terminate

    real_save = checkpoint.write_safetensors

    def save_then_terminated(path: Path, stream: checkpoint.TensorStream) -> None:
        real_save(path, stream)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives while the folder is still the temporary one

    previous = signal.signal(signal.SIGTERM, _terminate)
    monkeypatch.setattr(checkpoint, "write_safetensors", save_then_terminated)
    try:
        with pytest.raises(SystemExit) as stopped:
            write_folder(tmp_path / "out", tiny_args(), Transformer(tiny_args()).state_dict())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU machine's answer: no GPU for device 0")
def test_device_0_is_the_first_gpu_not_the_default(cli: Any) -> None:
    """fire hands --device 0 over as the int 0, which is the first GPU, as --device 1 is the second."""
    assert_error(cli("generate", "hi", "--device", "0"), "device 'cuda:0': no CUDA GPU is available")


def test_top_p_at_temperature_0_is_said_to_do_nothing(cli: Any) -> None:
    code, out, err = cli("generate", "def f():", "--max_tokens", "2", "--top_p", "0.5", "--device", "cpu")
    assert code == 0 and "note: --top_p has no effect at --temperature 0" in err
    code, out, err = cli("chat", "--temperature", "0", "--top_p", "0.5", "--max_tokens", "2", stdin="hi\n")
    assert code == 0 and "note: --top_p has no effect at --temperature 0" in err
    code, out, err = cli("chat", "--temperature", "0", "--max_tokens", "2", stdin="hi\n")  # chat's own top_p, not given
    assert code == 0 and "note" not in err


@pytest.fixture(scope="module")
def default_model() -> Transformer:
    return Transformer.from_folder(mistral.DEFAULT_MODEL)


@pytest.mark.parametrize(
    "prompts, options, fragment",
    [
        ("hello", {}, "encoded_prompts is a str: encode the text first"),
        (torch.tensor([[1, 2, 3]]), {}, "encoded_prompts must be a list of prompts, each a list of token ids, got Tensor (.tolist()"),
        ([[1.0, 2.0]], {}, "prompt 0 holds 1.0 (float), which is not a token id"),
        ([["a"]], {}, "prompt 0 holds 'a' (str)"),
        ([[1, None]], {}, "prompt 0 holds None"),
        ([[True, 2]], {}, "prompt 0 holds True (bool)"),
        ([7], {}, "prompt 0 must be a list of token ids (ints), got int"),
        ([[1, 2]], {"eos_id": "x"}, "eos_id must be a token id (an int) or None, got 'x'"),
    ],
    ids=["str", "2-D tensor", "floats", "strs", "None", "bools", "flat", "eos_id"],
)
def test_api_arguments_are_named_in_mistral_errors(default_model: Transformer, prompts: Any, options: dict, fragment: str) -> None:
    with pytest.raises(MistralError, match=re.escape(fragment)):
        mistral.generate(prompts, default_model, max_tokens=2, **options)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64])
def test_a_model_in_another_dtype_is_named(dtype: torch.dtype) -> None:
    model = Transformer.from_folder(mistral.DEFAULT_MODEL).to(dtype)
    with pytest.raises(MistralError, match=re.escape(f"the model's weights are {dtype}")):
        mistral.generate([[1, 2]], model, max_tokens=2)


def test_forward_and_decode_name_bad_ids(default_model: Transformer) -> None:
    V = default_model.args.vocab_size
    with pytest.raises(MistralError, match=re.escape(f"outside the vocabulary 0..{V - 1}")):
        default_model(torch.tensor([1, V]), [2])
    with pytest.raises(MistralError, match="sum\\(seqlens\\)=3"):
        default_model(torch.tensor([1, 2]), [1, 2])
    with pytest.raises(MistralError, match="seqlens must be a list of token counts"):
        default_model(torch.tensor([1, 2]), [2.0])
    with pytest.raises(MistralError, match="integer token ids, got torch.float32"):
        default_model(torch.tensor([1.0, 2.0]), [2])
    tokenizer = mistral.tokenizer.load_tokenizer(mistral.DEFAULT_MODEL)
    with pytest.raises(MistralError, match=re.escape(f"decode: {V} is not a token id of this vocabulary")):
        tokenizer.decode([1, V])


@pytest.mark.parametrize(
    "change, fragment",
    [
        (dict(n_layers=1_000_000), "holds 4 layers, but params.json says n_layers=1000000"),
        (dict(vocab_size=10**12), "tok_embeddings.weight is [4096, 192], params.json implies [1000000000000, 192]"),
        (dict(dim=10**9, head_dim=10**9 // 6), "tok_embeddings.weight is [4096, 192]"),
        (dict(moe=dict(num_experts=10**6, num_experts_per_tok=2)), "gate.weight is [4, 192], params.json implies [1000000, 192]"),
    ],
    ids=["layers", "vocab", "dim", "experts"],
)
@pytest.mark.parametrize("weights", [SAFETENSORS, PTH])
def test_params_json_that_does_not_match_the_file_fails_at_once(tmp_path: Path, change: dict, fragment: str, weights: str) -> None:
    """Checked against the weights file's names and shapes before anything is allocated (n_layers: 1000000
    ran for minutes), by generate and quantize alike, in a .pth as in a safetensors file."""
    folder = tmp_path / "model"
    shutil.copytree(mistral.DEFAULT_MODEL, folder)
    if weights == PTH:
        torch.save(load_file(str(folder / SAFETENSORS)), folder / PTH)
        (folder / SAFETENSORS).unlink()
    params = json.loads((folder / PARAMS).read_text())
    (folder / PARAMS).write_text(json.dumps(params | change))
    with pytest.raises(MistralError, match=re.escape(fragment)):
        Transformer.from_folder(folder)
    with pytest.raises(MistralError, match=re.escape(fragment)):
        quantize_folder(folder, tmp_path / "out")


@pytest.mark.parametrize(
    "content, fragment",
    [
        ([1, 2], "expected a dict of tensors, got list"),
        ({"norm.weight": [1.0] * 192}, "expected a dict of tensors, found ['Tensor', 'list']"),
        ({5: torch.zeros(1)}, "expected tensors by name, found the key 5"),
    ],
    ids=["list", "a list among the tensors", "a key that is no name"],
)
def test_a_pth_that_is_not_tensors_by_name_is_one_error(tmp_path: Path, content: Any, fragment: str) -> None:
    """A consolidated.00.pth holding something else is named, by generate and by quantize (a traceback, was)."""
    folder = tmp_path / "model"
    shutil.copytree(mistral.DEFAULT_MODEL, folder)
    state = load_file(str(folder / SAFETENSORS))
    (folder / SAFETENSORS).unlink()
    torch.save(content if isinstance(content, list) else state | content, folder / PTH)
    with pytest.raises(MistralError, match=re.escape(f"{PTH}: {fragment}")):
        Transformer.from_folder(folder)
    with pytest.raises(MistralError, match=re.escape(f"{PTH}: {fragment}")):
        quantize_folder(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", [b"", b"\x05", b"garbage!" * 4, (2**62).to_bytes(8, "little") + b"{}"])
def test_a_weights_file_that_is_not_safetensors_is_one_error(tmp_path: Path, content: bytes) -> None:
    folder = tmp_path / "model"
    shutil.copytree(mistral.DEFAULT_MODEL, folder)
    (folder / SAFETENSORS).write_bytes(content)
    with pytest.raises(MistralError, match="unreadable safetensors file"):
        Transformer.from_folder(folder)


ODD_VALUES = st.one_of(
    st.integers(-(10**3), 10**3), st.integers(10**4, 10**7), st.integers(10**12, 10**30), st.just(10**400), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=5), st.lists(st.integers(0, 3), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2),
)  # fmt: skip


@given(changes=st.dictionaries(st.sampled_from(sorted(json.loads((mistral.DEFAULT_MODEL / PARAMS).read_text()))), ODD_VALUES,
                               max_size=3),
       moe=st.dictionaries(st.sampled_from(["num_experts", "num_experts_per_tok"]), ODD_VALUES, max_size=2))  # fmt: skip
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_fuzzed_params_json_loads_or_names_the_problem(tmp_path_factory: pytest.TempPathFactory, changes: dict, moe: dict) -> None:
    """Whatever values params.json holds (the default model's moe section's too), from_folder loads the model
    and quantize writes it, or each raises one MistralError, nothing else."""
    folder = tmp_path_factory.mktemp("fuzz") / "model"
    shutil.copytree(mistral.DEFAULT_MODEL, folder)
    params = json.loads((folder / PARAMS).read_text())
    params = params | {"moe": params["moe"] | moe} | changes
    (folder / PARAMS).write_text(json.dumps(params))
    for load in (lambda: Transformer.from_folder(folder), lambda: quantize_folder(folder, folder.parent / "int8")):
        try:
            load()
        except MistralError as e:
            assert "\n" not in str(e) and len(str(e)) < 2000


@pytest.mark.parametrize(
    "text, fragment",
    [
        (None, "rope_theta must be a finite positive number, got 10000000000"),  # 1 and 400 zeros
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
    ids=["integer past float", "deep"],
)
def test_params_json_that_python_cannot_hold(tmp_path: Path, text: Optional[str], fragment: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(mistral.DEFAULT_MODEL, folder)
    if text is None:
        text = (folder / PARAMS).read_text().replace('"rope_theta": 10000.0', '"rope_theta": 1' + "0" * 400)
    (folder / PARAMS).write_text(text)
    with pytest.raises(MistralError, match=re.escape(fragment)):
        Transformer.from_folder(folder)


@pytest.mark.parametrize("content", ['{"config": 5, "vocab": "x"}', "[1, 2", "\x00garbage"])
def test_a_garbage_tekken_json_is_one_error(tmp_path: Path, content: str) -> None:
    folder = tmp_path / "model"
    shutil.copytree(mistral.DEFAULT_MODEL, folder)
    (folder / "tokenizer.model").unlink()
    (folder / "tekken.json").write_text(content)
    with pytest.raises(MistralError, match="tekken.json: unreadable tokenizer"):
        mistral.tokenizer.load_tokenizer(folder)


def test_hf_architectures_of_another_shape_is_named() -> None:
    from mistral.hf import args_from_hf_config

    with pytest.raises(MistralError, match="'architectures' must be a list of names"):
        args_from_hf_config({"architectures": {"MistralForCausalLM": 1}})


def test_an_error_of_the_model_s_own_is_not_called_a_lack_of_memory() -> None:
    with pytest.raises(MistralError, match="^attention_backend must be one of"):
        Transformer.from_folder(mistral.DEFAULT_MODEL, attention_backend="bogus")


def test_more_api_arguments_are_named(default_model: Transformer) -> None:
    """Found by trying the API as a new user would: each a MistralError naming the argument."""
    tokenizer = mistral.tokenizer.load_tokenizer(mistral.DEFAULT_MODEL)
    cases = [
        (lambda: mistral.generate([[1, 2]], "model", max_tokens=2), "model must be a mistral Transformer, got str"),
        (lambda: list(mistral.stream([[1, 2]], default_model, max_tokens=2, cache="x")), "cache must be a RotatingBufferCache"),
        (lambda: tokenizer.decode([None]), "decode: None is not a token id"),
        (lambda: tokenizer.decode(5), "decode takes a list of token ids, got int"),
        (lambda: tokenizer.encode(None), "must be a str, got NoneType"),
        (lambda: tokenizer.encode(b"abc"), "must be a str, got bytes"),
        (lambda: Transformer.from_folder(5), "a model folder is a path (str or Path), got int"),
        (lambda: mistral.Tokenizer(None), "a tokenizer file is a path (str or Path), got NoneType"),
        (lambda: default_model(torch.tensor([], dtype=torch.long), []), "seqlens add up to no tokens"),
        (lambda: default_model(torch.tensor([1, 2]), [2], cache="x"), "cache must be a RotatingBufferCache"),
        (lambda: mistral.generate([[1, 2]], default_model, max_tokens=2, eos_id=4096), "eos_id=4096 is outside the vocabulary 0..4095"),
        (lambda: mistral.generate([[1, 2]], default_model, max_tokens=2, eos_id=-1), "eos_id=-1 is outside the vocabulary"),
        (lambda: Transformer.from_folder(mistral.DEFAULT_MODEL, device="meta"), "device must be cpu, cuda or cuda:N, got 'meta'"),
        (lambda: Transformer.from_folder(mistral.DEFAULT_MODEL, device="xpu"), "device must be cpu, cuda or cuda:N, got 'xpu'"),
        (lambda: Transformer.from_folder(mistral.DEFAULT_MODEL, dtype=torch.int8), "dtype must be a floating-point torch.dtype"),
        (lambda: Transformer.from_folder(mistral.DEFAULT_MODEL, dtype="float16"), "got 'float16'"),
        (lambda: Transformer(None), "args must be a ModelArgs"),
    ]
    for call, fragment in cases:
        with pytest.raises(MistralError, match=re.escape(fragment)):
            call()


def test_an_unwritable_output_is_one_line() -> None:
    """A full disk behind stdout, or stdout closed: one line, not a traceback."""
    for redirect in (">/dev/full", ">&-"):
        run = subprocess.run(["bash", "-c", f"{sys.executable} -m mistral generate 'def f():' --max_tokens 3 --device cpu {redirect}"],
                             stderr=subprocess.PIPE, text=True, timeout=120)  # fmt: skip
        lines = [line for line in run.stderr.splitlines() if not line.startswith("prompt tokens:")]
        assert run.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (redirect, run.stderr)


def test_a_sigterm_leaves_a_written_folder_whole_or_absent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The temporary folder is renamed into place at once: SIGTERM between two files cannot leave params.json alone."""
    import signal

    from mistral import checkpoint
    from mistral.main import _terminate

    real_copy = checkpoint.shutil.copyfile

    def copy_then_terminated(src: Any, dst: Any) -> Any:
        out = real_copy(src, dst)
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    previous = signal.signal(signal.SIGTERM, _terminate)
    monkeypatch.setattr(checkpoint.shutil, "copyfile", copy_then_terminated)
    try:
        with pytest.raises(SystemExit):
            write_folder(tmp_path / "out", tiny_args(), Transformer(tiny_args()).state_dict(), tokenizers=[mistral.DEFAULT_MODEL / "tokenizer.model"])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert list(tmp_path.iterdir()) == []


API_VALUES = st.one_of(
    st.integers(-5, 70), st.integers(10**12, 10**30), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.text(max_size=3), st.lists(st.integers(-2, 5000), max_size=3), st.just(torch.tensor([1, 2])),
)  # fmt: skip
PROMPTS = st.one_of(
    st.lists(st.lists(st.integers(-2, 5000), max_size=4), max_size=3),
    st.lists(st.lists(st.one_of(st.integers(0, 100), st.floats(), st.booleans(), st.none(), st.text(max_size=2)), max_size=3), max_size=2),
    API_VALUES,
)


@given(prompts=PROMPTS, options=st.dictionaries(
    st.sampled_from(["max_tokens", "temperature", "top_p", "chunk_size", "eos_id", "seed", "micro_batches", "compile", "cuda_graphs"]),
    API_VALUES, max_size=3,
))  # fmt: skip
@settings(max_examples=80, deadline=None)
def test_fuzzed_python_api_runs_or_names_the_problem(default_model: Transformer, prompts: Any, options: dict) -> None:
    """generate() with any arguments: it returns, or raises one one-line MistralError; never another exception."""
    options.setdefault("max_tokens", 2)
    if isinstance(options["max_tokens"], int) and options["max_tokens"] > 8:
        options["max_tokens"] = 8  # a test's time, not a bad value
    if options.get("compile") is True:
        options["compile"] = False  # the CPU compiles for seconds; compiled blocks have their own test
    try:
        tokens, logprobs = mistral.generate(prompts, default_model, **options)
    except MistralError as e:
        assert "\n" not in str(e), str(e)
        return
    assert len(tokens) == len(logprobs) == len(prompts)


def without_root_s_reading(command: list[str]) -> list[str]:
    """command, run without root's right to read any file (a plain user has none to drop)."""
    if os.geteuid() != 0:
        return command
    if shutil.which("setpriv") is None:
        pytest.skip("root reads every file, and no setpriv here takes that right away")
    drop = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={drop}", f"--inh-caps={drop}", "--", *command]


@pytest.mark.parametrize("case", ["weights", "folder", "quantize", "convert", "lora", "convert into"])
def test_what_may_not_be_read_is_named(tmp_path: Path, case: str) -> None:
    """A file or folder without read permission: one line naming it. safetensors calls such a file
    "No such file or directory", and an unreadable folder's OSError read as "cannot write the output"."""
    model, hf, out = tmp_path / "model", tmp_path / "hf", tmp_path / "out"
    shutil.copytree(mistral.DEFAULT_MODEL, model)
    params = json.loads((model / PARAMS).read_text())
    (model / PARAMS).write_text(json.dumps(params | {"lora": {"rank": 2, "scaling": 1.0}}))
    save_file({}, str(model / "lora.safetensors"))
    weights, adapter, hf_weights = model / SAFETENSORS, model / "lora.safetensors", hf / "model.safetensors"
    generate = ["generate", str(model), "hi", "--max_tokens", "2"]
    args, closed, fragment = {
        "weights": (generate, weights, f"{weights}: cannot read (Permission denied)"),
        "folder": (generate, model, f"{model}/"),
        "quantize": (["quantize", str(model), str(out)], weights, f"{weights}: cannot read (Permission denied)"),
        "convert": (["convert", str(hf), str(out)], hf_weights, f"{hf_weights}: cannot read (Permission denied)"),
        "lora": (generate + ["--lora", str(adapter)], adapter, f"{adapter}: cannot read (Permission denied)"),
        "convert into": (["convert", str(hf), str(out)], out, f"{out}: cannot write (Permission denied)"),
    }[case]
    if case.startswith("convert"):
        from hf_reference import hf_model

        hf_model(moe=False).save_pretrained(hf)
    if case == "convert into":
        out.mkdir()
    closed.chmod(0)
    try:
        run = subprocess.run(without_root_s_reading([sys.executable, "-m", "mistral", *args]),
                             capture_output=True, text=True, timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})  # fmt: skip
    finally:
        closed.chmod(0o755)
    assert_error((run.returncode, run.stdout, run.stderr), fragment, "Permission denied")
    assert not out.exists() or case == "convert into"


def test_progress_into_a_log_is_its_last_line_only(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where stderr is no terminal (a log, a pipe), a long load's progress is not a line rewritten
    in place, which a log would hold as one line of every update run together: the last only."""
    from mistral.main import LoadProgress

    def shown_at_once(self: LoadProgress, folder: Path, after_s: float = 1.0) -> None:
        real_init(self, folder, after_s=0.0)
        self.start = self.last = -math.inf  # every tensor read would be shown, however fast

    real_init = LoadProgress.__init__
    monkeypatch.setattr(LoadProgress, "__init__", shown_at_once)
    code, out, err = cli("quantize", str(mistral.DEFAULT_MODEL), str(tmp_path / "out"))
    progress = [line for line in err.split("\n") if "loading " in line]
    assert code == 0 and len(progress) == 1 and progress[0].count("loading ") == 1, err
    n = len(load_file(str(mistral.DEFAULT_MODEL / SAFETENSORS)))
    assert f": {n}/{n} tensors" in progress[0]


def test_an_error_while_loading_starts_a_line_of_its_own(cli: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed read of a large checkpoint ends the progress line it showed (the error was written on at its end)."""
    from mistral.main import LoadProgress

    def shown_at_once(self: LoadProgress, folder: Path, after_s: float = 1.0) -> None:
        real_init(self, folder, after_s=0.0)
        self.start = self.last = -math.inf  # the first tensor read is shown, however fast
        self.live = True  # as on a terminal (the test's stderr is not one)

    real_init = LoadProgress.__init__
    monkeypatch.setattr(LoadProgress, "__init__", shown_at_once)
    src = tmp_path / "src"
    shutil.copytree(mistral.DEFAULT_MODEL, src)
    state = load_file(str(src / SAFETENSORS))
    state["output.weight"] = torch.full_like(state["output.weight"], math.nan)  # read after most others
    save_file(state, str(src / SAFETENSORS))
    code, out, err = cli("quantize", str(src), str(tmp_path / "out"))
    lines = err.split("\n")
    assert (code, out) == (2, "") and len(lines) == 3 and lines[-3].startswith("\rloading "), err
    assert lines[-2].startswith("error: ") and "output.weight holds values that are not finite" in lines[-2], err
