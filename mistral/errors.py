from typing import Any


class MistralError(ValueError):
    """A problem with the user's input (a file, a key, a shape, an option).

    Its message is one line that names the culprit; the CLI prints it without a
    traceback. Our own invariants use `assert` instead.
    """


def shown(value: Any) -> str:
    """repr(value), cut short when long (a params.json integer of 400 digits, a shape of them)."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:40]}... ({len(text)} characters)"


def is_int(value: Any) -> bool:
    """An int, and not a bool (True is an int to Python, never a count or an id to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """An int or a float, and not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(value: Any, name: str) -> int:
    """value, if it is a positive int (not a bool); else a MistralError naming `name`."""
    if not is_int(value) or value <= 0:
        raise MistralError(f"{name} must be a positive integer, got {value!r}")
    return value
