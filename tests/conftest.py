from __future__ import annotations

import sys
from pathlib import Path

# tests/fixtures.py is imported as `fixtures` by every test module
sys.path.insert(0, str(Path(__file__).parent))
