"""The tokenizer of a model folder, and the chat format of its version.

Mistral's releases ship one of six tokenizer files. Version 1 (tokenizer.model,
tokenizer.model.v1) is a plain sentencepiece model whose instruct format spells
"[INST]" in text; we encode it ourselves, so that v1 folders and the default model
need nothing more. The later versions put control tokens around each turn and place
the system prompt each their own way (v2 and v3: before the last user message, v7:
in [SYSTEM_PROMPT] tokens at the start), and tekken.json is not sentencepiece at all:
those come from mistral_common, Mistral's own reference for its formats, an optional
extra (`pip install -e '.[mistral-common]'`).

Both kinds offer the same methods: encode, decode, bos_id, eos_id, n_words and
encode_chat(messages), the token ids of a conversation ready for the assistant's answer.
"""

import os
import re
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union

from sentencepiece import SentencePieceProcessor

from mistral.errors import MistralError, is_int

# The tokenizer files of Mistral's releases; a model folder holds exactly one.
SENTENCEPIECE_V1 = ("tokenizer.model", "tokenizer.model.v1")
# tokenizer.model.v7m1 (mistral_common ships one) is v7's text tokenizer, which also speaks for images.
TOKENIZER_FILES = (
    *SENTENCEPIECE_V1, "tokenizer.model.v2", "tokenizer.model.v3", "tokenizer.model.v7", "tokenizer.model.v7m1", "tekken.json"
)  # fmt: skip
INSTALL = "pip install -e '.[mistral-common]' (or pip install mistral-common)"

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


class ChatTokenizer(Protocol):
    n_words: int
    bos_id: int
    eos_id: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_chat(self, messages: Sequence[Message]) -> list[int]: ...

    def token_bytes(self, id: int) -> Optional[bytes]:
        """The bytes a token stands for where they are part of a character (its text alone would be
        U+FFFD): a byte-fallback token's byte, a tekken token's bytes; else None (its text says it)."""
        ...


# A sentencepiece byte-fallback token's piece: "<0xF0>".
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_of_piece(piece: str) -> Optional[bytes]:
    """A byte token's byte where it is part of a character (an ASCII byte, "\\n", is one whole)."""
    match = BYTE_PIECE.fullmatch(piece)
    return None if match is None or int(match[1], 16) < 0x80 else bytes([int(match[1], 16)])


def tokenizer_file(folder: Union[str, Path]) -> Path:
    """The one tokenizer file of a model folder."""
    folder = Path(folder)
    found = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if len(found) != 1:
        what = "no tokenizer file" if not found else f"{len(found)} tokenizer files ({', '.join(found)})"
        raise MistralError(f"{folder}: {what} in the model folder, expected exactly one of {', '.join(TOKENIZER_FILES)}")
    return folder / found[0]


def load_tokenizer(folder: Union[str, Path]) -> ChatTokenizer:
    """The tokenizer of a model folder, with the chat format of its version."""
    path = tokenizer_file(folder)
    return Tokenizer(path) if path.name in SENTENCEPIECE_V1 else MistralCommonTokenizer(path)


def check_vocabulary(folder: Union[str, Path], tokenizer: ChatTokenizer, vocab_size: int) -> None:
    """The folder's tokenizer has params.json's vocabulary: another model's would produce garbage."""
    if tokenizer.n_words != vocab_size:
        raise MistralError(f"{tokenizer_file(folder)}: {tokenizer.n_words} tokens but params.json says vocab_size={vocab_size}")


