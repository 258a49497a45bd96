"""Weight-only int8 / int4 (torchao) against fp32: held-out loss and weight bytes of an HRMGemma.

For a trained checkpoint (e.g. `make demo-lm`'s runs/demo-lm/checkpoints/step-00000400), evaluates the
held-out loss of every data source of its config (as `hrm-mega eval` does, at the trained cycles) in
fp32 and after quantize_model(..., "int8") and (..., "int4"), saved as a quantized model directory and
loaded back as `serve`, `generate` and `eval` load it, and prints per scheme: each source's loss and its
change against fp32, the token-weighted mean change, the weight bytes held in memory and the bytes of
the directory's model.safetensors, both against fp32; for int4 also the bytes with its Linear weights
packed two per byte (load_quantized(pack_int4=True)) and how far that model's logits are from the
unpacked one's on two random rows (its held-out loss is the unpacked one's when they are equal). Exit
status 1 when a scheme misses its bound (int8: loss within 1%, bytes <= 0.3x; int4: within 3%, <= 0.2x;
bytes on disk and in memory, packed for int4).

    python bench/quantize_lm.py CKPT [--root DIR] [--max-samples N] [--out DIR] [--threads 2]
        [--schemes int8,int4]

--root: where the config's relative data paths start (default: the current directory, as for a run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

BOUNDS = {"int8": (0.01, 0.3), "int4": (0.03, 0.2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--root", default=".", help="base of the config's relative data paths")
    p.add_argument("--max-samples", type=int, default=0, help="held-out rows per source (0: all)")
    p.add_argument("--out", help="write the quantized model directories here (default: a temp dir)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--schemes", default="int8,int4", help="comma-separated (default int8,int4)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from hrm_mega.checkpoint.consolidate import load_model
    from hrm_mega.checkpoint.quantized import load_quantized, save_quantized
    from hrm_mega.models.quantize import quantize_model, weight_bytes
    from hrm_mega.training.engine import World
    from hrm_mega.training.tasks.lm import evaluate_lm

    root = Path(args.root)
    model, config = load_model(args.checkpoint)
    model.eval()
    sources = [(s.name, s.path, s.shard_url) for s in config.data.sources] or [
        (None, config.data.path, config.data.shard_url)
    ]
    world = World(rank=0, world_size=1, local_rank=0, dp_rank=0, dp_size=1, device=torch.device("cpu"))
    train = replace(config.train, eval_max_samples=args.max_samples)

    def losses(m) -> dict[str, tuple[float, float]]:
        out = {}
        for name, path, url in sources:
            data = replace(config.data, path=str(root / path), shard_url=url, sources=[])
            metrics = evaluate_lm(
                m, replace(config, train=train, data=data), world, cycles=config.model.h_cycles
            )
            out[name or "data"] = (metrics["loss"], float(metrics.get("tokens", 1)))
        return out

    base = losses(model)
    fp32_bytes = weight_bytes(model)
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="quantize-lm-"))
    fp32_file = out_dir / "fp32.safetensors"
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v for k, v in model.state_dict().items() if not k.endswith((".cos", ".sin"))}, fp32_file)
    print(f"{args.checkpoint}: {sum(v.numel() for v in model.parameters()):,} parameters, "
          f"{fp32_bytes / 2**20:.2f} MiB in fp32; sources {', '.join(base)}")  # fmt: skip
    print("fp32   " + "  ".join(f"{k} {v[0]:.4f}" for k, v in base.items()))
    ok = True
    for scheme in args.schemes.split(","):
        loss_bound, byte_bound = BOUNDS[scheme]
        q, _ = load_model(args.checkpoint)
        quantize_model(q.eval(), scheme)
        d = save_quantized(q, config, out_dir / scheme, scheme)
        q = load_model(d)[0].eval()  # what serve / generate / eval hold
        got = losses(q)
        memory = held = weight_bytes(q) / fp32_bytes
        packed_note = ""
        if scheme == "int4":  # packed two per byte (opt-in): its bytes, and its logits against q's
            packed = load_quantized(d, pack_int4=True)[0].eval()
            held = weight_bytes(packed) / fp32_bytes
            ids = torch.randint(
                0, config.model.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)
            )
            with torch.no_grad():
                diff = (packed.infer(ids)[0] - q.infer(ids)[0]).abs().max().item()
            packed_note = f" ({held:.3f}x packed, whose logits differ by {diff:.2e})"
        disk = os.path.getsize(d / "model.safetensors") / os.path.getsize(fp32_file)
        changes = {k: got[k][0] / base[k][0] - 1 for k in base}
        tokens = {k: base[k][1] for k in base}
        mean = sum(changes[k] * tokens[k] for k in base) / sum(tokens.values())
        worst = max(abs(c) for c in changes.values())
        fits = worst <= loss_bound and max(disk, held) <= byte_bound
        ok &= fits
        print(
            f"{scheme:<6} " + "  ".join(f"{k} {got[k][0]:.4f} ({changes[k]:+.2%})" for k in base)
            + f"; mean {mean:+.2%}, worst {worst:.2%} (bound {loss_bound:.0%}); weight bytes "
            f"{memory:.3f}x in memory{packed_note}, {disk:.3f}x on disk (bound {byte_bound}x); "
            f"{'ok' if fits else 'MISSED'}"
        )  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
