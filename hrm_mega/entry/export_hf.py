"""Hugging Face export: `hrm-mega export-hf CKPT OUT [--tokenizer PATH] [--dtype fp32|bf16] [--format F]
[--quantize int8|int4]`.

CKPT is anything `hrm-mega eval` reads: a training checkpoint (runs/.../checkpoints/step-*), a
consolidated .safetensors file or a model directory. An HRMGemma that computes exactly Gemma 3 becomes a
plain Gemma3ForCausalLM; anything else ships its modeling code (load it with trust_remote_code=True).
--quantize writes the weight-only quantized export of `hrm-mega quantize --format hf` instead (remote code
and a TorchAoConfig). See docs/checkpoints.md and hrm_mega/convert/hf_export.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hrm_mega.entry.common import run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hrm-mega export-hf", description="export a model for Hugging Face transformers"
    )
    p.add_argument("checkpoint", help="training checkpoint dir, consolidated .safetensors, or model dir")
    p.add_argument("out", help="output directory (must not exist, or be empty)")
    p.add_argument(
        "--tokenizer",
        help="SentencePiece tokenizer.model (default: the one next to CKPT or in its data.path)",
    )
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of the exported weights")
    p.add_argument(
        "--format", choices=["auto", "gemma3", "remote"], default="auto",
        help="auto: plain Gemma3ForCausalLM when the model is exactly Gemma 3, else remote code",
    )  # fmt: skip
    p.add_argument(
        "--max-shard-size", default="5GB", help="split the weights into files of at most this size"
    )
    p.add_argument(
        "--quantize", choices=["int8", "int4"],
        help="weight-only quantized export (torchao; the same as `hrm-mega quantize --format hf`)",
    )  # fmt: skip
    return p


def run(args: argparse.Namespace) -> int:
    if args.quantize:
        from hrm_mega.entry import quantize

        clashes = [f"--format {args.format}"] if args.format == "gemma3" else []
        clashes += [f"--dtype {args.dtype}"] if args.dtype != "fp32" else []
        if clashes:
            raise ValueError(
                f"--quantize {args.quantize} writes a remote-code export with fp32 scales; drop {' and '.join(clashes)}"
            )
        return quantize.run(
            argparse.Namespace(checkpoint=args.checkpoint, out=args.out, scheme=args.quantize, format="hf",
                               tokenizer=args.tokenizer)
        )  # fmt: skip
    from hrm_mega.checkpoint.consolidate import load_model
    from hrm_mega.checkpoint.model_dir import tokenizer_for
    from hrm_mega.convert.hf_export import DTYPES, export_hf

    model, config = load_model(args.checkpoint)
    tokenizer = args.tokenizer or tokenizer_for(args.checkpoint, config)
    report = export_hf(
        model, config, args.out, tokenizer=tokenizer, dtype=DTYPES[args.dtype], format=args.format,
        max_shard_size=args.max_shard_size, image_processor=image_processor_for(args.checkpoint, config),
    )  # fmt: skip
    how = "" if report.format == "gemma3" else " (remote code: load with trust_remote_code=True)"
    print(f"wrote {report.out}: {report.architecture}{how}")
    if report.tokenizer is not None:
        print(f"tokenizer: {report.tokenizer}")
    elif config.model.family == "hrm_gemma":
        print(
            "no tokenizer: pass --tokenizer PATH/tokenizer.model to include one (none inside CKPT or in data.path)"
        )
    for note in report.notes:
        print(f"note: {note}")
    return 0


def image_processor_for(checkpoint: str, config: Any) -> Any:
    """For a model with images: the preprocessor_config.json inside CKPT (import-hf keeps Gemma 3's),
    else the preprocessing of its training data (manifest extra.image: pan-and-scan as trained), else
    None (Gemma 3's defaults at model.vision.image_size)."""
    from hrm_mega.convert.hf_gemma import IMAGE_PROCESSOR_FILE
    from hrm_mega.training.tasks.lm import image_processing

    if getattr(config.model, "vision", None) is None:
        return None
    own = Path(checkpoint) / IMAGE_PROCESSOR_FILE
    if own.is_file():
        return own
    try:
        return image_processing(config)
    except ValueError:  # the training data is not here (or unreadable)
        return None


def main(argv: list[str] | None = None) -> int:
    return run_main("export-hf", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
