"""Download or generate the data of one LRA task into data/ (or --out).  (python scripts/prepare_data.py --help; installed as cast-prepare-data)"""

import sys

from cast.app.prepare import main

if __name__ == "__main__":
    sys.exit(main())
