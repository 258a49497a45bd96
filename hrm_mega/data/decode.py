"""From shard bytes to samples: reading tar records with webdataset, then decoding puzzle or text samples.

Reading and decoding are separate steps so that the stream can pass over records without decoding
them (a fast resume) and decodes only the samples it hands out. `decoder_for(manifest)` picks
`decode_puzzle` (inputs/labels/meta), `decode_text` (packed LM rows: tokens/docs) or `decode_image_text`
(packed rows with encoded images, decoded and resized here, in the loader workers), see
docs/data_format.md.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from webdataset.tariterators import group_by_keys, tar_file_expander

from hrm_mega.data.images import ImageError, ImageSpec, load_image, resized_views
from hrm_mega.data.remote import ShardFetchError, fetch_shard, is_remote
from hrm_mega.data.shards import DataFormatError

# webdataset's grouping of one key's members: {"__key__": "000000007", "inputs.npy": b"...", ...}
Record = dict[str, Any]
CORRUPT_POLICIES = ("skip", "fail")


class CorruptDataWarning(UserWarning):
    """A sample or shard was skipped under corrupt_policy="skip"."""


class Skip(NamedTuple):
    """A slot whose sample cannot be used. The stream counts it, warns and moves on to the next slot."""

    shard: str
    key: str | None  # None when the record could not even be read (truncated or unreadable tar)
    reason: str
    unreadable: bool  # True: the shard itself is damaged, not just this one sample

    def message(self) -> str:
        where = self.shard if self.key is None else f"{self.shard}: key {self.key}"
        return f"{where}: {self.reason}"


def _first_line(exn: BaseException) -> str:
    # webdataset appends " @ <file object>" and extra args to exception messages; keep the cause only
    text = str(exn.args[0]) if exn.args else str(exn)
    return f"{type(exn).__name__}: {text.split(' @ ')[0].splitlines()[0] if text else ''}".rstrip(": ")


def read_segment(
    path: str, lo: int, hi: int, wanted: np.ndarray, *, expected: int, fail: bool, sha256: str = "",
    retries: int = 0,
) -> Iterator[tuple[int, Record | Skip]]:  # fmt: skip
    """Yields `(i, record)` for records `lo + i` (in file order) of the shard where `wanted[i]`.

    Records are read but not decoded. Wanted records that cannot be read (truncated or damaged tar, or
    fewer records than the manifest's `expected`) come last as `Skip` items, or raise DataFormatError
    when `fail`. Reading stops after record `hi - 1`. A read of the whole shard is checked against the
    manifest's `sha256` as it goes: a flipped bit raises DataFormatError at the shard's end under
    `fail` (its samples have been handed out by then), or warns. A remote `path` (data.shard_url) is
    fetched whole first, `retries` more times if it fails or arrives damaged (remote.py).
    """
    errors: list[BaseException] = []

    def stop(exn: BaseException) -> bool:  # webdataset handler: remember the error, stop this shard
        errors.append(exn)
        return False

    seen = np.zeros(hi - lo, dtype=bool)
    ordinal, held = -1, None  # one record is held back: after a damaged end the last one may be partial
    whole = bool(sha256) and lo == 0 and wanted.all() and hi >= expected and not is_remote(path)
    actual = sha256
    try:
        with fetch_shard(path, sha256, retries) if is_remote(path) else open(path, "rb") as raw:
            stream = _HashingReader(raw) if whole else raw
            files = tar_file_expander([{"url": path, "stream": stream}], handler=stop)
            for record in group_by_keys(files, handler=stop):
                ordinal += 1
                if ordinal >= hi:
                    break
                if held is not None:
                    yield held
                    held = None
                if ordinal >= lo and wanted[ordinal - lo]:
                    seen[ordinal - lo] = True
                    held = (ordinal - lo, record)
            actual = stream.finish() if isinstance(stream, _HashingReader) and not errors else sha256
    except OSError as exn:  # unreadable file (webdataset routes errors while reading through `stop`)
        errors.append(exn)
    if ordinal >= expected:
        reason = f"has more samples than the {expected} listed in manifest.json"
        if fail:
            raise DataFormatError(f"{path}: {reason}")
        warnings.warn(f"{path}: {reason}; extra samples ignored", CorruptDataWarning, stacklevel=2)
    missing = np.flatnonzero(wanted & ~seen)
    damaged = bool(errors) or len(missing) > 0
    if damaged and errors and isinstance(errors[0], ShardFetchError):
        reason = str(errors[0]).removeprefix(f"{path}: ")
        if fail:
            raise DataFormatError(f"{path}: {reason}")
    elif damaged:
        cause = f" ({_first_line(errors[0])})" if errors else ""
        reason = f"truncated or unreadable tar: read {min(ordinal + 1, hi)} of {expected} samples{cause}"
        if fail:  # report the damage itself, not the half-read record at the cut
            raise DataFormatError(f"{path}: {reason}")
    if not damaged and actual != sha256:  # every record read, but not the bytes that were written
        reason = "its sha256 differs from manifest.json (damaged or modified shard)"
        if fail:
            raise DataFormatError(f"{path}: {reason}")
        warnings.warn(f"{path}: {reason}", CorruptDataWarning, stacklevel=2)
    if held is not None:  # under "skip" it is decoded like any other; if partial, it is skipped then
        yield held
    if damaged:
        for i in missing:
            yield int(i), Skip(path, None, reason, unreadable=True)


class _HashingReader:
    """A binary file whose bytes are hashed as they are read; finish() reads the rest and returns the
    sha256 of the whole file."""

    def __init__(self, raw: Any) -> None:
        self.raw, self.digest = raw, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.digest.update(data)
        return data

    def finish(self) -> str:
        while data := self.raw.read(1 << 20):
            self.digest.update(data)
        return self.digest.hexdigest()


# ---- decoding -------------------------------------------------------------------------------------


TEXT_TASK = "text"  # manifest task of packed LM datasets
IMAGE_TEXT_TASK = "image_text"  # packed LM rows with images (hrm-mega prep images); others hold puzzles
KINDS = {TEXT_TASK: "text", IMAGE_TEXT_TASK: "image_text"}


@dataclass(frozen=True)
class SampleSpec:
    """What a valid sample of this dataset looks like (from manifest.json). `kind` is "puzzle", "text" or
    "image_text" (text rows that also hold images, described by `image`)."""

    seq_len: int
    vocab_size: int
    num_puzzle_identifiers: int
    pad_id: int = 0
    ignore_label_id: int = -100
    kind: str = "puzzle"
    image: ImageSpec | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> SampleSpec:
        kind = KINDS.get(manifest.get("task"), "puzzle")  # type: ignore[arg-type]
        image = None
        if kind == "image_text":
            try:
                image = ImageSpec.from_json(manifest.get("extra", {}).get("image"))
            except ValueError as e:
                raise DataFormatError(f"manifest.json: {e}") from None
        return cls(
            seq_len=int(manifest["seq_len"]),
            vocab_size=int(manifest["vocab_size"]),
            num_puzzle_identifiers=int(manifest["num_puzzle_identifiers"]),
            pad_id=int(manifest.get("pad_id", 0)),
            ignore_label_id=int(manifest.get("ignore_label_id", -100)),
            kind=kind,
            image=image,
        )


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...]]] = {}


def load_npy(raw: bytes) -> np.ndarray:
    """Decodes .npy bytes without pickle. Parsed headers are cached: all samples of a dataset share one
    header, and parsing it (np.load) costs ~60 us against ~2 us for np.frombuffer."""
    if raw[:6] != _NPY_MAGIC or len(raw) < 10:
        raise ValueError("not a .npy file")
    if raw[6] == 1:
        offset = 10 + int.from_bytes(raw[8:10], "little")
    else:
        offset = 12 + int.from_bytes(raw[8:12], "little")
    header = raw[:offset]
    cached = _npy_headers.get(header)
    if cached is None:
        array = np.load(io.BytesIO(raw), allow_pickle=False)  # full checks on the first sight of a header
        if array.dtype.hasobject or not array.flags.c_contiguous:
            raise ValueError(f"unsupported array (dtype {array.dtype}, fortran order)")
        if len(_npy_headers) < 256:
            _npy_headers[header] = (array.dtype, array.shape)
        return array
    dtype, shape = cached
    count = int(np.prod(shape))
    if len(raw) != offset + count * dtype.itemsize:
        raise ValueError(f"{len(raw) - offset} data bytes, expected {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)


def _int_array(record: Record, member: str, spec: SampleSpec) -> np.ndarray:
    if member not in record:
        raise DataFormatError(f"missing member {member}")
    try:
        array = load_npy(record[member])
    except (ValueError, OSError, EOFError) as exn:
        raise DataFormatError(f"bad {member} ({exn})") from None
    if array.shape != (spec.seq_len,) or array.dtype.kind not in "iu":
        raise DataFormatError(
            f"{member} is {array.dtype}{list(array.shape)}, expected an integer array [{spec.seq_len}]"
        )
    return array.astype(np.int64)


def _sample_id(record: Record) -> int:
    key = record["__key__"]
    if not key.isdigit():
        raise DataFormatError(f"key {key!r} is not a decimal sample index")
    return int(key)


def _check_ids(ids: np.ndarray, what: str, spec: SampleSpec) -> None:
    if spec.image is not None:  # the image placeholder may be the id after the vocabulary (Gemma 3's)
        ids = ids[ids != spec.image.image_token_id]
    if ids.size and (ids.min() < 0 or ids.max() >= spec.vocab_size):
        raise DataFormatError(f"{what} token id outside [0, vocab_size={spec.vocab_size})")


def decode_puzzle(record: Record, spec: SampleSpec) -> dict[str, Any]:
    """Decodes one puzzle record into numpy int64 `inputs`/`labels` [seq_len] plus integer ids.

    Raises DataFormatError with a short reason (the caller adds the shard and key).
    """
    sample_id = _sample_id(record)
    inputs = _int_array(record, "inputs.npy", spec)
    labels = _int_array(record, "labels.npy", spec)
    if "meta.json" not in record:
        raise DataFormatError("missing member meta.json")
    try:
        meta = json.loads(record["meta.json"])
    except (ValueError, UnicodeDecodeError) as exn:
        raise DataFormatError(f"bad meta.json ({exn})") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), int) for k in ("puzzle_id", "group_id")):
        raise DataFormatError("meta.json needs integer puzzle_id and group_id")
    _check_ids(inputs, "inputs", spec)
    _check_ids(labels[labels != spec.ignore_label_id], "labels", spec)
    if not 0 <= meta["puzzle_id"] < spec.num_puzzle_identifiers:
        raise DataFormatError(f"puzzle_id {meta['puzzle_id']} outside [0, {spec.num_puzzle_identifiers})")
    return {
        "inputs": inputs,
        "labels": labels,
        "puzzle_identifiers": meta["puzzle_id"],
        "group_id": meta["group_id"],
        "sample_id": sample_id,
    }


def decode_text(record: Record, spec: SampleSpec) -> dict[str, Any]:
    """Decodes one packed LM row (`tokens.npy` ids, `docs.npy` document index per token, -1 = padding)
    into numpy int64 arrays [seq_len], HF-style (labels aligned with the inputs; the loss shifts them):

    - input_ids: the tokens;
    - labels: the token itself where it continues the document of the position before it, else
      ignore_label_id: at the first token of every document piece (a BOS, or a split document's
      continuation at the row start) and on padding;
    - position_ids: 0, 1, 2, ... restarting at every document piece (and at the padding);
    - doc_ids: 0, 1, 2, ... per document piece in the row; the padding gets the next id;
    - answer: 1 on the tokens of an answer span (a prompt/answer dataset's `answer.npy`: the answer's
      tokens and its document's EOS), 2 on hidden targets, else 0; and answer_spans, 1 when the dataset
      marks spans at all (the LM task then trains on both and scores the answers only; docs/data.md);
    - with `targets.npy` (hidden targets, `prep text --hidden-field`: an id or -1 per token), the labels
      of those positions are their targets: the input keeps the placeholder, the model learns to predict
      what it never sees;
    - due: with `due.npy` (`prep text --due-field`: 0-255 per token) the H cycle from which deep
      supervision trains the target at each position (lm_loss), else 0 everywhere.

    Raises DataFormatError with a short reason (the caller adds the shard and key).
    """
    sample_id = _sample_id(record)
    tokens = _int_array(record, "tokens.npy", spec)
    docs = _int_array(record, "docs.npy", spec)
    _check_ids(tokens, "tokens.npy", spec)
    real = docs >= 0
    if docs.min() < -1 or (not real[0]) or (real[1:] & ~real[:-1]).any():
        raise DataFormatError("docs.npy: document indices must be >= 0, with -1 (padding) only at the end")
    starts = np.ones(spec.seq_len, dtype=bool)
    starts[1:] = docs[1:] != docs[:-1]
    doc_ids = np.cumsum(starts) - 1
    if len(np.unique(docs[real])) != int(doc_ids[real][-1]) + 1:
        raise DataFormatError("docs.npy: a document's tokens must be contiguous within a row")
    spans = "answer.npy" in record
    answer = _int_array(record, "answer.npy", spec) if spans else np.zeros(spec.seq_len, dtype=np.int64)
    if spans and ((answer < 0) | (answer > 1) | (answer.astype(bool) & ~real)).any():
        raise DataFormatError("answer.npy: must be 0 or 1, and 0 on padding")
    labels = np.where(real & ~starts, tokens, spec.ignore_label_id)
    if "targets.npy" in record:
        targets = _int_array(record, "targets.npy", spec)
        hidden = targets >= 0
        if not spans or (targets < -1).any() or (hidden & (~real | answer.astype(bool))).any():
            raise DataFormatError(
                "targets.npy: must be -1 or a token id, only on prompt tokens of a dataset with answer.npy"
            )
        _check_ids(targets[hidden], "targets.npy", spec)
        hidden &= ~starts  # a split document's piece starting at a placeholder: no position predicts it
        labels = np.where(hidden, targets, labels)
        answer = np.where(hidden, 2, answer)
    due = np.zeros(spec.seq_len, dtype=np.int64)
    if "due.npy" in record:
        due = _int_array(record, "due.npy", spec)
        if (due < 0).any() or (due > 255).any():
            raise DataFormatError("due.npy: must be 0-255 (a cycle) per token")
    return {
        "input_ids": tokens,
        "labels": labels,
        "position_ids": np.arange(spec.seq_len) - np.flatnonzero(starts)[doc_ids],
        "doc_ids": doc_ids,
        "answer": answer,
        "answer_spans": int(spans),
        "due": due,
        "sample_id": sample_id,
    }


_IMAGE_MEMBER = re.compile(r"^img(\d+)\.(png|jpg)$")


def decode_image_text(record: Record, spec: SampleSpec) -> dict[str, Any]:
    """Decodes a packed row with images (`hrm-mega prep images`): decode_text's arrays, with the labels of
    every image token (<start_of_image>, the placeholders, <end_of_image>) set to ignore_label_id, plus

    - pixels: uint8 [n, 3, S, S], the row's views in order: each stored image (`img0.png`, `img1.jpg`,
      ... in index order) decoded here and preprocessed by the manifest's extra.image settings (resized;
      its pan-and-scan crops after it), rescaling and normalising left to the device
      (images.normalize_pixels);
    - num_images: n, which must equal the row's runs of mm_tokens_per_image placeholders.

    Raises DataFormatError with a short reason naming the member (the caller adds the shard and key).
    """
    assert spec.image is not None
    sample = decode_text(record, spec)
    image = spec.image
    tokens = sample["input_ids"]
    special = (
        (tokens == image.image_token_id) | (tokens == image.boi_token_id) | (tokens == image.eoi_token_id)
    )
    sample["labels"] = np.where(special, spec.ignore_label_id, sample["labels"])
    members = sorted(
        ((int(m.group(1)), name) for name in record if (m := _IMAGE_MEMBER.match(name))), key=lambda x: x[0]
    )
    if [i for i, _ in members] != list(range(len(members))):
        raise DataFormatError(f"image members {[n for _, n in members]} are not img0, img1, ... in order")
    placeholders = int((tokens == image.image_token_id).sum())
    if placeholders % image.mm_tokens_per_image:
        raise DataFormatError(
            f"tokens.npy holds {placeholders} image placeholders, not a multiple of mm_tokens_per_image="
            f"{image.mm_tokens_per_image}"
        )
    views = []
    for _, name in members:
        try:
            views.append(resized_views(load_image(record[name], name), image.processing))
        except ImageError as e:
            raise DataFormatError(str(e)) from None
    size = image.processing.size
    pixels = np.concatenate(views) if views else np.zeros((0, 3, size, size), dtype=np.uint8)
    if len(pixels) * image.mm_tokens_per_image != placeholders:
        raise DataFormatError(
            f"{len(members)} image(s) give {len(pixels)} view(s), but tokens.npy holds "
            f"{placeholders // image.mm_tokens_per_image} runs of image placeholders"
        )
    sample["pixels"] = pixels
    sample["num_images"] = len(pixels)
    return sample


Decoder = Callable[[Record, SampleSpec], dict[str, Any]]


def decoder_for(manifest: dict[str, Any]) -> Decoder:
    """The decoder for a dataset's samples: decode_text for task "text", decode_image_text for
    "image_text", else decode_puzzle."""
    task = manifest.get("task")
    return {TEXT_TASK: decode_text, IMAGE_TEXT_TASK: decode_image_text}.get(task, decode_puzzle)  # type: ignore[arg-type]
