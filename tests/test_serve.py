"""`mistral serve` as clients meet it: the official `openai` client against a server the
test starts on a free port of 127.0.0.1, with the default model on the CPU.

Every greedy answer must be the text generate() gives for the same request alone,
whatever else the server runs beside it (generate() runs on the same engine: these tests
check the server around it; tests/test_engine.py holds the engine to whole forwards); bad requests get an OpenAI error body and a
4xx status; a client that leaves frees its row; SIGTERM ends the server cleanly.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Optional

import openai
import pytest

from mistral import DEFAULT_MODEL, Transformer
from mistral.generation import generate
from mistral.openai_api import Choice, token_text
from mistral.tokenizer import MistralCommonTokenizer
from mistral.text import Completion
from mistral.tokenizer import load_tokenizer

MODEL = "default_model"  # the folder's name
TOKENIZER = load_tokenizer(DEFAULT_MODEL)


class Served:
    """A `mistral serve` process and its address."""

    def __init__(self, *options: str):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, "-m", "mistral", "serve", "--port", "0", *options]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        assert self.process.stderr is not None
        lines: list[str] = []
        while not (found := re.search(r"on (http://\S+) \(", lines[-1] if lines else "")):  # where it listens, once it does
            lines.append(self.process.stderr.readline())
            assert lines[-1], "".join(lines)  # it ended before
        self.url = found.group(1)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=120)

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as answer:
            return json.load(answer)

    def post(self, path: str, body: bytes, method: str = "POST") -> tuple[int, Any]:
        request = urllib.request.Request(f"{self.url}{path}", data=body, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                return answer.status, json.load(answer)
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def stop(self) -> tuple[int, str]:
        """SIGTERM; the exit code and what it wrote on stderr."""
        self.process.send_signal(signal.SIGTERM)
        try:
            _, err = self.process.communicate(timeout=60)
        finally:
            self.process.kill()
        return self.process.returncode, err


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    server = Served("--max_batch", "8", "--max_queue", "64")
    yield server
    code, err = server.stop()
    assert "Traceback" not in err, err


@pytest.fixture(scope="module")
def model() -> Transformer:
    return Transformer.from_folder(DEFAULT_MODEL)


def expected(model: Transformer, prompt: list[int], max_tokens: int, **options: Any) -> tuple[str, int]:
    """generate()'s answer for one prompt alone: its text (as the server decodes it) and its length in tokens."""
    (tokens,), _ = generate([prompt], model, max_tokens=max_tokens, eos_id=TOKENIZER.eos_id, **options)
    completion = Completion(TOKENIZER, prompt)
    completion.tokens = tokens
    return completion.text, len(tokens)


PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n",
    "class Path:",
    "    for i in range(len(items)):\n",
    "# The standard library\n" * 12,  # about 100 tokens: longer than the window (64), read in chunks
    "x = [",
    "def main():\n    parser = argparse.ArgumentParser()\n",
    "    return",
]


def test_whole_and_streamed_completions_are_generates(served: Served, model: Transformer) -> None:
    for prompt in PROMPTS[:3]:
        text, n = expected(model, TOKENIZER.encode(prompt, bos=True), 24)
        whole = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert whole.choices[0].text == text and whole.usage.completion_tokens == n, prompt
        assert whole.choices[0].finish_reason == ("length" if n == 24 else "stop")
        chunks = list(served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == text
        assert len(chunks) > 3 and chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_answers_in_the_folders_format(served: Served, model: Transformer) -> None:
    messages = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "def square(x):"}]
    text, n = expected(model, TOKENIZER.encode_chat(messages), 20)
    whole = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)  # type: ignore[arg-type]
    assert whole.choices[0].message.content == text and whole.choices[0].message.role == "assistant"
    assert whole.usage is not None and whole.usage.prompt_tokens == len(TOKENIZER.encode_chat(messages))
    stream = served.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0, stream=True,  # type: ignore[arg-type]
                                                   stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].usage.completion_tokens == n  # type: ignore[union-attr]
    assert all("usage" in c.model_fields_set and c.usage is None for c in chunks[:-1])  # null before the last, as OpenAI's


def test_32_clients_at_once_each_get_what_they_get_alone(served: Served, model: Transformer) -> None:
    """32 clients with different prompts, lengths and max_tokens, half of them streaming, on 8
    rows: requests wait, join and leave between forward calls, prompts are read beside the
    rows that decode, and each greedy answer is generate()'s for that request alone."""
    jobs = [(PROMPTS[i % len(PROMPTS)] + "    " * (i // len(PROMPTS)), 4 + (7 * i) % 29, i % 2 == 0) for i in range(32)]

    def ask(job: tuple[str, int, bool]) -> str:
        prompt, max_tokens, stream = job
        if stream:
            chunks = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)
        return served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=max_tokens, temperature=0).choices[0].text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs))
    for (prompt, max_tokens, _), answer in zip(jobs, answers):
        assert answer == expected(model, TOKENIZER.encode(prompt, bos=True), max_tokens)[0], (prompt, max_tokens)


