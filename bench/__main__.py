"""``python -m zchat.bench``: the same as ``zchat-bench``."""

from __future__ import annotations

import sys

from .main import main

if __name__ == "__main__":
    sys.exit(main())
