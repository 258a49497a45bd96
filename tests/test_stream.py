"""SampleStream: exactly-once epochs, DP/worker invariance, exact resume, evaluation passes, validation."""

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from hrm_mega.data import DataFormatError, SampleStream, iterate_split
from hrm_mega.data.partition import window_order
from hrm_mega.data.shards import ShardWriter, write_manifest

SEQ = 9


def expected_inputs(i: int) -> np.ndarray:
    return (i * 7 + np.arange(SEQ)) % 10 + 1


def build(root: Path, sizes: list[int], split: str = "train") -> Path:
    """A split whose shards hold `sizes` samples; sample i has content derived from i (see expected_inputs)."""
    shards, key = [], 0
    for number, size in enumerate(sizes):
        writer = ShardWriter(root / split, size, first_shard=number, first_key=key)
        for i in range(key, key + size):
            labels = expected_inputs(i).astype(np.int16)
            labels[i % SEQ] = -100
            writer.write(
                {
                    "inputs": expected_inputs(i).astype(np.int16),
                    "labels": labels,
                    "meta": {"puzzle_id": i % 3, "group_id": i // 2},
                }
            )
        shards += writer.close()
        key += size
    write_manifest(
        root, task="sudoku", builder_version="1", seed=0, command="test", vocab_size=11, seq_len=SEQ,
        num_puzzle_identifiers=3, splits={split: shards},
    )  # fmt: skip
    return root


SIZES = [7, 11, 5, 9, 13, 6, 8, 10]  # 69 samples, uneven so partitions wrap at different times


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Built once for the module: the tests only read it."""
    return build(tmp_path_factory.mktemp("stream"), SIZES)


def halting_masks(steps: int, batch: int, seed: int) -> list[np.ndarray]:
    """Global halted-row masks for `steps` refills (at least one row per step)."""
    rng = np.random.default_rng(seed)
    masks = []
    for _ in range(steps):
        mask = rng.random(batch) < 0.3
        mask[rng.integers(batch)] = True
        masks.append(mask)
    return masks


def run(streams: list[SampleStream], masks: list[np.ndarray], first: bool = True) -> dict[int, list[tuple]]:
    """Drives DP ranks in lockstep like the ACT loop; returns global row -> [(sample_id, epoch, inputs)]."""
    local = streams[0].local_batch
    seen: dict[int, list[tuple]] = {}

    def record(rank: int, batch: dict) -> None:
        for k, r in enumerate(batch["rows"].tolist()):
            item = (int(batch["sample_id"][k]), int(batch["epoch"][k]), tuple(batch["inputs"][k].tolist()))
            seen.setdefault(rank * local + r, []).append(item)

    if first:
        for rank, s in enumerate(streams):
            record(rank, s.first_batch())
    for mask in masks:
        for rank, s in enumerate(streams):
            rows = np.flatnonzero(mask[rank * local : (rank + 1) * local])
            record(rank, s.take(torch.as_tensor(rows)))
    return seen


def flip_transform(sample: dict, rng: np.random.Generator) -> dict:
    """An augmentation whose output depends on the rng (relabels digits by a random permutation)."""
    perm = np.concatenate([[0], 1 + rng.permutation(10)])
    sample["inputs"] = perm[sample["inputs"]]
    return sample


def make(data: Path, **kw) -> SampleStream:
    args = dict(seed=3, global_batch=8, partitions=4, shuffle_buffer=6)
    return SampleStream(data, **{**args, **kw})


@pytest.mark.timeout(60)
def test_one_epoch_two_ranks_two_workers_exactly_once(data: Path) -> None:
    ranks = [make(data, dp_rank=d, dp_size=2, num_workers=2) for d in range(2)]
    try:
        # 2 rows per partition, largest partition has 7 + 13 = 20 samples: 11 full takes finish epoch 0
        seen = run(ranks, [np.ones(8, dtype=bool)] * 10)
        items = [item for row in seen.values() for item in row]
        first_epoch = sorted(sid for sid, epoch, _ in items if epoch == 0)
        assert first_epoch == list(range(sum(SIZES)))
        assert any(epoch == 1 for _, epoch, _ in items)  # small partitions already wrapped
        for sid, _, inputs in items:  # content arrives intact
            assert inputs == tuple(expected_inputs(sid))
        samples = sum(s.progress["samples"] for s in ranks)
        assert samples == len(items) == 8 * 11
        rank_sizes = [sum(p.size for p in s.plans) for s in ranks]
        assert ranks[0].progress["epoch"] == pytest.approx(4 * 11 / rank_sizes[0])
    finally:
        for s in ranks:
            s.close()


@pytest.mark.timeout(60)
def test_fewer_shards_than_partitions_are_cut_into_sample_runs(tmp_path: Path) -> None:
    """A dataset smaller than one default shard: 2 shards, 8 partitions at DP=2. Every sample once per
    epoch, the same rows at DP=1 and DP=2, and an exact resume."""
    small = build(tmp_path / "small", [12, 9])
    layouts = {}
    for dp in (1, 2):
        streams = [make(small, partitions=8, global_batch=8, dp_rank=d, dp_size=dp) for d in range(dp)]
        layouts[dp] = run(streams, [np.ones(8, dtype=bool)] * 2)
        for s in streams:
            s.close()
    assert layouts[1] == layouts[2]
    # 21 samples over 8 partitions: 2 or 3 each, so 3 full takes end epoch 0 of every partition
    items = [item for row in layouts[1].values() for item in row]
    assert sorted(sid for sid, epoch, _ in items if epoch == 0) == list(range(21))

    resumed = make(small, partitions=8, global_batch=8)
    run([resumed], [np.ones(8, dtype=bool)])
    state = json.loads(json.dumps(resumed.state_dict()))
    after = run([resumed], [np.ones(8, dtype=bool)] * 3, first=False)
    again = make(small, partitions=8, global_batch=8)
    again.load_state_dict(state)
    assert run([again], [np.ones(8, dtype=bool)] * 3, first=False) == after
    resumed.close()
    again.close()


@pytest.mark.timeout(60)
def test_rows_see_the_same_samples_for_any_dp_size_and_worker_count(data: Path) -> None:
    masks = halting_masks(40, 8, seed=0)
    layouts = {}
    for dp, workers in [(1, 0), (2, 0), (2, 2), (1, 2)]:
        streams = [
            make(data, dp_rank=d, dp_size=dp, num_workers=workers, transform=flip_transform)
            for d in range(dp)
        ]
        layouts[dp, workers] = run(streams, masks)
        for s in streams:
            s.close()
    reference = layouts[1, 0]
    assert sum(len(v) for v in reference.values()) > 69  # crosses into epoch 1
    for layout, seen in layouts.items():
        assert seen == reference, layout
    # the transform ran, keyed by sample: a sample seen twice in the same epoch would look the same
    changed = [inputs != tuple(expected_inputs(sid)) for row in reference.values() for sid, _, inputs in row]
    assert sum(changed) > len(changed) // 2


@pytest.mark.timeout(60)
def test_rows_of_a_partition_are_served_in_ascending_order_whatever_the_argument_order(data: Path) -> None:
    a, b = make(data), make(data)
    forward, backward = a.take([0, 1, 2, 3]), b.take([3, 2, 1, 0])
    assert forward["rows"].tolist() == [0, 1, 2, 3] and backward["rows"].tolist() == [3, 2, 1, 0]
    assert forward["sample_id"].tolist() == backward["sample_id"].flip(0).tolist()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_exactly_across_epoch_boundaries(data: Path, workers: int) -> None:
    masks = halting_masks(60, 8, seed=1)
    whole = make(data, num_workers=workers)
    reference = [whole.first_batch()] + [whole.take(np.flatnonzero(m).tolist()) for m in masks]
    whole.close()
    rng = np.random.default_rng(workers)
    for cut in sorted(rng.choice(np.arange(1, 60), size=3, replace=False)):
        head = make(data, num_workers=workers)
        head.first_batch()
        for m in masks[: cut - 1]:
            head.take(np.flatnonzero(m).tolist())
        state = json.loads(json.dumps(head.state_dict()))
        head.close()
        tail = make(data, num_workers=workers)
        tail.load_state_dict(state)
        assert tail.progress == head.progress
        for step, m in enumerate(masks[cut - 1 :], start=cut):
            got = tail.take(np.flatnonzero(m).tolist())
            assert got.keys() == reference[step].keys()
            for name in got:
                assert torch.equal(got[name], reference[step][name]), (cut, step, name)
        assert tail.progress == whole.progress
        tail.close()
    assert reference[-1]["epoch"].max() >= 2  # the run covers several epochs


@pytest.mark.timeout(60)
def test_state_from_two_ranks_resumes_a_single_rank_run(data: Path) -> None:
    masks = halting_masks(30, 8, seed=2)
    reference = run([make(data)], masks)
    ranks = [make(data, dp_rank=d, dp_size=2) for d in range(2)]
    head = run(ranks, masks[:12])
    merged = SampleStream.merge_state_dicts([s.state_dict() for s in ranks])
    single = make(data)
    single.load_state_dict(json.loads(json.dumps(merged)))
    tail = run([single], masks[12:], first=False)
    for row in reference:
        assert head[row] + tail.get(row, []) == reference[row]


def test_same_seed_same_order_different_seed_different_order(data: Path) -> None:
    def order(seed: int) -> list[int]:
        s = make(data, seed=seed)
        return [sid for _ in range(12) for sid in s.first_batch()["sample_id"].tolist()]

    assert order(5) == order(5)
    assert order(5) != order(6)
    assert sorted(order(5)[:64]) != list(range(64))  # actually shuffled


def test_window_order_shuffles_within_windows_only() -> None:
    rng = np.random.default_rng(0)
    for n, window in [(1, 4), (10, 1), (50, 8), (30, 100)]:
        order = window_order(n, window, rng)
        assert sorted(order.tolist()) == list(range(n))
        assert all(order[k] // window == k // window for k in range(n))  # resume re-reads <= 1 window
    assert window_order(50, 8, np.random.default_rng(1)).tolist() != list(range(50))


def test_decoded_batch_layout(data: Path) -> None:
    batch = make(data, global_batch=4, partitions=4).first_batch()
    assert batch["inputs"].dtype == torch.long and batch["inputs"].shape == (4, SEQ)
    for k, sid in enumerate(batch["sample_id"].tolist()):
        assert batch["labels"][k, sid % SEQ] == -100
        assert batch["puzzle_identifiers"][k] == sid % 3 and batch["group_id"][k] == sid // 2
    assert batch["epoch"].tolist() == [0] * 4


def draw(sample: dict, rng: np.random.Generator) -> dict:
    sample["draw"] = int(rng.integers(1 << 40))
    return sample


def test_transform_rng_is_keyed_by_seed_epoch_and_sample_not_by_order(data: Path) -> None:
    def draws(**kw) -> dict[tuple[int, int], int]:
        stream, out = make(data, transform=draw, **kw), {}
        for _ in range(30):
            b = stream.first_batch()
            out.update(zip(zip(b["sample_id"].tolist(), b["epoch"].tolist()), b["draw"].tolist()))
        return out

    base, reordered, reseeded = draws(), draws(shuffle_buffer=2), draws(seed=4)
    common = base.keys() & reordered.keys()
    assert len(common) > 100 and all(base[k] == reordered[k] for k in common)
    assert len(set(base.values())) == len(base)  # every (sample, epoch) gets its own stream
    assert all(base[k] != reseeded[k] for k in base.keys() & reseeded.keys())


@pytest.mark.timeout(60)
def test_queues_stay_bounded_when_one_partition_is_drained(data: Path) -> None:
    stream = make(data, num_workers=2, prefetch=6)
    try:
        for _ in range(100):
            stream.take([0, 1])  # only partition 0 halts; the other partitions must not pile up
        assert max(len(q) for q in stream._queues) <= 6
        assert stream.progress["samples"] == 200
    finally:
        stream.close()


def explode(sample: dict, rng: np.random.Generator) -> dict:
    raise ValueError("augmentation exploded")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_transform_errors_surface_as_one_line(data: Path, workers: int) -> None:
    stream = make(data, num_workers=workers, transform=explode)
    with pytest.raises((ValueError, RuntimeError), match="augmentation exploded") as info:
        stream.first_batch()
    assert "\n" not in str(info.value)
    stream.close()


@pytest.mark.timeout(60)
def test_a_killed_worker_fails_fast_instead_of_hanging(data: Path) -> None:
    stream = make(data, num_workers=2)
    stream.first_batch()
    os.kill(stream._loader_iter._workers[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match="killed by signal|exited unexpectedly") as info:
        for _ in range(1000):
            stream.take(range(8))
    assert "\n" not in str(info.value)
    stream.close()


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(partitions=3), "partitions=3 must be a multiple of dp_size=2"),
        (dict(global_batch=6), "global_batch=6 must be a positive multiple of partitions=4"),
        (dict(partitions=128, global_batch=128), "partitions=128 exceeds the 69 samples"),
        (dict(num_workers=3), "num_workers=3"),
        (dict(dp_rank=2), "dp_rank=2"),
        (dict(corrupt_policy="ignore"), "corrupt_policy='ignore'"),
        (dict(shuffle_buffer=-1), "shuffle_buffer=-1"),
        (dict(seed=-1), "seed=-1"),
    ],
)
def test_bad_layouts_are_rejected_with_one_line(data: Path, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace("(", r"\(").replace(")", r"\)")) as info:
        make(data, dp_size=2, **kwargs)
    assert "\n" not in str(info.value)


def test_bad_take_rows_and_foreign_state_are_rejected(data: Path, tmp_path: Path) -> None:
    stream = make(data)
    with pytest.raises(ValueError, match="row 8 is outside the local batch"):
        stream.take([8])
    with pytest.raises(ValueError, match="must not repeat"):
        stream.take([1, 1])
    with pytest.raises(ValueError, match="seed=3 but this stream has seed=4"):
        make(data, seed=4).load_state_dict(stream.state_dict())
    with pytest.raises(ValueError, match="partitions=4 but this stream has partitions=2"):
        make(data, partitions=2).load_state_dict(stream.state_dict())
    other = build(tmp_path / "other", [7, 11, 5, 9, 13, 6, 8, 11])
    with pytest.raises(ValueError, match="shards_digest"):
        make(other).load_state_dict(stream.state_dict())
    with pytest.raises(DataFormatError, match="no split 'dev'"):
        make(data, split="dev")
    assert stream.take([])["inputs"].shape == (0, SEQ)


@pytest.mark.parametrize("batch_size", [4, 7])
def test_iterate_split_covers_each_sample_once_across_ranks(data: Path, batch_size: int) -> None:
    batches = [
        list(iterate_split(data, "train", batch_size=batch_size, dp_rank=d, dp_size=2)) for d in range(2)
    ]
    assert len(batches[0]) == len(batches[1]) == -(-35 // batch_size)  # ceil(ceil(69 / 2) / batch_size)
    ids = []
    for rank in batches:
        for b in rank:
            assert b["inputs"].shape == (batch_size, SEQ)
            valid = b["valid"]
            ids += b["sample_id"][valid].tolist()
            assert (b["labels"][~valid] == -100).all() and (b["sample_id"][~valid] == -1).all()
    assert sorted(ids) == list(range(69))
    assert ids[:3] == [0, 1, 2]  # unshuffled


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [0, 2])
def test_non_looping_stream_hands_out_each_sample_once_then_runs_dry(data: Path, workers: int) -> None:
    ranks = [make(data, dp_rank=d, dp_size=2, loop=False, num_workers=workers) for d in range(2)]
    ids, partial = [], False
    try:
        for _ in range(40):
            for s in ranks:
                batch = s.take(range(s.local_batch))
                partial |= 0 < len(batch["rows"]) < s.local_batch
                ids += batch["sample_id"].tolist()
        assert sorted(ids) == list(range(69))
        assert partial and all(s.exhausted for s in ranks)
        assert len(ranks[0].take([0, 1])["rows"]) == 0
        assert ranks[0].progress["epoch"] == 1.0
    finally:
        for s in ranks:
            s.close()
