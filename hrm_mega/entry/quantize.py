"""Quantization: `hrm-mega quantize CKPT OUT --scheme int8|int4 [--format hrm-mega|hf] [--tokenizer PATH]`.

CKPT is anything `hrm-mega eval` reads. The HRMGemma's Linear and embedding weights are quantized
weight-only with torchao (hrm_mega/models/quantize.py). --format hrm-mega (default) writes a quantized
model directory that `hrm-mega serve`, `generate` and `eval` load; --format hf writes a Hugging Face export
(remote code + TorchAoConfig) that `AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`
loads with the same quantized tensors. Prints the weight bytes against fp32.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hrm_mega.entry.common import run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrm-mega quantize", description="weight-only int8/int4 quantization")
    p.add_argument("checkpoint", help="training checkpoint dir, consolidated .safetensors, or model dir")
    p.add_argument("out", help="output directory (must not exist, or be empty)")
    p.add_argument(
        "--scheme", choices=["int8", "int4"], required=True, help="int8 per row; int4 per group of 32"
    )
    p.add_argument(
        "--format", choices=["hrm-mega", "hf"], default="hrm-mega",
        help="hrm-mega: a model directory for serve/generate/eval; hf: a transformers export (remote code)",
    )  # fmt: skip
    p.add_argument(
        "--tokenizer", help="SentencePiece tokenizer.model (default: the checkpoint's own or data.path's)"
    )
    return p


def run(args: argparse.Namespace) -> int:
    from hrm_mega.checkpoint.consolidate import load_model
    from hrm_mega.checkpoint.model_dir import tokenizer_for
    from hrm_mega.checkpoint.quantized import save_quantized
    from hrm_mega.convert.quantize import export_hf_quantized
    from hrm_mega.models.lm import HRMGemma
    from hrm_mega.models.quantize import QuantizeError, pack_int4_linears, quantize_model, weight_bytes

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} already exists and is not an empty directory; choose a new output directory")
    model, config = load_model(args.checkpoint)
    if not isinstance(model, HRMGemma):
        raise QuantizeError(
            f"{args.checkpoint}: a model.family={config.model.family} model; quantize takes hrm_gemma"
        )
    tokenizer = args.tokenizer or tokenizer_for(args.checkpoint, config)
    before = weight_bytes(model)
    quantize_model(model.eval(), args.scheme)
    if args.format == "hf":
        export_hf_quantized(model, config, out, args.scheme, tokenizer=tokenizer)
    else:
        save_quantized(model, config, out, args.scheme, tokenizer=tokenizer)
    after = weight_bytes(model)
    packed = ""
    if args.scheme == "int4" and pack_int4_linears(model):  # what load_quantized(pack_int4=True) holds
        packed = f"; {weight_bytes(model) / 2**20:.2f} MiB ({weight_bytes(model) / before:.3f}x) packed"
    print(
        f"wrote {out}: {args.scheme} weights, {after / 2**20:.2f} MiB in memory ({after / before:.3f}x fp32)"
        + packed
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main("quantize", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