def test_a_seeded_sampled_request_is_the_same_alone_and_in_a_crowd(served: Served, model: Transformer) -> None:
    options = dict(temperature=0.9, top_p=0.95, seed=7)
    prompt = "def parse(text):"
    text, _ = expected(model, TOKENIZER.encode(prompt, bos=True), 30, **options)  # type: ignore[arg-type]
    alone = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, **options).choices[0].text  # type: ignore[arg-type]

    def other(i: int) -> str:
        return served.client.completions.create(model=MODEL, prompt=PROMPTS[i % 8], max_tokens=20 + i, temperature=1.0, seed=i).choices[0].text

    with ThreadPoolExecutor(12) as pool:
        crowd = [pool.submit(other, i) for i in range(6)]
        ours = pool.submit(lambda: served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=30, **options).choices[0].text)  # type: ignore[arg-type]
        crowd += [pool.submit(other, i) for i in range(6, 11)]
        assert ours.result() == alone == text
        assert len({c.result() for c in crowd}) > 1  # the others sampled answers of their own


def test_n_choices_and_a_list_of_prompts(served: Served, model: Transformer) -> None:
    answer = served.client.completions.create(model=MODEL, prompt=["import re\n", "class A:"], max_tokens=8, temperature=0, n=2)
    texts = [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    first, second = (expected(model, TOKENIZER.encode(p, bos=True), 8)[0] for p in ("import re\n", "class A:"))
    assert texts == [first, first, second, second]


def test_stop_strings_cut_the_text_where_they_start(served: Served, model: Transformer) -> None:
    prompt = "def fibonacci(n):"
    text, _ = expected(model, TOKENIZER.encode(prompt, bos=True), 40)
    stop = text[10:14]  # four characters from inside the greedy answer
    cut = text[: text.index(stop)]
    whole = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "never seen"])
    assert whole.choices[0].text == cut and whole.choices[0].finish_reason == "stop"
    chunks = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in chunks) == cut


def test_a_choice_that_stops_early_leaves_the_others_running(served: Served, model: Transformer) -> None:
    """A stop string ends one choice while the others run on: the engine's steps for it that
    were on their way are dropped (they failed the request with a 500), whole and streamed."""
    prompts = ["def fibonacci(n):", "import re\n"]
    texts = [expected(model, TOKENIZER.encode(p, bos=True), 30)[0] for p in prompts]
    stop = next(texts[0][i : i + 3] for i in range(3, len(texts[0]) - 3) if texts[0][i : i + 3] not in texts[1])  # early in one alone
    cut = texts[0][: texts[0].index(stop)]
    request = {"model": MODEL, "prompt": prompts, "max_tokens": 30, "temperature": 0, "n": 2, "stop": stop}
    code, answer = served.post("/v1/completions", json.dumps(request).encode())
    assert code == 200, answer
    assert [c["text"] for c in sorted(answer["choices"], key=lambda c: c["index"])] == [cut, cut, texts[1], texts[1]]
    chunks = list(served.client.completions.create(**request, stream=True))  # type: ignore[call-overload]
    assert {i: "".join(c.text for ch in chunks for c in ch.choices if c.index == i) for i in range(4)} == {0: cut, 1: cut, 2: texts[1], 3: texts[1]}
    # Sampled choices that stop at different steps (a 500 in most tries before).
    code, answer = served.post("/v1/completions", json.dumps({"model": MODEL, "prompt": "def f(x):", "max_tokens": 200, "n": 8, "seed": 0,
                                                               "stop": ["return"]}).encode())  # fmt: skip
    assert code == 200, answer
    assert len(answer["choices"]) == 8 and all("return" not in c["text"] for c in answer["choices"])


def test_logprobs_are_the_models(served: Served, model: Transformer) -> None:
    prompt = "import os\n"
    ids = TOKENIZER.encode(prompt, bos=True)
    (tokens,), (logprobs,) = generate([ids], model, max_tokens=6)
    answer = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3)
    got = answer.choices[0].logprobs
    assert got is not None and got.token_logprobs == pytest.approx(logprobs, abs=1e-4)
    assert all(len(top) <= 3 and max(top.values()) == pytest.approx(lp, abs=1e-4) for top, lp in zip(got.top_logprobs, logprobs))  # type: ignore[union-attr]
    chat = served.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                                 temperature=0, logprobs=True, top_logprobs=2)  # fmt: skip
    content = chat.choices[0].logprobs.content  # type: ignore[union-attr]
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)


