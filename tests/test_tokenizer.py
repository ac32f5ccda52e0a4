"""The sentencepiece wrapper, on a model trained here and on Mistral's real v1 tokenizer."""

import importlib.util
from pathlib import Path

import pytest
import sentencepiece as spm
from make_tiny_model import train_tokenizer

from mistral import MistralError
from mistral.tokenizer import Tokenizer

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
