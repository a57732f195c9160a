"""``python -m edgeadapt.cli``: the same as the ``edgeadapt`` command."""

import sys

from edgeadapt.cli import main

sys.exit(main())