def test_neutral_values_and_nulls_are_taken_as_openai_takes_them(served: Served, model: Transformer) -> None:
    """A logit_bias of zeros changes nothing and is taken; a null is a field not given
    (max_completion_tokens beside max_tokens); top_p 0 is greedy."""
    want = expected(model, TOKENIZER.encode("x", bos=True), 3)[0]
    code, answer = served.post("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 3, "temperature": 0,
                                                               "logit_bias": {"50": 0, "7": 0.0}}).encode())  # fmt: skip
    assert code == 200 and answer["choices"][0]["text"] == want
    code, answer = served.post("/v1/chat/completions", json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                                                   "max_tokens": 2, "max_completion_tokens": None}).encode())  # fmt: skip
    assert code == 200 and answer["usage"]["completion_tokens"] <= 2
    # top_p 0, the smallest nucleus: the most likely token alone, whatever the temperature.
    code, answer = served.post("/v1/completions", json.dumps({"model": MODEL, "prompt": "x", "max_tokens": 3, "top_p": 0, "temperature": 1.5}).encode())
    assert code == 200 and answer["choices"][0]["text"] == want


def test_logprobs_end_where_a_stop_string_cuts_the_text(served: Served, model: Transformer) -> None:
    """The tokens whose log-probabilities come are those whose text lies within the answer cut
    at its stop string, whole and streamed (a token that runs past the cut is left out)."""
    prompt = "def fibonacci(n):"
    ids = TOKENIZER.encode(prompt, bos=True)
    text, _ = expected(model, ids, 40)
    (tokens,), _ = generate([ids], model, max_tokens=40, eos_id=TOKENIZER.eos_id)
    texts = [token_text(TOKENIZER, p, t) for p, t in zip([ids[-1], *tokens], tokens)]
    stop = text[12:15]
    cut = text[: text.index(stop)]
    within = [t for i, t in enumerate(texts) if len("".join(texts[: i + 1])) <= len(cut)]
    assert 0 < len(within) < len(texts)
    whole = served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop, logprobs=1)
    assert whole.choices[0].text == cut and whole.choices[0].logprobs.tokens == within  # type: ignore[union-attr]
    # Each token's text's offset, counted from the prompt's start (OpenAI's text_offset).
    offsets = [len(TOKENIZER.decode(ids)) + len("".join(within[:i])) for i in range(len(within))]
    assert whole.choices[0].logprobs.text_offset == offsets  # type: ignore[union-attr]
    chunks = list(served.client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop, logprobs=1, stream=True))
    assert [t for c in chunks for t in c.choices[0].logprobs.tokens] == within  # type: ignore[union-attr]
    assert [t for c in chunks for t in c.choices[0].logprobs.text_offset] == offsets  # type: ignore[union-attr]


@pytest.mark.parametrize("tokenizer", ["default", "v3"])
@pytest.mark.parametrize("answer, stop", [("s = '🙂 é' # done", "#"), ("Hello world. Bye", "d")])
def test_logprobs_follow_the_text_through_characters_of_several_tokens(tokenizer: str, answer: str, stop: str) -> None:
    """openai_api.Choice fed token by token, as the engine hands them over: the tokens given
    logprobs are those whose text lies within the answer cut at its stop, counted on the
    decoded text (a character spelled by byte tokens is one; the space after a chat prompt's
    last control token, [/INST] in v3, is one), and text_offset is where each starts in it."""
    if tokenizer == "default":
        tok = TOKENIZER
    else:
        mistral_common = pytest.importorskip("mistral_common")
        tok = MistralCommonTokenizer(Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_240323.model.v3")
    prompt = tok.encode_chat([{"role": "user", "content": "Hi"}])
    ids = tok.encode(answer, bos=False)
    choice = Choice(0, Completion(tok, prompt), [stop], logprobs=True)
    text = ""
    for token in ids:
        text += choice.add([token], [-1.0], [], None)
        if choice.finish_reason is not None:
            break

    def text_of(n: int) -> str:  # the answer's text after its first n tokens, as the server decodes it
        completion = Completion(tok, prompt)
        completion.tokens = ids[:n]
        return completion.text

    whole = [n for n in range(len(ids) + 1) if "\ufffd" not in text_of(n)]  # token counts at character boundaries
    assert text == text_of(len(ids))[: text_of(len(ids)).index(stop)]
    assert choice.covered() == max(n for n in whole if len(text_of(n)) <= len(text))
    body = choice.logprobs_body(tok, False, 0, choice.covered())
    prompt_length = len(tok.decode(prompt))
    assert all(body["text_offset"][n] == prompt_length + len(text_of(n)) for n in whole if n < choice.covered())


def test_a_developer_message_is_a_system_message(served: Served, model: Transformer) -> None:
    """OpenAI's newer name for the system's message."""
    messages = [{"role": "system", "content": "Answer in Python."}, {"role": "user", "content": "def square(x):"}]
    text, _ = expected(model, TOKENIZER.encode_chat(messages), 8)
    request = {"model": MODEL, "messages": [{**messages[0], "role": "developer"}, messages[1]], "max_tokens": 8, "temperature": 0}
    code, answer = served.post("/v1/chat/completions", json.dumps(request).encode())
    assert code == 200 and answer["choices"][0]["message"]["content"] == text, answer


def test_models_and_health(served: Served) -> None:
    assert [m.id for m in served.client.models.list()] == [MODEL]
    assert served.client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError, match="'gpt-4' does not exist"):
        served.client.models.retrieve("gpt-4")
    assert served.health() == {"status": "ok", "running": 0, "waiting": 0}


