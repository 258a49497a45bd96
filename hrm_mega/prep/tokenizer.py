"""Documents from text files, and the SentencePiece tokenizer trained on a seeded sample of them.

    python -m hrm_mega.prep tokenizer --input web.jsonl.gz arith/train.jsonl --prompt-field prompt \
        --answer-field answer --vocab-size 8000 --out tok.model

Input files are read as streams, one document at a time:

- `.jsonl`: one JSON object per line. The document is its string field --text-field (default "text";
  empty texts are skipped), or, with --prompt-field and --answer-field, the pair of those two string
  fields (the answer must not be empty; the prompt may be).
- `.parquet`: the same fields as columns, read in batches of rows (pyarrow).
- anything else: plain text, one document per line; blank lines are skipped.
- a `.gz` suffix on top (`web.jsonl.gz`, `train.txt.gz`) is read through gzip.

Errors are one line naming the option and the file, and the line (JSONL, text) or row (Parquet).

The tokenizer sample: document i of the input (counting documents, across the files in order) gets the
key unit_hash(seed, i); the sample is the documents in increasing key order, taken while they fit both
--tokenizer-docs documents and --tokenizer-chars characters, and it trains in input order. Kept with a
bounded heap while streaming, it is the same whatever the input's size beyond the sample, and `prep
text` draws exactly this sample from its train documents (so `prep tokenizer --input X` trains the
model `prep text --input X --test-input Y` would). A prompt/answer document counts as prompt + answer.

The model: SentencePiece BPE (as Gemma's) with byte fallback (any text encodes, nothing maps to <unk>),
text kept verbatim (identity normalisation, no dummy prefix, spaces kept), digits split one per piece,
--atomic-symbols never merged with a neighbour, and Gemma's special ids: 0 <pad>, 1 </s> (eos),
2 <s> (bos), 3 <unk>.
"""

from __future__ import annotations

import argparse
import gzip
import heapq
import io
import json
import re
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import sentencepiece as spm

from hrm_mega.prep.common import DataPrepError, non_negative_int, positive_int, unit_hash

PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3  # Gemma's layout of the special pieces
DEFAULT_TOKENIZER_DOCS = 1_000_000
# SentencePiece's BPE trainer keeps the whole sample plus state per distinct word. Measured on the 2-core
# dev box at vocab 8000 (docs/benchmarks.md, "prep text at corpus scale"): 3-5 bytes per character and
# 0.1 s per million characters on Zipfian word text, and up to ~30 bytes per character and 0.7 s per
# million on text of nearly all distinct words. 20M characters so bound the trainer to ~600 MB and ~15 s
# on any text, well inside the 1.5 GB a whole `prep text` run may take (--tokenizer-chars raises it for
# a larger vocabulary where memory allows).
DEFAULT_TOKENIZER_CHARS = 20_000_000
_TRAINER_THREADS = 4  # the trained model depends on SentencePiece's thread count: fixed, not --workers
_TRAINER_CHUNK = 4096  # characters per training sentence (SentencePiece skips longer sentences)
_SAMPLE_KEY = 20  # unit_hash purpose: the tokenizer sample's keys
_PARQUET_BATCH = 1024  # rows per Parquet read (memory: one batch of one row group's columns)

# A text, a (prompt, answer) pair, or a pair with hidden targets: (prompt, answer, targets), the k-th
# target what the prompt's k-th placeholder piece is trained to predict (Fields.hidden), and with due
# cycles (Fields.due) (prompt, answer, targets, dues): one per target, then the answer's.
Document = (
    str
    | tuple[str, str]
    | tuple[str, str, tuple[str, ...]]
    | tuple[str, str, tuple[str, ...], tuple[int, ...]]
)
DEFAULT_HIDDEN_PIECE = "?"


