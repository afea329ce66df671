"""``python -m mz_pipelines.medseg <verb>``."""
from __future__ import annotations

import sys

from .cli import DOMAIN

if __name__ == "__main__":
    sys.exit(DOMAIN.main())
