"""``python -m mz_apps.medseg [--host H] [--port P] [--share] [--runs-root runs]``."""
from __future__ import annotations

from .app import main

if __name__ == "__main__":
    main()
