"""Pictures of what CAST clusters, and of a task's samples.  (python scripts/visualize.py --help; installed as cast-visualize)"""

import sys

from cast.app.visualize import main

if __name__ == "__main__":
    sys.exit(main())
