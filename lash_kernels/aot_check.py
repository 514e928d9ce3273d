"""``python -m lash_kernels.aot_check``: runs :func:`lash_kernels.tools.aot_check.main`."""

import sys

from lash_kernels.tools.aot_check import main

if __name__ == "__main__":
    sys.exit(main())
