"""`python pipelines/posttrain_rl.py ARGS` runs `python -m hrm_mega.entry.posttrain_rl ARGS`."""

import sys

from hrm_mega.entry.posttrain_rl import main

if __name__ == "__main__":
    sys.exit(main())
