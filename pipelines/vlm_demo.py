"""`python pipelines/vlm_demo.py ARGS` runs `python -m hrm_mega.entry.vlm_demo ARGS`."""

import sys

from hrm_mega.entry.vlm_demo import main

if __name__ == "__main__":
    sys.exit(main())
