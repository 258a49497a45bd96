"""Hugging Face import: `hrm-mega import-hf HF_DIR OUT [--set model.h_cycles=2 ...]`.

HF_DIR is a Gemma 3 checkpoint directory (config.json + model.safetensors, or shards with
model.safetensors.index.json). OUT becomes an hrm-mega model directory (model.safetensors + config.yaml)
holding an HRMGemma that computes exactly that Gemma 3; its gates start at zero, so cycles raised with
--set give the same logits until training opens them. See docs/checkpoints.md.
"""

from __future__ import annotations

import argparse
import sys

from hrm_mega.entry.common import run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hrm-mega import-hf", description="import a Gemma 3 checkpoint into HRMGemma"
    )
    p.add_argument("hf_dir", help="Hugging Face checkpoint directory (config.json + safetensors)")
    p.add_argument("out", help="output model directory (must not exist, or be empty)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field on top of the checkpoint's shape, e.g. --set model.h_cycles=2 (repeatable)",
    )  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    from hrm_mega.convert.hf_import import import_hf

    out, config = import_hf(args.hf_dir, args.out, args.overrides)
    m = config.model
    print(
        f"wrote {out}: HRMGemma, {m.num_layers} layers ({m.num_groups} CycleBlocks + {m.num_tail_layers} tail), "
        f"h_cycles={m.h_cycles}, l_cycles={m.l_cycles}"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("import-hf", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
