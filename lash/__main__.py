"""``python -m lash train|ashem …``."""

import sys

from lash.cli import main

sys.exit(main())
