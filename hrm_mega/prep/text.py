"""Text (LM) shards: a SentencePiece tokenizer, tokenization on every core, document-aware packing.

    python -m hrm_mega.prep text --input corpus/train.txt --test-input corpus/test.txt \
        --vocab-size 512 --seq-len 256 --out data/text

Input: `.jsonl` files hold one JSON object per line whose string field --text-field (default "text") is
the document (documents may contain newlines); any other file holds one document per line. Blank lines
are skipped. A `.gz` suffix on top (`corpus.jsonl.gz`, `train.txt.gz`) is read through gzip. Without
--test-input, a seeded --test-fraction of the documents is held out as the test split.

Tokenizer: a SentencePiece BPE model (as Gemma's) trained on the train split only, with byte fallback
(any text encodes, nothing maps to <unk>), text kept verbatim (identity normalisation, no dummy prefix,
spaces kept), digits split one per piece, --atomic-symbols never merged with a neighbour, and Gemma's
special ids: 0 <pad>, 1 </s> (eos), 2 <s> (bos), 3 <unk>. Or an existing model given with --tokenizer. Either way it is copied to DIR/tokenizer.model.

Packing (docs/data_format.md has the layout and the batch it decodes to): each document becomes
BOS + its tokens + EOS. Documents are packed next-fit into rows of --seq-len tokens: a document that
fits in one row is never split (when it does not fit in the current row's space, that row is padded and
it starts the next one); a longer document fills the current row's space and continues into as many
rows as it needs. The train split packs its documents in a seeded random order, the test split in input
order. Each row stores its tokens and, per token, the index of the document it comes from (-1 for
padding), from which the loader derives labels, position ids and per-row document ids.

Determinism: the tokenizer trains with a fixed thread count, workers encode chunks that come back in
order, and packing is sequential, so the shards are byte-identical for any --workers.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from hrm_mega.data.shards import TOKENIZER_FILE, ShardInfo, ShardWriter, write_manifest
from hrm_mega.prep.common import (
    DataPrepError,
    add_common_arguments,
    dataset_rng,
    fraction,
    ordered_map,
    pick_rows,
    positive_int,
    prepare_out_dir,
    progress,
    write_order,
)

TASK = "text"
BUILDER_VERSION = "1"
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3  # Gemma's layout of the special pieces
DEFAULT_TEST_FRACTION = 0.1
_TRAINER_THREADS = 4  # the trained model depends on SentencePiece's thread count: fixed, not --workers
_TRAINER_CHUNK = 4096  # characters per training sentence (SentencePiece skips longer sentences)
_ENCODE_CHUNK = 256  # documents per encoding job
_TOKENIZER_SAMPLE = 20  # dataset_rng purpose: which documents train the tokenizer


# ---- reading documents ------------------------------------------------------------------------------


def read_documents(paths: Sequence[Path], option: str, text_field: str = "text") -> list[str]:
    """All documents of the given files, in order. Errors name the option and the file (and line)."""
    documents: list[str] = []
    for path in paths:
        if not path.is_file():
            raise DataPrepError(f"{option} {path}: no such file")
        compressed = path.suffix == ".gz"
        try:
            raw = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exn:
            raise DataPrepError(f"{option} {path}: not UTF-8 text (bad byte at offset {exn.start})") from None
        except (OSError, EOFError, zlib.error) as exn:
            raise DataPrepError(f"{option} {path}: not a readable gzip file ({exn})") from None
        kind = Path(path.stem).suffix if compressed else path.suffix
        if kind == ".jsonl":
            found = _jsonl_documents(path, text, text_field)
        else:  # split on "\n" only: str.splitlines would also cut at \x0c, \u2028 and other separators
            found = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
        if not found:
            raise DataPrepError(f"{option} {path}: holds no documents (empty file)")
        documents += found
    return documents


def _jsonl_documents(path: Path, text: str, field: str) -> list[str]:
    documents = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exn:
            raise DataPrepError(f"{path}:{lineno}: not valid JSON ({exn.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise DataPrepError(
                f'{path}:{lineno}: expected an object with a string field "{field}" (--text-field)'
            )
        if record[field]:
            documents.append(record[field])
    return documents


# ---- tokenizer --------------------------------------------------------------------------------------


def train_tokenizer(
    documents: Sequence[str],
    vocab_size: int,
    *,
    seed: int,
    max_documents: int,
    atomic_symbols: Sequence[str] = (),
) -> bytes:
    """Trains a SentencePiece BPE model on (a seeded sample of at most `max_documents` of) the
    documents; returns the serialized model. `atomic_symbols` are always pieces of their own, never
    merged with a neighbour (SentencePiece's user-defined symbols). Deterministic: no sampling inside
    SentencePiece, fixed thread count."""
    if len(documents) > max_documents:
        picked = dataset_rng(seed, _TOKENIZER_SAMPLE).choice(len(documents), max_documents, replace=False)
        documents = [documents[i] for i in np.sort(picked).tolist()]

    def sentences() -> Iterator[str]:
        for doc in documents:
            for start in range(0, len(doc), _TRAINER_CHUNK):
                yield doc[start : start + _TRAINER_CHUNK]

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(),
            model_writer=model,
            model_type="bpe",  # Gemma's choice; also ~20x faster to train than unigram on small text
            vocab_size=vocab_size,
            byte_fallback=True,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            split_digits=True,
            user_defined_symbols=list(atomic_symbols),
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            bos_id=BOS_ID,
            unk_id=UNK_ID,
            input_sentence_size=0,  # every sentence: SentencePiece's own sampling is not needed
            max_sentence_length=4 * _TRAINER_CHUNK,  # bytes: 4 per character at most in UTF-8
            num_threads=_TRAINER_THREADS,
            minloglevel=2,
        )
    except RuntimeError as exn:
        raise DataPrepError(_training_error(str(exn), vocab_size)) from None
    return model.getvalue()


def _training_error(message: str, vocab_size: int) -> str:
    """SentencePiece's training errors as one actionable line."""
    too_small = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
    if too_small:
        need = int(too_small.group(1))
        return (
            f"--vocab-size {vocab_size}: too small for this text; it needs at least {need} pieces "
            f"(4 special, 256 byte-fallback and {need - 260} character pieces)"
        )
    too_big = re.search(r"Vocabulary size too high \(\d+\)\. Please set it to a value <= (\d+)", message)
    if too_big:
        return (
            f"--vocab-size {vocab_size}: too big for this text; SentencePiece can make at most "
            f"{too_big.group(1)} pieces from it (lower --vocab-size or add text)"
        )
    return f"SentencePiece training failed: {message.strip().splitlines()[0]}"


def load_tokenizer(model: bytes, where: str) -> spm.SentencePieceProcessor:
    """Parses a serialized model and checks that it defines the special pieces packing needs."""
    processor = spm.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model)
    except RuntimeError:
        raise DataPrepError(f"{where}: not a SentencePiece model (cannot parse it)") from None
    if processor.get_piece_size() == 0:
        raise DataPrepError(f"{where}: not a SentencePiece model (no pieces)")
    for name, piece_id in (
        ("pad", processor.pad_id()),
        ("bos", processor.bos_id()),
        ("eos", processor.eos_id()),
    ):
        if piece_id < 0:
            raise DataPrepError(
                f"{where}: the tokenizer defines no {name} piece ({name}_id is -1); packing needs pad, bos "
                "and eos (omit --tokenizer to train one)"
            )
    return processor


