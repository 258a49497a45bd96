"""SampleStream on a text dataset built by `hrm-mega prep text`: batch layout and its consistency with the
shards, rank partitioning, exact resume, evaluation passes, and rejected augmentation / malformed rows."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from hrm_mega.data import DataFormatError, SampleStream, iterate_split
from hrm_mega.data.decode import CorruptDataWarning
from hrm_mega.data.shards import ShardWriter, read_manifest, write_manifest
from hrm_mega.prep.cli import main
from hrm_mega.prep.common import read_samples

SEQ = 32
TEXT_KEYS = {
    "input_ids",
    "labels",
    "position_ids",
    "doc_ids",
    "answer",
    "answer_spans",
    "due",
    "sample_id",
    "epoch",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text")
    assert (
        main(["corpus", "--out", str(root / "corpus"), "--docs", "300", "--test-docs", "40", "--quiet"]) == 0
    )
    with open(root / "corpus/train.txt", "a") as f:
        f.write(
            "sort: " + " ".join("31415926535897932384") + " -> " + " ".join(sorted("31415926535897932384"))
        )
    argv = ["text", "--input", str(root / "corpus/train.txt"), "--test-input", str(root / "corpus/test.txt")]
    argv += ["--vocab-size", "320", "--seq-len", str(SEQ), "--samples-per-shard", "16", "--workers", "1"]
    assert main([*argv, "--out", str(root / "data"), "--quiet"]) == 0
    return root / "data"


@pytest.fixture(scope="module")
def rows(data: Path) -> dict[str, dict[int, dict]]:
    """split -> sample id -> {"tokens", "docs"} as stored in the shards."""
    return {split: {int(s["key"]): s for s in read_samples(data, split)} for split in ("train", "test")}


def reference_fields(tokens: list[int], docs: list[int]) -> dict[str, list[int]]:
    """The batch fields of one row, computed token by token from the stored document indices."""
    labels, positions, doc_ids = [], [], []
    doc_id = position = -1
    for i, (token, doc) in enumerate(zip(tokens, docs)):
        continues = i > 0 and doc == docs[i - 1]
        doc_id, position = (doc_id, position + 1) if continues else (doc_id + 1, 0)
        labels.append(token if continues and doc >= 0 else -100)
        positions.append(position)
        doc_ids.append(doc_id)
    answer = [0] * len(tokens)  # a plain text dataset marks no answer spans
    return {
        "input_ids": tokens,
        "labels": labels,
        "position_ids": positions,
        "doc_ids": doc_ids,
        "answer": answer,
    }


def check_batch(batch: dict[str, torch.Tensor], stored: dict[int, dict], extra: set[str]) -> None:
    assert set(batch) == TEXT_KEYS | extra
    for name, value in batch.items():
        assert value.dtype == (torch.bool if name == "valid" else torch.int64), name
    for k, sample_id in enumerate(batch["sample_id"].tolist()):
        if sample_id < 0:
            continue
        row = stored[sample_id]
        expected = reference_fields(row["tokens"].tolist(), row["docs"].tolist())
        for name, values in expected.items():
            assert batch[name][k].tolist() == values, (sample_id, name)


def make(data: Path, **kw) -> SampleStream:
    args = dict(seed=7, global_batch=8, partitions=4, shuffle_buffer=5)
    return SampleStream(data, **{**args, **kw})


def test_batches_match_the_shards_and_the_labels_follow_documents(data: Path, rows) -> None:
    manifest = read_manifest(data)
    bos, eos = manifest["bos_id"], manifest["eos_id"]
    stream = make(data)
    for _ in range(6):
        batch = stream.first_batch()
        check_batch(batch, rows["train"], {"rows"})
        assert batch["input_ids"].shape == (8, SEQ)
        ids, labels, pos = batch["input_ids"], batch["labels"], batch["position_ids"]
        # a target is never a BOS; every EOS is a target; BOS only starts a document
        assert not (labels == bos).any() and (labels[ids == eos] == eos).all()
        assert (pos[ids == bos] == 0).all()
        assert (labels[pos == 0] == -100).all() and (labels[:, 0] == -100).all()
    empty = stream.take([])
    assert set(empty) == TEXT_KEYS | {"rows"} and empty["input_ids"].shape == (0, SEQ)
    # every train row, including those that start mid-document (a long document split across rows)
    continued = 0
    for batch in iterate_split(data, "train", batch_size=16):
        check_batch(batch, rows["train"], {"valid"})
        starts_mid = batch["valid"] & (batch["input_ids"][:, 0] != bos)
        continued += int(starts_mid.sum())
        assert (batch["labels"][starts_mid, 0] == -100).all() and (
            batch["position_ids"][starts_mid, 0] == 0
        ).all()
    assert continued >= 1


def test_two_ranks_see_disjoint_samples_that_cover_the_epoch(data: Path, rows) -> None:
    n = read_manifest(data)["splits"]["train"]["num_samples"]
    ranks = [make(data, dp_rank=d, dp_size=2) for d in range(2)]
    seen: list[list[tuple[int, int]]] = [[], []]
    for step in range(-(-n // 4) + 5):  # every partition (2 rows each) wraps into epoch 1
        for d, stream in enumerate(ranks):
            batch = stream.first_batch()
            if step % 10 == 0:
                check_batch(batch, rows["train"], {"rows"})
            seen[d] += list(zip(batch["sample_id"].tolist(), batch["epoch"].tolist()))
    first = [[sid for sid, epoch in rank if epoch == 0] for rank in seen]
    assert len(set(first[0])) == len(first[0]) and len(set(first[1])) == len(first[1])  # once per epoch
    assert not set(first[0]) & set(first[1])
    assert sorted(first[0] + first[1]) == list(range(n))
    assert all(any(epoch == 1 for _, epoch in rank) for rank in seen)


def halting_masks(steps: int, batch: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(steps):
        mask = rng.random(batch) < 0.4
        mask[rng.integers(batch)] = True
        masks.append(mask)
    return masks


def resume_matches(data: Path, workers: tuple[int, int]) -> None:
    masks = halting_masks(60, 8, seed=0)
    whole = make(data, num_workers=workers[0], partitions=2)
    reference = [whole.first_batch()] + [whole.take(np.flatnonzero(m).tolist()) for m in masks]
    whole.close()
    head = make(data, num_workers=workers[0], partitions=2)
    head.first_batch()
    for m in masks[:17]:
        head.take(np.flatnonzero(m).tolist())
    state = json.loads(json.dumps(head.state_dict()))
    head.close()
    assert all(entry["position"] > 0 for entry in state["partition_state"].values())  # mid-epoch
    tail = make(data, num_workers=workers[1], partitions=2)
    tail.load_state_dict(state)
    for step, m in enumerate(masks[17:], start=18):
        got = tail.take(np.flatnonzero(m).tolist())
        assert got.keys() == reference[step].keys()
        for name in got:
            assert torch.equal(got[name], reference[step][name]), (step, name)
    assert tail.progress == whole.progress
    assert max(b["epoch"].max() for b in reference[18:]) >= 1  # an epoch boundary comes after the cut
    tail.close()


def test_resume_mid_epoch_continues_identically(data: Path) -> None:
    resume_matches(data, (0, 0))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_resume_with_workers_continues_identically(data: Path) -> None:
    resume_matches(data, (2, 1))


def test_same_seed_same_rows_other_seed_other_rows(data: Path) -> None:
    def order(seed: int) -> list[int]:
        stream = make(data, seed=seed)
        return [sid for _ in range(5) for sid in stream.first_batch()["sample_id"].tolist()]

    assert order(1) == order(1) and order(1) != order(2)


@pytest.mark.parametrize("batch_size", [8, 13])
def test_iterate_split_covers_the_test_rows_once_across_ranks(data: Path, rows, batch_size: int) -> None:
    n = len(rows["test"])
    batches = [
        list(iterate_split(data, "test", batch_size=batch_size, dp_rank=d, dp_size=2)) for d in range(2)
    ]
    per_rank = -(-n // 2)
    assert len(batches[0]) == len(batches[1]) == -(-per_rank // batch_size)
    ids = []
    for rank in batches:
        for batch in rank:
            check_batch(batch, rows["test"], {"valid"})
            valid = batch["valid"]
            ids += batch["sample_id"][valid].tolist()
            pad = ~valid
            assert (batch["labels"][pad] == -100).all() and (batch["sample_id"][pad] == -1).all()
            assert (batch["doc_ids"][pad] == 0).all() and (
                batch["position_ids"][pad] == torch.arange(SEQ)
            ).all()
    assert sorted(ids) == list(range(n))


def shift(sample: dict, rng: np.random.Generator) -> dict:
    return sample


def test_augmentation_is_refused_for_text(data: Path) -> None:
    with pytest.raises(ValueError, match="augmentation does not apply to text datasets.*data.augment=false"):
        make(data, transform=shift)


def test_malformed_text_rows_are_skipped_or_fail_with_one_line(tmp_path: Path) -> None:
    good = ([2, 5, 6, 1, 0, 0], [0, 0, 0, 0, -1, -1])
    bad = {
        "padding inside": ([2, 5, 0, 2, 6, 1], [0, 0, -1, 1, 1, 1]),
        "document split inside a row": ([2, 5, 2, 6, 7, 1], [0, 0, 1, 1, 0, 0]),
        "token outside vocab": ([2, 50, 1, 0, 0, 0], [0, 0, 0, -1, -1, -1]),
    }
    writer = ShardWriter(tmp_path / "test", 10)
    for tokens, docs in [good, *bad.values(), good]:
        writer.write({"tokens": np.array(tokens, np.int32), "docs": np.array(docs, np.int32)})
    write_manifest(
        tmp_path, task="text", builder_version="1", seed=0, command="test", vocab_size=10, seq_len=6,
        num_puzzle_identifiers=0, splits={"test": writer.close()},
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batch = next(iterate_split(tmp_path, "test", batch_size=5))
    assert batch["sample_id"][batch["valid"]].tolist() == [0, 4]
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptDataWarning)]
    assert len(messages) == 3 and all("\n" not in m for m in messages)
    assert "docs.npy" in messages[0] and "contiguous" in messages[1] and "tokens.npy" in messages[2]
    with pytest.raises(DataFormatError, match=r"shard-000000.tar: key 000000001: docs.npy") as info:
        list(iterate_split(tmp_path, "test", batch_size=5, corrupt_policy="fail"))
    assert "\n" not in str(info.value)
