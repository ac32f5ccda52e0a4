"""The tokenizers: the sentencepiece wrapper on a model trained here, and every tokenizer
of Mistral's releases (mistral_common's data files) against mistral_common itself."""

import importlib.util
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import sentencepiece as spm
from make_tiny_model import train_tokenizer

from mistral import DEFAULT_MODEL, MistralError
from mistral.openai_api import token_bytes, token_label
from mistral.text import Completion
from mistral.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Return a new dictionary initialized from an optional positional argument.",
    "Grüße, 世界 🙂",  # outside the training text: byte fallback must carry it through
    "x = {'a': [1, 2.5]}  # tabs\tand\nnewlines",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.model"
    train_tokenizer(path, vocab_size=512)
    return path


def test_trained_tokenizer_round_trip_and_special_ids(trained: Path) -> None:
    tok = Tokenizer(trained)
    assert tok.n_words == 512
    assert (tok.bos_id, tok.eos_id) == (1, 2)  # Mistral's ids, as train_tokenizer asks
    for text in TEXTS[:2]:
        ids = tok.encode(text, bos=True, eos=True)
        assert ids[0] == 1 and ids[-1] == 2 and 1 not in ids[1:-1] and 2 not in ids[1:-1]
        assert all(0 <= i < tok.n_words for i in ids)
        assert tok.decode(ids) == text  # special tokens decode to nothing
        assert tok.encode(text, bos=False) == ids[1:-1]
    # sentencepiece normalizes whitespace runs (nmt_nfkc): tabs and newlines become a space.
    assert tok.decode(tok.encode(TEXTS[2])) == "x = {'a': [1, 2.5]} # tabs and newlines"


def mistral_v1_tokenizer() -> Path:
    if importlib.util.find_spec("mistral_common") is None:
        pytest.skip("mistral_common is not installed")
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    assert path.is_file(), f"{path}: mistral_common ships no v1 tokenizer"
    return path


def test_real_mistral_v1_tokenizer() -> None:
    path = mistral_v1_tokenizer()
    tok = Tokenizer(path)
    reference = spm.SentencePieceProcessor(model_file=str(path))  # the library itself, no wrapper
    assert tok.n_words == reference.vocab_size() == 32000
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    ids = tok.encode("Hello world", bos=True)
    assert ids == [reference.bos_id()] + reference.encode("Hello world")
    # Known ids (also what mistral_common's SentencePieceTokenizer returns): <s>, ▁Hello, ▁world.
    assert ids == [1, 22557, 1526]
    assert [reference.id_to_piece(i) for i in ids] == ["<s>", "▁Hello", "▁world"]
    for text in TEXTS[:2]:
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_missing_or_bad_tokenizer_file_is_a_mistral_error(tmp_path: Path) -> None:
    with pytest.raises(MistralError, match="tokenizer file not found"):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(MistralError, match="tokenizer file not found"):
        Tokenizer(tmp_path)  # a folder is not a file
    garbage = tmp_path / "tokenizer.model"
    garbage.write_text("not a sentencepiece model")
    with pytest.raises(MistralError, match="not a sentencepiece model"):
        Tokenizer(garbage)


# --- Every tokenizer of Mistral's releases, against mistral_common -------------------

CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "Hello, who are you?"}],
    "several turns": [
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Eleven. "},  # v2+ strip the trailing space, v1 keeps it
        {"role": "user", "content": "Thanks"},
    ],
    "system prompt": [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Good morning"},
        {"role": "assistant", "content": "Bonjour"},
        {"role": "user", "content": "Good night"},
    ],
    "unicode and emoji": [{"role": "user", "content": "Grüße, 世界 🙂👩‍💻 — ∑ x²\ttab\nnewline"}],
    "control-token lookalikes": [
        {"role": "user", "content": "[INST] <s> </s> [/INST] [SYSTEM_PROMPT] [TOOL_CALLS]"},
        {"role": "assistant", "content": "[/INST]"},
        {"role": "user", "content": "<unk>[INST]"},
    ],
    "same roles in a row": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "a"},
        {"role": "user", "content": "b"},
        {"role": "system", "content": "Be kind."},
    ],
}
PLAIN = [*TEXTS, "", " leading space", "[INST] looks like a control token [/INST]", "<s></s>", "🙂" * 3]


