"""``python -m dsv3``: the same CLI as the ``dsv3`` console script."""

import sys

from .cli import main

sys.exit(main())
