"""Weighted mixtures (data.sources): realised proportions, DP invariance, exact resume, config errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_stream import build

from hrm_mega.config import ConfigError, load_config
from hrm_mega.data.mixture import MixtureStream, Source
from hrm_mega.data.shards import manifest_digest
from hrm_mega.data.stream import SampleStream
from hrm_mega.resources import recipe

WEIGHTS = {"a": 0.6, "b": 0.3, "c": 0.1}


@pytest.fixture(scope="module")
def three(tmp_path_factory) -> dict[str, Path]:
    """Three puzzle-shaped datasets (the mixture does not look inside samples): 69, 40 and 24 samples."""
    root = tmp_path_factory.mktemp("mixture")
    sizes = {"a": [7, 11, 5, 9, 13, 6, 8, 10], "b": [10, 10, 10, 10], "c": [6, 6, 6, 6]}
    return {name: build(root / name, s) for name, s in sizes.items()}


def mixture(three, *, batch: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 5, workers: int = 0):
    sources = [
        Source(name, WEIGHTS[name], SampleStream(path, seed=seed + i, global_batch=batch, partitions=4,
                                                 dp_rank=dp_rank, dp_size=dp_size, shuffle_buffer=6, num_workers=workers))
        for i, (name, path) in enumerate(three.items())
    ]  # fmt: skip
    return MixtureStream(sources, seed=seed, global_batch=batch, dp_rank=dp_rank, dp_size=dp_size)


def global_rows(streams, steps: int) -> list[list[tuple[int, int]]]:
    """Per step, (source, sample_id) of every global row, the ranks' local batches in rank order."""
    out = []
    for _ in range(steps):
        step = []
        for s in streams:
            batch = s.take(range(s.local_batch))
            step += list(zip(batch["source"].tolist(), batch["sample_id"].tolist()))
        out.append(step)
    return out


def test_realised_proportions_follow_the_weights_within_a_point(three):
    stream = mixture(three, batch=64)
    counts = np.zeros(3)
    for step in global_rows([stream], 313):  # 20,032 samples
        for source, _ in step:
            counts[source] += 1
    shares = counts / counts.sum()
    assert np.abs(shares - np.array(list(WEIGHTS.values()))).max() < 0.01, shares
    # a step's rows are spread over the sources too, not one source per step
    first = [source for source, _ in global_rows([mixture(three, batch=64)], 1)[0]]
    assert sorted(set(first)) == [0, 1, 2] and abs(first.count(0) - 38) <= 2
    assert stream.progress["a/samples"] + stream.progress["b/samples"] + stream.progress["c/samples"] == 20032
    stream.close()


def test_dp1_and_dp2_read_the_same_rows_and_resume_exactly(three):
    one = mixture(three, batch=8)
    two = [mixture(three, batch=8, dp_rank=r, dp_size=2) for r in range(2)]
    assert global_rows([one], 12) == global_rows(two, 12)
    # a DP=2 state merged and loaded at DP=1 (and the DP=1 state at DP=2) continues like the uninterrupted run
    state_two = MixtureStream.merge_state_dicts([json.loads(json.dumps(s.state_dict())) for s in two])
    state_one = json.loads(json.dumps(one.state_dict()))
    expected = global_rows([one], 6)
    again = mixture(three, batch=8)
    again.load_state_dict(state_two)
    assert global_rows([again], 6) == expected
    halves = [
        mixture(three, batch=8, dp_rank=r, dp_size=2, workers=1) for r in range(2)
    ]  # with a loader worker
    for h in halves:
        h.load_state_dict(state_one)
    assert global_rows(halves, 6) == expected
    for s in [one, *two, again, *halves]:
        s.close()


