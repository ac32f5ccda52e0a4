"""A thin sentencepiece wrapper: the tokenizer.model of a Mistral folder."""

from pathlib import Path
from typing import Union

from sentencepiece import SentencePieceProcessor

from mistral.errors import MistralError


def check_text(text: str, what: str) -> None:
    """A MistralError naming `what` unless text is valid Unicode: bytes that were not UTF-8
    reach Python's argv and stdin as lone surrogates, which sentencepiece cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MistralError(f"{what} is not UTF-8 text") from None


class Tokenizer:
    def __init__(self, path: Union[str, Path]):
        path = Path(path)
        if not path.is_file():
            raise MistralError(f"{path}: tokenizer file not found")
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as e:
            raise MistralError(f"{path}: not a sentencepiece model ({str(e).splitlines()[0]})") from None

    @property
    def n_words(self) -> int:
        return self.sp.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        check_text(text, "the text to encode")
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
