"""`python -m data_prep TASK ...` (from the repository root) runs hrm_mega.prep, the shard builders;
`hrm-mega prep TASK ...` and `python -m hrm_mega.prep TASK ...` are the same command."""

import sys

from hrm_mega.prep.cli import main

if __name__ == "__main__":
    sys.exit(main())
