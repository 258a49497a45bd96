"""`python pipelines/export_hf.py ARGS` runs `python -m hrm_mega.entry.export_hf ARGS`."""

import sys

from hrm_mega.entry.export_hf import main

if __name__ == "__main__":
    sys.exit(main())