def test_a_client_that_leaves_mid_stream_frees_its_row(served: Served) -> None:
    stream = served.client.completions.create(model=MODEL, prompt="def f():", max_tokens=20000, temperature=0, stream=True)
    for _, _ in zip(stream, range(5)):
        pass
    assert served.health()["running"] == 1
    stream.close()
    deadline = time.monotonic() + 10
    while served.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.health() == {"status": "ok", "running": 0, "waiting": 0}


def test_a_client_that_leaves_before_a_whole_answer_frees_its_row(served: Served) -> None:
    import socket

    host, port = served.url.removeprefix("http://").split(":")
    body = json.dumps({"model": MODEL, "prompt": "def f():", "max_tokens": 20000, "temperature": 0}).encode()
    with socket.create_connection((host, int(port))) as connection:
        connection.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
        deadline = time.monotonic() + 10
        while not served.health()["running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert served.health()["running"] == 1
    deadline = time.monotonic() + 10
    while served.health()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert served.health() == {"status": "ok", "running": 0, "waiting": 0}


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"\xff\xfe", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": "gpt-4", "prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temprature": 0}, 400, "temprature"),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**7}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", b'{"model": "default_model", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": -0.1}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "n": 100}, 400, "n"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 0.5}, 400, "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "echo": True}, 400, "echo"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"50": 0, "51": 2}}, 400, "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"abc": 0}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": "x"}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": {"a": 1}}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}, 400, "response_format"),
    ("/v1/completions", b'{"model": "default_model", "prompt": "\\ud800x"}', 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": ["x"] * 80}, 400, "prompt"),  # more than the 72 it runs and queues
    ("/v1/completions", {"model": MODEL, "prompt": ["x"] * 10, "n": 8}, 400, "n"),
    ("/v1/completion", {"model": MODEL, "prompt": "x"}, 404, None),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{i}-{p}" for i, (_, _, _, p) in enumerate(BAD)])
def test_a_bad_request_gets_an_openai_error_body(served: Served, path: str, body: Any, status: int, param: Optional[str]) -> None:
    code, answer = served.post(path, body if isinstance(body, bytes) else json.dumps(body).encode())
    assert code == status, answer
    error = answer["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"], answer
    assert "Traceback" not in error["message"] and "\n" not in error["message"]


def test_a_bad_stream_request_is_refused_before_it_streams(served: Served) -> None:
    with pytest.raises(openai.BadRequestError, match="past max_context"):
        served.client.completions.create(model=MODEL, prompt="x", max_tokens=10**6, stream=True)
    code, answer = served.post("/v1/completions", b"", method="GET")
    assert code == 405 and answer["error"]["message"]


def test_a_full_queue_gets_429_and_sigterm_ends_the_server_while_requests_run() -> None:
    # A failed check must not leave the server running (a mutation run left one for half an hour).
    server = Served("--max_batch", "1", "--max_queue", "0", "--grace_s", "1")
    try:
        # Requests that arrive together are counted as they are admitted, not once they begin to run.
        barrier = threading.Barrier(6)

        def at_once(_: int) -> int:
            barrier.wait()
            try:
                server.client.completions.create(model=MODEL, prompt="def f():", max_tokens=300, temperature=0)
                return 200
            except openai.RateLimitError as e:
                assert e.response.headers["retry-after"] == "1"
                return 429

        with ThreadPoolExecutor(6) as pool:
            assert sorted(pool.map(at_once, range(6))) == [200] + [429] * 5
        chunks: list[str] = []
        failures: list[BaseException] = []

        def long_stream() -> None:
            try:
                for c in server.client.completions.create(model=MODEL, prompt="def f():", max_tokens=20000, temperature=0, stream=True):
                    chunks.append(c.choices[0].text)
            except BaseException as e:  # the server ends the stream: a connection cut off is the client's to see
                failures.append(e)

        reader = threading.Thread(target=long_stream)
        reader.start()
        deadline = time.monotonic() + 30
        while len(chunks) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(openai.RateLimitError, match="busy"):
            server.client.completions.create(model=MODEL, prompt="x", max_tokens=3)
        with pytest.raises(openai.BadRequestError, match="temperature"):  # a request that can never run: 400, not busy
            server.client.completions.create(model=MODEL, prompt="x", max_tokens=3, temperature=9)
        with pytest.raises(openai.RateLimitError, match="busy"):  # a stream too: a status, before it begins
            server.client.completions.create(model=MODEL, prompt="x", max_tokens=3, stream=True)
        started = time.monotonic()
        code, err = server.stop()
        reader.join(timeout=30)
        assert time.monotonic() - started < 20 and not reader.is_alive()
        assert code == 128 + signal.SIGTERM and "Traceback" not in err, err
        assert len(chunks) >= 3
    finally:
        server.process.kill()  # (it has ended, where every check passed)


@pytest.mark.parametrize("experts", [[], ["--expert_parallel"]], ids=["every expert split", "whole experts"])
def test_a_tensor_parallel_server_answers_as_one_process_does(model: Transformer, experts: list[str]) -> None:
    """Two tensor ranks, started by mistral: rank 0 serves HTTP, both run every forward call on
    the requests rank 0 plans; SIGTERM ends both (the other rank waits for rank 0's word)."""
    server = Served("--num_tensor_ranks", "2", *experts, "--device", "cpu", "--max_batch", "4", "--grace_s", "1")
    try:
        jobs = [(PROMPTS[i], 6 + 3 * i) for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda job: server.client.completions.create(
                model=MODEL, prompt=job[0], max_tokens=job[1], temperature=0).choices[0].text, jobs))  # fmt: skip
        assert answers == [expected(model, TOKENIZER.encode(p, bos=True), n)[0] for p, n in jobs]
        chunks = server.client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=10, temperature=0, stream=True)
        assert "".join(c.choices[0].text for c in chunks) == expected(model, TOKENIZER.encode(PROMPTS[0], bos=True), 10)[0]
        time.sleep(2.5)  # idle past two heartbeats: the other rank still waits for rank 0's plans
        assert server.health() == {"status": "ok", "running": 0, "waiting": 0}
    finally:
        code, err = server.stop()
    assert code == 128 + signal.SIGTERM and "Traceback" not in err and "error" not in err, err


