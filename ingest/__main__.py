import sys

from .signals import early_queue

signals = early_queue(sys.argv[1:])  # first: a SIGHUP during the imports below is queued, not fatal

from .cli import main  # noqa: E402

sys.exit(main(signals=signals))
