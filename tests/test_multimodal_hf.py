"""Multimodal Gemma 3 through the files, with transformers as the client: import-hf keeps the vision tower
and projector of a Gemma3ForConditionalGeneration, export-hf writes one back (or remote code when the
cycles are open), and the logits on prompts with one and two images equal transformers'. Tiny, random,
fp32; nothing is downloaded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import sentencepiece as spm
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoProcessor,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    SiglipVisionConfig,
)

from hrm_mega.checkpoint.consolidate import load_model
from hrm_mega.checkpoint.model_dir import save_model_dir
from hrm_mega.config import Config, LMModelConfig
from hrm_mega.config.model import VisionConfig
from hrm_mega.convert.hf_gemma import hf_config_from
from hrm_mega.data.images import ImageProcessing, preprocess
from hrm_mega.entry import export_hf, import_hf
from hrm_mega.models.lm import HRMGemma

TOL = 1e-4
IMAGE, BOI, EOI = 127, 125, 126


def text_config(**overrides) -> LMModelConfig:
    """Two groups of 2 local + 1 global layer, then a tail of 1; a window of 3 (shorter than an image)."""
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=7, num_heads=2, num_kv_heads=1,
        head_dim=32, query_pre_attn_scalar=24, sliding_window=3, local_per_global=2, rope_scaling=2.0,
        max_position=64,
    )  # fmt: skip
    return LMModelConfig(**{**fields, **overrides})


def vision_config(**overrides) -> VisionConfig:
    fields = dict(
        image_size=28, patch_size=7, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
        mm_tokens_per_image=4, image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI,
    )  # fmt: skip
    return VisionConfig(**{**fields, **overrides})


def random_hf_gemma3(
    seed: int, text: LMModelConfig | None = None, **tokens: int
) -> Gemma3ForConditionalGeneration:
    """A random multimodal Gemma 3, with SigLIP's pooling head (which Gemma 3 never runs); tokens: other
    image_token_id, boi_token_id, eoi_token_id."""
    v = vision_config(**tokens)
    vision = SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size, vision_use_head=True,
    )  # fmt: skip
    config = Gemma3Config(
        text_config=hf_config_from(text or text_config()).to_dict(), vision_config=vision.to_dict(),
        mm_tokens_per_image=4, image_token_index=v.image_token_id, boi_token_index=v.boi_token_id,
        eoi_token_index=v.eoi_token_id,
    )  # fmt: skip
    model = Gemma3ForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return model


def prompts(seed: int) -> dict[str, torch.Tensor]:
    """Two rows, left-padded to 20: one image in the first row, two in the second; 3 images in all."""
    generator = torch.Generator().manual_seed(seed)
    image = [BOI, *[IMAGE] * 4, EOI]
    rows = [[5, *image, 6, 7, 8, 9, 10], [11, *image, 12, 13, *image, 14]]
    ids = torch.zeros(2, 20, dtype=torch.long)
    mask = torch.zeros(2, 20, dtype=torch.long)
    for i, r in enumerate(rows):
        text = torch.randint(3, 120, (len(r),), generator=generator)
        ids[i, 20 - len(r) :] = torch.where(torch.tensor(r) < 20, text, torch.tensor(r))
        mask[i, 20 - len(r) :] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp_min(0),
        "pixel_values": torch.randn(3, 3, 28, 28, generator=generator),
    }


def hf_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """transformers' logits on the batch, with token_type_ids as Gemma 3's processor makes them."""
    with torch.no_grad():
        return model(**batch, token_type_ids=(batch["input_ids"] == IMAGE).long()).logits


def our_logits(model: HRMGemma, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(
            batch["input_ids"], pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        )[0]  # fmt: skip


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float((a - b)[mask.bool()].abs().max())


def run_ok(main, argv: list, capsys) -> str:
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_import_hf_keeps_the_vision_tower_and_gives_transformers_logits(tmp_path: Path, capsys) -> None:
    hf = random_hf_gemma3(seed=0)
    hf.save_pretrained(tmp_path / "hf")
    run_ok(import_hf.main, [tmp_path / "hf", tmp_path / "ours", "--set", "model.h_cycles=2"], capsys)
    model, loaded = load_model(tmp_path / "ours")
    assert loaded.model.vision == vision_config(trainable=False)
    assert loaded.model.h_cycles == 2  # zero gates: still exactly the Gemma 3
    batch = prompts(seed=1)
    expected = hf_logits(hf, batch)
    assert expected.abs().max() > 1.0
    assert max_diff(our_logits(model, batch), expected, batch["attention_mask"]) < TOL  # 1 and 2 images
    one = {k: v[:1] for k, v in batch.items() if k != "pixel_values"} | {
        "pixel_values": batch["pixel_values"][:1]
    }
    assert max_diff(our_logits(model, one), hf_logits(hf, one), one["attention_mask"]) < TOL  # one row alone

    run_ok(import_hf.main, [tmp_path / "hf", tmp_path / "text", "--set", "model.vision=null"], capsys)
    text, _ = load_model(tmp_path / "text")
    assert text.vision is None  # the text decoder alone, as before model.vision existed
    ids = batch["input_ids"][:, -5:]
    with torch.no_grad():
        assert (text.eval()(ids)[0] - hf(input_ids=ids).logits).abs().max() < TOL


def random_hrm_gemma(tmp_path: Path, seed: int, *, open_gates: bool, **overrides) -> tuple[HRMGemma, Path]:
    config = text_config(vision=vision_config(), **overrides)
    model = HRMGemma(config).init_weights(seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
            if not open_gates and name.rsplit(".", 1)[-1].startswith("gate_"):
                p.zero_()
    return model.eval(), save_model_dir(model.state_dict(), Config(model=config), tmp_path / f"ckpt-{seed}")


def test_export_hf_writes_a_gemma3_for_conditional_generation(tmp_path: Path, capsys) -> None:
    model, ckpt = random_hrm_gemma(tmp_path, seed=2, open_gates=False, h_cycles=2, tie_embeddings=False)
    out = tmp_path / "export"
    assert "Gemma3ForConditionalGeneration" in run_ok(export_hf.main, [ckpt, out], capsys)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gemma3" and config["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert not config["vision_config"]["vision_use_head"] and config["mm_tokens_per_image"] == 4
    hf = Gemma3ForConditionalGeneration.from_pretrained(out).eval()
    batch = prompts(seed=3)
    expected = our_logits(model, batch)
    assert expected.abs().max() > 1.0
    assert max_diff(hf_logits(hf, batch), expected, batch["attention_mask"]) < TOL
    processor = AutoImageProcessor.from_pretrained(out, local_files_only=True)  # preprocesses as we do
    image = Image.fromarray(np.random.default_rng(6).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    ours, _ = preprocess(image, ImageProcessing.for_model(vision_config()))
    assert np.abs(processor(images=[image], return_tensors="np")["pixel_values"] - ours).max() <= 1e-6

    back = tmp_path / "back"  # and import-hf reads the export: the same model again
    run_ok(import_hf.main, [out, back], capsys)
    assert (back / "preprocessor_config.json").read_text() == (out / "preprocessor_config.json").read_text()
    again, _ = load_model(back)
    assert max_diff(our_logits(again, batch), expected, batch["attention_mask"]) < TOL


def test_open_cycles_export_remote_code_that_takes_images(tmp_path: Path, capsys) -> None:
    model, ckpt = random_hrm_gemma(tmp_path, seed=4, open_gates=True, h_cycles=2)
    out = tmp_path / "export"
    assert "trust_remote_code=True" in run_ok(export_hf.main, [ckpt, out], capsys)
    assert "vision.py" in {p.name for p in out.iterdir()}
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    batch = prompts(seed=5)
    with torch.no_grad():
        got = hf(**batch).logits
    assert max_diff(got, our_logits(model, batch), batch["attention_mask"]) < TOL


def test_export_with_a_tokenizer_loads_as_a_gemma3_processor(tmp_path: Path, capsys) -> None:
    """A tokenizer holding <start_of_image>/<end_of_image> (the image placeholder is the id after its
    pieces, as in Gemma 3): AutoProcessor loads offline, expands an image in the text, and its batch
    gives transformers and HRMGemma the same logits."""
    lines = [f"{a} + {b} = {a + b}, a picture of {a} cats." for a in range(30) for b in range(0, 60, 7)]
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model_file, vocab_size=120, hard_vocab_limit=False,
        minloglevel=2, pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["<start_of_image>", "<end_of_image>"],
    )  # fmt: skip
    (tmp_path / "tokenizer.model").write_bytes(model_file.getvalue())
    pieces = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model")).vocab_size()
    vision = vision_config(boi_token_id=4, eoi_token_id=5, image_token_id=pieces)
    config = text_config(vocab_size=pieces + 8, vision=vision)
    model = HRMGemma(config).init_weights(6)
    ckpt = save_model_dir(model.state_dict(), Config(model=config), tmp_path / "ckpt")
    out = tmp_path / "export"
    run_ok(export_hf.main, [ckpt, out, "--tokenizer", tmp_path / "tokenizer.model"], capsys)

    processor = AutoProcessor.from_pretrained(out, local_files_only=True)
    assert type(processor).__name__ == "Gemma3Processor"
    image = Image.fromarray(np.random.default_rng(7).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    batch = processor(text=["a picture of <start_of_image> 3 cats"], images=[[image]], return_tensors="pt")
    ids = batch["input_ids"]
    assert int((ids == pieces).sum()) == 4 and int((ids == 4).sum()) == 1 and int((ids == 5).sum()) == 1
    assert torch.equal(batch["token_type_ids"], (ids == pieces).long())
    hf = Gemma3ForConditionalGeneration.from_pretrained(out).eval()
    with torch.no_grad():
        expected = model.eval()(
            ids, pixel_values=batch["pixel_values"], attention_mask=batch["attention_mask"]
        )[0]
        assert (hf(**batch).logits - expected).abs().max() < TOL


# --------------------------------------------------------------------------------------------------
# A Gemma 3 with its processor, as the Hub ships one: transformers' own processor is the reference
# --------------------------------------------------------------------------------------------------


def gemma_style_tokenizer(path: Path) -> int:
    """A SentencePiece BPE model made as Gemma's is (byte fallback, no dummy prefix, whitespace kept,
    digits split; <pad> <eos> <bos> <unk> <mask>, then <start_of_image> = 5 and <end_of_image> = 6);
    returns its piece count, which is the id of the image placeholder <image_soft_token>."""
    lines = [f"{a} + {b} = {a + b}, a picture of {a} cats.  Here is the original image and here are some "
             "crops to help you see better" for a in range(30) for b in range(0, 60, 7)]  # fmt: skip
    model_file = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model_file, vocab_size=330, model_type="bpe", byte_fallback=True,
        add_dummy_prefix=False, remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", hard_vocab_limit=False, minloglevel=2, pad_id=0, eos_id=1, bos_id=2,
        unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=["<mask>", "<start_of_image>", "<end_of_image>"],
    )  # fmt: skip
    path.write_bytes(model_file.getvalue())
    return spm.SentencePieceProcessor(model_file=str(path)).vocab_size()


@pytest.fixture(scope="module")
def gemma3_with_processor(tmp_path_factory) -> Path:
    """A random tiny Gemma3ForConditionalGeneration and its Gemma3Processor (GemmaTokenizer converted by
    transformers from the SentencePiece model; pan-and-scan on), both saved by transformers, with the
    tokenizer.model beside them as Gemma 3's Hub directories hold it."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, GemmaTokenizer

    root = tmp_path_factory.mktemp("gemma3_with_processor")
    image = gemma_style_tokenizer(root / "tokenizer.model")
    named = {
        "boi_token": "<start_of_image>",
        "eoi_token": "<end_of_image>",
        "image_token": "<image_soft_token>",
    }
    tokenizer = GemmaTokenizer.from_pretrained(root, add_bos_token=True, extra_special_tokens=named)
    assert (
        tokenizer.convert_tokens_to_ids("<image_soft_token>") == image
    )  # Gemma 3's: the id after the pieces
    images = Gemma3ImageProcessorPil(size={"height": 28, "width": 28}, do_pan_and_scan=True)
    Gemma3Processor(image_processor=images, tokenizer=tokenizer, image_seq_length=4).save_pretrained(root)
    text = text_config(vocab_size=image + 6, max_position=160)
    random_hf_gemma3(seed=8, text=text, image_token_id=image, boi_token_id=5, eoi_token_id=6).save_pretrained(
        root
    )
    return root


