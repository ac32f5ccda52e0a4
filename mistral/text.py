"""A completion's text as it grows token by token: for the command line's stream and the server's."""

from typing import Optional

from mistral.tokenizer import ChatTokenizer

# Tokens decoded before the first new one, whose text is then taken off again (see `Completion.unshown`).
CONTEXT = 4


class Completion:
    """One prompt's completion, growing token by token.

    Its text is decode(prompt + completion) minus the prompt's text: decoding the new
    tokens alone would lose the space sentencepiece folds into a word's first piece.
    """

    def __init__(self, tokenizer: ChatTokenizer, prompt_tokens: list[int]):
        self.tokenizer, self.prompt_tokens = tokenizer, list(prompt_tokens)  # a copy: a chat's history grows
        self.prompt_text = tokenizer.decode(prompt_tokens)
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.finish_reason: Optional[str] = None  # "eos" or "length"
        self.shown = 0  # tokens of the completion whose text was handed over

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.prompt_tokens + self.tokens)[len(self.prompt_text) :]

    def unshown(self, final: bool = False) -> str:
        """The text not handed over yet: what `text` gained since the last call.

        Decoding prompt and completion whole at every token would cost a long stream
        time in proportion to its length at each step. Decoding is local, so the new
        tokens are decoded after the CONTEXT tokens before them (more, where those have no
        text), and those tokens' own text is cut off: both decodings start at the same
        piece of text, so the space sentencepiece drops at the start is dropped from both alike. A character spelled by several byte
        tokens decodes to U+FFFD until its last byte arrives, so a text that ends in one
        waits for the next token (unless final).
        """
        every = self.prompt_tokens + self.tokens
        start = len(self.prompt_tokens) + self.shown
        first = max(start - CONTEXT, 0)
        before = self.tokenizer.decode(every[first:start])
        while not before and first > 0:  # control tokens have no text: the first piece with some must be in the context
            first = max(first - CONTEXT, 0)
            before = self.tokenizer.decode(every[first:start])
        text = self.tokenizer.decode(every[first:])
        if not final and text.endswith("\ufffd"):
            return ""
        self.shown = len(self.tokens)
        return text[len(before) :]
