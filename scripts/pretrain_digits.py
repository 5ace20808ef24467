"""Train (or find in the cache) the digits prior and classifier: same as ``steer pretrain-digits``.

Usage: ``python scripts/pretrain_digits.py [--cache-dir DIR] [--steps N] [--force]``
"""

import sys

from steer.digits.prior import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