def processor_batch(processor) -> dict[str, torch.Tensor]:
    """One prompt with a small image, one with a wide image (pan-and-scanned: the image, then 3 crops, with
    Gemma 3's text around them) and a small one, left-padded by the processor, with position ids that
    count real tokens."""
    rng = np.random.default_rng(9)
    small, wide, other = (Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
                          for shape in ((50, 60, 3), (300, 900, 3), (40, 30, 3)))  # fmt: skip
    texts = [
        "a picture of <start_of_image> 3 cats",
        "two  pictures:\n<start_of_image> and <start_of_image> 12 + 7 = 19.",
    ]
    batch = processor(
        text=texts, images=[[small], [wide, other]], do_pan_and_scan=True, padding=True, return_tensors="pt"
    )  # Gemma3Processor pan-and-scans only when asked per call, whatever preprocessor_config.json says
    batch = dict(batch)
    batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    return batch


def test_a_gemma3_and_its_processor_round_trip_with_pan_and_scan(
    gemma3_with_processor: Path, tmp_path, capsys
):
    """transformers' processor makes the batch (one image in one row; in the other, a pan-and-scanned image
    and a small one); import-hf gives transformers' logits; export-hf gives a directory whose processor
    makes the same batch (AutoProcessor, offline) and whose Gemma3ForConditionalGeneration gives them too."""
    original = AutoProcessor.from_pretrained(gemma3_with_processor, local_files_only=True)
    batch = processor_batch(original)
    assert batch["pixel_values"].shape[0] == 1 + (1 + 3) + 1  # the wide image and its 3 crops
    assert int((batch["input_ids"] == original.tokenizer.image_token_id).sum()) == 6 * 4
    with torch.no_grad():
        expected = (
            Gemma3ForConditionalGeneration.from_pretrained(gemma3_with_processor).eval()(**batch).logits
        )
    assert expected.abs().max() > 1.0

    run_ok(import_hf.main, [gemma3_with_processor, tmp_path / "ours", "--set", "model.h_cycles=2"], capsys)
    model, _ = load_model(tmp_path / "ours")
    assert max_diff(our_logits(model, batch), expected, batch["attention_mask"]) < TOL

    run_ok(export_hf.main, [tmp_path / "ours", tmp_path / "export"], capsys)
    exported = AutoProcessor.from_pretrained(tmp_path / "export", local_files_only=True)
    assert exported.image_processor.do_pan_and_scan and original.image_processor.do_pan_and_scan  # kept
    again = processor_batch(exported)
    assert again.keys() == batch.keys()
    for key in batch:
        assert torch.equal(again[key], batch[key]), key  # token ids, masks and pixel values
    with torch.no_grad():
        reloaded = Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "export").eval()(**again).logits
    assert max_diff(reloaded, expected, batch["attention_mask"]) < TOL


