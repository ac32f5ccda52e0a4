"""The OpenAI HTTP API's requests and answers, without HTTP: what `mistral serve` reads and writes.

A request body is checked field by field against what this server does, and anything
else is a `BadRequest` naming the field (the server answers it with status 400 and
OpenAI's error body): unknown fields, wrong types, values out of range, and options
OpenAI has that this server does not do with other than their neutral value (n > 1 is
done; penalties, logit_bias, echo, best_of, tools are not).
"""

import bisect
import json
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from mistral.engine import MAX_TOP_LOGPROBS
from mistral.errors import is_int, is_number
from mistral.tokenizer import ChatTokenizer, Message
from mistral.text import Completion

MAX_N = 16  # choices per request
MAX_STOPS = 4  # OpenAI's limit on stop strings
MAX_LOGPROBS = 5  # completions' logprobs


class BadRequest(ValueError):
    """A request this server will not run: status 400 (or `status`), with OpenAI's error body."""

    def __init__(self, message: str, param: Optional[str] = None, code: Optional[str] = None, status: int = 400):
        super().__init__(message)
        self.param, self.code, self.status = param, code, status

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Params:
    """A checked request: the prompts' tokens and how to sample them."""

    prompts: list[list[int]]  # one per prompt; each runs n times
    max_tokens: Optional[int]  # None: as many as max_context leaves
    temperature: float
    top_p: float
    n: int = 1
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage
    stop: list[str] = field(default_factory=list)
    seed: Optional[int] = None
    logprobs: Optional[int] = None  # None: none; else this many alternatives per token (0: the token's own only)
    chat: bool = False


