"""python -m refimpl run ... (the same as the ringattn command)."""

import sys

from .cli import main

sys.exit(main())
