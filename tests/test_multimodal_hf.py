"""Multimodal Gemma 3 through the files, with transformers as the client: import-hf keeps the vision tower
and projector of a Gemma3ForConditionalGeneration, export-hf writes one back (or remote code when the
cycles are open), and the logits on prompts with one and two images equal transformers'. Tiny, random,
fp32; nothing is downloaded."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
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


def random_hf_gemma3(seed: int) -> Gemma3ForConditionalGeneration:
    """A random multimodal Gemma 3, with SigLIP's pooling head (which Gemma 3 never runs)."""
    v = vision_config()
    vision = SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size, vision_use_head=True,
    )  # fmt: skip
    config = Gemma3Config(
        text_config=hf_config_from(text_config()).to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
        image_token_index=IMAGE, boi_token_index=BOI, eoi_token_index=EOI,
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
