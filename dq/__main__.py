"""`python -m dq ...` (and `accelerate launch -m dq ...`) runs the CLI."""

import sys

from dq.cli import main

sys.exit(main())