# ---- encoding ---------------------------------------------------------------------------------------

_processors: dict[str, spm.SentencePieceProcessor] = {}  # per process, keyed by the model's sha256


def _encode_job(job: tuple[str, str, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    """Encodes a chunk of documents; returns (all ids as one int32 array, length of each document)."""
    model_path, digest, documents = job
    processor = _processors.get(digest)
    if processor is None:
        processor = _processors[digest] = spm.SentencePieceProcessor(model_file=model_path)
    encoded = processor.encode(documents, out_type=int, num_threads=1)
    lengths = np.array([len(ids) for ids in encoded], dtype=np.int64)
    flat = np.fromiter((i for ids in encoded for i in ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def encode_documents(
    model_path: Path, documents: Sequence[str], *, workers: int, desc: str, quiet: bool
) -> list[np.ndarray]:
    """Token ids (int32) of each document, encoded by `workers` processes; the same for any `workers`."""
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    jobs = [
        (str(model_path), digest, list(documents[i : i + _ENCODE_CHUNK]))
        for i in range(0, len(documents), _ENCODE_CHUNK)
    ]
    encoded: list[np.ndarray] = []
    for flat, lengths in ordered_map(_encode_job, jobs, workers, desc, quiet):
        encoded += np.split(flat, np.cumsum(lengths)[:-1])
    return encoded


# ---- packing ----------------------------------------------------------------------------------------


def pack_documents(
    order: Iterable[int], documents: Sequence[np.ndarray], seq_len: int, *, bos: int, eos: int, pad: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Packs BOS + ids + EOS of documents[i] for i in `order` into rows of `seq_len` (next-fit).

    Yields (tokens int32 [seq_len], docs int32 [seq_len]): docs[k] is the index of the document token k
    comes from, -1 for padding (which only ends a row). A document that fits in a row is never split; a
    longer one fills the current row and continues in the next rows.
    """

    def new_row() -> tuple[np.ndarray, np.ndarray]:
        return np.full(seq_len, pad, dtype=np.int32), np.full(seq_len, -1, dtype=np.int32)

    tokens, docs = new_row()
    fill = 0
    for index in order:
        run = np.concatenate(([bos], documents[index], [eos])).astype(np.int32)
        if fill and len(run) <= seq_len and fill + len(run) > seq_len:  # fits a row, not this one's space
            yield tokens, docs
            (tokens, docs), fill = new_row(), 0
        start = 0
        while start < len(run):
            take = min(seq_len - fill, len(run) - start)
            tokens[fill : fill + take] = run[start : start + take]
            docs[fill : fill + take] = index
            fill, start = fill + take, start + take
            if fill == seq_len:
                yield tokens, docs
                (tokens, docs), fill = new_row(), 0
    if fill:
        yield tokens, docs


# ---- the unigram baseline ---------------------------------------------------------------------------


def unigram_cross_entropy(
    train: Sequence[np.ndarray], test: Sequence[np.ndarray], *, eos: int, vocab_size: int
) -> float:
    """Per-token cross-entropy (nats) on the test split of the train split's add-one smoothed unigram
    distribution, over the tokens an LM predicts: each document's ids followed by EOS (BOS is never a
    target). p(t) = (count_train(t) + 1) / (N_train + vocab_size)."""

    def target_counts(documents: Sequence[np.ndarray]) -> np.ndarray:
        ids = np.concatenate([*documents, np.full(len(documents), eos)]).astype(np.int64)
        return np.bincount(ids, minlength=vocab_size).astype(np.float64)

    train_counts, test_counts = target_counts(train), target_counts(test)
    log_p = np.log(train_counts + 1.0) - np.log(train_counts.sum() + vocab_size)
    return float(-(test_counts * log_p).sum() / test_counts.sum())


# ---- the command ------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "text", help="tokenize text (SentencePiece) and pack documents into fixed-length LM sequences"
    )
    add_common_arguments(p)
    p.add_argument("--input", type=Path, nargs="+", required=True, metavar="FILE", help="train documents")
    p.add_argument(
        "--text-field",
        default="text",
        metavar="NAME",
        help='.jsonl input: the field holding the text (default "text")',
    )
    p.add_argument("--seq-len", type=positive_int, required=True, help="tokens per packed sequence")
    p.add_argument("--vocab-size", type=positive_int, help="pieces of the trained tokenizer")
    p.add_argument("--tokenizer", type=Path, metavar="MODEL", help="reuse this SentencePiece .model file")
    p.add_argument(
        "--tokenizer-docs",
        type=positive_int,
        default=1_000_000,
        help="train the tokenizer on a seeded sample of at most this many documents (default 1000000)",
    )
    p.add_argument(
        "--atomic-symbols",
        nargs="+",
        default=[],
        metavar="SYMBOL",
        help="strings the trained tokenizer keeps as pieces of their own, e.g. '=' so that a prompt "
        "ending in '=' splits where its training text did ('=-' is not merged into one piece)",
    )
    test = p.add_mutually_exclusive_group()
    test.add_argument("--test-input", type=Path, nargs="+", metavar="FILE", help="test documents")
    test.add_argument(
        "--test-fraction",
        type=fraction,
        help=f"without --test-input, hold out this share of the documents (default {DEFAULT_TEST_FRACTION})",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace, command: str) -> Path:
    if args.seq_len < 2:
        raise DataPrepError(f"--seq-len {args.seq_len}: must be >= 2 (room for a BOS and one token)")
    if any(not symbol for symbol in args.atomic_symbols):
        raise DataPrepError(
            "--atomic-symbols: a symbol is empty; give non-empty strings, e.g. --atomic-symbols ="
        )
    if args.vocab_size is None and args.tokenizer is None:
        raise DataPrepError("--vocab-size: required unless --tokenizer gives a trained model")
    if not args.overwrite:
        prepare_out_dir(args.out, overwrite=False)  # refuse an existing dataset before doing any work
    documents = split_documents(args)
    model = tokenizer_model(args, documents["train"])
    processor = load_tokenizer(
        model, "trained tokenizer" if args.tokenizer is None else f"--tokenizer {args.tokenizer}"
    )
    if args.vocab_size is not None and args.vocab_size != processor.get_piece_size():
        raise DataPrepError(
            f"--vocab-size {args.vocab_size}: --tokenizer {args.tokenizer} has "
            f"{processor.get_piece_size()} pieces (omit --vocab-size)"
        )
    vocab_size = processor.get_piece_size()
    ids = {"bos": processor.bos_id(), "eos": processor.eos_id(), "pad": processor.pad_id()}

    # Everything that can fail on the input has been checked: only now touch --out.
    prepare_out_dir(args.out, args.overwrite)
    args.out.mkdir(parents=True, exist_ok=True)
    model_path = args.out / TOKENIZER_FILE
    model_path.write_bytes(model)
    encoded = {
        split: encode_documents(
            model_path, docs, workers=args.workers, desc=f"encoding {split}", quiet=args.quiet
        )
        for split, docs in documents.items()
    }
    shards, stats = {}, {}
    for split, split_encoded in encoded.items():
        shards[split], stats[split] = write_rows(args, split, split_encoded, **ids)
        stats[split]["unk_tokens"] = sum(int((x == processor.unk_id()).sum()) for x in split_encoded)

    extra: dict[str, Any] = {name: {split: s[name] for split, s in stats.items()} for name in stats["train"]}
    extra.update(
        unigram_entropy_nats=unigram_cross_entropy(
            encoded["train"], encoded["test"], eos=ids["eos"], vocab_size=vocab_size
        ),
        inputs=[str(p) for p in args.input],
        test_inputs=None if args.test_input is None else [str(p) for p in args.test_input],
        test_fraction=None if args.test_input is not None else _test_fraction(args),
        tokenizer_source="trained" if args.tokenizer is None else str(args.tokenizer),
        atomic_symbols=list(args.atomic_symbols),
        tokenizer_sha256=hashlib.sha256(model).hexdigest(),
        packing="next-fit/bos-eos",
    )
    return write_manifest(
        args.out,
        top_level={"tokenizer": TOKENIZER_FILE, "bos_id": ids["bos"], "eos_id": ids["eos"]},
        task=TASK,
        builder_version=BUILDER_VERSION,
        seed=args.seed,
        command=command,
        vocab_size=vocab_size,
        seq_len=args.seq_len,
        num_puzzle_identifiers=0,
        splits=shards,
        pad_id=ids["pad"],
        extra=extra,
    )


def tokenizer_model(args: argparse.Namespace, train_documents: Sequence[str]) -> bytes:
    """The serialized SentencePiece model: trained on the train documents, or read from --tokenizer."""
    if args.tokenizer is None:
        return train_tokenizer(
            train_documents, args.vocab_size, seed=args.seed, max_documents=args.tokenizer_docs,
            atomic_symbols=args.atomic_symbols,
        )  # fmt: skip
    if args.atomic_symbols:
        raise DataPrepError("--atomic-symbols: applies to a trained tokenizer; omit it with --tokenizer")
    if not args.tokenizer.is_file():
        raise DataPrepError(f"--tokenizer {args.tokenizer}: no such file")
    return args.tokenizer.read_bytes()


def write_rows(
    args: argparse.Namespace, split: str, encoded: Sequence[np.ndarray], *, bos: int, eos: int, pad: int
) -> tuple[list[ShardInfo], dict[str, int]]:
    """Packs one split's documents (train: seeded order) into shards; returns the shards and counts."""
    order = write_order(args.seed, split, len(encoded)).tolist()
    writer = ShardWriter(args.out / split, args.samples_per_shard)
    padding = 0
    bar = progress(len(encoded), f"packing {split}", args.quiet)
    for tokens, docs in pack_documents(
        _counted(order, bar), encoded, args.seq_len, bos=bos, eos=eos, pad=pad
    ):
        writer.write({"tokens": tokens, "docs": docs})
        padding += int((docs < 0).sum())
    bar.close()
    lengths = np.array([len(ids) + 2 for ids in encoded], dtype=np.int64)  # + BOS and EOS
    return writer.close(), {
        "documents": len(encoded),
        "tokens": int(lengths.sum()),
        "padding_tokens": padding,
        "split_documents": int((lengths > args.seq_len).sum()),
    }


def _test_fraction(args: argparse.Namespace) -> float:
    return DEFAULT_TEST_FRACTION if args.test_fraction is None else args.test_fraction


def split_documents(args: argparse.Namespace) -> dict[str, list[str]]:
    """The train and test documents, each in input order: --test-input files, or a seeded held-out
    --test-fraction of the --input documents."""
    train = read_documents(args.input, "--input", args.text_field)
    if args.test_input is not None:
        return {"train": train, "test": read_documents(args.test_input, "--test-input", args.text_field)}
    share = _test_fraction(args)
    rows = pick_rows(args.seed, len(train), None, share, {})
    if len(rows["test"]) == 0 or len(rows["train"]) == 0:
        raise DataPrepError(
            f"--test-fraction {share}: holds out {len(rows['test'])} of {len(train)} documents; "
            "each split needs at least one (pass --test-input or change the fraction)"
        )
    return {split: [train[i] for i in rows[split].tolist()] for split in ("train", "test")}


def _counted(order: Sequence[int], bar: Any) -> Iterator[int]:
    for index in order:
        yield index
        bar.update()