def text_source(tmp_path: Path, tiny_text: Path, name: str, edit=None) -> Path:
    copy = shutil.copytree(tiny_text, tmp_path / name)
    if edit is not None:
        manifest = json.loads((copy / "manifest.json").read_text())
        edit(manifest)
        manifest["sha256"] = manifest_digest(manifest)
        (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def sources_config(tmp_path, *sources: tuple):
    """(path, weight) or (path, weight, shard_url) per source."""
    listed = (
        "["
        + ", ".join(f"{{path: '{s[0]}', weight: {s[1]}, shard_url: '{(*s, '')[2]}'}}" for s in sources)
        + "]"
    )
    return load_config(recipe("lm/hrmgemma_tiny.yaml"), [f"data.sources={listed}", "data.partitions=2",
                       f"log.out_dir={tmp_path}/run"], world_size=1, command="train")  # fmt: skip


def test_a_mixture_config_is_checked_in_one_line_before_training(tmp_path, tiny_text):
    other = text_source(tmp_path, tiny_text, "other")
    config = sources_config(tmp_path, (tiny_text, 2), (other, 1))
    assert config.data.path == str(tiny_text) and [s.name for s in config.data.sources] == ["data", "other"]
    foreign = text_source(
        tmp_path, tiny_text, "foreign", lambda m: m["extra"].update(tokenizer_sha256="0" * 64)
    )
    cases = [
        ([(tiny_text, -1), (other, 1)], "data.sources[0].weight=-1.0 must be a number >= 0"),
        ([(tiny_text, 0), (other, 0)], "data.sources: the weights sum to 0"),
        ([(tiny_text, 1), (tmp_path / "missing", 1)], "data.sources[1] (missing: "),
        ([(tiny_text, 1), (foreign, 1)], "data.sources[1] (foreign: "),
        ([(tiny_text, 1), (tiny_text, 1)], "data.sources[1].name='data' repeats an earlier source's"),
        (
            [(tiny_text, 1), (other, 1, "ftp://host/{name}")],
            "data.sources[1].shard_url='ftp://host/{name}': unknown scheme 'ftp'",
        ),
    ]
    for sources, message in cases:
        with pytest.raises(ConfigError) as error:
            sources_config(tmp_path, *sources)
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    with pytest.raises(ConfigError, match="no manifest.json there"):
        sources_config(tmp_path, (tiny_text, 1), (tmp_path / "missing", 1))
    with pytest.raises(ConfigError, match="its tokenizer differs from data.sources\\[0\\]'s"):
        sources_config(tmp_path, (tiny_text, 1), (foreign, 1))


def test_a_curriculum_switches_or_anneals_and_resumes_across_its_boundary(three):
    """Stage 0 (steps 0-9): a only; stage 1 (10-19): b only; stage 2 (20-): linear from b-only to c-only
    over steps 20-39. A state saved before the first boundary resumes into it exactly, with a worker."""
    from hrm_mega.data.mixture import Stage, weights_at

    stages = [Stage(10, (1.0, 0.0, 0.0)), Stage(20, (0.0, 1.0, 0.0)), Stage(40, (0.0, 0.0, 1.0), linear=True)]
    assert weights_at(stages, 9).tolist() == [1, 0, 0] and weights_at(stages, 10).tolist() == [0, 1, 0]
    assert weights_at(stages, 30).tolist() == pytest.approx([0, 0.5, 0.5])
    assert weights_at(stages, 99).tolist() == [0, 0, 1]  # past the last stage: its weights

    def run(stream, steps):
        return global_rows([stream], steps)

    def make(workers=0):
        m = mixture(three, batch=16, workers=workers)
        m.stages = stages
        return m

    whole = run(make(), 40)
    assert {s for step in whole[:10] for s, _ in step} == {0} and {
        s for step in whole[10:20] for s, _ in step
    } == {1}
    annealed = [source for step in whole[20:40] for source, _ in step]
    assert abs(annealed.count(2) / len(annealed) - 0.5) < 0.05  # the mean of a linear ramp
    early = sum(s == 2 for step in whole[20:25] for s, _ in step)
    late = sum(s == 2 for step in whole[35:40] for s, _ in step)
    assert early < late
    before = make()
    run(before, 8)
    state = json.loads(json.dumps(before.state_dict()))
    after = make(workers=1)
    after.load_state_dict(state)
    assert run(after, 6) == whole[8:14]  # steps 8-13, across the switch at 10
    before.close()
    after.close()


def test_curriculum_config_errors_are_one_line(tmp_path, tiny_text):
    other = text_source(tmp_path, tiny_text, "other")
    base = f"data.sources=[{{path: '{tiny_text}'}}, {{path: '{other}'}}]"
    cases = [
        ("data.curriculum=[{until_step: 10, weights: {data: 1}}, {until_step: 5, weights: {other: 1}}]",
         "data.curriculum[1].until_step=5 must be above the previous stage's 10"),
        ("data.curriculum=[{until_step: 10, weights: {web: 1}}]", "data.curriculum[0].weights names 'web', not a source"),
        ("data.curriculum=[{until_step: 10, weights: {data: 0}}]", "data.curriculum[0].weights must be numbers >= 0"),
        ("data.curriculum=[{until_step: 10, weights: {data: 1}, anneal: linear}]",
         "data.curriculum[0].anneal=linear needs a stage before it"),
        ("data.curriculum=[{until_tokens: 100, weights: {data: 1}}, {until_step: 50, weights: {other: 1}}]",
         "data.curriculum[1]: until_step and until_tokens mix"),
        ("data.curriculum=[{until_tokens: 100, weights: {data: 1}}, {until_tokens: 100, weights: {other: 1}}]",
         "data.curriculum[1].until_tokens=100 must be above the previous stage's 100"),
    ]  # fmt: skip
    for curriculum, message in cases:
        with pytest.raises(ConfigError) as error:
            load_config(recipe("lm/hrmgemma_tiny.yaml"), [base, curriculum])
        assert message in str(error.value) and "\n" not in str(error.value), str(error.value)
    with pytest.raises(ConfigError, match="data.curriculum needs data.sources"):
        load_config(recipe("lm/hrmgemma_tiny.yaml"), ["data.curriculum=[{until_step: 10, weights: {a: 1}}]"])
    config = load_config(
        recipe("lm/hrmgemma_tiny.yaml"),
        [
            base,
            "data.curriculum=[{until_step: 4, weights: {data: 1}}, {weights: {other: 1}, anneal: linear}]",
        ],
    )
    assert [s.until_step for s in config.data.curriculum] == [4, 0]


def test_with_stop_at_end_the_mixture_says_when_a_source_ran_out(three):
    """data.source_end=stop: `ran_out` turns True once a source has handed out its whole split; with the
    default (repeat) it never does."""
    stopping, repeating = mixture(three, batch=8), mixture(three, batch=8)
    stopping.stop_at_end = True
    steps = 0
    while not stopping.ran_out:
        stopping.take(range(8))
        repeating.take(range(8))
        steps += 1
        assert steps < 1000
    # a (69 samples, 4.8 a step) runs out first, after 15 steps; b (40 at 2.4) and c (24 at 0.8) later
    progress = stopping.progress
    assert progress["a/epoch"] >= 1.0 > max(progress["b/epoch"], progress["c/epoch"]) and steps == 15
    assert not repeating.ran_out
    stopping.close()
    repeating.close()


def test_an_in_order_source_is_read_in_written_order_every_epoch(three):
    """in_order (data.sources[i].shuffle=false): the partitions walk their shards in index order with no
    shuffle buffer, so sample ids (written order) only grow within an epoch and every epoch repeats it;
    a state saved mid-epoch resumes in that order."""
    b = three["b"]  # 4 shards of 10 samples: ids 0-39
    stream = SampleStream(b, seed=3, global_batch=2, partitions=2, shuffle_buffer=6, in_order=True)
    ids = [stream.take(range(2))["sample_id"].tolist() for _ in range(40)]
    rows = list(zip(*ids))
    assert rows[0][:20] == tuple(range(0, 10)) + tuple(range(20, 30))  # partition 0: shards 0 and 2
    assert rows[1][:20] == tuple(range(10, 20)) + tuple(range(30, 40))
    assert rows[0][20:] == rows[0][:20] and rows[1][20:] == rows[1][:20]
    shuffled = SampleStream(b, seed=3, global_batch=2, partitions=2, shuffle_buffer=6)
    assert [shuffled.take(range(2))["sample_id"].tolist() for _ in range(20)] != ids[:20]
    first = SampleStream(b, seed=3, global_batch=2, partitions=2, in_order=True)
    for _ in range(13):
        first.take(range(2))
    resumed = SampleStream(b, seed=3, global_batch=2, partitions=2, in_order=True)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [resumed.take(range(2))["sample_id"].tolist() for _ in range(7)] == ids[13:20]
    with pytest.raises(ValueError, match="shuffle_buffer|in_order"):
        resumed.load_state_dict(SampleStream(b, seed=3, global_batch=2, partitions=2).state_dict())