# Fields OpenAI defines that this server takes only at their neutral value: (field, allowed values).
NEUTRAL = {
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "echo": (False, None),
    "best_of": (1, None),
    "suffix": (None, ""),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "parallel_tool_calls": (None, False, True),
    "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "store": (None, False),
    "service_tier": (None, "auto", "default"),
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed", "user", "metadata"}
COMPLETION_FIELDS = COMMON | {"prompt", "logprobs", "echo", "best_of", "suffix", "frequency_penalty", "presence_penalty", "logit_bias"}
CHAT_FIELDS = COMMON | {
    "messages", "max_completion_tokens", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias",
    "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "response_format", "modalities", "audio",
    "prediction", "reasoning_effort", "store", "service_tier",
}  # fmt: skip


def parse_json(raw: bytes) -> dict:
    """The request body as a JSON object."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, nested too deep
        raise BadRequest(f"the request body is not valid JSON ({type(e).__name__}: {str(e)[:100]})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def completion_params(body: dict, tokenizer: ChatTokenizer, model_name: str) -> Params:
    """/v1/completions: prompt is a string, a list of them, a list of token ids, or a list of those."""
    _check_fields(body, COMPLETION_FIELDS, model_name)
    if "prompt" not in body:
        raise BadRequest("'prompt' is required", "prompt")
    prompts = [_prompt_tokens(p, tokenizer, f"prompt[{i}]") for i, p in enumerate(_prompt_list(body["prompt"]))]
    logprobs = _optional_int(body, "logprobs", 0, MAX_LOGPROBS)
    params = _common(body, prompts, default_max_tokens=16)
    params.logprobs = logprobs
    return params


def chat_params(body: dict, tokenizer: ChatTokenizer, model_name: str) -> Params:
    """/v1/chat/completions: messages in the folder's chat format (its tokenizer's encode_chat)."""
    _check_fields(body, CHAT_FIELDS, model_name)
    if "messages" not in body:
        raise BadRequest("'messages' is required", "messages")
    messages = _messages(body["messages"])
    try:
        prompt = tokenizer.encode_chat(messages)
    except ValueError as e:  # MistralError: the conversation's order or contents
        raise BadRequest(f"messages: {e}", "messages") from None
    _optional_int(body, "max_completion_tokens", 1, None)  # its type and range first
    if body.get("max_completion_tokens") is not None:  # (null: not given, as OpenAI reads it)
        if body.get("max_tokens") is not None and body["max_tokens"] != body["max_completion_tokens"]:
            raise BadRequest("give max_tokens or max_completion_tokens, not two different values", "max_completion_tokens")
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    params = _common(body, [prompt], default_max_tokens=None)
    params.chat = True
    if not isinstance(body.get("logprobs", False), (bool, type(None))):
        raise BadRequest(f"logprobs must be true or false, got {_shown(body['logprobs'])}", "logprobs")
    top = _optional_int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not body.get("logprobs"):
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    params.logprobs = (top or 0) if body.get("logprobs") else None
    return params


def _neutral(name: str, value: Any) -> bool:
    """Whether `value` of a field this server takes only at its neutral value changes nothing
    (a logit_bias of zeros is as neutral as none)."""
    if name == "logit_bias" and isinstance(value, dict) and all(key.isdigit() and _same(bias, 0) for key, bias in value.items()):
        return True  # (keys are token ids, as OpenAI's)
    return any(_same(value, v) for v in NEUTRAL[name])


def _check_fields(body: dict, known: set[str], model_name: str) -> None:
    for name in body:
        if name not in known:
            raise BadRequest(f"unknown field {_shown(name)}", str(name), "unknown_field")
        if name in NEUTRAL and not _neutral(name, body[name]):
            raise BadRequest(f"{name}={_shown(body[name])} is not supported by this server", name, "unsupported_value")
    model = body.get("model")
    if model is None:
        raise BadRequest("'model' is required", "model")
    if model != model_name:
        raise BadRequest(f"the model {_shown(model)} does not exist: this server runs {model_name!r}", "model", "model_not_found")
    if "user" in body and not isinstance(body["user"], str):
        raise BadRequest(f"user must be a string, got {_shown(body['user'])}", "user")
    if "metadata" in body and not isinstance(body["metadata"], (dict, type(None))):
        raise BadRequest(f"metadata must be an object, got {_shown(body['metadata'])}", "metadata")


def _same(a: Any, b: Any) -> bool:
    return type(a) is type(b) and a == b or (is_number(a) and is_number(b) and a == b)


def _common(body: dict, prompts: list[list[int]], default_max_tokens: Optional[int]) -> Params:
    max_tokens = _optional_int(body, "max_tokens", 1, None)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:  # OpenAI takes it: the smallest nucleus, the most likely token alone (greedy)
        temperature, top_p = 0.0, 1.0
    n = _optional_int(body, "n", 1, MAX_N) or 1
    stream = body.get("stream")
    if not isinstance(stream, (bool, type(None))):
        raise BadRequest(f"stream must be true or false, got {_shown(stream)}", "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise BadRequest("stream_options needs stream: true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"} or not isinstance(options.get("include_usage", False), bool):
            raise BadRequest(f"stream_options must be {{\"include_usage\": true|false}}, got {_shown(options)}", "stream_options")
    seed = body.get("seed")
    if seed is not None and (not is_int(seed) or not -(2**63) <= seed < 2**64):
        raise BadRequest(f"seed must be an integer, got {_shown(seed)}", "seed")
    return Params(
        prompts=prompts, max_tokens=default_max_tokens if max_tokens is None else max_tokens, temperature=temperature,
        top_p=top_p, n=n, stream=bool(stream), include_usage=bool(options and options.get("include_usage")),
        stop=_stops(body.get("stop")), seed=None if seed is None else seed % 2**64,
    )  # fmt: skip


def _optional_int(body: dict, name: str, low: int, high: Optional[int]) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if not is_int(value) or value < low or (high is not None and value > high):
        within = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        raise BadRequest(f"{name} must be {within}, got {_shown(value)}", name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not is_number(value) or not math.isfinite(value) or not low <= value <= high:
        raise BadRequest(f"{name} must be a number in [{low:g}, {high:g}], got {_shown(value)}", name)
    return float(value)


def _stops(stop: Any) -> list[str]:
    stops = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) and s for s in stops):
        raise BadRequest(f"stop must be a non-empty string or a list of up to {MAX_STOPS} of them, got {_shown(stop)}", "stop")
    return stops


def _prompt_list(prompt: Any) -> list:
    """A request's prompts: a string or a list of token ids is one."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        return prompt
    raise BadRequest(f"prompt must be a string, a list of strings, a list of token ids or a list of those, got {_shown(prompt)}", "prompt")


