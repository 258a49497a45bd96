"""`python pipelines/demo.py ARGS` runs `python -m hrm_mega.entry.demo ARGS`."""

import sys

from hrm_mega.entry.demo import main

if __name__ == "__main__":
    sys.exit(main())
