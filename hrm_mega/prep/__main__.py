"""`python -m hrm_mega.prep ...`: see hrm_mega/prep/cli.py."""

from hrm_mega.prep.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
