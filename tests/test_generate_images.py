"""Generation with images (inference/generate.py, `hrm-mega generate --image`): KV-cached decoding with
images in the prompts equals the uncached reference token for token (per-token halting, raised cycles,
left padding, rows with different numbers of images), and the command places images at the prompts'
<start_of_image> markers or before every prompt, with one-line errors for what it cannot use."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_VISION
from test_vision import BOI, EOI, IMAGE, multimodal_model, pixels

from hrm_mega.inference.generate import generate, left_pad

ROOT = Path(__file__).resolve().parents[1]
RUN = [BOI, IMAGE, IMAGE, IMAGE, IMAGE, EOI]


@pytest.mark.parametrize("sampling", [{"greedy": True}, {"temperature": 0.9, "top_p": 0.9, "seed": 3}])
def test_cached_generation_with_images_equals_uncached(sampling) -> None:
    model = multimodal_model(seed=4, h_cycles=2)
    prompts = [[2, *RUN, 7, *RUN, 9], [2, 11, *RUN, 12, 13, 14, 15, 16, 17, 18]]  # 2 images, then 1
    ids, mask = left_pad(prompts)
    images = pixels(3, seed=5)
    options = dict(attention_mask=mask, max_new_tokens=8, max_cycles=torch.tensor([3, 2]), halt_threshold=0.6,
                   eos_id=None, pixel_values=images, **sampling)  # fmt: skip
    encoded = []
    hook = model.vision.tower.register_forward_hook(lambda *_: encoded.append(1))
    cached = generate(model, ids, **options)
    hook.remove()
    assert len(encoded) == 1  # the prefill encodes the images once: neither cycles nor decoding re-read them
    uncached = generate(model, ids, use_cache=False, **options)
    assert torch.equal(cached.tokens, uncached.tokens)
    assert torch.equal(cached.cycles, uncached.cycles)
    with torch.no_grad():  # the images are read: other images, other next-token logits
        a, b = (
            model.infer(ids, attention_mask=mask, pixel_values=pixels(3, seed=s))[0][:, -1] for s in (5, 6)
        )
    assert (a - b).abs().min() > 0


@pytest.fixture
def model_dir(tiny_image_text: Path, tmp_path: Path) -> Path:
    """A random tiny multimodal HRMGemma saved as a model directory with the image data's tokenizer."""
    from test_lm_training import TINY_LM

    from hrm_mega.checkpoint.model_dir import save_model_dir
    from hrm_mega.config import load_config
    from hrm_mega.models import build_model

    sets = [*TINY_LM, *TINY_VISION, f"data.path={tiny_image_text / 'images'}"]
    config = load_config(ROOT / "configs/lm/hrmgemma_tiny.yaml", sets)
    model = build_model(config.model).init_weights(0)
    tokenizer = tiny_image_text / "images/tokenizer.model"
    return save_model_dir(model.state_dict(), config, tmp_path / "model", {"tokenizer.model": tokenizer})


def generate_cli(capsys, *args: str) -> tuple[int, list[str], str]:
    from hrm_mega.entry.generate import main

    code = main([*args])
    out = capsys.readouterr()
    return code, out.out.splitlines(), out.err


def test_generate_command_with_images(model_dir: Path, tiny_image_text: Path, tmp_path: Path, capsys) -> None:
    import sentencepiece as spm

    from hrm_mega.checkpoint.consolidate import load_model
    from hrm_mega.entry.generate import image_prompts

    records = [json.loads(x) for x in (tiny_image_text / "grids/test.jsonl").read_text().splitlines()]
    first, second = (str(tiny_image_text / "grids" / r["image"]) for r in records[:2])
    common = [str(model_dir), "--max-new-tokens", "6", "--max-cycles", "3", "--halt-threshold", "0.7"]
    code, lines, err = generate_cli(capsys, *common, "--image", first, "--image", second,
                                    "--prompt", "a<start_of_image>b", "--prompt", "<start_of_image>")  # fmt: skip
    assert code == 0, err
    stats = json.loads(lines[-1])
    assert stats["prompts"] == 2 and stats["tokens"] > 0

    # what it printed is the uncached reference's greedy continuation of the same ids
    model, config = load_model(str(model_dir))
    tokenizer = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    prompts, images = image_prompts(["a<start_of_image>b", "<start_of_image>"], [first, second], tokenizer,
                                    config, [tokenizer.bos_id()])  # fmt: skip
    assert prompts[0][:3] == [tokenizer.bos_id(), *tokenizer.encode("a"), 5] and prompts[1][1:3] == [5, 320]
    ids, mask = left_pad(prompts)
    reference = generate(model.eval(), ids, attention_mask=mask, max_new_tokens=6, max_cycles=3, halt_threshold=0.7,
                         greedy=True, eos_id=tokenizer.eos_id(), pixel_values=images, use_cache=False,
                         vocab_limit=tokenizer.get_piece_size())  # fmt: skip
    for row, line in enumerate(lines[:2]):
        new = reference.tokens[row, : reference.lengths[row]].tolist()
        shown = [t for t in prompts[row] if t != 320]  # the placeholders print as nothing
        assert line == tokenizer.decode(shown + new)

    # without markers every prompt starts with every image; two prompts, one image: one run each
    code, lines, err = generate_cli(capsys, *common, "--image", first, "--prompt", "x", "--prompt", "y")
    assert code == 0, err
    assert json.loads(lines[-1])["prompts"] == 2

    bad = tmp_path / "bad.png"
    bad.write_bytes(Path(first).read_bytes()[:30])
    for args, message in [
        (["--image", str(bad), "--prompt", "x"], f"--image {bad}: cannot read the image"),
        (["--image", first, "--prompt", "<start_of_image><start_of_image>"], "hold 2 <start_of_image> markers but 1"),
        (["--prompt", "<start_of_image>"], "holds <start_of_image> but no --image is given"),
    ]:  # fmt: skip
        code, _, err = generate_cli(capsys, *common, *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def huge_png_header(path: Path, side: int = 20_000) -> Path:
    """A PNG that declares side x side pixels (and holds none): Pillow's decompression-bomb limit refuses
    it when it opens, before decoding anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    return path


def test_images_the_processor_cannot_take_are_one_line_errors(model_dir, tmp_path, capsys) -> None:
    huge = huge_png_header(tmp_path / "huge.png")
    missing = tmp_path / "missing.png"
    for image, message in [
        (
            huge,
            f"--image {huge}: cannot read the image (DecompressionBombError: Image size (400000000 pixels)",
        ),
        (missing, f"--image {missing}: no such file"),
    ]:
        code, _, err = generate_cli(capsys, str(model_dir), "--image", str(image), "--prompt", "x")
        assert code == 2 and err.startswith(f"hrm-mega generate: error: {message}"), err
        assert len(err.strip().splitlines()) == 1
