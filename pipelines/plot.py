"""`python pipelines/plot.py ARGS` runs `python -m hrm_mega.entry.plot ARGS`."""

import sys

from hrm_mega.entry.plot import main

if __name__ == "__main__":
    sys.exit(main())
