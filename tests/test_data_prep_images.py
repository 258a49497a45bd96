"""Image-text data: `prep grid-images` and `prep images` (hrm_mega/prep/images.py), the shards' layout and
determinism, the decoded rows (labels, answer spans, pixels against the preprocessing of the source
files), pan-and-scan views, folders and re-encoded formats, bad inputs as one line, damaged images in
shards skipped and counted (or failing with shard and key), and mixtures whose batches hold rows with
0..k images."""

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IMAGE_PIECES
from PIL import Image

from hrm_mega.data import SampleStream, iterate_split
from hrm_mega.data.collate import select_rows
from hrm_mega.data.decode import CorruptDataWarning
from hrm_mega.data.images import ImageProcessing, preprocess, resized_views
from hrm_mega.data.mixture import MixtureStream, Source
from hrm_mega.data.shards import DataFormatError, read_manifest, split_shards
from hrm_mega.prep.cli import main as prep_main

ROOT = Path(__file__).resolve().parents[1]


def prep(*args: str) -> None:
    assert prep_main([*args]) == 0


def prep_error(capsys, *args: str) -> str:
    assert prep_main([*args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def members(data: Path, split: str) -> dict[str, dict[str, bytes]]:
    """key -> {member name without the key: bytes} over a split's shards."""
    out: dict[str, dict[str, bytes]] = {}
    for path in split_shards(data, split):
        with tarfile.open(path) as tar:
            for m in tar.getmembers():
                key, _, name = m.name.partition(".")
                out.setdefault(key, {})[name] = tar.extractfile(m).read()
    return out


def build(data: Path, src: Path, *extra: str, workers: int = 1) -> None:
    prep("images", "--input", str(src / "train.jsonl"), "--test-input", str(src / "test.jsonl"),
         "--tokenizer", str(src.parent / "text/tokenizer.model"), "--seq-len", "32", "--image-size", "16",
         "--mm-tokens-per-image", "4", "--out", str(data), "--workers", str(workers),
         "--samples-per-shard", "8", "--quiet", *extra)  # fmt: skip


def test_shards_are_byte_identical_for_any_workers_and_rows_decode_as_documented(tiny_image_text, tmp_path):
    src = tiny_image_text / "grids"
    build(tmp_path / "w2", src, workers=2)
    a, b = read_manifest(tiny_image_text / "images"), read_manifest(tmp_path / "w2")
    assert a["splits"] == b["splits"]  # the same shards, checksums included
    assert a["task"] == "image_text" and a["extra"]["documents"] == {"train": 160, "test": 32}
    assert a["extra"]["views"] == a["extra"]["images"] == {"train": 160, "test": 32}
    assert a["splits"]["train"]["num_samples"] == 80  # 13 tokens a document: two per row of 32

    # A test row: [BOS, boi, 4 x image, eoi, "d d / d d", EOS] twice; labels off the image tokens; the
    # text and EOS are the answer; pixels are the source PNGs resized (uint8), in document order.
    batch = next(iter(iterate_split(tiny_image_text / "images", "test", batch_size=2)))
    ids, labels, answer = batch["input_ids"][0], batch["labels"][0], batch["answer"][0]
    doc = [2, 5, 320, 320, 320, 320, 6]
    assert ids[:7].tolist() == doc and ids[13:20].tolist() == doc and ids[26:].eq(0).all()
    assert (
        labels[:7].eq(-100).all()
        and labels[13:20].eq(-100).all()
        and labels[7:13].tolist() == ids[7:13].tolist()
    )
    assert answer.tolist() == [0] * 7 + [1] * 6 + [0] * 7 + [1] * 6 + [0] * 6
    assert batch["num_images"].tolist() == [2, 2] and batch["pixels"].dtype == torch.uint8
    records = [json.loads(line) for line in (src / "test.jsonl").read_text().splitlines()]
    processing = ImageProcessing(size=16)
    for k in range(4):  # the test split keeps input order
        expected = resized_views(Image.open(src / records[k]["image"]), processing)
        assert torch.equal(batch["pixels"][k : k + 1], torch.from_numpy(expected))
    # select_rows keeps pixels in step with their rows
    second = select_rows(batch, [1])
    assert torch.equal(second["pixels"], batch["pixels"][2:4]) and second["num_images"].tolist() == [2]


def test_pan_and_scan_folders_and_other_formats(tmp_path, tiny_image_text):
    """A folder of images with .txt files; a wide BMP becomes a PNG member and, with pan-and-scan, four
    views (the image and three crops) whose runs the tokens hold."""
    folder = tmp_path / "pictures"
    folder.mkdir()
    rng = np.random.default_rng(0)
    wide = Image.fromarray(rng.integers(0, 256, (16, 48, 3), dtype=np.uint8))
    wide.save(folder / "a_wide.bmp")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(folder / "b_square.png")
    (folder / "a_wide.txt").write_text("12/34\n")
    (folder / "b_square.txt").write_text("56/78\n")
    out = tmp_path / "data"
    prep("images", "--input", str(folder), "--test-input", str(folder), "--tokenizer",
         str(tiny_image_text / "text/tokenizer.model"), "--seq-len", "40", "--image-size", "16",
         "--mm-tokens-per-image", "4", "--pan-and-scan", "--min-crop-size", "8", "--out", str(out),
         "--workers", "1", "--quiet")  # fmt: skip
    manifest = read_manifest(out)
    assert manifest["extra"]["views"]["test"] == 4 + 1 and manifest["extra"]["image"]["pan_and_scan"]
    row = members(out, "test")["000000000"]
    assert sorted(row) == ["answer.npy", "docs.npy", "img0.png", "tokens.npy"]  # the square one: next row
    batch = next(iter(iterate_split(out, "test", batch_size=2)))
    assert batch["num_images"].tolist() == [4, 1]
    processing = ImageProcessing(size=16, pan_and_scan=True, min_crop_size=8)
    assert torch.equal(batch["pixels"][:4], torch.from_numpy(resized_views(wide, processing)))
    assert int((batch["input_ids"][0] == 320).sum()) == 4 * 4

    # export-hf gives a model trained on these rows an image processor that preprocesses as they were
    from conftest import TINY_VISION
    from transformers import AutoImageProcessor

    from hrm_mega.config import load_config
    from hrm_mega.convert.hf_export import save_image_processor
    from hrm_mega.entry.export_hf import image_processor_for

    config = load_config(
        None, ["model.family=hrm_gemma", "model.vocab_size=320", *TINY_VISION, f"data.path={out}"]
    )
    assert image_processor_for(str(tmp_path / "ckpt"), config) == processing
    save_image_processor(config.model.vision, tmp_path, processing)
    exported = AutoImageProcessor.from_pretrained(tmp_path, local_files_only=True)
    pixels = exported(images=[wide], do_pan_and_scan=True, return_tensors="np")["pixel_values"]
    assert np.abs(pixels - preprocess(wide, processing)[0]).max() <= 1e-6 and len(pixels) == 4


def test_bad_inputs_are_one_line_errors_and_bad_images_can_be_skipped(
    tmp_path, tiny_text, tiny_image_text, capsys
):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (16, 16), "white").save(src / "ok.png")
    (src / "cut.png").write_bytes((src / "ok.png").read_bytes()[:40])
    lines = [{"image": "ok.png", "text": "11/22"}, {"image": "cut.png", "text": "33/44"}]
    (src / "pairs.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    tok = str(tiny_image_text / "text/tokenizer.model")
    base = ["images", "--input", str(src / "pairs.jsonl"), "--test-input", str(src / "pairs.jsonl"),
            "--seq-len", "32", "--image-size", "16", "--mm-tokens-per-image", "4", "--workers", "1", "--quiet"]  # fmt: skip

    line = prep_error(capsys, *base, "--tokenizer", tok, "--out", str(tmp_path / "a"))
    assert f"{src / 'pairs.jsonl'}:2: image {src / 'cut.png'}: cannot read the image" in line
    prep(*base, "--tokenizer", tok, "--out", str(tmp_path / "a"), "--on-bad-image", "skip")
    extra = read_manifest(tmp_path / "a")["extra"]
    assert extra["skipped_records"] == {"train": 1, "test": 1} and extra["documents"] == {
        "train": 1,
        "test": 1,
    }

    text_only = tiny_text / "tokenizer.model"  # trained without the image pieces
    line = prep_error(capsys, *base, "--tokenizer", str(text_only), "--out", str(tmp_path / "b"))
    assert "has no piece <start_of_image>; train it with --atomic-symbols" in line
    line = prep_error(
        capsys, *base[:5], "--seq-len", "6", *base[7:], "--tokenizer", tok, "--out", str(tmp_path / "c")
    )
    assert "--seq-len 6: an image takes 8 tokens" in line
    (src / "bad.jsonl").write_text(json.dumps({"image": "ok.png", "caption": "x"}) + "\n")
    line = prep_error(capsys, *base[:2], str(src / "bad.jsonl"), *base[3:], "--tokenizer", tok,
                      "--out", str(tmp_path / "d"))  # fmt: skip
    assert line.endswith(f"--input {src / 'bad.jsonl'}:1: no string field 'text' (--text-field)")
    (src / "sneaky.jsonl").write_text(json.dumps({"image": "ok.png", "text": f"a{IMAGE_PIECES[0]}"}) + "\n")
    line = prep_error(capsys, *base[:2], str(src / "sneaky.jsonl"), *base[3:], "--tokenizer", tok,
                      "--out", str(tmp_path / "e"))  # fmt: skip
    assert "its text holds an image token" in line
    assert not (tmp_path / "e").exists()


def damage(data: Path, split: str, key: str) -> Path:
    """Rewrites the split's shard holding `key` with that sample's first image cut short."""
    for path in split_shards(data, split):
        with tarfile.open(path) as tar:
            entries = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        if not any(m.name.startswith(key) for m, _ in entries):
            continue
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for m, payload in entries:
                if m.name == f"{key}.img0.png":
                    payload = payload[:50]
                    m.size = len(payload)
                tar.addfile(m, io.BytesIO(payload))
        return path
    raise AssertionError(key)


def test_a_damaged_image_in_a_shard_is_skipped_and_counted_or_fails_with_shard_and_key(
    tmp_path, tiny_image_text
):
    import shutil

    data = shutil.copytree(tiny_image_text / "images", tmp_path / "images")
    shard = damage(data, "test", "000000003")
    with pytest.warns(
        CorruptDataWarning, match=rf"{shard.name}: key 000000003: img0.png: cannot read the image"
    ):
        batches = list(iterate_split(data, "test", batch_size=16))
    assert sum(int(b["valid"].sum()) for b in batches) == 15
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptDataWarning)
        with SampleStream(data, "test", seed=0, global_batch=16, partitions=2, loop=False) as stream:
            stream.take(range(16))
            assert stream.progress["skipped_samples"] == 1 and stream.progress["samples"] == 15
    with pytest.raises(
        DataFormatError, match=rf"^\S*{shard.name}: key 000000003: img0.png: cannot read the image"
    ):
        list(iterate_split(data, "test", batch_size=16, corrupt_policy="fail"))


def test_a_mixture_of_text_and_image_text_rows(tiny_image_text):
    """Rows from the text source hold no images; pixels follow the rows that have them, in row order."""
    streams = [
        Source(name, 0.5, SampleStream(tiny_image_text / name, "train", seed=i, global_batch=8, partitions=2))
        for i, name in enumerate(("text", "images"))
    ]
    mixture = MixtureStream(streams, seed=0, global_batch=8, dp_rank=0, dp_size=1)
    for _ in range(3):
        batch = mixture.take(range(8))
        counts = batch["num_images"]
        assert set(batch["source"].tolist()) == {0, 1}
        assert counts[batch["source"] == 0].eq(0).all() and counts[batch["source"] == 1].eq(2).all()
        assert batch["pixels"].shape == (int(counts.sum()), 3, 16, 16)
        placeholders = (batch["input_ids"] == 320).sum(dim=1)
        assert placeholders.tolist() == (counts * 4).tolist()


def test_config_checks_hold_image_data_against_model_vision(tiny_image_text):
    from conftest import TINY_VISION

    from hrm_mega.config import ConfigError, load_config
    from hrm_mega.config.checks import check_run

    tiny = ["model.vocab_size=320", "model.max_position=64", "train.global_batch=4", "data.partitions=2"]
    recipe = ROOT / "configs/lm/hrmgemma_tiny.yaml"
    images = f"data.path={tiny_image_text / 'images'}"
    check_run(load_config(recipe, [*tiny, *TINY_VISION, images]), "train")
    with pytest.raises(ConfigError, match="holds image-text data, but the model has no image encoder"):
        check_run(load_config(recipe, [*tiny, images]), "train")
    with pytest.raises(ConfigError, match=r"model.vision.image_size=32 but \S+ was built with image_size=16"):
        check_run(load_config(recipe, [*tiny, *TINY_VISION, "model.vision.image_size=32", images]), "train")
    mixture = (
        f"data.sources=[{{path: '{tiny_image_text / 'text'}'}}, {{path: '{tiny_image_text / 'images'}'}}]"
    )
    check_run(load_config(recipe, [*tiny, *TINY_VISION, mixture]), "train")
    with pytest.raises(
        ConfigError, match=r"data.sources\[1\] \(images: .*\) holds image-text data, but the model"
    ):
        check_run(load_config(recipe, [*tiny, mixture]), "train")
