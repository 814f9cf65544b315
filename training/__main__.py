"""Entry point of ``python -m training`` and the ``repserve-train`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
