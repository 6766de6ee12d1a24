"""Where the reference data lives: `shared/reference/` beside the checkout (as in CI), overridable by env."""

from __future__ import annotations

import os
from pathlib import Path

REFERENCE_ROOT = Path(os.environ.get("CATALOG_EMBED_REFERENCE", Path(__file__).resolve().parents[3] / "shared" / "reference"))
MUSICNN_REFERENCE = REFERENCE_ROOT / "musicnn"
MULE_REFERENCE = REFERENCE_ROOT / "mule"
