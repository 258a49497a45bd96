"""SampleStream on damaged data: truncated tars and malformed samples, under corrupt_policy skip and fail."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from hrm_mega.data import CorruptDataWarning, DataFormatError, SampleStream, iterate_split
from hrm_mega.data.shards import ShardInfo, ShardWriter, sha256_file, write_manifest

SEQ = 9
GOOD_IN_MALFORMED = [40, 42, 48, 49]  # the malformed shard's readable samples
TRUNCATED = r"shard-000001\.tar: truncated or unreadable tar: read \d+ of 10 samples"


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def good_members(i: int) -> dict[str, bytes]:
    values = ((i * 7 + np.arange(SEQ)) % 10 + 1).astype(np.int16)
    meta = json.dumps({"puzzle_id": 0, "group_id": i}).encode()
    return {"inputs.npy": npy(values), "labels.npy": npy(values), "meta.json": meta}


def malformed_members(i: int) -> dict[str, bytes]:
    members = good_members(i)
    if i == 41:
        members["inputs.npy"] = npy(np.ones(SEQ - 2, dtype=np.int16))  # wrong seq_len
    elif i == 43:
        members["inputs.npy"] = b"\x93NUMPY\x01\x00garbage"  # bad npy
    elif i == 44:
        members["meta.json"] = b"{not json"
    elif i == 45:
        del members["labels.npy"]  # missing member
    elif i == 46:
        members["labels.npy"] = npy(np.full(SEQ, 50, dtype=np.int16))  # token id >= vocab_size
    elif i == 47:
        members["inputs.npy"] = npy(np.ones(SEQ, dtype=np.float32))  # not integers
    return members


def write_tar(path: Path, samples: dict[int, dict[str, bytes]]) -> ShardInfo:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples.items():
            for name, payload in members.items():
                info = tarfile.TarInfo(f"{key:09d}.{name}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return ShardInfo(path.name, len(samples), sha256_file(path))


def build(root: Path, *, truncate: str | None = None, malformed: bool = False, extra: bool = False) -> Path:
    """Shards 0-3 hold samples 0..39 (10 each); shard 4, if `malformed`, holds 40..49 with six bad ones.

    `truncate` cuts shard 1 (samples 10..19): "mid-member", "block" (at a 512-byte boundary, so tarfile
    sees a clean end) or "empty". `extra`: the manifest under-counts shard 2 by 2 samples.
    """
    writer = ShardWriter(root / "train", 10)
    for i in range(40):
        writer.write({"inputs": ((i * 7 + np.arange(SEQ)) % 10 + 1).astype(np.int16),
                      "labels": ((i * 7 + np.arange(SEQ)) % 10 + 1).astype(np.int16),
                      "meta": {"puzzle_id": 0, "group_id": i}})  # fmt: skip
    shards = writer.close()
    if malformed:
        shards.append(
            write_tar(root / "train" / "shard-000004.tar", {i: malformed_members(i) for i in range(40, 50)})
        )
    if truncate:
        path = root / "train" / "shard-000001.tar"
        data = path.read_bytes()
        with tarfile.open(path) as tar:
            inside = tar.getmembers()[16].offset_data + 10  # within the data of sample 15's labels.npy
        cut = {"mid-member": inside, "block": (len(data) // 2) // 512 * 512, "empty": 0}[truncate]
        path.write_bytes(data[:cut])
    if extra:
        shards[2] = ShardInfo(shards[2].name, 8, shards[2].sha256)
    write_manifest(root, task="sudoku", builder_version="1", seed=0, command="test", vocab_size=11,
                   seq_len=SEQ, num_puzzle_identifiers=1, splits={"train": shards})  # fmt: skip
    return root


def drain(stream: SampleStream) -> list[int]:
    ids = []
    while not stream.exhausted:
        ids += stream.take(range(stream.local_batch))["sample_id"].tolist()
    return ids


@pytest.mark.timeout(60)
@pytest.mark.parametrize("truncate", ["mid-member", "block", "empty"])
@pytest.mark.parametrize("workers", [0, 2])
def test_skip_policy_counts_damage_and_delivers_everything_else(
    tmp_path: Path, truncate: str, workers: int
) -> None:
    data = build(tmp_path, truncate=truncate, malformed=True)
    stream = SampleStream(data, seed=0, global_batch=4, partitions=2, loop=False, num_workers=workers)
    with pytest.warns(CorruptDataWarning) as caught:
        ids = drain(stream)
    stream.close()
    assert len(ids) == len(set(ids))
    survivors = sorted(i for i in ids if 10 <= i < 20)
    assert survivors == list(range(10, 10 + len(survivors))) and len(survivors) < 10  # a prefix of shard 1
    assert sorted(ids) == list(range(10)) + survivors + list(range(20, 40)) + GOOD_IN_MALFORMED
    progress = stream.progress
    assert progress["skipped_samples"] == 50 - len(ids) and progress["samples"] == len(ids)
    assert progress["skipped_shards"] == 1
    messages = [str(w.message) for w in caught]
    assert any("shard-000001.tar" in m and "truncated" in m for m in messages)
    for key in (41, 43, 44, 45, 46, 47):
        assert any(f"shard-000004.tar: key {key:09d}" in m for m in messages), key
    assert all("\n" not in m for m in messages)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_skip_policy_training_resumes_exactly_with_damage(tmp_path: Path, workers: int) -> None:
    data = build(tmp_path, truncate="mid-member", malformed=True)

    def make() -> SampleStream:
        return SampleStream(data, seed=1, global_batch=4, partitions=2, shuffle_buffer=8, num_workers=workers)

    rng = np.random.default_rng(0)
    masks = [np.flatnonzero(rng.random(4) < 0.5).tolist() or [0] for _ in range(60)]
    with pytest.warns(CorruptDataWarning):
        whole = make()
        reference = [whole.take(rows)["sample_id"].tolist() for rows in masks]
        head = make()
        for rows in masks[:25]:
            head.take(rows)
        state = json.loads(json.dumps(head.state_dict()))
        tail = make()
        tail.load_state_dict(state)
        rest = [tail.take(rows)["sample_id"].tolist() for rows in masks[25:]]
    assert rest == reference[25:]
    assert tail.progress == whole.progress and whole.progress["skipped_shards"] == 1
    assert whole.progress["epoch"] > 2  # several passes, each skipping the same damage
    for s in (whole, head, tail):
        s.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (dict(truncate="mid-member"), TRUNCATED),
        (dict(truncate="block"), TRUNCATED),
        (dict(malformed=True), r"shard-000004\.tar: key 0000000(41|43|44|45|46|47): "),
        (dict(extra=True), r"shard-000002\.tar: has more samples than the 8 listed in manifest\.json"),
    ],
)
def test_fail_policy_raises_one_line_naming_the_shard(
    tmp_path: Path, workers: int, damage: dict, message: str
) -> None:
    data = build(tmp_path, **damage)
    stream = SampleStream(data, seed=0, global_batch=4, partitions=2, loop=False, num_workers=workers,
                          corrupt_policy="fail")  # fmt: skip
    with pytest.raises(DataFormatError, match=message) as info:
        drain(stream)
    assert "\n" not in str(info.value)
    stream.close()


@pytest.mark.timeout(60)
def test_evaluation_pass_skips_damage_and_keeps_batch_counts_equal(tmp_path: Path) -> None:
    data = build(tmp_path, truncate="block", malformed=True)
    with pytest.warns(CorruptDataWarning):
        ranks = [list(iterate_split(data, "train", batch_size=8, dp_rank=d, dp_size=2)) for d in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # ceil(25 / 8)
    ids = [i for rank in ranks for b in rank for i in b["sample_id"][b["valid"]].tolist()]
    assert len(ids) == len(set(ids)) and set(GOOD_IN_MALFORMED) <= set(ids) and 41 not in ids
    with pytest.raises(DataFormatError, match="shard-000001.tar"):
        list(iterate_split(data, "train", batch_size=8, corrupt_policy="fail"))
