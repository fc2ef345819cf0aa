"""`python -m emoserve.cli`: the `emoserve` command."""

import sys

from emoserve.cli import main

sys.exit(main())
