"""Tables and plots from finished runs: the LRA table, CAST against cluster count, failures.  (python scripts/report.py --help; installed as cast-report)"""

import sys

from cast.app.report import main

if __name__ == "__main__":
    sys.exit(main())
