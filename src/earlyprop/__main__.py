"""``python -m earlyprop``: the same entry point as the ``earlyprop`` console script."""

import sys

from earlyprop.cli import main

if __name__ == "__main__":
    sys.exit(main())
