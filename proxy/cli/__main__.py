"""`python -m proxy.cli`: the same as the `jitgate` console script."""

import sys

from .main import main

sys.exit(main())
