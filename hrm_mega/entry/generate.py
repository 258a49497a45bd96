"""Generation entry point: `python -m hrm_mega.entry.generate CKPT --prompt TEXT [--prompt TEXT ...]`.

Loads an HRMGemma from a training checkpoint, a model directory or a consolidated .safetensors file,
and its SentencePiece tokenizer: --tokenizer, or by default `tokenizer.model` in the dataset directory
of the checkpoint's config (`data.path`), where text data prep writes it. Prompts run as one batch with
left padding. The text streams to stdout: each prompt followed by its continuation, one prompt after
another (the first streams live while later ones are buffered until it is done). A final JSON line
gives the statistics: new tokens, tokens/s, mean H cycles per block.

Decoding is greedy unless --temperature, --top-k or --top-p is given (then it samples, seeded by --seed).
--max-cycles caps the H cycles of every CycleBlock (it may exceed the trained model.h_cycles);
--halt-threshold lets a token stop earlier once its halting head is that confident. --kv-dtype int8
stores the KV cache as int8 with a scale per token and head (models/paged_kv_cache.py).

Images (a model with model.vision): `--image FILE`, repeated for several. A prompt may say where images
go with the marker <start_of_image> (Gemma 3's convention): the images fill the markers in order,
across the prompts, one each, and their number must match. Without markers, every prompt starts with
all the images (several questions about the same pictures). Each image becomes its views (with the
training data's pan-and-scan settings, from its manifest's extra.image when data.path has one), each
view the run [<start_of_image>, placeholder x mm_tokens_per_image, <end_of_image>], as `prep images`
writes them; the prompt's prefill reads the images once and decoding then runs from the KV cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from hrm_mega.data.shards import TOKENIZER_FILE
from hrm_mega.entry.common import add_device_arg, resolve_device, run_main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hrm_mega.entry.generate", description="generate text with an HRMGemma")
    p.add_argument("checkpoint", help="training checkpoint dir, consolidated .safetensors, or model dir")
    p.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    p.add_argument(
        "--image", action="append", default=[], metavar="FILE",
        help=f"an image for a model with images (repeat for several; see {IMAGE_MARKER} in the module help)",
    )  # fmt: skip
    p.add_argument(
        "--tokenizer",
        help=f"SentencePiece model (default: the checkpoint's own, else DATA/{TOKENIZER_FILE} of its data.path)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--greedy", action="store_true", help="argmax decoding (the default without sampling options)"
    )
    p.add_argument("--temperature", type=float, help="sample at this temperature (default 1 when sampling)")
    p.add_argument("--top-k", type=int, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, help="sample among the most likely tokens holding this probability")
    p.add_argument("--max-cycles", type=int, help="H cycles per CycleBlock at most (default: model.h_cycles)")
    p.add_argument("--halt-threshold", type=float, help="stop a token's cycles once P(halt) reaches this")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampler")
    p.add_argument("--no-bos", action="store_true", help="do not start the prompts with the tokenizer's BOS")
    p.add_argument(
        "--kv-dtype", choices=("model", "int8"), default="model",
        help="how the KV cache stores keys/values: model (the model's dtype, default) or int8 (the paged "
        "cache with a scale per token and head: about 0.28x the fp32 bytes at head_dim 32)",
    )  # fmt: skip
    add_device_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    from hrm_mega.checkpoint.consolidate import load_model
    from hrm_mega.inference.generate import left_pad, stream_generate
    from hrm_mega.models.lm import HRMGemma
    from hrm_mega.models.paged_kv_cache import pool_for

    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    if args.greedy and sampling:
        raise ValueError("--greedy takes no --temperature, --top-k or --top-p")
    device = resolve_device(args.device)
    model, config = load_model(args.checkpoint)
    if not isinstance(model, HRMGemma):
        raise ValueError(
            f"{args.checkpoint}: a model.family={config.model.family} model; generation needs hrm_gemma"
        )
    tokenizer = load_tokenizer(args.tokenizer, args.checkpoint, config)
    if tokenizer.get_piece_size() > config.model.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_piece_size()} pieces but the model's "
            f"model.vocab_size={config.model.vocab_size}; is it the model's tokenizer?"
        )
    bos = [] if args.no_bos or tokenizer.bos_id() < 0 else [tokenizer.bos_id()]
    prompts, pixel_values = image_prompts(args.prompt, args.image, tokenizer, config, bos)
    pad_id = max(tokenizer.pad_id(), 0)
    input_ids, attention_mask = left_pad(prompts, pad_id=pad_id, device=device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device)
    eos_id = tokenizer.eos_id() if tokenizer.eos_id() >= 0 else None

    model.to(device).eval()
    pieces = tokenizer.get_piece_size()  # an image placeholder past the pieces prints as nothing
    printer = TextPrinter(tokenizer, [[t for t in p if t < pieces] for p in prompts])
    new_tokens = cycle_sum = 0
    # int8 keys/values live in the paged cache's blocks; the model's dtype keeps the rectangular cache
    kv_pool = pool_for(model, kv_dtype=args.kv_dtype) if args.kv_dtype != "model" else None
    start = time.perf_counter()
    steps = stream_generate(
        model, input_ids, attention_mask=attention_mask, max_new_tokens=args.max_new_tokens,
        max_cycles=args.max_cycles, halt_threshold=args.halt_threshold, greedy=not sampling,
        seed=args.seed, eos_id=eos_id, pad_id=pad_id, vocab_limit=tokenizer.get_piece_size(),
        pixel_values=pixel_values, kv_pool=kv_pool, **sampling,
    )  # fmt: skip
    for step in steps:
        printer.add(step.tokens, step.active, step.finished)
        new_tokens += int(step.active.sum())
        cycle_sum += int(step.cycles.sum())
    seconds = time.perf_counter() - start
    printer.close()
    blocks = len(model.blocks)
    stats = {
        "prompts": len(prompts),
        "tokens": new_tokens,
        "seconds": round(seconds, 4),
        "tokens_per_s": round(new_tokens / seconds, 2) if seconds > 0 else None,
        "mean_cycles": round(cycle_sum / (new_tokens * blocks), 4) if new_tokens else None,
        "max_cycles": args.max_cycles or config.model.h_cycles,
    }
    print(json.dumps(stats), flush=True)
    return 0


IMAGE_MARKER = "<start_of_image>"


def image_prompts(
    texts: list[str], images: list[str | bytes], tokenizer, config, bos: list[int]
) -> tuple[list[list[int]], Any]:  # -> (token lists, pixel_values tensor or None)
    """The prompts' ids with the images' placeholder runs in place (module docstring), and the images'
    pixel_values in the order of their runs, row by row (None without images). An image is a file path
    or the file's bytes (hrm-mega serve's chat image parts)."""
    import torch

    from hrm_mega.data.images import ImageError, load_image, pixel_values
    from hrm_mega.training.tasks.lm import image_processing

    vision = config.model.vision
    marked = sum(text.count(IMAGE_MARKER) for text in texts)
    if not images:
        if marked:
            raise ValueError(f"a --prompt holds {IMAGE_MARKER} but no --image is given")
        return [bos + tokenizer.encode(text) for text in texts], None
    if vision is None:
        raise ValueError("--image: this model has no image encoder (model.vision); it reads text only")
    if marked and marked != len(images):
        raise ValueError(
            f"the prompts hold {marked} {IMAGE_MARKER} markers but {len(images)} --image files are given"
        )
    try:
        processing = image_processing(config)
    except ValueError:  # the training data is not here (or unreadable): the model's own geometry
        processing = None
    if processing is None:
        from hrm_mega.data.images import ImageProcessing

        processing = ImageProcessing.for_model(vision)
    loaded = []
    for path in images:
        try:
            source, where = (path, "image") if isinstance(path, bytes) else (Path(path), f"--image {path}")
            loaded.append(load_image(source, where))
        except ImageError as e:
            raise ValueError(str(e)) from None
    views = [pixel_values([image], processing)[0] for image in loaded]  # [1 + crops, 3, S, S] each
    run = [vision.boi_token_id, *[vision.image_token_id] * vision.mm_tokens_per_image, vision.eoi_token_id]
    prompts, ordered = [], []
    queue = list(range(len(images)))
    for text in texts:
        ids = list(bos)
        if not marked:  # every prompt starts with all the images
            for k in range(len(images)):
                ids += run * len(views[k])
                ordered.append(views[k])
            ids += tokenizer.encode(text)
        else:
            for i, piece in enumerate(text.split(IMAGE_MARKER)):
                if i:
                    k = queue.pop(0)
                    ids += run * len(views[k])
                    ordered.append(views[k])
                ids += tokenizer.encode(piece) if piece else []
        prompts.append(ids)
    return prompts, torch.cat(ordered)


def load_tokenizer(explicit: str | None, checkpoint: str, config):  # -> spm.SentencePieceProcessor
    """--tokenizer, else the checkpoint's own copy, else the one in the config's data.path."""
    import sentencepiece as spm

    from hrm_mega.checkpoint.model_dir import tokenizer_for

    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ValueError(f"--tokenizer {path}: no such file")
    elif (found := tokenizer_for(checkpoint, config)) is not None:
        path = found
    elif not config.data.path:
        raise ValueError(
            f"no tokenizer: none inside {checkpoint} and the checkpoint's config has no data.path; "
            f"pass --tokenizer PATH/{TOKENIZER_FILE}"
        )
    else:
        raise ValueError(
            f"no tokenizer: none inside {checkpoint}, and {Path(config.data.path) / TOKENIZER_FILE} does not "
            f"exist (data.path of the checkpoint's config); pass --tokenizer PATH/{TOKENIZER_FILE}"
        )
    try:
        return spm.SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as e:
        raise ValueError(f"{path}: not a SentencePiece model ({str(e).splitlines()[0]})") from None


class TextPrinter:
    """Streams every row's prompt + continuation to stdout in prompt order: the earliest unfinished row
    prints as its tokens arrive, later rows are held back until the rows before them are done.

    Each row's text is decoded whole (prompt + new tokens) and only the part not yet printed is written:
    SentencePiece pieces carry their leading space, and a byte-fallback character can take several
    tokens, so decoding tokens one by one would garble both. A trailing incomplete character waits."""

    def __init__(self, tokenizer, prompts: list[list[int]]) -> None:
        self.tokenizer = tokenizer
        self.ids = [list(p) for p in prompts]
        self.done = [False] * len(prompts)
        self.printed = ""  # what the current row has printed so far
        self.row = 0

    def add(self, tokens, active, finished) -> None:
        for r, (token, is_active) in enumerate(zip(tokens.tolist(), active.tolist(), strict=True)):
            if is_active:
                self.ids[r].append(token)
        for r, is_done in enumerate(finished.tolist()):
            self.done[r] = self.done[r] or is_done
        self._flush()

    def close(self) -> None:
        self.done = [True] * len(self.done)
        self._flush()

    def _flush(self) -> None:
        while self.row < len(self.ids):
            text = self.tokenizer.decode(self.ids[self.row])
            finished = self.done[self.row]
            if text.startswith(self.printed) and (finished or not text.endswith("\ufffd")):
                sys.stdout.write(text[len(self.printed) :])
                self.printed = text
            if not finished:
                break
            sys.stdout.write("\n")
            self.row, self.printed = self.row + 1, ""
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    return run_main("generate", lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