def _prompt_tokens(prompt: Any, tokenizer: ChatTokenizer, name: str) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise BadRequest(f"{name} is empty", "prompt")
        try:
            return tokenizer.encode(prompt, bos=True)
        except ValueError as e:  # MistralError: not UTF-8 text (a lone surrogate)
            raise BadRequest(f"{name}: {e}", "prompt") from None
    if isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < tokenizer.n_words]
        if bad:
            raise BadRequest(f"{name} has token ids outside the vocabulary 0..{tokenizer.n_words - 1}: {bad[:5]}", "prompt")
        return list(prompt)
    raise BadRequest(f"{name} must be a non-empty string or list of token ids, got {_shown(prompt)}", "prompt")


def _messages(messages: Any) -> list[Message]:
    """OpenAI's messages as the tokenizer takes them: a content given as parts of text is joined,
    and a "developer" message (OpenAI's newer name for the system's) is a system message."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest(f"messages must be a non-empty list, got {_shown(messages)}", "messages")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant") or set(m) - {"role", "content", "name"}:
            raise BadRequest(f"messages[{i}] must be {{\"role\": \"system\"|\"developer\"|\"user\"|\"assistant\", \"content\": ...}}, got {_shown(m)}", "messages")
        content = m.get("content")
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be text, got {_shown(content)}", "messages")
        out.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    return out


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (bytes, set)) else repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


class Choice:
    """One answer as the client receives it: its text piece by piece, cut at the first stop string.

    Text that might be the start of a stop string waits until it is known not to be, and so
    do its tokens' log-probabilities: those of a token past the cut are never given.
    """

    def __init__(self, index: int, completion: Completion, stops: Sequence[str], logprobs: bool = False):
        self.index, self.completion, self.stops = index, completion, list(stops)
        self.held = ""  # decoded, not handed over yet
        self.given = 0  # characters handed over
        self.cut = False  # at a stop string
        self.finish_reason: Optional[str] = None
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        # With logprobs: per token decoded so far, where its text ends in the answer's.
        self.ends: Optional[list[int]] = [] if logprobs else None

    def add(self, tokens: list[int], logprobs: list[float], top: list[list[tuple[int, float]]], finish_reason: Optional[str]) -> str:
        """The engine's news for this answer; returns the text the client may have now.
        A stop string found sets finish_reason 'stop' (the caller ends the request)."""
        assert self.finish_reason is None
        self.completion.tokens += tokens
        self.logprobs += logprobs
        self.top += top
        self.held += self.completion.unshown(final=finish_reason is not None)
        if self.ends is not None:
            self._mark(self.given + len(self.held))
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held, self.finish_reason, self.cut = self.held[: min(found)], "", "stop", True
        elif finish_reason is not None:
            # OpenAI's reasons have none for an answer the server ended (a shutdown): "length" says it was cut.
            self.finish_reason = "stop" if finish_reason == "stop" else "length"
            out, self.held = self.held, ""
        else:
            # Only a stop's first len(held) characters can be what held ends with (a client's stop of
            # a million characters checked whole, prefix by prefix, stalled every stream).
            keep = max((k for s in self.stops for k in range(1, min(len(s), len(self.held) + 1)) if self.held.endswith(s[:k])), default=0)
            out, self.held = self.held[: len(self.held) - keep], self.held[len(self.held) - keep :]
        self.given += len(out)
        return out

    def _mark(self, decoded: int) -> None:
        """Where the text of each token decoded since the last mark ends in the answer's: the last
        at `decoded`, the length of the text they all decode to (Completion.shown tokens), those
        before it spaced by their own texts (token_text) within it. A token's own text can be
        longer (U+FFFD for each part of a character) or shorter (the space sentencepiece drops
        after a control token) than what it adds to the whole."""
        assert self.ends is not None
        tokens, prompt, n = self.completion.tokens, self.completion.prompt_tokens, self.completion.shown
        at = self.ends[-1] if self.ends else 0
        for j in range(len(self.ends), n - 1):
            at = min(decoded, at + len(token_text(self.completion.tokenizer, tokens[j - 1] if j else prompt[-1], tokens[j])))
            self.ends.append(at)
        if len(self.ends) < n:
            self.ends.append(decoded)

    def covered(self) -> int:
        """How many of the answer's tokens lie within the text handed over: every one once it
        ended other than at a stop string, else those whose text ends within it."""
        assert self.ends is not None, "a Choice made without logprobs"
        n = len(self.logprobs)
        if self.finish_reason is not None and not self.cut:
            return n
        return bisect.bisect_right(self.ends, self.given, 0, min(n, len(self.ends)))

    def logprobs_body(self, tokenizer: ChatTokenizer, chat: bool, start: int, end: int) -> dict:
        """OpenAI's logprobs of tokens start..end-1 of this answer (chat's 'content' list, or completions' columns)."""
        tokens = self.completion.tokens
        ids = tokens[start:end]
        previous = [tokens[j - 1] if j else self.completion.prompt_tokens[-1] for j in range(start, end)]
        logprobs = self.logprobs[start:end]
        tops = self.top[start:end] if self.top else [[] for _ in ids]
        if chat:
            return {"content": [
                {"token": token_text(tokenizer, p, t), "logprob": lp, "bytes": token_bytes(tokenizer, p, t),
                 "top_logprobs": [{"token": token_text(tokenizer, p, a), "logprob": alp, "bytes": token_bytes(tokenizer, p, a)} for a, alp in top]}
                for p, t, lp, top in zip(previous, ids, logprobs, tops)
            ]}  # fmt: skip
        assert self.ends is not None
        starts = [self.ends[j - 1] if j else 0 for j in range(start, end)]  # each token's text's start in the answer
        return {
            "tokens": [token_label(tokenizer, p, t) for p, t in zip(previous, ids)],
            "text_offset": [len(self.completion.prompt_text) + at for at in starts],  # (OpenAI's count from the prompt's start)
            "token_logprobs": logprobs,
            "top_logprobs": [{token_label(tokenizer, p, a): alp for a, alp in top} for p, top in zip(previous, tops)] if self.top else None,
        }


def token_text(tokenizer: ChatTokenizer, previous: int, token: int) -> str:
    """A token's text after the one before it (sentencepiece drops a space at the start of a text)."""
    return tokenizer.decode([previous, token])[len(tokenizer.decode([previous])) :]


def token_bytes(tokenizer: ChatTokenizer, previous: int, token: int) -> list[int]:
    """Chat logprobs' `bytes` of a token: its text's UTF-8, or where it is part of a character
    (its text alone is U+FFFD) the bytes it stands for."""
    raw = tokenizer.token_bytes(token)
    return list(token_text(tokenizer, previous, token).encode() if raw is None else raw)


def token_label(tokenizer: ChatTokenizer, previous: int, token: int) -> str:
    """Completions' name for a token in its logprobs: its text, or for part of a character
    OpenAI's "bytes:\\xf0" (so that such tokens do not all read U+FFFD)."""
    raw = tokenizer.token_bytes(token)
    return token_text(tokenizer, previous, token) if raw is None else "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())
