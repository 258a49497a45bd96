"""`make demo-vlm`: a multimodal HRMGemma learns to read pictures, on the CPU.

1. `prep grid-images` renders 4 x 4 grids of random digits as 64 px pictures (5,000 train, 600 test):
   every cell is an independent uniform digit, so nothing in a grid's text can be guessed without
   looking at its picture.
2. `prep images` tokenizes the texts (a SentencePiece model trained on them, with the image pieces) and
   packs the pictures and texts into image-text shards.
3. Trains configs/lm/hrmgemma_vlm_tiny.yaml on DeepSpeed: a SigLIP tower and Gemma 3 projector (trained
   from scratch) feeding two CycleBlocks.
4. Reads every held-out picture with greedy, KV-cached generation (the picture in the prompt's prefill)
   and scores each cell of the text it writes; then again with every picture blanked (a white image),
   against the best any reader without the picture can do on average: each cell's most frequent digit
   in the train split (the majority rate).

Every stage is the real one (the code of `hrm-mega prep`, `train` and `generate`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

from hrm_mega.entry.common import demo_config, run_main
from hrm_mega.resources import recipe

RECIPE = recipe("lm/hrmgemma_vlm_tiny.yaml")
GRID, CELL, TRAIN, TEST = 4, 16, 5000, 600


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrm_mega.entry.vlm_demo", description=__doc__)
    p.add_argument("--data", default="data/vlm-grids", help="the data directory (built if missing)")
    p.add_argument("--out", default="runs/demo-vlm", help="run directory (a fresh run each time)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def build_commands(root: Path, config) -> list[list[str]]:
    """The `hrm_mega.prep` command lines: the pictures and their texts, then the image-text shards."""
    v = config.model.vision
    src = root / "src"
    return [
        ["grid-images", "--out", str(src), "--train", str(TRAIN), "--test", str(TEST), "--grid", str(GRID),
         "--cell", str(CELL), "--seed", "0", "--overwrite", "--quiet"],
        ["images", "--input", str(src / "train.jsonl"), "--test-input", str(src / "test.jsonl"),
         "--vocab-size", str(config.model.vocab_size), "--seq-len", str(2 + v.mm_tokens_per_image + 2 + GRID * GRID),
         "--image-size", str(v.image_size), "--mm-tokens-per-image", str(v.mm_tokens_per_image),
         "--out", str(root / "images"), "--samples-per-shard", "500", "--seed", "0", "--overwrite", "--quiet"],
    ]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from hrm_mega.config import read_config
    from hrm_mega.entry.common import build_dataset

    root = Path(args.data)
    t0 = time.perf_counter()
    recipe_config = read_config(RECIPE, args.overrides)  # the data does not exist yet: no checks
    if not build_dataset(root / "images", build_commands(root, recipe_config), "[demo-vlm] "):
        return 2
    t_data = time.perf_counter() - t0
    config = demo_config(
        RECIPE, argparse.Namespace(data=str(root / "images"), out=args.out, overrides=args.overrides)
    )

    shutil.rmtree(args.out, ignore_errors=True)
    from hrm_mega.training.trainer import build_trainer

    print(f"[demo-vlm] training {RECIPE.name} for {config.train.steps} steps on the CPU", flush=True)
    t1 = time.perf_counter()
    trainer = build_trainer(config, resume="none")
    trained = trainer.train()
    t_train = time.perf_counter() - t1

    t2 = time.perf_counter()
    seen = read_pictures(trainer, root, blank=False)
    blank = read_pictures(trainer, root, blank=True)
    majority = majority_rate(root / "src/train.jsonl")
    t_eval = time.perf_counter() - t2
    report = {
        "test_images": seen["images"],
        "cell_accuracy": seen["cell_accuracy"],
        "grid_exact": seen["grid_exact"],
        "cell_accuracy_blanked": blank["cell_accuracy"],
        "majority_rate": majority,
        "eval_loss": trained.get("eval/loss"),
        "seconds": {"data": t_data, "train": t_train, "eval": t_eval, "total": time.perf_counter() - t0},
        "steps": config.train.steps,
        "samples": seen["samples"],
    }
    print_report(report)
    (Path(args.out) / "demo_results.json").write_text(json.dumps(report, indent=2))
    return 0


def read_pictures(trainer, root: Path, blank: bool, batch: int = 100) -> dict:
    """Greedy reading of every test picture (KV-cached generation, the picture in the prefill): per-cell
    accuracy of the first 16 digits written, whole grids exactly right, a few examples."""
    import sentencepiece as spm
    import torch

    from hrm_mega.data.images import ImageProcessing, load_image, pixel_values
    from hrm_mega.inference.generate import generate, left_pad

    v = trainer.config.model.vision
    tokenizer = spm.SentencePieceProcessor(model_file=str(root / "images/tokenizer.model"))
    records = [json.loads(line) for line in (root / "src/test.jsonl").read_text().splitlines()]
    run = [v.boi_token_id, *[v.image_token_id] * v.mm_tokens_per_image, v.eoi_token_id]
    processing = ImageProcessing.for_model(v)
    cells = correct = exact = 0
    samples = []
    model = trainer.model.eval()
    for start in range(0, len(records), batch):
        part = records[start : start + batch]
        images = [load_image(root / "src" / r["image"], r["image"]) for r in part]
        pixels, _ = pixel_values(images, processing)
        if blank:
            pixels = torch.ones_like(pixels)  # white: 255 rescaled and normalised
        ids, mask = left_pad([[tokenizer.bos_id(), *run]] * len(part), pad_id=tokenizer.pad_id())
        with torch.no_grad():
            out = generate(model, ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=GRID * GRID + 1,
                           greedy=True, eos_id=tokenizer.eos_id(), pad_id=tokenizer.pad_id(),
                           vocab_limit=tokenizer.get_piece_size())  # fmt: skip
        for r, tokens, n in zip(part, out.tokens.tolist(), out.lengths.tolist()):
            text = tokenizer.decode([t for t in tokens[:n] if t != tokenizer.eos_id()])
            truth = r["text"]
            hits = sum(a == b for a, b in zip(text[: len(truth)], truth))
            cells, correct, exact = cells + len(truth), correct + hits, exact + int(text == truth)
            if len(samples) < 3:
                samples.append({"image": r["image"], "text": truth, "read": text})
    model.train()
    return {"images": len(records), "cell_accuracy": correct / cells, "grid_exact": exact / len(records),
            "samples": samples}  # fmt: skip


def majority_rate(train_jsonl: Path) -> float:
    """The per-cell accuracy of always writing each cell's most frequent train digit."""
    texts = [json.loads(line)["text"] for line in train_jsonl.read_text().splitlines()]
    width = len(texts[0])
    rates = [Counter(t[i] for t in texts).most_common(1)[0][1] / len(texts) for i in range(width)]
    return sum(rates) / width


def print_report(r: dict) -> None:
    s = r["seconds"]
    print()
    print(
        f"HRMGemma with a SigLIP tower reading {GRID}x{GRID} digit grids ({r['test_images']} held-out pictures)"
    )
    print(f"  per-cell accuracy, with the picture:     {100 * r['cell_accuracy']:.1f}%  (whole grids exact: "
          f"{100 * r['grid_exact']:.1f}%)")  # fmt: skip
    print(f"  per-cell accuracy, picture blanked:      {100 * r['cell_accuracy_blanked']:.1f}%")
    print(f"  majority digit per cell (train split):   {100 * r['majority_rate']:.1f}%")
    for sample in r["samples"]:
        print(f"  {sample['image']}: text {sample['text']}  read {sample['read']}")
    print(f"data build {s['data']:.0f} s, training {s['train']:.0f} s ({r['steps']} steps, CPU), reading "
          f"{s['eval']:.0f} s; total {s['total']:.0f} s", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    return run_main("demo-vlm", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
