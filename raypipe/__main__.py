"""``python -m raypipe``."""

from __future__ import annotations

import sys

from raypipe.cli import main

sys.exit(main())
