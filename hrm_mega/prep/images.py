"""Image-text shards: (image, text) records tokenized and packed into LM rows, the images kept encoded.

    python -m hrm_mega.prep images --input pairs/train.jsonl --test-input pairs/test.jsonl \
        --tokenizer data/text/tokenizer.model --seq-len 512 --image-size 896 --out data/captions
    python -m hrm_mega.prep grid-images --out src/grids --train 4000 --test 500   # a set to read, made here

Input: JSONL records {"image": PATH, "text": TEXT} (field names --image-field, --text-field; PATH relative
to the JSONL file's folder, or absolute; --prompt-field names an optional text that goes before the
image), or folders of images, each image with a .txt file of the same name holding its text (an image
`a/b.png` and `a/b.txt`, in the order of their relative paths). Without --test-input, record i of
--input is a test record when unit_hash(seed, i) < --test-fraction, a seeded coin per record.

A record becomes one document of the row it is packed into:

    BOS + prompt ids + (1 + crops) x [<start_of_image>, image x mm_tokens_per_image, <end_of_image>]
        + text ids + EOS

`image` is the placeholder id whose embeddings the vision encoder's features replace (models/lm.py):
the tokenizer's <image_soft_token> piece if it has one, else the id right after its pieces (Gemma 3's
choice). <start_of_image> and <end_of_image> must be pieces of the tokenizer; a tokenizer trained here
(--vocab-size) gets them as atomic symbols. Pan-and-scan (--pan-and-scan) decides the crops from the
image's size now, as the loader will (data/images.py), so the tokens hold a run per view. The text and
its EOS are the document's answer span (answer.npy: with data.answer_only_loss the loss is the text's,
never the image's or the prompt's), and the image tokens get no labels (data/decode.py). A text too long
for --seq-len is cut, keeping its EOS (counted as truncated_documents); a record whose image runs alone
do not fit is an error.

Rows are packed next-fit from whole documents (a document never spans rows), the train split in a
seeded random order and the test split in input order. Each row stores tokens.npy, docs.npy and
answer.npy as a text row does, plus its images, each as one member `img0.png`, `img1.jpg`, ...: PNG and
JPEG files byte for byte as they were read, other formats (WebP, BMP, GIF, TIFF, ...) converted to RGB
PNG. The loader workers decode and resize them (docs/data_format.md, "Image-text samples").

Bad images (missing, truncated, undecodable, too large, a mode Pillow cannot convert) are a one-line
error naming the record, or with --on-bad-image skip are left out and counted (extra.skipped_records).
Every image is decoded once here, so a dataset that builds holds only images the loader can read.

Memory stays bounded: records stream through --workers processes (at most two per worker in flight),
each split's token ids and image bytes go to an anonymous temporary file in --out, and memory keeps a few
numbers per document. Determinism: results come back in input order and packing is sequential, so the
shards are byte-identical for any --workers.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tempfile
from array import array
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm
from PIL import Image, ImageDraw, ImageFont

from hrm_mega.data.images import ImageError, ImageProcessing, ImageSpec, load_image, to_rgb, view_count
from hrm_mega.data.shards import TOKENIZER_FILE, ShardInfo, ShardWriter, write_manifest
from hrm_mega.prep.common import (
    DataPrepError,
    add_common_arguments,
    bounded_map,
    fraction,
    item_rng,
    non_negative_int,
    ordered_map,
    positive_int,
    prepare_out_dir,
    progress,
    unit_hash,
    write_order,
)
from hrm_mega.prep.tokenizer import TokenizerSample, check_atomic_symbols, load_tokenizer, train_sentencepiece

TASK = "image_text"
BUILDER_VERSION = "1"
BOI_PIECE, EOI_PIECE, IMAGE_PIECE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
DEFAULT_TEST_FRACTION = 0.1
_HELD_OUT = 31  # unit_hash purpose: which --input records form the test split
_IN_FLIGHT = 2  # records per worker submitted and not yet written
_KEPT = {"PNG": "png", "JPEG": "jpg"}  # formats stored byte for byte (others become PNG)
_EXTENSIONS = ("png", "jpg")


# ---- reading records --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    where: str  # "FILE:LINE" or the image's path: how errors name the record
    image: Path
    prompt: str
    text: str


@dataclass(frozen=True)
class Fields:
    image: str = "image"
    text: str = "text"
    prompt: str | None = None


def iter_records(paths: Sequence[Path], option: str, fields: Fields) -> Iterator[Record]:
    """The records of the given JSONL files and image folders, in order, read as streams."""
    for path in paths:
        if path.is_dir():
            yield from _folder_records(path, option)
        elif path.is_file():
            yield from _jsonl_records(path, option, fields)
        else:
            raise DataPrepError(f"{option} {path}: no such file or folder")


def _jsonl_records(path: Path, option: str, fields: Fields) -> Iterator[Record]:
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise DataPrepError(f"{option} {where}: not a JSON object ({e})") from None
            if not isinstance(record, dict):
                raise DataPrepError(f"{option} {where}: not a JSON object")
            wanted = [("--image-field", fields.image), ("--text-field", fields.text)]
            if fields.prompt is not None:
                wanted.append(("--prompt-field", fields.prompt))
            for flag, name in wanted:
                if not isinstance(record.get(name), str):
                    raise DataPrepError(f"{option} {where}: no string field {name!r} ({flag})")
            image = Path(record[fields.image])
            prompt = record[fields.prompt] if fields.prompt is not None else ""
            yield Record(
                where, image if image.is_absolute() else path.parent / image, prompt, record[fields.text]
            )


def _folder_records(folder: Path, option: str) -> Iterator[Record]:
    images = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not images:
        raise DataPrepError(f"{option} {folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    for image in images:
        caption = image.with_suffix(".txt")
        if not caption.is_file():
            raise DataPrepError(f"{option} {image}: no text file {caption.name} beside it")
        try:
            text = caption.read_text(encoding="utf-8").rstrip("\n")
        except UnicodeDecodeError:
            raise DataPrepError(f"{option} {caption}: not UTF-8 text") from None
        yield Record(str(image), image, "", text)


# ---- preparing one record (in a worker) ---------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    spec: ImageSpec
    model: bytes  # the serialized SentencePiece model


@dataclass
class Prepared:
    prompt: np.ndarray  # int32 ids
    text: np.ndarray  # int32 ids
    image: bytes  # encoded as stored
    ext: str  # "png" | "jpg"
    views: int


_worker: tuple[spm.SentencePieceProcessor, ImageSpec] | None = None


def _start_worker(settings: Settings) -> None:
    global _worker
    _worker = (spm.SentencePieceProcessor(model_proto=settings.model), settings.spec)


def _prepare(record: Record) -> Prepared | str:
    """Reads, checks and (if needed) re-encodes the image, counts its views and tokenizes the texts; an
    error line instead when the record cannot be used."""
    assert _worker is not None
    tokenizer, spec = _worker
    try:
        raw = record.image.read_bytes()
    except OSError as e:
        return f"{record.where}: image {record.image}: {e.strerror or type(e).__name__}"
    try:
        image = load_image(raw, f"{record.where}: image {record.image}")
    except ImageError as e:
        return str(e)
    ext = _KEPT.get(image.format or "")
    if ext is None:  # another format: store what the model sees, losslessly
        buffer = io.BytesIO()
        to_rgb(image).save(buffer, format="PNG")
        raw, ext = buffer.getvalue(), "png"
    prompt, text = (np.array(ids, dtype=np.int32) for ids in tokenizer.encode([record.prompt, record.text]))
    reserved = {spec.image_token_id, spec.boi_token_id, spec.eoi_token_id}
    if reserved & set(prompt.tolist()) or reserved & set(text.tolist()):
        return f"{record.where}: its text holds an image token ({BOI_PIECE}, {EOI_PIECE} or the placeholder)"
    return Prepared(prompt, text, raw, ext, view_count(image, spec.processing))


# ---- one split's documents, spooled -------------------------------------------------------------------


class Spool:
    """One split's prepared documents in input order: ids and image bytes in an anonymous temporary file,
    a few numbers per document in memory."""

    def __init__(self, directory: Path) -> None:
        self.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (closed by close())
        self.end = 0
        # per document: offset of its record, prompt ids, text ids, image bytes, views, extension index
        self.offset, self.prompt, self.text = array("q"), array("l"), array("l")
        self.image, self.views, self.ext = array("q"), array("l"), array("b")

    def append(self, doc: Prepared) -> None:
        blob = doc.prompt.tobytes() + doc.text.tobytes() + doc.image
        self.file.write(blob)
        self.offset.append(self.end)
        self.end += len(blob)
        self.prompt.append(len(doc.prompt))
        self.text.append(len(doc.text))
        self.image.append(len(doc.image))
        self.views.append(doc.views)
        self.ext.append(_EXTENSIONS.index(doc.ext))

    def seal(self) -> None:
        """Ends appending (flushes the file's buffer); reading starts."""
        self.file.flush()

    def __len__(self) -> int:
        return len(self.offset)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray, bytes, str]:
        n_prompt, n_text = self.prompt[i], self.text[i]
        size = 4 * (n_prompt + n_text) + self.image[i]
        blob = _pread(self.file.fileno(), size, self.offset[i])
        prompt = np.frombuffer(blob, dtype=np.int32, count=n_prompt)
        text = np.frombuffer(blob, dtype=np.int32, count=n_text, offset=4 * n_prompt)
        return prompt, text, blob[4 * (n_prompt + n_text) :], _EXTENSIONS[self.ext[i]]

    def close(self) -> None:
        self.file.close()


