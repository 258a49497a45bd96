"""`python pipelines/pretrain.py ARGS` runs `python -m hrm_mega.entry.pretrain ARGS`."""

import sys

from hrm_mega.entry.pretrain import main

if __name__ == "__main__":
    sys.exit(main())