# ---- reading documents ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fields:
    """Which JSONL/Parquet fields hold a document: `text`, or the pair (`prompt`, `answer`), optionally
    with `hidden`: a list of strings, the targets of the prompt's `hidden_piece` placeholders in order,
    and with `due`: a list of ints, the H cycle from which deep supervision trains each target, then the
    answer's (0: from the first)."""

    text: str = "text"
    prompt: str | None = None
    answer: str | None = None
    hidden: str | None = None
    hidden_piece: str = DEFAULT_HIDDEN_PIECE
    due: str | None = None

    @property
    def pairs(self) -> bool:
        return self.prompt is not None

    def columns(self) -> list[str]:
        """The fields a record must have: the text's, or the prompt's and the answer's."""
        if self.prompt is None or self.answer is None:
            return [self.text]
        return [self.prompt, self.answer, *(f for f in (self.hidden, self.due) if f)]

    def option(self, field: str) -> str:
        if not self.pairs:
            return "--text-field"
        if field == self.hidden:
            return "--hidden-field"
        if field == self.due:
            return "--due-field"
        return "--prompt-field" if field == self.prompt else "--answer-field"


def add_field_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text-field",
        metavar="NAME",
        help='.jsonl/.parquet input: the field holding the text (default "text")',
    )
    parser.add_argument(
        "--prompt-field",
        metavar="NAME",
        help="with --answer-field: a document is this field's prompt followed by the answer field's text, "
        "and only the answer (and its EOS) is marked as one (instead of --text-field)",
    )
    parser.add_argument("--answer-field", metavar="NAME", help="see --prompt-field")
    parser.add_argument(
        "--hidden-field",
        metavar="NAME",
        help="with --prompt-field: a list of strings, hidden targets. The prompt's k-th --hidden-piece "
        "placeholder is trained to predict the k-th string (one tokenizer piece each) while the model only "
        "ever sees the placeholder there: supervision of intermediate results the context never shows",
    )
    parser.add_argument(
        "--hidden-piece",
        metavar="PIECE",
        default=DEFAULT_HIDDEN_PIECE,
        help=f'the placeholder of --hidden-field (default "{DEFAULT_HIDDEN_PIECE}"; it must be a piece of its '
        "own in every prompt: list it in --atomic-symbols)",
    )
    parser.add_argument(
        "--due-field",
        metavar="NAME",
        help="with --hidden-field: a list of ints, one per hidden target and then one for the answer: the H "
        "cycle from which HRMGemma's deep supervision (model.deep_supervision) trains each of them, for "
        "targets that take that many steps to work out (0: from the first cycle); stored as `due`",
    )


def fields_from_args(args: argparse.Namespace) -> Fields:
    if (args.prompt_field is None) != (args.answer_field is None):
        given, missing = (
            ("--prompt-field", "--answer-field")
            if args.answer_field is None
            else ("--answer-field", "--prompt-field")
        )
        raise DataPrepError(f"{given}: needs {missing} too (a document is a prompt and an answer)")
    hidden = getattr(args, "hidden_field", None)
    if hidden is not None and args.prompt_field is None:
        raise DataPrepError(
            f"--hidden-field {hidden}: needs --prompt-field/--answer-field (targets of a prompt)"
        )
    if args.prompt_field is None:
        return Fields(text="text" if args.text_field is None else args.text_field)
    if args.text_field is not None:
        raise DataPrepError(
            "--text-field: not allowed with --prompt-field/--answer-field (a record is either one text or "
            "a prompt/answer pair)"
        )
    if args.prompt_field == args.answer_field:
        raise DataPrepError(f"--answer-field {args.answer_field}: the same field as --prompt-field")
    if hidden in (args.prompt_field, args.answer_field):
        raise DataPrepError(f"--hidden-field {hidden}: the same field as --prompt-field or --answer-field")
    due = getattr(args, "due_field", None)
    if due is not None and (hidden is None or due in (args.prompt_field, args.answer_field, hidden)):
        raise DataPrepError(f"--due-field {due}: needs --hidden-field, and a field of its own")
    piece = getattr(args, "hidden_piece", DEFAULT_HIDDEN_PIECE)
    if not piece or any(c.isspace() for c in piece):
        raise DataPrepError(f"--hidden-piece {piece!r}: must be a non-empty piece without whitespace")
    return Fields(
        prompt=args.prompt_field, answer=args.answer_field, hidden=hidden, hidden_piece=piece, due=due
    )


