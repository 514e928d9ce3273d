"""The ASHEM experiment end to end: data, phase 1, hard-token mining, phase 2, routing, report.

    python colab2.py                      # defaults: WikiText-2 (offline corpus without the hub)
    python colab2.py --quick --out DIR    # a few minutes on a laptop CPU
    python colab2.py --protocol original  # the seed's own protocol, for a like-for-like comparison
    python colab2.py --seeds 3            # three runs, every figure as mean ± std
    python colab2.py --dataset path/to/text.txt   # any text file, split 90/10 by lines

Writes DIR/results.json, DIR/results.md and PNG plots (dev-slice training curves with the kept
epochs, the phase-1 confidence histogram with the threshold, PPL per exit before and after
phase 2). ``python -m lash ashem`` is the same command; ``--help`` lists every flag.
"""

import sys

from lash.cli import ashem_main

if __name__ == "__main__":
    sys.exit(ashem_main())
