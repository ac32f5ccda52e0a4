"""A thin sentencepiece wrapper: the tokenizer.model of a Mistral folder."""

from pathlib import Path
from typing import Union

from sentencepiece import SentencePieceProcessor

from mistral.errors import MistralError


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
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)