def _pread(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size > 0:  # pread may return less than asked
        chunk = os.pread(fd, size, offset)
        if not chunk:
            raise OSError(f"temporary spool file: short read at byte {offset}")
        chunks.append(chunk)
        size, offset = size - len(chunk), offset + len(chunk)
    return b"".join(chunks)


# ---- the command ------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "images", help="tokenize (image, text) records and pack them into LM rows with the images encoded"
    )
    add_common_arguments(p)
    p.add_argument(
        "--input", type=Path, nargs="+", required=True, metavar="PATH", help="train records: JSONL or folders"
    )
    test = p.add_mutually_exclusive_group()
    test.add_argument("--test-input", type=Path, nargs="+", metavar="PATH", help="test records")
    test.add_argument(
        "--test-fraction", type=fraction,
        help=f"without --test-input, hold out each record with this probability (default {DEFAULT_TEST_FRACTION})",
    )  # fmt: skip
    p.add_argument(
        "--image-field", default="image", metavar="NAME", help='JSONL: the image path (default "image")'
    )
    p.add_argument("--text-field", default="text", metavar="NAME", help='JSONL: the text (default "text")')
    p.add_argument("--prompt-field", metavar="NAME", help="JSONL: a text before the image (not trained on)")
    p.add_argument("--seq-len", type=positive_int, required=True, help="tokens per packed sequence")
    p.add_argument(
        "--tokenizer", type=Path, metavar="MODEL", help="a SentencePiece .model with the image pieces"
    )
    p.add_argument(
        "--vocab-size", type=positive_int, help="train a tokenizer of this many pieces on the texts"
    )
    p.add_argument("--atomic-symbols", nargs="+", default=[], metavar="SYMBOL",
                   help="more pieces of their own for a trained tokenizer (the image pieces always are)")  # fmt: skip
    g = p.add_argument_group("the model's image geometry (model.vision) and preprocessing")
    g.add_argument(
        "--image-size", type=positive_int, default=896, help="model.vision.image_size (default 896)"
    )
    g.add_argument(
        "--mm-tokens-per-image", type=positive_int, default=256, help="model.vision.mm_tokens_per_image (256)"
    )
    g.add_argument("--pan-and-scan", action="store_true", help="Gemma 3's crops of elongated images")
    g.add_argument("--min-crop-size", type=positive_int, default=256, help="pan-and-scan: crop side >= (256)")
    g.add_argument("--max-crops", type=positive_int, default=4, help="pan-and-scan: crops at most (4)")
    g.add_argument("--min-ratio", type=float, default=1.2, help="pan-and-scan: aspect ratio from which (1.2)")
    p.add_argument(
        "--on-bad-image", choices=("fail", "skip"), default="fail",
        help="a record whose image cannot be read: stop with its name (default), or leave it out and count it",
    )  # fmt: skip
    p.set_defaults(run=run)

    grid = subparsers.add_parser(
        "grid-images", help="generate a 'read the picture' set: digit grids rendered as PNGs, JSONL records"
    )
    grid.add_argument("--out", type=Path, required=True, help="folder for images/ and train/test.jsonl")
    grid.add_argument("--train", type=non_negative_int, default=4000, help="train images (default 4000)")
    grid.add_argument("--test", type=non_negative_int, default=500, help="test images (default 500)")
    grid.add_argument("--grid", type=positive_int, default=4, help="cells per side (default 4)")
    grid.add_argument("--cell", type=positive_int, default=16, help="pixels per cell (default 16)")
    grid.add_argument("--separator", default="", help="text between rows of digits (default: none)")
    grid.add_argument("--seed", type=non_negative_int, default=0, help="generator seed (default 0)")
    grid.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1, help="processes")
    grid.add_argument("--overwrite", action="store_true", help="replace a set already in --out")
    grid.add_argument("--quiet", action="store_true", help="no progress bars")
    grid.set_defaults(run=run_grids)