def test_a_remote_code_export_reads_a_picture_end_to_end(tmp_path: Path, capsys) -> None:
    """Open cycles: the export ships its modeling code and, from the Gemma-style tokenizer, Gemma 3's
    processor. AutoProcessor (offline) makes the batch of a pan-and-scanned picture; the remote model's
    logits are HRMGemma's, and its generate() reads the picture to the tokens hrm-mega's generation gives."""
    from hrm_mega.inference.generate import generate

    image = gemma_style_tokenizer(tmp_path / "tokenizer.model")
    vision = vision_config(image_token_id=image, boi_token_id=5, eoi_token_id=6)
    config = text_config(vocab_size=image + 6, max_position=160, h_cycles=2, vision=vision)
    model = HRMGemma(config).init_weights(10)
    generator = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for p in model.parameters():  # gates open too: no plain Gemma 3 computes this
            p.add_(torch.randn(p.shape, generator=generator) * 0.1)
    ckpt = save_model_dir(model.state_dict(), Config(model=config), tmp_path / "ckpt")
    out = tmp_path / "export"
    printed = run_ok(export_hf.main, [ckpt, out, "--tokenizer", tmp_path / "tokenizer.model"], capsys)
    assert "trust_remote_code=True" in printed

    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True, local_files_only=True)
    assert type(processor).__name__ == "Gemma3Processor"
    batch = processor_batch(processor)
    assert batch["pixel_values"].shape[0] == 1 + (1 + 3) + 1
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, local_files_only=True).eval()
    expected = our_logits(model, batch)
    with torch.no_grad():
        assert max_diff(hf(**batch).logits, expected, batch["attention_mask"]) < TOL
        inputs = {k: v for k, v in batch.items() if k != "position_ids"}
        for halting in ({}, {"max_cycles": 3, "halt_threshold": 0.6}):  # training forward; per-token halting
            tokens = hf.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None, **halting)
            ours = generate(model, batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=4,
                            greedy=True, eos_id=None, pixel_values=batch["pixel_values"], **halting)  # fmt: skip
            assert torch.equal(tokens[:, batch["input_ids"].shape[1] :], ours.tokens), halting
            # generate() decodes against its KV cache (the prefill read the picture); recomputing agrees
            again = hf.generate(**inputs, max_new_tokens=4, do_sample=False, eos_token_id=None, use_cache=False,
                                **halting)  # fmt: skip
            assert torch.equal(tokens, again), halting


