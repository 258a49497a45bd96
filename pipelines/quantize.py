"""`python pipelines/quantize.py ARGS` runs `python -m hrm_mega.entry.quantize ARGS`."""

import sys

from hrm_mega.entry.quantize import main

if __name__ == "__main__":
    sys.exit(main())