def check_messages(messages: Sequence[Message]) -> None:
    """A conversation the assistant can answer: known roles, text contents, the user's turn last."""
    if not messages:
        raise MistralError("encode_chat: no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
            raise MistralError(f"encode_chat: message {i} must be {{'role': 'system' | 'user' | 'assistant', 'content': str}}, got {m!r}")
        if m["role"] == "assistant" and not m["content"].strip():
            raise MistralError(f"encode_chat: message {i} is an empty assistant message")
    last = [m["role"] for m in messages if m["role"] != "system"][-1:]
    if last != ["user"]:
        raise MistralError(f"encode_chat: the last message (but system ones) must be the user's, got {last}")


def check_ids(ids: Sequence[int], n_words: int) -> list[int]:
    """ids as a list, if each is a token id of the vocabulary (an int in 0..n_words-1)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        raise MistralError(f"decode takes a list of token ids, got {type(ids).__name__}")
    ids = list(ids)
    for t in ids:
        if not is_int(t) or not 0 <= t < n_words:
            raise MistralError(f"decode: {t!r} is not a token id of this vocabulary (ints 0..{n_words - 1})")
    return ids


def check_text(text: str, what: str) -> None:
    """A MistralError naming `what` unless text is valid Unicode: bytes that were not UTF-8
    reach Python's argv and stdin as lone surrogates, which sentencepiece cannot encode."""
    if not isinstance(text, str):
        raise MistralError(f"{what} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MistralError(f"{what} is not UTF-8 text") from None


class Tokenizer:
    """A sentencepiece model, and Mistral's v1 instruct format:

        <s>[INST] system\\n\\nquestion [/INST] answer</s>[INST] next question [/INST]

    Each turn is encoded on its own (so each "[INST]" starts a word), exactly as
    mistral_common's InstructTokenizerV1 does; tests check the two agree.
    """

    def __init__(self, path: Union[str, Path]):
        if not isinstance(path, (str, os.PathLike)):
            raise MistralError(f"a tokenizer file is a path (str or Path), got {type(path).__name__}")
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
        return self.sp.decode(check_ids(ids, self.n_words))

    def token_bytes(self, id: int) -> Optional[bytes]:
        return _byte_of_piece(self.sp.id_to_piece(check_ids([id], self.n_words)[0]))

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        check_messages(messages)
        # mistral_common's normalization: the system messages make one system prompt,
        # neighbours of one role one message (joined by a blank line), and a
        # conversation that does not open with the user opens with an empty user turn.
        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        turns: list[Message] = []
        for m in messages:
            if m["role"] == "system":
                continue
            if turns and turns[-1]["role"] == m["role"]:
                turns[-1] = {"role": m["role"], "content": turns[-1]["content"] + "\n\n" + m["content"]}
            else:
                turns.append(dict(m))
        if turns[0]["role"] != "user":
            turns.insert(0, {"role": "user", "content": ""})
        if system:
            turns[0]["content"] = system + "\n\n" + turns[0]["content"]
        tokens = [self.bos_id]
        for turn in turns:
            if turn["role"] == "user":
                tokens += self.encode(f"[INST] {turn['content']} [/INST]", bos=False)
            else:
                tokens += self.encode(turn["content"], bos=False, eos=True)
        return tokens


class MistralCommonTokenizer:
    """tokenizer.model.v2 / v3 / v7 or tekken.json, through mistral_common.

    decode drops control tokens ([INST], ...), as mistral_common does by default: the
    text of an answer is what the user reads.
    """

    def __init__(self, path: Path):
        try:
            from mistral_common.exceptions import MistralCommonException
            from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        except ImportError:
            raise MistralError(f"{path}: this tokenizer needs the mistral_common package: {INSTALL}") from None
        self._errors = (MistralCommonException, ValueError, AssertionError)
        try:
            self.mistral = MistralTokenizer.from_file(str(path))
        # A file of the wrong structure fails deep in mistral_common's parsing, with whatever
        # Python raises there (an int where an object belongs: AttributeError, ...).
        except (*self._errors, OSError, RuntimeError, AttributeError, KeyError, TypeError, IndexError) as e:
            raise MistralError(f"{path}: unreadable tokenizer ({type(e).__name__}: {e})".splitlines()[0]) from None
        self.raw = self.mistral.instruct_tokenizer.tokenizer
        self.version = self.raw.version.value

    @property
    def n_words(self) -> int:
        return self.raw.n_words

    @property
    def bos_id(self) -> int:
        return self.raw.bos_id

    @property
    def eos_id(self) -> int:
        return self.raw.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        return self.raw.encode(text, bos=bos, eos=eos)

    def decode(self, ids: list[int]) -> str:
        return self.mistral.decode(check_ids(ids, self.n_words))

    def token_bytes(self, id: int) -> Optional[bytes]:
        (id,) = check_ids([id], self.n_words)
        if not hasattr(self.raw, "id_to_byte_piece"):  # sentencepiece (v1-v7)
            return _byte_of_piece(self.raw.id_to_piece(id))
        piece = self.raw.id_to_byte_piece(id)  # tekken: every token is bytes; a control token's are none
        try:
            piece.decode("utf-8")
        except UnicodeDecodeError:
            return piece
        return None

    def encode_chat(self, messages: Sequence[Message]) -> list[int]:
        from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        check_messages(messages)
        kinds = {"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
        request = ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])
        try:
            return self.mistral.encode_chat_completion(request).tokens
        except self._errors as e:
            raise MistralError(f"encode_chat: {type(e).__name__}: {e}".splitlines()[0]) from None