def test_a_hub_style_preprocessor_config_is_kept_and_checked(tmp_path: Path) -> None:
    """Gemma 3's Hub directories hold preprocessor_config.json (transformers 4's layout, nulls for the
    processor's defaults): import keeps it, export writes it as it is, after checking its image size."""
    import pytest

    from hrm_mega.convert.hf_export import ExportError, save_image_processor
    from hrm_mega.convert.hf_import import image_processor_settings

    hub = {
        "do_convert_rgb": None, "do_normalize": True, "do_pan_and_scan": None, "do_rescale": True, "do_resize": True,
        "image_mean": [0.5] * 3, "image_processor_type": "Gemma3ImageProcessor", "image_seq_length": 4,
        "image_std": [0.5] * 3, "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
        "pan_and_scan_min_ratio_to_activate": None, "processor_class": "Gemma3Processor", "resample": 2,
        "rescale_factor": 1 / 255, "size": {"height": 28, "width": 28},
    }  # fmt: skip
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/preprocessor_config.json").write_text(json.dumps(hub))
    assert image_processor_settings(tmp_path / "hf") == hub
    (tmp_path / "out").mkdir()
    save_image_processor(vision_config(), tmp_path / "out", tmp_path / "hf/preprocessor_config.json")
    assert json.loads((tmp_path / "out/preprocessor_config.json").read_text()) == hub
    with pytest.raises(ExportError, match=r"resizes images to 28 x 28, but the vision tower takes 56 x 56"):
        save_image_processor(
            vision_config(image_size=56), tmp_path / "out", tmp_path / "hf/preprocessor_config.json"
        )