def iter_documents(
    paths: Sequence[Path], option: str, fields: Fields = Fields(), *, plain_pairs: bool = False
) -> Iterator[Document]:
    """The documents of the given files, in order, read as streams. With prompt/answer `fields`, plain
    text files are an error unless `plain_pairs` (then each of their lines is a text document)."""
    check_files(paths, option)
    for path in paths:
        kind = Path(path.stem).suffix if path.suffix == ".gz" else path.suffix
        if kind == ".jsonl":
            found = _jsonl_documents(path, option, fields)
        elif kind == ".parquet":
            if path.suffix == ".gz":
                raise DataPrepError(f"{option} {path}: Parquet compresses inside; give the .parquet file")
            found = _parquet_documents(path, option, fields)
        elif fields.pairs and not plain_pairs:
            raise DataPrepError(
                f"{option} {path}: plain text has no prompt/answer fields (--prompt-field/--answer-field "
                "need .jsonl or .parquet input)"
            )
        else:
            found = (text for _, text in _text_lines(path, option) if text.strip())
        count = 0
        for document in found:
            count += 1
            yield document
        if count == 0:
            raise DataPrepError(f"{option} {path}: holds no documents (empty file)")


def check_files(paths: Sequence[Path], option: str) -> None:
    for path in paths:
        if not path.is_file():
            raise DataPrepError(f"{option} {path}: no such file")


def _text_lines(path: Path, option: str) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a text file, gzip-compressed or not."""
    compressed = path.suffix == ".gz"
    offset = 0
    try:
        with gzip.open(path, "rb") if compressed else open(path, "rb") as f:  # noqa: SIM115
            for lineno, raw in enumerate(f, 1):  # splits at b"\n" only, not at \x0c, \u2028, ...
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as exn:
                    raise DataPrepError(
                        f"{option} {path}: not UTF-8 text (bad byte at offset {offset + exn.start})"
                    ) from None
                offset += len(raw)
                yield lineno, line.removesuffix("\n").removesuffix("\r")
    except (OSError, EOFError, zlib.error) as exn:
        if not compressed:
            raise DataPrepError(f"{option} {path}: cannot read it ({exn})") from None
        raise DataPrepError(f"{option} {path}: not a readable gzip file ({exn})") from None


def _jsonl_documents(path: Path, option: str, fields: Fields) -> Iterator[Document]:
    for lineno, line in _text_lines(path, option):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exn:
            raise DataPrepError(f"{path}:{lineno}: not valid JSON ({exn.msg})") from None
        if not isinstance(record, dict):
            record = {}
        where = f"{path}:{lineno}"
        document = _document(
            [record.get(f) for f in fields.columns()], fields, where, "an object with a string field"
        )
        if document:
            yield document


def _parquet_documents(path: Path, option: str, fields: Fields) -> Iterator[Document]:
    import pyarrow as pa  # imported here: only Parquet input needs it
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exn:
        raise DataPrepError(f"{option} {path}: not a readable Parquet file ({exn})") from None
    columns = fields.columns()
    for name in columns:
        if name not in parquet.schema_arrow.names:
            raise DataPrepError(
                f'{option} {path}: no column "{name}" ({fields.option(name)}); its columns: '
                f"{', '.join(parquet.schema_arrow.names)}"
            )
    row = 0
    try:
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
            for values in zip(*(batch.column(name).to_pylist() for name in columns)):
                row += 1
                document = _document(list(values), fields, f"{path}, row {row}", "a string in column")
                if document:
                    yield document
    except (pa.ArrowException, OSError) as exn:
        raise DataPrepError(f"{option} {path}: not a readable Parquet file ({exn})") from None


def _document(values: list[Any], fields: Fields, where: str, expected: str) -> Document:
    """The document of one record's field values (an empty text is "": skipped)."""
    for name, value in zip(fields.columns(), values):
        if name in (fields.hidden, fields.due):
            continue
        if not isinstance(value, str):
            raise DataPrepError(f'{where}: expected {expected} "{name}" ({fields.option(name)})')
    if not fields.pairs:
        return values[0]
    if not values[1]:
        raise DataPrepError(f'{where}: the answer is empty (field "{fields.answer}", --answer-field)')
    if fields.hidden is None:
        return values[0], values[1]
    targets = values[2]
    if not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise DataPrepError(
            f'{where}: expected a list of non-empty strings in "{fields.hidden}" (--hidden-field)'
        )
    placeholders = values[0].count(fields.hidden_piece)
    if placeholders != len(targets):
        raise DataPrepError(
            f'{where}: {len(targets)} hidden targets ("{fields.hidden}") for {placeholders} '
            f'"{fields.hidden_piece}" placeholders in the prompt (--hidden-piece); they must pair up'
        )
    if fields.due is None:
        return values[0], values[1], tuple(targets)
    dues = values[3]
    if (
        not isinstance(dues, list)
        or len(dues) != len(targets) + 1
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= 255 for d in dues)
    ):
        raise DataPrepError(
            f'{where}: expected {len(targets) + 1} ints in 0..255 in "{fields.due}" (--due-field: one per '
            "hidden target, then the answer's)"
        )
    return values[0], values[1], tuple(targets), tuple(dues)


