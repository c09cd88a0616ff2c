"""``python -m bn_ref.conformance``: see :mod:`bn_ref.conformance.cli`."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
