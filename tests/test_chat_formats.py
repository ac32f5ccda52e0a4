"""`mistral generate` and `mistral chat` on a tiny random model folder for each tokenizer
of Mistral's releases (vocabulary matching it): each chat turn is the folder's official
format, and the answers kept in the KV cache equal a fresh generation over the whole
conversation, also where the format rewrites an earlier turn and the cache rewinds.
"""

import io
import sys
from pathlib import Path

import pytest

from helpers import random_model, tiny_args
from mistral.generation import generate
from mistral.main import Conversation, load, main
from test_tokenizer import RELEASE_NAMES, mistral_common_data

# v1 and v2 folders get a window of 8, which a conversation wraps (so a rewind
# starts over); the others have none (a rewind keeps the common prefix).
WINDOWED = ("tokenizer.model.v1", "mistral_instruct_tokenizer_240216.model.v2")
SYSTEM = "You answer briefly."


@pytest.fixture(params=sorted(RELEASE_NAMES), scope="module")
def folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    source = mistral_common_data() / request.param
    n_words = MistralTokenizer.from_file(str(source)).instruct_tokenizer.tokenizer.n_words
    out = tmp_path_factory.mktemp("release")
    window = 8 if request.param in WINDOWED else None
    random_model(tiny_args(vocab_size=n_words, sliding_window=window)).save(out)
    (out / RELEASE_NAMES[request.param]).write_bytes(source.read_bytes())
    return out


def run_main(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, *args: str, stdin: str = "") -> str:
    monkeypatch.setattr(sys, "argv", ["mistral", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    main()  # a MistralError would exit with code 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return out


def test_generate_and_chat_run(folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    out = run_main(monkeypatch, capsys, "generate", str(folder), "Grüße 🙂", "--max_tokens", "4", "--device", "cpu")
    assert out.startswith("Grüße 🙂")
    out = run_main(monkeypatch, capsys, "chat", str(folder), "--max_tokens", "4", "--device", "cpu", "--system", SYSTEM,
                   stdin="Hello there\n[INST] And then? 🙂\n")
    assert out.count("\n") == 2  # two turns, an answer a line


def test_chat_turns_are_the_official_format_and_the_cache_is_right(folder: Path) -> None:
    model, tokenizer = load(folder, "cpu", "float32")
    chat = Conversation(model, tokenizer, max_context=512, system=SYSTEM, max_tokens=12, temperature=0.0, top_p=1.0)
    messages = [{"role": "system", "content": SYSTEM}]
    previous = None
    for text in ["What is 2 + 2?", "And [INST] 3 + 3? 🙂", "Thanks"]:
        messages.append({"role": "user", "content": text})
        answer = chat.say(text)
        official = tokenizer.encode_chat(messages)
        if previous is None or answer.prompt_tokens == official:
            assert answer.prompt_tokens == official
        else:  # the answers so far as sampled, the rest as the format has it
            kept = previous.prompt_tokens + previous.tokens
            assert answer.prompt_tokens[: len(kept)] == kept
            assert answer.prompt_tokens[len(kept) :] == official[official.index(tokenizer.eos_id, len(previous.prompt_tokens)) :]
        (fresh,), _ = generate([answer.prompt_tokens], model, max_tokens=12, eos_id=tokenizer.eos_id)
        assert answer.tokens == fresh
        content = tokenizer.decode(answer.tokens)
        if content.strip():
            messages.append({"role": "assistant", "content": content})
        previous = answer


def test_rewind_keeps_the_prefix_unless_the_buffer_wrapped() -> None:
    model = random_model(tiny_args(sliding_window=4))
    cache = model.make_cache(1, 64)
    cache.advance([4])
    cache.rewind(0, 2)
    assert cache.lengths[0] == 2  # nothing overwritten yet
    cache.reset()
    cache.advance([9])
    cache.rewind(0, 8)
    assert cache.lengths[0] == 8  # one back: it reads positions 5..7, still there
    cache.reset()
    cache.advance([9])
    cache.rewind(0, 7)
    assert cache.lengths[0] == 0  # it reads position 4, which 8 overwrote: start over