def document_text(document: Document) -> str:
    return document if isinstance(document, str) else document[0] + document[1]


# ---- the sample -------------------------------------------------------------------------------------


class TokenizerSample:
    """The documents with the smallest keys (unit_hash of the seed and the document's index) that fit
    `max_documents` and `max_chars`, kept while streaming.

    Invariant: the heap holds exactly the documents seen so far whose key is below `cutoff`, and they fit;
    a document's text counts at most `max_chars` characters (a longer one is cut), so the sample is
    never empty. The result does not depend on how the documents were chunked.
    """

    def __init__(self, seed: int, max_documents: int, max_chars: int) -> None:
        self.seed, self.max_documents, self.max_chars = seed, max_documents, max_chars
        self.cutoff = 1.0
        self.chars = 0
        self.heap: list[tuple[float, int, str]] = []  # (-key, index, text): the largest key on top

    def offer(self, indices: np.ndarray, texts: Sequence[str]) -> None:
        """Considers documents `indices[k]` with texts `texts[k]`."""
        keys = unit_hash(self.seed, _SAMPLE_KEY, indices)
        for k in np.flatnonzero(keys < self.cutoff).tolist():
            if keys[k] >= self.cutoff:  # the cutoff fell while this chunk was offered
                continue
            text = texts[k][: self.max_chars]
            heapq.heappush(self.heap, (-float(keys[k]), int(indices[k]), text))
            self.chars += len(text)
            while len(self.heap) > self.max_documents or self.chars > self.max_chars:
                key, _, dropped = heapq.heappop(self.heap)
                self.cutoff, self.chars = -key, self.chars - len(dropped)

    def take(self) -> list[str]:
        """The sampled texts in input order (the sample is emptied)."""
        texts = [text for _, _, text in sorted(self.heap, key=lambda entry: entry[1])]
        self.heap, self.chars = [], 0
        return texts


def train_tokenizer(
    documents: Iterable[str],
    vocab_size: int,
    *,
    seed: int,
    max_documents: int,
    max_chars: int = DEFAULT_TOKENIZER_CHARS,
    atomic_symbols: Sequence[str] = (),
) -> bytes:
    """Trains a SentencePiece model on the seeded sample (TokenizerSample) of `documents`; returns the
    serialized model."""
    sample = TokenizerSample(seed, max_documents, max_chars)
    texts = list(documents)
    sample.offer(np.arange(len(texts)), texts)
    return train_sentencepiece(sample.take(), vocab_size, atomic_symbols)


