"""`python -m mistral` and the `mistral` command."""

import os
import signal
import sys
from typing import Any


def _quit(signum: int, frame: Any) -> None:
    # Ctrl-C while the imports run, or once the command is done (Python's exit handlers): end
    # at once, quietly. A KeyboardInterrupt raised there would surface inside torch's or
    # numpy's own start-up or clean-up as a traceback, or in C++ as an abort.
    sys.stderr.write("\n")
    os._exit(128 + signum)


def run() -> None:
    """mistral.main.main, its imports (torch's alone takes seconds) made while Ctrl-C ends the process quietly."""
    previous = signal.getsignal(signal.SIGINT)
    quiet = _quit if previous is not signal.SIG_IGN else previous  # a background job ignores it: so do we
    signal.signal(signal.SIGINT, quiet)
    try:
        from mistral.launch import follow_launcher

        follow_launcher()  # a rank of mistral's own launcher: not a moment longer than it
        from mistral.main import main
    finally:
        signal.signal(signal.SIGINT, previous)
    try:
        main()  # which stops quietly on Ctrl-C itself
    finally:
        signal.signal(signal.SIGINT, quiet)


if __name__ == "__main__":
    run()