def run(args: argparse.Namespace, command: str) -> Path:
    check_atomic_symbols(args.atomic_symbols)
    if (args.tokenizer is None) == (args.vocab_size is None):
        raise DataPrepError("--tokenizer or --vocab-size: give exactly one (reuse a tokenizer, or train one)")
    if args.out.exists() and not args.out.is_dir():
        raise DataPrepError(f"--out {args.out}: exists and is not a directory")
    if not args.overwrite:
        prepare_out_dir(args.out, overwrite=False)  # refuse an existing dataset before doing any work
    for option, paths in (("--input", args.input), ("--test-input", args.test_input or [])):
        for path in paths:
            if not path.exists():
                raise DataPrepError(f"{option} {path}: no such file or folder")
    fields = Fields(args.image_field, args.text_field, args.prompt_field)
    model = tokenizer_model(args, fields)
    processor = load_tokenizer(
        model, "trained tokenizer" if args.tokenizer is None else f"--tokenizer {args.tokenizer}"
    )
    spec = image_spec(args, processor)
    fixed = 2 + spec.mm_tokens_per_image + 2  # BOS, one view's run, EOS
    if fixed > args.seq_len:
        raise DataPrepError(
            f"--seq-len {args.seq_len}: an image takes {fixed} tokens with BOS and EOS (--mm-tokens-per-image "
            f"{spec.mm_tokens_per_image}); raise --seq-len"
        )

    created = not args.out.exists()
    args.out.mkdir(parents=True, exist_ok=True)
    spools = {split: Spool(args.out) for split in ("train", "test")}
    try:
        skipped = read_splits(args, fields, Settings(spec, model), spools)
        for split, spool in spools.items():
            if not len(spool):
                raise DataPrepError(
                    f"the {split} split has no records (check --input/--test-input, or --test-fraction)"
                )
        prepare_out_dir(args.out, args.overwrite)  # every input error has surfaced: replace an old build now
        (args.out / TOKENIZER_FILE).write_bytes(model)
        ids = {"bos": processor.bos_id(), "eos": processor.eos_id(), "pad": processor.pad_id()}
        shards, stats = {}, {}
        for split, spool in spools.items():
            shards[split], stats[split] = write_rows(args, split, spool, spec, **ids)
            stats[split]["skipped_records"] = skipped[split]
    except BaseException:
        if created and args.out.is_dir() and not any(args.out.iterdir()):
            args.out.rmdir()
        raise
    finally:
        for spool in spools.values():
            spool.close()

    extra: dict[str, Any] = {name: {split: s[name] for split, s in stats.items()} for name in stats["train"]}
    extra.update(
        image=spec.to_json(),
        inputs=[str(p) for p in args.input],
        test_inputs=None if args.test_input is None else [str(p) for p in args.test_input],
        test_fraction=None if args.test_input is not None else _test_fraction(args),
        tokenizer_source="trained" if args.tokenizer is None else str(args.tokenizer),
        tokenizer_sha256=hashlib.sha256(model).hexdigest(),
        atomic_symbols=list(args.atomic_symbols),
        packing="next-fit/whole-documents",
        train_order="shuffled",
        answer_spans=True,
        answer_documents={split: s["documents"] for split, s in stats.items()},
        on_bad_image=args.on_bad_image,
    )
    return write_manifest(
        args.out,
        top_level={"tokenizer": TOKENIZER_FILE, "bos_id": ids["bos"], "eos_id": ids["eos"]},
        task=TASK,
        builder_version=BUILDER_VERSION,
        seed=args.seed,
        command=command,
        vocab_size=processor.get_piece_size(),
        seq_len=args.seq_len,
        num_puzzle_identifiers=0,
        splits=shards,
        pad_id=ids["pad"],
        extra=extra,
    )


