class MistralError(ValueError):
    """A problem with the user's input (a file, a key, a shape, an option).

    Its message is one line that names the culprit; the CLI prints it without a
    traceback. Our own invariants use `assert` instead.
    """
