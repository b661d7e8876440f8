"""``python -m spotd``."""

import sys

from spotd.cli import main

sys.exit(main())
