#!/usr/bin/env python3
"""The sync relay: `python host/sync_bridge.py --help` (paytoken_host.sync_bridge_cli)."""

import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "firmware" / "lib")]

from paytoken_host.sync_bridge_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
