"""`python -m mistral` and the `mistral` command."""

import sys


def run() -> None:
    """mistral.main.main, with its imports (torch's alone takes seconds) inside the Ctrl-C handling."""
    try:
        from mistral.launch import follow_launcher

        follow_launcher()  # a rank of mistral's own launcher: not a moment longer than it
        from mistral.main import main
    except KeyboardInterrupt:  # stop quietly, as main() does once running
        print(file=sys.stderr)
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