def train_sentencepiece(texts: list[str], vocab_size: int, atomic_symbols: Sequence[str] = ()) -> bytes:
    """Trains the SentencePiece BPE model on `texts` (all of them, in order; the list is emptied as
    SentencePiece copies it, so the texts are not held twice). `atomic_symbols` are always pieces of
    their own, never merged with a neighbour (SentencePiece's user-defined symbols). Deterministic: no
    sampling inside SentencePiece, fixed thread count."""
    texts.reverse()

    def sentences() -> Iterator[str]:
        while texts:
            text = texts.pop()
            for start in range(0, len(text), _TRAINER_CHUNK):
                yield text[start : start + _TRAINER_CHUNK]

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


# ---- the command ------------------------------------------------------------------------------------


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a trained tokenizer that `prep text` and `prep tokenizer` share."""
    parser.add_argument(
        "--tokenizer-docs",
        type=positive_int,
        default=DEFAULT_TOKENIZER_DOCS,
        help=f"train the tokenizer on a seeded sample of at most this many documents (default {DEFAULT_TOKENIZER_DOCS})",
    )
    parser.add_argument(
        "--tokenizer-chars",
        type=positive_int,
        default=DEFAULT_TOKENIZER_CHARS,
        help=f"... and at most this many characters (default {DEFAULT_TOKENIZER_CHARS}; bounds the "
        "trainer's memory)",
    )
    parser.add_argument(
        "--atomic-symbols",
        nargs="+",
        default=[],
        metavar="SYMBOL",
        help="strings the trained tokenizer keeps as pieces of their own, e.g. '=' so that a prompt "
        "ending in '=' splits where its training text did ('=-' is not merged into one piece)",
    )


def check_atomic_symbols(symbols: Sequence[str]) -> None:
    if any(not symbol for symbol in symbols):
        raise DataPrepError(
            "--atomic-symbols: a symbol is empty; give non-empty strings, e.g. --atomic-symbols ="
        )


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "tokenizer",
        help="train the SentencePiece tokenizer `prep text` would, on a seeded sample across several inputs",
    )
    p.add_argument("--input", type=Path, nargs="+", required=True, metavar="FILE", help="documents")
    add_field_arguments(p)
    p.add_argument("--vocab-size", type=positive_int, required=True, help="pieces of the tokenizer")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="the .model file to write")
    p.add_argument("--seed", type=non_negative_int, default=0, help="the sample's seed (default 0)")
    add_sample_arguments(p)
    p.add_argument("--quiet", action="store_true", help="no summary line")
    p.set_defaults(run=run)


def run(args: argparse.Namespace, command: str) -> Path:
    """Trains on the sample of all --input documents; the field options apply to JSONL and Parquet
    files, plain text files are one document per line whatever they say."""
    check_atomic_symbols(args.atomic_symbols)
    fields = fields_from_args(args)
    if args.out.is_dir():
        raise DataPrepError(f"--out {args.out}: is a directory; give the .model file to write")
    sample = TokenizerSample(args.seed, args.tokenizer_docs, args.tokenizer_chars)
    for start, documents in chunked(iter_documents(args.input, "--input", fields, plain_pairs=True)):
        sample.offer(np.arange(start, start + len(documents)), [document_text(d) for d in documents])
    model = train_sentencepiece(sample.take(), args.vocab_size, args.atomic_symbols)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_name(args.out.name + ".partial")
    partial.write_bytes(model)
    partial.replace(args.out)  # a reader never sees half a model
    return args.out


def chunked(
    documents: Iterable[Document], max_documents: int = 256, max_chars: int = 1 << 20
) -> Iterator[tuple[int, list[Document]]]:
    """(index of the first, documents) in chunks of at most `max_documents` documents, and no more
    characters than `max_chars` unless a single document has them."""
    chunk: list[Document] = []
    start = chars = 0
    for document in documents:
        size = len(document) if isinstance(document, str) else len(document[0]) + len(document[1])
        if chunk and (len(chunk) == max_documents or chars + size > max_chars):
            yield start, chunk
            start, chunk, chars = start + len(chunk), [], 0
        chunk.append(document)
        chars += size
    if chunk:
        yield start, chunk
