"""``python -m evoxtral_stream`` is the ``evoxtral-stream`` command."""

import sys

from .cli import main

sys.exit(main())
