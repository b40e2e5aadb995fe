"""Speed and memory of every attention mechanism against sequence length, as ratios to vanilla.  (python scripts/bench.py --help; installed as cast-bench)"""

import sys

from cast.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
