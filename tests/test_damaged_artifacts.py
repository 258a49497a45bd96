"""Every artifact hrm-mega writes, truncated or with one bit flipped, is reported in one line naming the
file by the code that reads it: model directories, consolidated .safetensors files, Hugging Face
exports (read back by import-hf), dataset shards and manifests. Training checkpoints, and resuming past
a damaged one, are checked in test_puzzle_runs.py (they need a run)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from conftest import write_tiny_sudoku

from hrm_mega.checkpoint.consolidate import load_model, save_consolidated
from hrm_mega.checkpoint.model_dir import CheckpointError, save_model_dir
from hrm_mega.config import Config, LMModelConfig, PuzzleModelConfig
from hrm_mega.data import DataFormatError, iterate_split
from hrm_mega.models import build_model


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def flip_a_bit(path: Path, at: float = 0.7) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x04
    path.write_bytes(bytes(data))


DAMAGES = {"truncated": truncate, "bit-flipped": flip_a_bit}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """One of each: a model directory (with a tokenizer file), a consolidated file, a dataset."""
    root = tmp_path_factory.mktemp("written")
    model_config = PuzzleModelConfig(vocab_size=11, seq_len=16, hidden_size=32, num_heads=2, h_layers=1,
                                     l_layers=1, puzzle_emb_ndim=32, halt_max_steps=2)  # fmt: skip
    model = build_model(model_config).init_weights(0)
    config = Config(model=model_config)
    (root / "tokenizer.model").write_bytes(bytes(range(256)) * 8)
    save_model_dir(
        model.state_dict(), config, root / "model_dir", files={"tokenizer.model": root / "tokenizer.model"}
    )
    save_consolidated(model.state_dict(), config, root / "model.safetensors")
    write_tiny_sudoku(root / "data")
    return {
        "model_dir": root / "model_dir",
        "consolidated": root / "model.safetensors",
        "data": root / "data",
    }


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", ["model.safetensors", "config.yaml", "tokenizer.model", "checksums.json"])
def test_a_damaged_model_directory_is_one_line_naming_the_file(written, tmp_path, name, damage):
    copy = shutil.copytree(written["model_dir"], tmp_path / "m")
    DAMAGES[damage](copy / name)
    with pytest.raises(CheckpointError) as error:
        load_model(copy)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{copy} is damaged: ")
    assert name in message
    load_model(written["model_dir"])  # the original is intact


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_consolidated_file_is_one_line_naming_it(written, tmp_path, damage):
    copy = tmp_path / "model.safetensors"
    shutil.copyfile(written["consolidated"], copy)
    DAMAGES[damage](copy)
    with pytest.raises(CheckpointError) as error:
        load_model(copy)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(copy))
    expected = (
        "not a readable .safetensors file" if damage == "truncated" else "is damaged: its tensors' sha256"
    )
    assert expected in message


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_shard_or_manifest_is_one_line_naming_it(written, tmp_path, damage):
    for name in ("test/shard-000000.tar", "manifest.json"):
        copy = shutil.copytree(written["data"], tmp_path / f"{damage}-{name.replace('/', '-')}")
        DAMAGES[damage](copy / name)
        with pytest.raises((DataFormatError, ValueError)) as error:
            for _ in iterate_split(copy, "test", batch_size=4, corrupt_policy="fail"):
                pass
        message = str(error.value)
        assert "\n" not in message and str(copy / name) in message, message
    batches = list(iterate_split(written["data"], "test", batch_size=4, corrupt_policy="fail"))
    assert sum(int(b["valid"].sum()) for b in batches) == 24


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_hugging_face_export_is_one_line_when_imported(tmp_path, damage):
    """export-hf writes checksums.json; import-hf checks it (a third-party directory without one is
    only caught when truncated, by the safetensors reader)."""
    from hrm_mega.convert.hf_export import export_hf
    from hrm_mega.convert.hf_import import import_hf

    lm = LMModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       num_kv_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                       local_per_global=1, max_position=64)  # fmt: skip
    model = build_model(lm).init_weights(0)
    export = export_hf(model, Config(model=lm), tmp_path / "export").out
    import_hf(export, tmp_path / "intact")  # the undamaged export imports
    for name in ("model.safetensors", "config.json"):
        copy = shutil.copytree(export, tmp_path / f"copy-{name}")
        DAMAGES[damage](copy / name)
        with pytest.raises((CheckpointError, ValueError)) as error:
            import_hf(copy, tmp_path / f"out-{name}")
        message = str(error.value)
        assert "\n" not in message and re.search(re.escape(str(copy)) + r".*" + re.escape(name), message), (
            message
        )
    # a third-party directory (no checksums.json): its truncated weights are still one line naming the file
    third_party = shutil.copytree(export, tmp_path / "third-party")
    (third_party / "checksums.json").unlink()
    truncate(third_party / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=rf"^{re.escape(str(third_party / 'model.safetensors'))}: not a readable"
    ):
        import_hf(third_party, tmp_path / "out-third-party")


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_dataset_tokenizer_is_one_line_naming_it(tiny_text, tmp_path, damage):
    """`prep text` records the tokenizer's sha256 in the manifest; what reads the dataset's tokenizer (a
    training run copying it into checkpoints, LM RL, generate and export without a copy of their own)
    checks it."""
    from hrm_mega.data.shards import dataset_tokenizer

    assert dataset_tokenizer(tiny_text) == tiny_text / "tokenizer.model"
    copy = shutil.copytree(tiny_text, tmp_path / "text")
    DAMAGES[damage](copy / "tokenizer.model")
    with pytest.raises(DataFormatError) as error:
        dataset_tokenizer(copy)
    assert str(error.value) == (
        f"{copy / 'tokenizer.model'} is damaged: its sha256 differs from the one manifest.json recorded"
    )
