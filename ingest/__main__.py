"""`python -m ingest` and the installed `hipcall-ingest` command (pyproject's entry point is `main`
here, not ingest.cli's): serve's and run's SIGHUP and SIGUSR2 are queued before the seconds the
other imports take (ingest/signals.py); a console script imports its entry point's module first."""

import sys

from .signals import early_queue


def main() -> int:
    signals = early_queue(sys.argv[1:])  # first: a SIGHUP during the imports below is queued, not fatal
    from .cli import main as cli_main

    return cli_main(signals=signals)


if __name__ == "__main__":
    sys.exit(main())
