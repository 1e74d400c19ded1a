"""``python -m stmorph`` is the ``stmorph`` command."""

import sys

from .cli import main

sys.exit(main())
