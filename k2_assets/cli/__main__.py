"""`python -m k2_assets.cli`: the `k2` command."""

import sys

from k2_assets.cli import main

sys.exit(main())
