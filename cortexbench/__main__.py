"""``python -m cortexbench``: list the commands (the same as the ``cortexbench`` console script)."""

import sys

from cortexbench.cli import main

sys.exit(main())