def test_a_temperature_that_float32_rounds_to_zero_samples_greedily(served: Served, model: Transformer) -> None:
    """1e-46 is in [0, 2] but 0 in float32: it must neither fail (0 / 0) nor break what runs beside it."""
    answer = served.client.completions.create(model=MODEL, prompt="import os\n", max_tokens=8, temperature=1e-46)
    assert answer.choices[0].text == expected(model, TOKENIZER.encode("import os\n", bos=True), 8)[0]


def test_a_port_in_use_or_an_address_of_another_machine_is_one_line_before_loading() -> None:
    import socket

    from mistral.main import bind_error, check_address

    check_address("", 0)  # every interface, as uvicorn (asyncio) takes it
    check_address("localhost", 0)
    # newer asyncio (3.13), for an address not of this machine: no errno; the OS's words found again
    assert bind_error("192.0.2.1", 8000, OSError("could not bind on any address out of [('192.0.2.1', 8000)]")) == "Cannot assign requested address"

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        cases = (("127.0.0.1", port, "Address already in use"), ("192.0.2.1", 8000, "Cannot assign requested address"),
                 ("xx..yy", 8000, "label empty or too long"))  # fmt: skip
        for host, at, reason in cases:
            command = [sys.executable, "-m", "mistral", "serve", "--host", host, "--port", str(at)]
            result = subprocess.run(command, capture_output=True, text=True, timeout=60, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
            lines = result.stderr.splitlines()
            assert result.returncode == 2 and len(lines) == 1, result.stderr
            assert lines[0].startswith(f"error: cannot serve on {host}:{at}: ") and reason in lines[0], result.stderr
