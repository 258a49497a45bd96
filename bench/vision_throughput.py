"""Images through HRMGemma on the CPU: image tokens per second through the vision tower and through the
whole model, and memory per image at 1, 4 and 16 crops (views).

A view is one picture the tower sees: an image, or one of its pan-and-scan crops; each becomes
mm_tokens_per_image tokens of the text model ("image tokens"). An image with V views is one row

    BOS + V x [boi, image x mm_tokens_per_image, eoi] + 16 text tokens + EOS

of a batch of --rows rows. Random-init weights in fp32, on --threads cores, three measurements per V:

1. tower: the SigLIP tower and projector alone, inference (no autograd, as a frozen tower runs):
   views/s, image tokens/s and patches/s;
2. model: a training step of the whole model (forward with the images merged into the residual stream,
   lm_loss, backward; the tower trainable): image tokens/s and all tokens/s;
3. memory: the activations that training step keeps for backward (every tensor autograd saves, each
   storage counted once; saved_tensors_hooks), per image (per row: its text is 18 of its tokens). That
   is the part of a step's memory that grows with images; weights, gradients and optimizer state do not.

Two model sizes (`--size`):
  - tiny: `make demo-vlm`'s model (configs/lm/hrmgemma_vlm_tiny.yaml: a 64 px, patch 8, 2-layer tower);
  - small: a SigLIP-S-like tower at 224 px (patch 14: 256 patches; 6 layers, width 384, 6 heads; 64
    tokens per view) on the same text decoder at width 256.
Gemma 3's own tower (896 px, 4096 patches, 27 layers of width 1152) costs about 0.9 TFLOP per view
forward; it is a GPU measurement, not one for this machine.

    python bench/vision_throughput.py [--size tiny|small] [--views 1,4,16] [--rows 4] [--steps 3]
        [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hrm_mega.config import load_config
from hrm_mega.models import build_model
from hrm_mega.models.lm import HRMGemma, lm_loss

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs/lm/hrmgemma_vlm_tiny.yaml"
SIZES = {
    "tiny": [],
    "small": [
        "model.hidden_size=256", "model.intermediate_size=512", "model.head_dim=64", "model.query_pre_attn_scalar=64",
        "model.max_position=2048", "model.sliding_window=512",
        "model.vision={image_size: 224, patch_size: 14, hidden_size: 384, intermediate_size: 1536, num_layers: 6, "
        "num_heads: 6, mm_tokens_per_image: 64, image_token_id: 272, boi_token_id: 4, eoi_token_id: 5, "
        "trainable: true}",
    ],
}  # fmt: skip
TEXT = 16  # text tokens per row


def build(size: str) -> HRMGemma:
    config = load_config(RECIPE, ["data.path=", "model.max_position=2048", *SIZES[size]])
    return build_model(config.model).init_weights(0)


def batch(model: HRMGemma, rows: int, views: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [rows, s], labels, pixel_values [rows * views, 3, S, S]) of rows with one image of
    `views` views each and TEXT random text tokens."""
    v = model.config.vision
    run = [v.boi_token_id, *[v.image_token_id] * v.mm_tokens_per_image, v.eoi_token_id]
    g = torch.Generator().manual_seed(0)
    text = torch.randint(6, 16, (rows, TEXT), generator=g)
    head = torch.tensor([2, *run * views]).expand(rows, -1)
    ids = torch.cat((head, text, torch.ones(rows, 1, dtype=torch.long)), dim=1)
    labels = torch.where(torch.isin(ids, torch.tensor(run)) | (ids == 2), -100, ids)
    pixels = torch.randn(rows * views, 3, v.image_size, v.image_size, generator=g)
    return ids, labels, pixels


def timed(fn, steps: int) -> float:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - start) / steps


def measure(size: str, views: int, rows: int, steps: int) -> dict:
    model = build(size)
    v = model.config.vision
    ids, labels, pixels = batch(model, rows, views)

    def tower() -> None:
        with torch.no_grad():
            model.vision(pixels)

    def train_step() -> None:
        logits, aux = model(ids, pixel_values=pixels)
        lm_loss(logits, labels, aux, model.config)["loss"].backward()
        model.zero_grad(set_to_none=True)

    t_tower, t_step = timed(tower, steps), timed(train_step, steps)
    n = rows * views
    return {
        "size": size, "views": views, "rows": rows, "seq_len": ids.shape[1],
        "tower_views_per_s": n / t_tower, "tower_image_tokens_per_s": n * v.mm_tokens_per_image / t_tower,
        "tower_patches_per_s": n * v.patches_per_side**2 / t_tower,
        "model_image_tokens_per_s": n * v.mm_tokens_per_image / t_step, "model_tokens_per_s": ids.numel() / t_step,
    }  # fmt: skip


def memory(model: HRMGemma, views: int, rows: int) -> dict:
    """Bytes autograd keeps for backward in one training step (every tensor saved by the forward, each
    storage counted once), per image: the memory a step's activations take, whatever the allocator."""
    ids, labels, pixels = batch(model, rows, views)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, aux = model(ids, pixel_values=pixels)
        loss = lm_loss(logits, labels, aux, model.config)["loss"]
    loss.backward()
    model.zero_grad(set_to_none=True)
    return {"mb_per_image": sum(storages.values()) / 2**20 / rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="small")
    p.add_argument("--views", default="1,4,16")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for views in [int(x) for x in args.views.split(",")]:
        row = measure(args.size, views, args.rows, args.steps)
        row |= memory(build(args.size), views, args.rows)
        row["mb_per_view"] = row["mb_per_image"] / views
        results.append(row)
        print(json.dumps(row), flush=True)
    print(f"\n{args.size}: {args.rows} rows of one image each, fp32, {args.threads} threads")
    print(f"{'views':>5} {'seq':>5} {'tower views/s':>13} {'tower img tok/s':>15} {'model img tok/s':>15} "
          f"{'model tok/s':>11} {'MB/image':>9} {'MB/view':>8}")  # fmt: skip
    for r in results:
        print(f"{r['views']:>5} {r['seq_len']:>5} {r['tower_views_per_s']:>13.1f} {r['tower_image_tokens_per_s']:>15,.0f} "
              f"{r['model_image_tokens_per_s']:>15,.0f} {r['model_tokens_per_s']:>11,.0f} {r['mb_per_image']:>9.1f} "
              f"{r['mb_per_view']:>8.1f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
