"""Text (LM) shards at corpus scale: streamed input, tokenization on every core, document-aware packing.

    python -m hrm_mega.prep text --input corpus/train.txt --test-input corpus/test.txt \
        --vocab-size 512 --seq-len 256 --out data/text

Input (hrm_mega/prep/tokenizer.py reads it): plain text, one document per line; JSONL whose field
--text-field is the document; Parquet with such a column; gzip of the first two. Or prompt/answer
records (JSONL or Parquet, --prompt-field and --answer-field): the document is the prompt followed by
the answer, and only the answer is marked (answer.npy below).

Memory stays bounded whatever the input's size; nothing holds the corpus or its tokens:

1. With a tokenizer to train, one pass over --input draws the tokenizer sample (tokenizer.py: bounded by
   --tokenizer-docs and --tokenizer-chars) and trains on it.
2. A second pass streams every document to --workers processes, in chunks, at most two chunks per
   worker in flight. Each split's ids go to an anonymous temporary int32 file in --out (gone when the
   build ends, however it ends); memory keeps 8 bytes per document (its offset; prompt/answer: 8 more,
   its answer's length) and the token counts of the unigram baseline.
3. Each split is packed from its file, each document read with a positioned read (pread, not a memory
   map, whose pages would count towards the process's memory).

Held-out split: without --test-input, document i of --input is a test document when unit_hash(seed, i)
< --test-fraction, a seeded coin per document, so the split needs no count up front.

Packing (docs/data_format.md has the layout and the batch it decodes to): each document becomes BOS +
its tokens + EOS; a prompt/answer document BOS + prompt ids + answer ids + EOS, the two encoded
separately so that their boundary is a token boundary. Documents are packed next-fit into rows of
--seq-len tokens: a document that fits in one row is never split (when it does not fit in the current
row's space, that row is padded and it starts the next one); a longer document fills the current row's
space and continues into as many rows as it needs. The train split packs its documents in a seeded
random order (input order with --keep-order), the test split in input order. Each row stores its tokens
and, per token, the index of the document it comes from (-1 for padding); a prompt/answer dataset also
stores `answer` per token: 1 on the answer's tokens and the EOS after them, 0 elsewhere (prompt, BOS,
padding), which a split document's pieces keep. With --hidden-field, a row also stores `targets` per
token: at each prompt placeholder (--hidden-piece) the id of its hidden target, -1 elsewhere; the token
stays the placeholder, so the model is trained to predict a value it never sees (docs/data_format.md).
With --due-field, a row also stores `due` per token: the H cycle from which deep supervision trains the
target there (each placeholder's, the answer's on the answer and its EOS), 0 elsewhere.

Determinism: the tokenizer sample is a function of the seed and the documents, the tokenizer trains
with a fixed thread count, chunks are cut in the main process and their results come back in order, and
packing is sequential, so the shards are byte-identical for any --workers.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from hrm_mega.data.shards import TOKENIZER_FILE, ShardInfo, ShardWriter, write_manifest
from hrm_mega.prep.common import (
    DataPrepError,
    add_common_arguments,
    bounded_map,
    fraction,
    positive_int,
    prepare_out_dir,
    progress,
    unit_hash,
    write_order,
)
from hrm_mega.prep.tokenizer import (
    DEFAULT_HIDDEN_PIECE,
    Document,
    Fields,
    TokenizerSample,
    add_field_arguments,
    add_sample_arguments,
    check_atomic_symbols,
    check_files,
    chunked,
    document_text,
    fields_from_args,
    iter_documents,
    load_tokenizer,
    train_sentencepiece,
    train_tokenizer,  # noqa: F401 (part of this module's interface: tests and the RL checks train with it)
)

TASK = "text"
BUILDER_VERSION = "2"  # 2: streamed; held-out documents by a per-document coin, tokenizer sample by keys
DEFAULT_TEST_FRACTION = 0.1
_CHUNK_DOCUMENTS = 256  # documents per encoding job (and at most ~1M characters)
_IN_FLIGHT = 2  # encoding chunks per worker submitted and not yet written
_HELD_OUT = 21  # unit_hash purpose: which --input documents form the test split


# ---- encoding ---------------------------------------------------------------------------------------

_encoder: spm.SentencePieceProcessor | None = None  # per process, set by _start_encoder
_hidden_piece = DEFAULT_HIDDEN_PIECE


def _start_encoder(model: bytes, hidden_piece: str = DEFAULT_HIDDEN_PIECE) -> None:
    global _encoder, _hidden_piece
    _encoder, _hidden_piece = spm.SentencePieceProcessor(model_proto=model), hidden_piece


Encoded = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray | None]


def _encode_chunk(documents: list[Document]) -> Encoded:
    """Encodes a chunk of documents: (all ids as one int32 array, tokens per document, for prompt/answer
    documents the answer's tokens per document (else None), for documents with hidden targets an int32
    array aligned with the ids: the target's id at each placeholder, -1 elsewhere (else None), and for
    documents with due cycles an int32 array aligned with the ids: each placeholder's due cycle and the
    answer's on its tokens, 0 elsewhere (else None))."""
    assert _encoder is not None
    answers = targets = dues = None
    if all(isinstance(document, str) for document in documents):
        encoded = _encoder.encode(documents, out_type=int, num_threads=1)
    else:
        prompts = _encoder.encode([d[0] for d in documents], out_type=int, num_threads=1)
        replies = _encoder.encode([d[1] for d in documents], out_type=int, num_threads=1)
        encoded = [prompt + reply for prompt, reply in zip(prompts, replies)]
        answers = np.fromiter(map(len, replies), dtype=np.int32, count=len(replies))
        if len(documents[0]) >= 3:
            per_document = [_hidden_targets(p, len(r), d[2]) for p, r, d in zip(prompts, replies, documents)]  # type: ignore[misc]
            targets = np.concatenate([np.zeros(0, dtype=np.int32)] + per_document)
        if len(documents[0]) == 4:
            dues = np.concatenate(
                [np.zeros(0, dtype=np.int32)]
                + [_due_cycles(t, len(r), d[3]) for t, r, d in zip(per_document, replies, documents)]  # type: ignore[misc]
            )
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    flat = np.fromiter(chain.from_iterable(encoded), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths, answers, targets, dues


def _due_cycles(targets: np.ndarray, answer_tokens: int, dues: tuple[int, ...]) -> np.ndarray:
    """One document's due cycles aligned with its ids: dues[k] at the k-th placeholder, dues[-1] on the
    answer's tokens, 0 elsewhere."""
    out = np.zeros(len(targets), dtype=np.int32)
    out[targets >= 0] = dues[:-1]
    out[len(targets) - answer_tokens :] = dues[-1]
    return out


def _hidden_targets(prompt: list[int], answer_tokens: int, targets: tuple[str, ...]) -> np.ndarray:
    """One document's hidden targets aligned with its ids (prompt + answer): each placeholder piece's
    target id, -1 elsewhere."""
    assert _encoder is not None
    placeholder = _encoder.piece_to_id(_hidden_piece)
    ids = [_encoder.piece_to_id(t) for t in targets]
    out = np.full(len(prompt) + answer_tokens, -1, dtype=np.int32)
    where = np.flatnonzero(np.asarray(prompt, dtype=np.int64) == placeholder)
    if placeholder == _encoder.unk_id() or len(where) != len(targets):
        raise DataPrepError(
            f'--hidden-piece "{_hidden_piece}": not a piece of its own in every prompt ({len(where)} found for '
            f"{len(targets)} targets); list it in --atomic-symbols when the tokenizer is trained"
        )
    unknown = [t for t, i in zip(targets, ids) if i == _encoder.unk_id()]
    if unknown:
        raise DataPrepError(
            f"--hidden-field: target {unknown[0]!r} is not one piece of the tokenizer (each target must be "
            "a single piece: list it in --atomic-symbols)"
        )
    out[where] = ids
    return out


class TokenFile:
    """One split's encoded documents, in the order appended: ids (and, with hidden targets, the targets
    aligned with them) in anonymous temporary files, a document's offset (and its answer's length) in
    memory, and the per-id token counts."""

    def __init__(
        self, directory: Path, vocab_size: int, answers: bool, hidden: bool = False, due: bool = False
    ) -> None:
        self.file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 (closed by close())
        self.hidden = tempfile.TemporaryFile(dir=directory) if hidden else None  # noqa: SIM115
        self.due = tempfile.TemporaryFile(dir=directory) if due else None  # noqa: SIM115
        self._lengths: list[np.ndarray] = []
        self._answers: list[np.ndarray] | None = [] if answers else None
        self.id_counts = np.zeros(vocab_size, dtype=np.int64)
        self.offsets = np.zeros(1, dtype=np.int64)  # document i: ids offsets[i]:offsets[i + 1]
        self.answers: np.ndarray | None = None  # answer tokens per document (prompt/answer only)

    def append(
        self,
        ids: np.ndarray,
        lengths: np.ndarray,
        answers: np.ndarray | None,
        targets: np.ndarray | None,
        dues: np.ndarray | None = None,
    ) -> None:
        self.file.write(memoryview(ids))
        for file, values in ((self.hidden, targets), (self.due, dues)):
            if file is not None:
                assert values is not None
                file.write(memoryview(values))
        self._lengths.append(lengths)
        if self._answers is not None:
            assert answers is not None
            self._answers.append(answers)
        self.id_counts += np.bincount(ids, minlength=len(self.id_counts))

    def seal(self) -> None:
        """Ends appending; reading starts."""
        for file in (self.file, self.hidden, self.due):
            if file is not None:
                file.flush()
        lengths = np.concatenate([np.zeros(1, dtype=np.int64), *self._lengths])
        self.offsets, self._lengths = np.cumsum(lengths), []
        if self._answers is not None:
            self.answers = np.concatenate([np.zeros(0, dtype=np.int32), *self._answers])
            self._answers = []

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        return self._read(self.file, index)

    def targets(self, index: int) -> np.ndarray:
        """Document `index`'s hidden targets, aligned with its ids (-1: none)."""
        assert self.hidden is not None
        return self._read(self.hidden, index)

    def dues(self, index: int) -> np.ndarray:
        """Document `index`'s due cycles, aligned with its ids (0: none)."""
        assert self.due is not None
        return self._read(self.due, index)

    def _read(self, file: Any, index: int) -> np.ndarray:
        start, end = 4 * int(self.offsets[index]), 4 * int(self.offsets[index + 1])
        chunks = []
        while start < end:  # pread may return less than asked (at most ~2 GB per call on Linux)
            chunks.append(os.pread(file.fileno(), end - start, start))
            if not chunks[-1]:
                raise OSError(f"temporary token file: short read at byte {start}")
            start += len(chunks[-1])
        return np.frombuffer(b"".join(chunks), dtype=np.int32)

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def close(self) -> None:
        for file in (self.file, self.hidden, self.due):
            if file is not None:
                file.close()


def encode_splits(
    args: argparse.Namespace, fields: Fields, model: bytes, files: dict[str, TokenFile]
) -> None:
    """Streams every document through `--workers` encoders into files["train"] / files["test"]."""
    test_masks: deque[np.ndarray] = deque()  # per chunk submitted, which of its documents are test ones

    def jobs() -> Iterator[list[Document]]:
        for documents, test in split_chunks(args, fields):
            test_masks.append(test)
            yield documents

    bar = progress(None, "encoding", args.quiet)  # type: ignore[arg-type] (no total: streamed)
    encoded = bounded_map(
        _encode_chunk,
        jobs(),
        args.workers,
        ahead=_IN_FLIGHT,
        initializer=_start_encoder,
        initargs=(model, fields.hidden_piece),
    )
    for ids, lengths, answers, targets, dues in encoded:
        test = test_masks.popleft()
        for split, keep in (("train", ~test), ("test", test)):
            if keep.all():
                files[split].append(ids, lengths, answers, targets, dues)
            elif keep.any():
                tokens = np.repeat(keep, lengths)
                files[split].append(
                    ids[tokens],
                    lengths[keep],
                    None if answers is None else answers[keep],
                    None if targets is None else targets[tokens],
                    None if dues is None else dues[tokens],
                )
        bar.update(len(lengths))
    bar.close()
    for file in files.values():
        file.seal()


def split_chunks(args: argparse.Namespace, fields: Fields) -> Iterator[tuple[list[Document], np.ndarray]]:
    """Chunks of all documents, --input then --test-input, each with its test-split mask."""
    for start, documents in chunked(iter_documents(args.input, "--input", fields), _CHUNK_DOCUMENTS):
        yield documents, held_out(args, start, len(documents))
    test_documents = iter_documents(args.test_input or [], "--test-input", fields)
    for _, documents in chunked(test_documents, _CHUNK_DOCUMENTS):
        yield documents, np.ones(len(documents), dtype=bool)


def held_out(args: argparse.Namespace, start: int, count: int) -> np.ndarray:
    """Which of --input documents start..start+count-1 are test documents."""
    if args.test_input is not None:
        return np.zeros(count, dtype=bool)
    return unit_hash(args.seed, _HELD_OUT, np.arange(start, start + count)) < _test_fraction(args)


# ---- packing ----------------------------------------------------------------------------------------


def pack_documents(
    order: Iterable[int],
    documents: Sequence[np.ndarray],
    seq_len: int,
    *,
    bos: int,
    eos: int,
    pad: int,
    answers: Sequence[int] | None = None,
    targets: Callable[[int], np.ndarray] | None = None,
    dues: Callable[[int], np.ndarray] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Packs BOS + ids + EOS of documents[i] for i in `order` into rows of `seq_len` (next-fit).

    Yields rows {"tokens": int32 [seq_len], "docs": int32 [seq_len], ...}: docs[k] is the index of the
    document token k comes from, -1 for padding (which only ends a row). A document that fits in a row is
    never split; a longer one fills the current row and continues in the next rows. With `answers` (the
    answer's token count per document: its last ids), "answer" is uint8 [seq_len], 1 on those ids and
    the EOS after them. With `targets` (document i's hidden targets aligned with its ids, -1 where none),
    "targets" is int32 [seq_len], -1 except at the placeholders. With `dues` (document i's due cycles
    aligned with its ids), "due" is uint8 [seq_len]: those, the answer's on the EOS too, 0 elsewhere.
    """

    def new_row() -> dict[str, np.ndarray]:
        row = {"tokens": np.full(seq_len, pad, dtype=np.int32), "docs": np.full(seq_len, -1, dtype=np.int32)}
        if answers is not None:
            row["answer"] = np.zeros(seq_len, dtype=np.uint8)
        if targets is not None:
            row["targets"] = np.full(seq_len, -1, dtype=np.int32)
        if dues is not None:
            row["due"] = np.zeros(seq_len, dtype=np.uint8)
        return row

    row, fill = new_row(), 0
    for index in order:
        ids = documents[index]
        run = {"tokens": np.concatenate(([bos], ids, [eos])).astype(np.int32)}
        run["docs"] = np.full(len(run["tokens"]), index, dtype=np.int32)
        if answers is not None:
            run["answer"] = np.zeros(len(run["tokens"]), dtype=np.uint8)
            run["answer"][len(run["tokens"]) - 1 - answers[index] :] = 1
        if targets is not None:
            run["targets"] = np.concatenate(([-1], targets(index), [-1])).astype(np.int32)
        if dues is not None:
            due = dues(index)
            run["due"] = np.concatenate(([0], due, due[-1:])).astype(np.uint8)  # the EOS: the answer's
        size = len(run["tokens"])
        if fill and size <= seq_len and fill + size > seq_len:  # fits a row, not this one's space
            yield row
            row, fill = new_row(), 0
        start = 0
        while start < size:
            take = min(seq_len - fill, size - start)
            for name, values in run.items():
                row[name][fill : fill + take] = values[start : start + take]
            fill, start = fill + take, start + take
            if fill == seq_len:
                yield row
                row, fill = new_row(), 0
    if fill:
        yield row


# ---- the unigram baseline ---------------------------------------------------------------------------


def unigram_cross_entropy(train_counts: np.ndarray, test_counts: np.ndarray) -> float:
    """Per-token cross-entropy (nats) on the test split of the train split's add-one smoothed unigram
    distribution, from each split's count per token id (over the vocabulary) of the tokens an LM
    predicts: each document's ids followed by EOS (BOS is never a target).
    p(t) = (count_train(t) + 1) / (N_train + vocab_size)."""
    train, test = train_counts.astype(np.float64), test_counts.astype(np.float64)
    log_p = np.log(train + 1.0) - np.log(train.sum() + len(train))
    return float(-(test * log_p).sum() / test.sum())


def target_counts(file: TokenFile, eos: int) -> np.ndarray:
    """The split's count per id of predicted tokens: its ids plus one EOS per document."""
    counts = file.id_counts.copy()
    counts[eos] += len(file)
    return counts


# ---- the command ------------------------------------------------------------------------------------


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "text", help="tokenize text (SentencePiece) and pack documents into fixed-length LM sequences"
    )
    add_common_arguments(p)
    p.add_argument("--input", type=Path, nargs="+", required=True, metavar="FILE", help="train documents")
    add_field_arguments(p)
    p.add_argument("--seq-len", type=positive_int, required=True, help="tokens per packed sequence")
    p.add_argument("--vocab-size", type=positive_int, help="pieces of the trained tokenizer")
    p.add_argument("--tokenizer", type=Path, metavar="MODEL", help="reuse this SentencePiece .model file")
    add_sample_arguments(p)
    test = p.add_mutually_exclusive_group()
    test.add_argument("--test-input", type=Path, nargs="+", metavar="FILE", help="test documents")
    test.add_argument(
        "--test-fraction",
        type=fraction,
        help="without --test-input, hold out each document with this probability (seeded; default "
        f"{DEFAULT_TEST_FRACTION})",
    )
    p.add_argument(
        "--keep-order",
        action="store_true",
        help="pack the train split in input order (e.g. sorted easy to hard), not in a seeded random order",
    )
    p.set_defaults(run=run)


def run(args: argparse.Namespace, command: str) -> Path:
    if args.seq_len < 2:
        raise DataPrepError(f"--seq-len {args.seq_len}: must be >= 2 (room for a BOS and one token)")
    check_atomic_symbols(args.atomic_symbols)
    if args.vocab_size is None and args.tokenizer is None:
        raise DataPrepError("--vocab-size: required unless --tokenizer gives a trained model")
    fields = fields_from_args(args)
    check_files(args.input, "--input")
    check_files(args.test_input or [], "--test-input")  # before a pass over --input
    if args.out.exists() and not args.out.is_dir():
        raise DataPrepError(f"--out {args.out}: exists and is not a directory")
    if not args.overwrite:
        prepare_out_dir(args.out, overwrite=False)  # refuse an existing dataset before doing any work
    model = tokenizer_model(args, fields)
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

    created = not args.out.exists()
    args.out.mkdir(parents=True, exist_ok=True)
    files = {
        split: TokenFile(
            args.out, vocab_size, fields.pairs, hidden=fields.hidden is not None, due=fields.due is not None
        )
        for split in ("train", "test")
    }
    try:
        encode_splits(args, fields, model, files)
        check_split_sizes(args, {split: len(file) for split, file in files.items()})
        # Every input error has surfaced by now: only now replace a previous dataset in --out.
        prepare_out_dir(args.out, args.overwrite)
        (args.out / TOKENIZER_FILE).write_bytes(model)
        shards, stats = {}, {}
        for split, file in files.items():
            shards[split], stats[split] = write_rows(args, split, file, **ids)
            stats[split]["unk_tokens"] = (
                int(file.id_counts[processor.unk_id()]) if processor.unk_id() >= 0 else 0
            )
        baseline = unigram_cross_entropy(
            target_counts(files["train"], ids["eos"]), target_counts(files["test"], ids["eos"])
        )
    except BaseException:
        if created and not any(args.out.iterdir()):
            args.out.rmdir()
        raise
    finally:
        for file in files.values():
            file.close()

    extra: dict[str, Any] = {name: {split: s[name] for split, s in stats.items()} for name in stats["train"]}
    extra.update(
        unigram_entropy_nats=baseline,
        inputs=[str(p) for p in args.input],
        test_inputs=None if args.test_input is None else [str(p) for p in args.test_input],
        test_fraction=None if args.test_input is not None else _test_fraction(args),
        tokenizer_source="trained" if args.tokenizer is None else str(args.tokenizer),
        atomic_symbols=list(args.atomic_symbols),
        tokenizer_sha256=hashlib.sha256(model).hexdigest(),
        packing="next-fit/bos-eos",
        train_order="input" if args.keep_order else "shuffled",
        answer_spans=fields.pairs,
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


def tokenizer_model(args: argparse.Namespace, fields: Fields) -> bytes:
    """The serialized SentencePiece model: read from --tokenizer, or trained on the sample of the train
    documents (a first pass over --input)."""
    if args.tokenizer is not None:
        if args.atomic_symbols:
            raise DataPrepError("--atomic-symbols: applies to a trained tokenizer; omit it with --tokenizer")
        if not args.tokenizer.is_file():
            raise DataPrepError(f"--tokenizer {args.tokenizer}: no such file")
        return args.tokenizer.read_bytes()
    sample = TokenizerSample(args.seed, args.tokenizer_docs, args.tokenizer_chars)
    sizes = {"train": 0, "test": 0}
    bar = progress(None, "tokenizer sample", args.quiet)  # type: ignore[arg-type] (no total: streamed)
    for start, documents in chunked(iter_documents(args.input, "--input", fields)):
        train = np.flatnonzero(~held_out(args, start, len(documents)))
        sample.offer(start + train, [document_text(documents[k]) for k in train.tolist()])
        sizes["train"] += len(train)
        sizes["test"] += len(documents) - len(train)
        bar.update(len(documents))
    bar.close()
    check_split_sizes(args, sizes)
    return train_sentencepiece(sample.take(), args.vocab_size, args.atomic_symbols)


def check_split_sizes(args: argparse.Namespace, sizes: dict[str, int]) -> None:
    if args.test_input is None and (sizes["test"] == 0 or sizes["train"] == 0):
        raise DataPrepError(
            f"--test-fraction {_test_fraction(args)}: holds out {sizes['test']} of "
            f"{sizes['train'] + sizes['test']} documents; each split needs at least one (pass --test-input "
            "or change the fraction)"
        )


def write_rows(
    args: argparse.Namespace, split: str, file: TokenFile, *, bos: int, eos: int, pad: int
) -> tuple[list[ShardInfo], dict[str, int]]:
    """Packs one split's documents (train: seeded order unless --keep-order) into shards; returns the
    shards and counts."""
    count = len(file)
    order = np.arange(count) if args.keep_order else write_order(args.seed, split, count)
    writer = ShardWriter(args.out / split, args.samples_per_shard)
    padding = 0
    bar = progress(count, f"packing {split}", args.quiet)
    targets = file.targets if file.hidden is not None else None
    dues = file.dues if file.due is not None else None
    rows = pack_documents(
        _counted(order, bar),
        file,
        args.seq_len,
        bos=bos,
        eos=eos,
        pad=pad,
        answers=file.answers,
        targets=targets,
        dues=dues,
    )
    hidden = 0
    for row in rows:
        writer.write(row)
        padding += int((row["docs"] < 0).sum())
        hidden += int((row["targets"] >= 0).sum()) if "targets" in row else 0
    bar.close()
    lengths = file.lengths() + 2  # + BOS and EOS
    stats = {
        "documents": count,
        "tokens": int(lengths.sum()),
        "padding_tokens": padding,
        "split_documents": int((lengths > args.seq_len).sum()),
    }
    if file.answers is not None:
        stats["answer_documents"] = count
    if file.hidden is not None:
        stats["hidden_targets"] = hidden
    return writer.close(), stats


def _test_fraction(args: argparse.Namespace) -> float:
    return DEFAULT_TEST_FRACTION if args.test_fraction is None else args.test_fraction


def _counted(order: np.ndarray, bar: Any, block: int = 65536) -> Iterator[int]:
    """The indices of `order` as Python ints, converted a block at a time (not a list of them all)."""
    for start in range(0, len(order), block):
        yield from order[start : start + block].tolist()
        bar.update(min(block, len(order) - start))