def tokenizer_model(args: argparse.Namespace, fields: Fields) -> bytes:
    """--tokenizer's bytes, or a tokenizer trained on the train split's texts (and prompts), with the
    image pieces and --atomic-symbols as pieces of their own."""
    if args.tokenizer is not None:
        if args.atomic_symbols:
            raise DataPrepError("--atomic-symbols: applies to a trained tokenizer; omit it with --tokenizer")
        if not args.tokenizer.is_file():
            raise DataPrepError(f"--tokenizer {args.tokenizer}: no such file")
        return args.tokenizer.read_bytes()
    sample = TokenizerSample(args.seed, 1_000_000, 20_000_000)
    for i, record in enumerate(iter_records(args.input, "--input", fields)):
        if not held_out(args, i):
            sample.offer(np.array([i]), [record.prompt + record.text])
    symbols = [BOI_PIECE, EOI_PIECE, *[s for s in args.atomic_symbols if s not in (BOI_PIECE, EOI_PIECE)]]
    return train_sentencepiece(sample.take(), args.vocab_size, symbols)


def image_spec(args: argparse.Namespace, processor: spm.SentencePieceProcessor) -> ImageSpec:
    """The geometry options and the tokenizer's image ids as an ImageSpec."""
    where = "trained tokenizer" if args.tokenizer is None else f"--tokenizer {args.tokenizer}"
    n = processor.get_piece_size()
    pieces = {processor.id_to_piece(i): i for i in range(n)}
    for piece in (BOI_PIECE, EOI_PIECE):
        if piece not in pieces:
            raise DataPrepError(
                f"{where}: has no piece {piece}; train it with --atomic-symbols '{BOI_PIECE}' '{EOI_PIECE}' "
                "(prep text and prep tokenizer take them), or train one here with --vocab-size"
            )
    if args.pan_and_scan and args.min_ratio < 1:
        raise DataPrepError(f"--min-ratio {args.min_ratio}: must be >= 1 (long side over short side)")
    processing = ImageProcessing(
        size=args.image_size, pan_and_scan=args.pan_and_scan, min_crop_size=args.min_crop_size,
        max_crops=args.max_crops, min_ratio=args.min_ratio,
    )  # fmt: skip
    return ImageSpec(
        processing, args.mm_tokens_per_image, pieces.get(IMAGE_PIECE, n), pieces[BOI_PIECE], pieces[EOI_PIECE]
    )


