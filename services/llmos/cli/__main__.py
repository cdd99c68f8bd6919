"""`python -m llmos.cli` is the `llmos` command."""

import sys

from llmos.cli import main

sys.exit(main())
