"""The command line of one `mistral` command, checked before fire runs anything.

fire calls the command with the arguments it understood and only then complains about
the rest: a misspelled option would be reported after the model had run (or a chat had
answered every line). `check_arguments` reads the arguments as fire will, refuses what
fire would leave over, and hands fire each option as `--name=value`, so that a switch
such as `--json` never swallows the prompt after it.
"""

import difflib
import inspect
import re
from typing import Callable, Mapping

from mistral.errors import MistralError

# fire's test for a flag (core._IsFlag); anything else, a negative number included, is positional.
FLAG = re.compile(r"--|-[a-zA-Z]")
HELP = ("--help", "-h")


def check_arguments(command: Callable, name: str, args: list[str]) -> list[str]:
    """args of `mistral NAME ...` rewritten for fire, or a MistralError naming the argument at fault."""
    params = inspect.signature(command).parameters
    options = [n for n, p in params.items() if p.kind is not p.VAR_POSITIONAL]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params.values())
    positionals: list[str] = []
    flags: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not FLAG.match(arg):
            positionals.append(arg)
            continue
        key, equals, value = arg.lstrip("-").partition("=")
        key = key.replace("-", "_")
        bare = not equals and (i == len(args) or FLAG.match(args[i]) is not None)
        if bare and key.startswith("no") and key[2:] in params and _is_switch(params[key[2:]]):
            key, value, equals = key[2:], "False", "="
        option = _option(key, arg, options, name, varargs)
        if _is_switch(params[option]):
            # A switch takes no value from the next argument (fire's would take a prompt).
            if not equals:
                value = "True"
            elif value not in ("True", "False"):
                raise MistralError(f"{arg}: --{option} is a switch: write --{option} or --no{option}")
        elif not equals:
            if bare:
                raise MistralError(f"{arg}: the option needs a value, e.g. --{option}=VALUE")
            value = args[i]
            i += 1
        flags[option] = value
    _check_positionals(params, name, positionals, flags, varargs)
    return positionals + [f"--{k}={v}" for k, v in flags.items()]


def _is_switch(param: inspect.Parameter) -> bool:
    return param.annotation is bool


def _option(key: str, arg: str, options: list[str], name: str, varargs: bool) -> str:
    """The option that `key` names: itself, or, as fire reads a single letter, the one option starting with it."""
    if key in options:
        return key
    if len(key) == 1:
        matches = [o for o in options if o[0] == key]
        if len(matches) == 1:
            return matches[0]
        if matches:
            raise MistralError(f"{arg} is ambiguous: it could be any of {', '.join('--' + m for m in matches)}")
    close = difflib.get_close_matches(key, options, n=1)
    hint = f"did you mean --{close[0]}?" if close else f"the options are {', '.join('--' + o for o in options)}"
    if varargs and not close:  # the text may be a prompt that starts with "-"
        hint += f"; a prompt that starts with '-' goes after '--': mistral {name} -- {arg!r}"
    raise MistralError(f"{arg}: no such option of `mistral {name}`: {hint}")


def _check_positionals(
    params: Mapping[str, inspect.Parameter], name: str, positionals: list[str], flags: dict[str, str], varargs: bool
) -> None:
    slots = [n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD and n not in flags]
    if varargs:
        return
    if len(positionals) > len(slots):
        usage = " ".join(f"[{n.upper()}]" if params[n].default is not params[n].empty else n.upper() for n in slots)
        raise MistralError(f"`mistral {name}` takes {usage or 'no arguments'}, got {len(positionals)}: {positionals}")
    missing = [n.upper() for n in slots[len(positionals) :] if params[n].default is params[n].empty]
    if missing:
        raise MistralError(f"`mistral {name}` needs {' '.join(missing)}")