def held_out(args: argparse.Namespace, index: int) -> bool:
    if args.test_input is not None:
        return False
    return bool(unit_hash(args.seed, _HELD_OUT, np.array([index]))[0] < _test_fraction(args))


def read_splits(
    args: argparse.Namespace, fields: Fields, settings: Settings, spools: dict[str, Spool]
) -> dict[str, int]:
    """Prepares every record on --workers processes into the split's spool; returns the records skipped
    per split (--on-bad-image skip)."""
    splits: deque[str] = deque()  # the split of each record submitted and not yet written

    def jobs() -> Iterator[Record]:
        for i, record in enumerate(iter_records(args.input, "--input", fields)):
            splits.append("test" if held_out(args, i) else "train")
            yield record
        for record in iter_records(args.test_input or [], "--test-input", fields):
            splits.append("test")
            yield record

    skipped = {"train": 0, "test": 0}
    bar = progress(None, "images", args.quiet)  # type: ignore[arg-type] (streamed: no total)
    for result in bounded_map(_prepare, jobs(), args.workers, ahead=_IN_FLIGHT, initializer=_start_worker,
                              initargs=(settings,)):  # fmt: skip
        split = splits.popleft()
        if isinstance(result, str):
            if args.on_bad_image == "fail":
                raise DataPrepError(f"{result} (--on-bad-image skip leaves such records out)")
            skipped[split] += 1
        else:
            spools[split].append(result)
        bar.update()
    bar.close()
    return skipped


