from typing import Any


class MistralError(ValueError):
    """A problem with the user's input (a file, a key, a shape, an option).

    Its message is one line that names the culprit; the CLI prints it without a
    traceback. Our own invariants use `assert` instead.
    """


def check_positive_int(value: Any, name: str) -> int:
    """value, if it is a positive int (not a bool); else a MistralError naming `name`."""
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise MistralError(f"{name} must be a positive integer, got {value!r}")
    return value