def mistral_common_data() -> Path:
    mistral_common = pytest.importorskip("mistral_common")
    return Path(mistral_common.__file__).parent / "data"


# mistral_common's data file -> its name in a released model folder.
RELEASE_NAMES = {
    "tokenizer.model.v1": "tokenizer.model.v1",
    "mistral_instruct_tokenizer_240216.model.v2": "tokenizer.model.v2",
    "mistral_instruct_tokenizer_240323.model.v3": "tokenizer.model.v3",
    "mistral_instruct_tokenizer_241114.model.v7": "tokenizer.model.v7",
    "mistral_instruct_tokenizer_241114.model.v7m1": "tokenizer.model.v7m1",  # v7's text tokenizer, for images too
    "tekken_240718.json": "tekken.json",
    "tekken_240911.json": "tekken.json",
}


@pytest.fixture(params=sorted(RELEASE_NAMES), scope="module")
def released(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """(our tokenizer from a folder holding the file under its release name, mistral_common's MistralTokenizer)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    source = mistral_common_data() / request.param
    assert source.is_file(), f"{source}: not shipped by this mistral_common"
    folder = tmp_path_factory.mktemp("released")
    (folder / RELEASE_NAMES[request.param]).write_bytes(source.read_bytes())
    return load_tokenizer(folder), MistralTokenizer.from_file(str(source))


def test_encode_and_special_ids_equal_mistral_common(released: tuple) -> None:
    ours, reference = released
    raw = reference.instruct_tokenizer.tokenizer
    assert (ours.n_words, ours.bos_id, ours.eos_id) == (raw.n_words, raw.bos_id, raw.eos_id)
    for text in PLAIN:
        for bos, eos in [(True, False), (False, False), (True, True)]:
            assert ours.encode(text, bos=bos, eos=eos) == raw.encode(text, bos=bos, eos=eos), text


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_encode_chat_equals_mistral_common(released: tuple, name: str) -> None:
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    ours, reference = released
    kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    messages = CONVERSATIONS[name]
    request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
    assert ours.encode_chat(messages) == reference.encode_chat_completion(request).tokens


def test_decode_round_trips(released: tuple) -> None:
    ours, _ = released
    for text in [TEXTS[0], TEXTS[1], "[INST] not a control token"]:
        assert ours.decode(ours.encode(text, bos=True, eos=True)) == text
    # Control tokens are not text: an encoded conversation decodes to its contents.
    ids = ours.encode_chat([{"role": "user", "content": "Hi"}])
    assert ours.decode(ids).replace("[INST]", "").replace("[/INST]", "").strip() == "Hi"


def test_streamed_answer_never_splits_a_character(released: tuple) -> None:
    """main.Completion: decode(prompt + answer) minus the prompt's text, byte tokens held back until whole."""
    ours, _ = released
    prompt = ours.encode_chat([{"role": "user", "content": "Say it"}])
    text = "Grüße 🙂 naïve → 世界"
    answer = Completion(ours, prompt)
    pieces = []
    for token in ours.encode(text, bos=False):
        answer.tokens.append(token)
        pieces.append(answer.unshown())
    pieces.append(answer.unshown(final=True))
    assert "".join(pieces).strip() == text
    assert not any("\ufffd" in p for p in pieces)


def test_token_bytes_spell_what_the_tokens_text_cannot(released: tuple) -> None:
    """Logprobs' `bytes` (openai_api.token_bytes): a token's text's UTF-8, or the bytes a token
    that is part of a character stands for; token by token they spell the text's UTF-8.
    The default model's byte tokens are such tokens (its vocabulary spells the emoji by bytes)."""
    for tokenizer in (released[0], load_tokenizer(DEFAULT_MODEL)):
        text = "Grüße 🙂 naïve → 世界"
        ids = tokenizer.encode(text, bos=True)
        spelled = b"".join(bytes(token_bytes(tokenizer, p, t)) for p, t in zip(ids, ids[1:]))
        assert spelled.decode().strip() == text
    default = load_tokenizer(DEFAULT_MODEL)
    parts = [default.token_bytes(t) for t in default.encode("🙂", bos=False)]
    assert b"".join(p for p in parts if p is not None) == "🙂".encode() and token_label(default, 1, default.encode("🙂", bos=False)[-1]).startswith("bytes:\\x")
    assert all(default.token_bytes(t) is None for t in default.encode("a\nb", bos=False))  # a byte token of a whole character: its text


def test_streamed_pieces_make_the_whole_text(released: tuple) -> None:
    """Completion.unshown decodes a few tokens of context, not the whole text: its pieces, joined,
    are `text` for any tokens (byte tokens, control tokens, spaces, cut characters), held back
    only while the text ends in a cut character."""
    ours, _ = released
    prompt = ours.encode_chat([{"role": "user", "content": "Say it"}])
    vocab = ours.n_words

    @settings(max_examples=60, deadline=None, derandomize=True)
    @given(st.lists(st.integers(0, vocab - 1), max_size=40), st.sets(st.integers(0, 40)))
    def check(tokens: list[int], final_at: set[int]) -> None:
        answer = Completion(ours, prompt)
        pieces = []
        for i, token in enumerate(tokens):
            answer.tokens.append(token)
            pieces.append(answer.unshown(final=i in final_at))
            assert answer.text.startswith("".join(pieces))
        pieces.append(answer.unshown(final=True))
        assert "".join(pieces) == answer.text

    check()


@pytest.mark.parametrize(
    "messages, message",
    [
        ([], "no messages"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], r"last message \(but system ones\) must be the user's"),
        ([{"role": "bot", "content": "a"}], "message 0 must be"),
        ([{"role": "user", "content": 3}], "message 0 must be"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": " "}, {"role": "user", "content": "c"}],
         "message 1 is an empty assistant message"),
    ],
    ids=["empty", "assistant last", "bad role", "not text", "empty answer"],
)
def test_bad_conversation_is_a_mistral_error(released: tuple, messages: list, message: str) -> None:
    ours, _ = released
    with pytest.raises(MistralError, match=message):
        ours.encode_chat(messages)