def document(
    prompt: np.ndarray, text: np.ndarray, views: int, spec: ImageSpec, seq_len: int, *, bos: int, eos: int
) -> tuple[np.ndarray, int, bool]:
    """A record's ids (module docstring), its answer's length (the text's ids + EOS) and whether the
    text was cut to fit seq_len."""
    head = np.concatenate(([bos], prompt, np.tile(np.array(spec.run, dtype=np.int32), views)))
    room = seq_len - len(head) - 1
    if room < 0:
        raise DataPrepError(
            f"a record's BOS, prompt and {views} image view(s) take {len(head) + 1} tokens with its EOS, "
            f"more than --seq-len {seq_len}"
        )
    cut = len(text) > room
    ids = np.concatenate((head, text[:room], [eos])).astype(np.int32)
    return ids, min(len(text), room) + 1, cut


def write_rows(
    args: argparse.Namespace, split: str, spool: Spool, spec: ImageSpec, *, bos: int, eos: int, pad: int
) -> tuple[list[ShardInfo], dict[str, int]]:
    """Packs one split's documents next-fit into rows (train: in the seeded write order) and writes them."""
    spool.seal()
    order = write_order(args.seed, split, len(spool))
    writer = ShardWriter(args.out / split, args.samples_per_shard)
    stats = dict.fromkeys(
        ("documents", "images", "views", "tokens", "padding_tokens", "truncated_documents"), 0
    )
    row: list[
        tuple[int, np.ndarray, int, bytes, str]
    ] = []  # (document index, ids, answer length, image, ext)
    fill = 0

    def flush() -> None:
        tokens = np.full(args.seq_len, pad, dtype=np.int32)
        docs = np.full(args.seq_len, -1, dtype=np.int32)
        answer = np.zeros(args.seq_len, dtype=np.uint8)
        sample: dict[str, Any] = {}
        at = 0
        for k, (index, ids, answer_len, image, ext) in enumerate(row):
            tokens[at : at + len(ids)] = ids
            docs[at : at + len(ids)] = index
            answer[at + len(ids) - answer_len : at + len(ids)] = 1
            sample[f"img{k}.{ext}"] = image
            at += len(ids)
        stats["padding_tokens"] += args.seq_len - at
        writer.write({"tokens": tokens, "docs": docs, "answer": answer, **sample})

    bar = progress(len(spool), f"packing {split}", args.quiet)
    for index in order.tolist():
        prompt, text, image, ext = spool[index]
        ids, answer_len, cut = document(
            prompt, text, spool.views[index], spec, args.seq_len, bos=bos, eos=eos
        )
        if row and fill + len(ids) > args.seq_len:
            flush()
            row, fill = [], 0
        row.append((index, ids, answer_len, image, ext))
        fill += len(ids)
        stats["documents"] += 1
        stats["images"] += 1
        stats["views"] += spool.views[index]
        stats["tokens"] += len(ids)
        stats["truncated_documents"] += int(cut)
        bar.update()
    if row:
        flush()
    bar.close()
    return writer.close(), stats


