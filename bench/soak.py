"""The fault soak as a command: `python bench/soak.py --requests 20000 --concurrency 50 --seed 1`.

The soak itself is tests/reliability/soak.py (tests/reliability/test_soak.py runs a short version of
the same code, and the reliability tests share its helpers): tests never import bench/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.reliability.soak import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
