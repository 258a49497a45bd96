"""`python pipelines/launch.py ARGS` runs `python -m hrm_mega.entry.launch ARGS`."""

import sys

from hrm_mega.entry.launch import main

if __name__ == "__main__":
    sys.exit(main())
