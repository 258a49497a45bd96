"""Command line of the shard builders: `python -m hrm_mega.prep {sudoku,maze,arc,hrm-npy} --out DIR ...`,
and of the text tools (`corpus`, `puzzle-text`, `tokenizer`, `text`).

`main(argv)` returns an exit code instead of exiting, so other front ends (`hrm-mega prep ...`) can call
it. Bad arguments and bad input files give one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from hrm_mega.data.shards import DataFormatError
from hrm_mega.prep import arc, corpus, hrm_npy, images, maze, puzzle_text, reasoning, sudoku, text, tokenizer
from hrm_mega.prep.common import DataPrepError

PROG = "python -m hrm_mega.prep"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error instead of the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(prog=prog, description="Build puzzle datasets as WebDataset shards + manifest.json.")
    subparsers = parser.add_subparsers(dest="task", required=True, metavar="TASK", parser_class=_Parser)
    for module in (sudoku, maze, arc, hrm_npy, corpus, puzzle_text, reasoning, tokenizer, text, images):
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    """Builds one dataset; returns 0 on success, 2 on bad arguments or input (message on stderr).

    `prog` prefixes the command recorded in manifest.json (" ".join of argv after it).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as e:  # --help, or an argparse error already printed
        return int(e.code or 0)
    command = " ".join([prog, *argv])
    try:
        manifest = args.run(args, command)
    except (DataPrepError, DataFormatError, OSError) as e:
        print(f"{prog} {args.task}: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(f"wrote {manifest}", file=sys.stderr)
    return 0
