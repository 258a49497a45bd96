"""`python pipelines/serve.py ARGS` runs `python -m hrm_mega.entry.serve ARGS`."""

import sys

from hrm_mega.entry.serve import main

if __name__ == "__main__":
    sys.exit(main())