def test_folder_must_hold_exactly_one_tokenizer(tmp_path: Path, trained: Path) -> None:
    with pytest.raises(MistralError, match=r"no tokenizer file in the model folder, expected exactly one of tokenizer\.model, "):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(trained.read_bytes())
    assert isinstance(load_tokenizer(tmp_path), Tokenizer)
    (tmp_path / "tekken.json").write_text("{}")
    with pytest.raises(MistralError, match=r"2 tokenizer files \(tokenizer\.model, tekken\.json\) in the model folder"):
        load_tokenizer(tmp_path)


def test_without_mistral_common_v1_works_and_others_say_how_to_install(
    tmp_path: Path, trained: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mistral_common", None)  # import mistral_common now fails
    monkeypatch.setitem(sys.modules, "mistral_common.tokens.tokenizers.mistral", None)
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "tokenizer.model").write_bytes(trained.read_bytes())
    tok = load_tokenizer(tmp_path / "v1")
    assert tok.encode_chat([{"role": "user", "content": "hi"}])[:1] == [tok.bos_id]
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "tokenizer.model.v3").write_bytes(trained.read_bytes())
    with pytest.raises(MistralError, match=r"tokenizer\.model\.v3: this tokenizer needs the mistral_common package: pip install"):
        load_tokenizer(tmp_path / "v3")
