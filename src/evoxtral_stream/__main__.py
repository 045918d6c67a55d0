"""``python -m evoxtral_stream`` is the ``evoxtral-stream`` command."""

import sys

try:
    from .cli import main
except BaseException as e:
    # A Ctrl-C as Python reads cli/__init__.py, before its own guard runs
    # (.startup).
    from .startup import exit_if_interrupted

    exit_if_interrupted(e)
    raise

sys.exit(main())
