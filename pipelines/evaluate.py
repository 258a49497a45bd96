"""`python pipelines/evaluate.py ARGS` runs `python -m hrm_mega.entry.evaluate ARGS`."""

import sys

from hrm_mega.entry.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
