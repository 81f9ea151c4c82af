"""`python -m conveyor.cli`: the same command as the `conveyor` console script."""

import sys

from conveyor.cli import main

sys.exit(main())