def _test_fraction(args: argparse.Namespace) -> float:
    return DEFAULT_TEST_FRACTION if args.test_fraction is None else args.test_fraction


# ---- the synthetic set: digit grids to read -----------------------------------------------------------


def grid_text(digits: np.ndarray, separator: str = "") -> str:
    """A grid's text: its digits in reading order, rows joined by `separator` (a 3 x 3 grid: "307145900",
    or "307/145/900")."""
    return separator.join("".join(str(int(d)) for d in row) for row in digits)


def render_grid(digits: np.ndarray, cell: int, rng: np.random.Generator) -> Image.Image:
    """The grid as a clean greyscale picture: light cell borders, each digit dark on white, centred in its
    cell with a jitter of up to a tenth of the cell and a random shade."""
    n = digits.shape[0]
    image = Image.new("L", (n * cell, n * cell), 255)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=max(6, int(cell * 0.8)))
    for i in range(1, n):
        draw.line([(i * cell, 0), (i * cell, n * cell)], fill=200)
        draw.line([(0, i * cell), (n * cell, i * cell)], fill=200)
    jitter = max(1, cell // 10)
    for r in range(n):
        for c in range(n):
            dx, dy = (int(v) for v in rng.integers(-jitter, jitter + 1, size=2))
            centre = (c * cell + cell / 2 + dx, r * cell + cell / 2 + dy)
            draw.text(centre, str(int(digits[r, c])), fill=int(rng.integers(0, 80)), font=font, anchor="mm")
    return image


def _grid_job(job: tuple[Path, int, int, int, str, str, int]) -> str:
    out, seed, grid, cell, separator, split, index = job
    rng = item_rng(seed, split, index)
    digits = rng.integers(0, 10, size=(grid, grid))
    name = f"images/{split}/{index:06d}.png"
    render_grid(digits, cell, rng).save(out / name, format="PNG")
    return json.dumps({"image": name, "text": grid_text(digits, separator)}, sort_keys=True)


def run_grids(args: argparse.Namespace, command: str) -> Path:
    """Writes --out/images/{split}/NNNNNN.png and --out/{train,test}.jsonl; returns the train JSONL."""
    if (args.out / "train.jsonl").exists() and not args.overwrite:
        raise DataPrepError(f"--out {args.out}: already holds a grid set; pass --overwrite to replace it")
    for split, count in (("train", args.train), ("test", args.test)):
        (args.out / "images" / split).mkdir(parents=True, exist_ok=True)
        jobs = [(args.out, args.seed, args.grid, args.cell, args.separator, split, i) for i in range(count)]
        lines = list(ordered_map(_grid_job, jobs, args.workers, f"grid-images {split}", args.quiet))
        partial = args.out / f".{split}.jsonl.partial"
        partial.write_text("".join(line + "\n" for line in lines))
        partial.replace(args.out / f"{split}.jsonl")
    return args.out / "train.jsonl"
