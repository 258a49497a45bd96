"""`python pipelines/generate.py ARGS` runs `python -m hrm_mega.entry.generate ARGS`."""

import sys

from hrm_mega.entry.generate import main

if __name__ == "__main__":
    sys.exit(main())
