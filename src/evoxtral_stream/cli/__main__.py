"""``python -m evoxtral_stream.cli``: the ``evoxtral-stream`` command, as
``python -m evoxtral_stream`` is (Python imported this package first)."""

import sys

from . import main

sys.exit(main())
