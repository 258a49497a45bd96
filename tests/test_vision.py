"""Multimodal HRMGemma: the SigLIP tower and Gemma 3 projector (models/vision.py) against transformers,
the image stream in HRMGemma (placeholders replaced, Gemma 3's bidirectional image mask), model.vision in
the config. Everything is tiny, random and fp32; nothing is downloaded."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Gemma3Config, Gemma3ImageProcessorPil, SiglipVisionConfig, SiglipVisionModel
from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

from hrm_mega.config import LMModelConfig, load_config
from hrm_mega.config.model import VisionConfig
from hrm_mega.config.schema import ConfigError
from hrm_mega.data.images import ImageProcessing, pan_and_scan_boxes, pixel_values, preprocess
from hrm_mega.models.kv_cache import KVCache
from hrm_mega.models.layers import init_parameters
from hrm_mega.models.lm import HRMGemma, image_indices, sequence_context
from hrm_mega.models.vision import ImageEncoder, image_token_ids

TOL = 1e-5
IMAGE, BOI, EOI = 127, 125, 126


def vision_config(**overrides) -> VisionConfig:
    """28 px, patch 7: a 4 x 4 patch grid pooled 2 x 2 into 4 tokens per image."""
    fields = dict(
        image_size=28, patch_size=7, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
        mm_tokens_per_image=4, image_token_id=IMAGE, boi_token_id=BOI, eoi_token_id=EOI, trainable=True,
    )  # fmt: skip
    return VisionConfig(**{**fields, **overrides})


def lm_config(**overrides) -> LMModelConfig:
    """Two groups of 2 local + 1 global layer; a window of 3 (shorter than an image with its markers)."""
    fields = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=6, num_heads=2, num_kv_heads=1,
        head_dim=32, query_pre_attn_scalar=24, sliding_window=3, local_per_global=2, max_position=64,
        vision=vision_config(),
    )  # fmt: skip
    return LMModelConfig(**{**fields, **overrides})


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * scale)
    return model.eval()


def pixels(n: int, seed: int = 0, size: int = 28) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def row(*parts: int | str, length: int = 0) -> list[int]:
    """A row of token ids: numbers as they are, "img" as <boi>, 4 placeholders, <eoi>."""
    ids: list[int] = []
    for part in parts:
        ids += [BOI, IMAGE, IMAGE, IMAGE, IMAGE, EOI] if part == "img" else [int(part)]
    return ids + [3] * (length - len(ids))


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------


def test_model_vision_config_section() -> None:
    base = ["model.family=hrm_gemma"]
    assert load_config(None, base).model.vision is None  # absent: text only, as before
    c = load_config(None, [*base, "model.vision.image_size=448", "model.vision.trainable=true"]).model
    assert c.vision == VisionConfig(image_size=448, trainable=True)  # the rest: Gemma 3's defaults
    assert c.vision.mm_tokens_per_image == 256 and c.vision.patches_per_side == 32
    with pytest.raises(ConfigError, match="did you mean model.vision.patch_size"):
        load_config(None, [*base, "model.vision.patch_sise=16"])
    with pytest.raises(ConfigError, match="model.vision.mm_tokens_per_image=200 must be a square"):
        load_config(None, [*base, "model.vision.mm_tokens_per_image=200"])
    with pytest.raises(ConfigError, match="its side 3 must divide the 64 patches per side"):
        load_config(None, [*base, "model.vision.mm_tokens_per_image=9"])
    with pytest.raises(ConfigError, match="model.vision.patch_size=15 does not divide"):
        load_config(None, [*base, "model.vision.patch_size=15"])
    with pytest.raises(ConfigError, match="boi_token_id=300 must be < model.vocab_size=256"):
        load_config(None, [*base, "model.vocab_size=256", "model.vision.boi_token_id=300"])
    # pipeline stages take images: the tower and projector go on the first stage (tests/test_parallel.py)
    assert load_config("lm/hrmgemma_4b", ["model.vision.trainable=false", "parallel.pp=5"]).parallel.pp == 5


def test_gemma3_4b_with_vision_has_the_published_parameter_count() -> None:
    """google/gemma-3-4b-pt's safetensors index holds 8,600,158,944 bf16 bytes: 4,300,079,472 weights."""
    config = load_config("lm/hrmgemma_4b", ["model.vision.trainable=false"]).model
    with torch.device("meta"):
        counts = HRMGemma(config).parameter_counts()
    assert counts["gemma"] == 4_300_079_472
    assert (
        counts["vision"] == 416_866_032 + 1152 + 1152 * 2560
    )  # SigLIP So400m at 896 px (no head), projector


# --------------------------------------------------------------------------------------------------
# The image encoder against transformers' SiglipVisionModel + Gemma3MultiModalProjector
# --------------------------------------------------------------------------------------------------


def hf_vision(v: VisionConfig) -> tuple[SiglipVisionModel, Gemma3MultiModalProjector]:
    siglip = SiglipVisionConfig(
        hidden_size=v.hidden_size, intermediate_size=v.intermediate_size, num_hidden_layers=v.num_layers,
        num_attention_heads=v.num_heads, image_size=v.image_size, patch_size=v.patch_size, vision_use_head=False,
    )  # fmt: skip
    config = Gemma3Config(
        vision_config=siglip.to_dict(),
        text_config={"hidden_size": 64},
        mm_tokens_per_image=v.mm_tokens_per_image,
    )
    return SiglipVisionModel(siglip).eval(), Gemma3MultiModalProjector(config).eval()


def copy_from_hf(ours: ImageEncoder, tower: SiglipVisionModel, projector: Gemma3MultiModalProjector) -> None:
    """HF's names are ours but for four renames; the projector weight is stored transposed."""
    renames = {
        "embeddings.patch_embedding": "patch_embedding",
        "embeddings.position_embedding.weight": "position_embedding",
        "encoder.layers": "layers",
        "vision_model.": "",
    }
    sd = {}
    for key, tensor in tower.state_dict().items():
        for old, new in renames.items():
            key = key.replace(old, new)
        sd[f"tower.{key}"] = tensor
    sd["projector.norm.weight"] = projector.mm_soft_emb_norm.weight
    sd["projector.proj.weight"] = projector.mm_input_projection_weight.t()
    ours.load_state_dict(sd, strict=True)


@pytest.mark.parametrize("tokens", [4, 16, 1], ids=["pool-2x2", "no-pool", "pool-all"])
def test_image_encoder_matches_siglip_and_the_gemma3_projector(tokens: int) -> None:
    v = vision_config(mm_tokens_per_image=tokens)
    tower, projector = hf_vision(v)
    generator = torch.Generator().manual_seed(tokens)
    with torch.no_grad():
        for p in [*tower.parameters(), *projector.parameters()]:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    ours = ImageEncoder(v, 64)
    copy_from_hf(ours, tower, projector)
    images = pixels(3, seed=tokens)
    with torch.no_grad():
        expected = projector(tower(pixel_values=images).last_hidden_state)
        got = ours.eval()(images)
    assert got.shape == (3, tokens, 64)
    assert expected.abs().max() > 1.0
    assert (got - expected).abs().max() < TOL


def test_frozen_tower_trains_only_the_projector() -> None:
    for trainable in (False, True):
        encoder = ImageEncoder(vision_config(trainable=trainable), 64)
        init_parameters(encoder, seed=0)
        encoder(pixels(2)).square().sum().backward()
        tower_grads = [p.grad is not None for p in encoder.tower.parameters()]
        assert all(p.requires_grad == trainable for p in encoder.tower.parameters())
        assert all(tower_grads) == trainable and any(tower_grads) == trainable
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.projector.parameters())


def test_pixel_values_of_the_wrong_size_are_refused() -> None:
    encoder = ImageEncoder(vision_config(), 64)
    with pytest.raises(ValueError, match=r"expected \[n_images, 3, 28, 28\]"):
        encoder(pixels(1, size=32))


# --------------------------------------------------------------------------------------------------
# HRMGemma with images
# --------------------------------------------------------------------------------------------------


def multimodal_model(seed: int = 0, **overrides) -> HRMGemma:
    return perturbed(HRMGemma(lm_config(**overrides)).init_weights(seed), seed)


def test_image_indices_and_token_ids() -> None:
    v = vision_config()
    assert image_token_ids(v) == [BOI, IMAGE, IMAGE, IMAGE, IMAGE, EOI]
    ids = torch.tensor([row(5, "img", 6, "img", 7), row("img", length=15)])
    expected_first = [-1, -1, 0, 0, 0, 0, -1, -1, -1, 1, 1, 1, 1, -1, -1]
    assert image_indices(ids, v)[0].tolist() == expected_first
    assert image_indices(ids, v)[1].tolist() == [-1, 0, 0, 0, 0] + [-1] * 10
    with pytest.raises(ValueError, match="row 1 holds 3 image placeholder tokens"):
        image_indices(torch.tensor([row(5, 6, 7, 8), [IMAGE] * 3 + [1]]), v)


def reference_mask(
    image_ids: list[int], docs: list[int], valid: list[bool], window: int | None
) -> torch.Tensor:
    """Gemma 3's mask spelt out pair by pair: (causal OR same image) AND window (keys at most window-1
    back), within the document, padding keys hidden (each query keeps itself)."""
    s = len(image_ids)
    mask = torch.zeros(s, s, dtype=torch.bool)
    for q in range(s):
        for k in range(s):
            same_image = image_ids[q] >= 0 and image_ids[q] == image_ids[k]
            allowed = (k <= q or same_image) and (window is None or q - k < window)
            mask[q, k] = (allowed and docs[q] == docs[k] and valid[k]) or q == k
    return mask


def test_image_masks_for_local_and_global_layers_with_documents_and_padding() -> None:
    config = lm_config()  # a window of 3: shorter than an image with its markers
    ids = torch.tensor([row(5, "img", 6, "img", 7, length=16), row(0, 0, 5, "img", 6, 7, 8, 9, 1, length=16)])
    docs = torch.tensor([[0] * 9 + [1] * 7, [0] * 16])
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[1, :2] = False  # left padding
    image_ids = image_indices(ids, config.vision)
    model = HRMGemma(config)
    x = torch.zeros(2, 16, config.hidden_size)
    ctx = sequence_context(config, (model.rope_local, model.rope_global), x, None, valid.long(), docs,
                           image_ids=image_ids)  # fmt: skip
    for kind, window in (("local", 3), ("global", None)):
        for b in range(2):
            expected = reference_mask(image_ids[b].tolist(), docs[b].tolist(), valid[b].tolist(), window)
            assert torch.equal(ctx.masks[kind][b, 0], expected), (kind, b)
    # an image token sees a later token of its image 3 ahead (Gemma 3: the window bounds keys behind only)
    assert bool(ctx.masks["local"][0, 0, 2, 5]) and not bool(ctx.masks["local"][0, 0, 5, 2])


def output_change(model: HRMGemma, ids: torch.Tensor, image: int, **inputs) -> torch.Tensor:
    """How much each position's logits move [s] when the features of the last placeholder of `image`
    (row 0's images in order) change: the encoder's output is replaced, to change one token at a time."""
    features = model.vision(pixels(int((ids[0] == IMAGE).sum()) // 4)).detach()
    changed = features.clone()
    changed[image, -1] += 1.0

    def logits_with(f: torch.Tensor) -> torch.Tensor:
        model.vision.forward = lambda _: f
        try:
            with torch.no_grad():
                return model(ids, pixel_values=pixels(len(f)), **inputs)[0][0]
        finally:
            del model.vision.forward

    return (logits_with(changed) - logits_with(features)).abs().amax(dim=-1)


def test_an_image_token_sees_later_tokens_of_its_image_and_no_text_token_sees_ahead() -> None:
    """Changing the features of an image's last placeholder changes the outputs of the image's earlier
    tokens (bidirectional within the image), never those of the text before it, nor of another image's
    earlier tokens; at every layer kind, since a window of 3 is shorter than the image."""
    model = multimodal_model(h_cycles=2, l_cycles=2)
    ids = torch.tensor([row(5, 6, "img", 7, 8, "img", 9)])
    before_last = [i for i in range(ids.shape[1]) if ids[0, i] == IMAGE][3]  # last token of image 0
    diff = output_change(model, ids, 0)  # [s]
    image0 = list(range(3, 7))
    assert (diff[:3] == 0).all()  # text (and <boi>) before the image: untouched
    assert (diff[image0[:-1]] > 1e-3).all()  # earlier tokens of the same image: changed
    assert (diff[before_last + 1 :] > 0).all()  # everything after: changed (causal)

    diff = output_change(model, ids, 1)  # image 1: image 0 and the text between stay as they were
    first_of_image1 = [i for i in range(ids.shape[1]) if ids[0, i] == IMAGE][4]
    assert (diff[:first_of_image1] == 0).all() and (diff[first_of_image1:] > 0).all()


def test_in_packed_rows_an_image_is_seen_both_ways_within_its_document_only() -> None:
    """Two documents packed in one row, an image in each (positions restart with the second): changing
    the last token of the second document's image changes its earlier tokens and what follows it, never
    the first document nor the text before the image; changing the first document's image never
    reaches the second document. At local and global layers: the window of 3 is shorter than an image."""
    model = multimodal_model(seed=3, h_cycles=2)
    ids = torch.tensor([row(5, "img", 6) + row(7, 8, "img", 9)])  # 8 + 9 tokens
    docs = torch.tensor([[0] * 8 + [1] * 9])
    diff = output_change(model, ids, 1, doc_ids=docs)
    assert (diff[:11] == 0).all()  # document 0, then document 1's text and <boi> before its image
    assert (diff[11:14] > 1e-3).all() and (diff[14:] > 0).all()  # its image's earlier tokens, then after
    diff = output_change(model, ids, 0, doc_ids=docs)
    assert (diff[:2] == 0).all() and (diff[2:5] > 1e-3).all() and (diff[5:8] > 0).all()
    assert (diff[8:] == 0).all()  # the next document never sees it


def test_the_image_is_encoded_once_per_forward() -> None:
    model = multimodal_model(h_cycles=3, l_cycles=2)
    calls = []
    model.vision.tower.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.tensor([row(5, "img", 6), row("img", "img", length=14)[:8]])
    with pytest.raises(ValueError, match="row 1 holds 5 image placeholder tokens"):
        model(ids, pixel_values=pixels(3))
    ids = torch.tensor([row(5, "img", 6, length=14), row("img", "img", length=14)])
    logits, aux = model(ids, pixel_values=pixels(3))
    assert calls == [1] and aux["cycles_used"].tolist() == [3, 3]
    with pytest.raises(ValueError, match="but 2 images give 8"):
        model(ids, pixel_values=pixels(2))
    with pytest.raises(ValueError, match="no vision encoder"):
        HRMGemma(lm_config(vision=None))(ids % 100, pixel_values=pixels(3))


def test_zero_gates_keep_a_multimodal_model_exact_under_more_cycles() -> None:
    model = multimodal_model(seed=1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1].startswith("gate_"):
                p.zero_()
    ids = torch.tensor([row(5, "img", 6, 7, length=12)])
    with torch.no_grad():
        single = model(ids, pixel_values=pixels(1))[0]
        more = model(ids, pixel_values=pixels(1), cycles=3)[0]
    assert (single - more).abs().max() < TOL


def test_infer_with_images_matches_forward_and_the_kv_cache() -> None:
    model = multimodal_model(seed=2, h_cycles=2)
    ids = torch.tensor([row(5, "img", 6, 7, 8, 9, 10, 11, 12, 13, 14), row("img", 9, "img", 10, 11, 12)])
    images = pixels(3, seed=3)
    with torch.no_grad():
        expected = model(ids, pixel_values=images)[0]
        reference, _ = model.infer(ids, pixel_values=images)
        assert (reference - expected).abs().max() < TOL
        cache = KVCache()  # a prompt with its images, then text one token at a time
        prompt, _ = model.infer(ids[:, :13], pixel_values=images, cache=cache)
        steps = [model.infer(ids[:, i : i + 1], cache=cache)[0] for i in range(13, 16)]
    assert (torch.cat([prompt, *steps], dim=1) - reference).abs().max() < TOL


def test_a_text_only_model_is_unchanged() -> None:
    text = dataclasses.replace(lm_config(), vision=None)
    model = HRMGemma(text)
    assert model.vision is None and not any(name.startswith("vision") for name, _ in model.named_parameters())


# --------------------------------------------------------------------------------------------------
# Image preprocessing (data/images.py) against transformers' Gemma3ImageProcessorPil
# --------------------------------------------------------------------------------------------------

# (width, height, mode): the crop decisions each one exercises with Gemma 3's settings (256, 4, 1.2)
IMAGES = {
    "wide": (900, 300, "RGB"),  # 3 crops of 300 x 300
    "wide-uneven": (1001, 300, "RGB"),  # 3 crops, the last one a column narrower
    "tall": (300, 1300, "RGB"),  # 4 crops of 300 x 325
    "square": (400, 400, "RGB"),  # not elongated: no crops
    "small": (40, 100, "RGB"),  # elongated, but crops would be under 256 px: none
    "large": (2000, 1500, "RGB"),  # ratio 1.33: 2 crops of 1000 x 1500
    "very-wide": (3000, 200, "RGB"),  # 4 crops at most, each 200 px high: none
    "rgba": (700, 300, "RGBA"),  # transparency over white
    "grey": (300, 800, "L"),
    "palette": (520, 260, "P"),
}


def generated_image(width: int, height: int, mode: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L")
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    return rgb.quantize(64) if mode == "P" else rgb


@pytest.mark.parametrize("name", list(IMAGES))
def test_preprocessing_matches_transformers_gemma3_image_processor(name: str) -> None:
    width, height, mode = IMAGES[name]
    image = generated_image(width, height, mode, seed=len(name))
    processing = ImageProcessing(size=64, pan_and_scan=True)  # a small side keeps the test fast
    hf = Gemma3ImageProcessorPil(
        size={"height": 64, "width": 64}, do_pan_and_scan=True, pan_and_scan_min_crop_size=256,
        pan_and_scan_max_num_crops=4, pan_and_scan_min_ratio_to_activate=1.2,
    )  # fmt: skip
    expected = hf(images=[image], return_tensors="np")
    ours, crops = preprocess(image, processing)
    assert crops == int(expected["num_crops"][0])
    assert ours.shape == expected["pixel_values"].shape == (1 + crops, 3, 64, 64)
    assert ours.dtype == np.float32
    assert np.abs(ours - expected["pixel_values"]).max() <= 1e-6


def test_crop_decisions_and_batches() -> None:
    expected_crops = {
        "wide": 3,
        "wide-uneven": 3,
        "tall": 4,
        "square": 0,
        "small": 0,
        "large": 2,
        "very-wide": 0,
    }
    for name, crops in expected_crops.items():
        width, height, _ = IMAGES[name]
        assert len(pan_and_scan_boxes(width, height, 256, 4, 1.2)) == crops, name
    assert pan_and_scan_boxes(1001, 300, 256, 4, 1.2)[-1] == (668, 0, 1001, 300)  # clipped to the image
    images = [generated_image(900, 300, "RGB", 0), np.zeros((50, 60), np.uint8)]
    values, crops = pixel_values(images, ImageProcessing.for_model(vision_config(), pan_and_scan=True))
    assert values.shape == (1 + 3 + 1, 3, 28, 28) and crops == [3, 0]
    assert torch.equal(values[-1], torch.full((3, 28, 28), -1.0))  # black -> (0 - 0.5) / 0.5
    with pytest.raises(ValueError, match="uint8"):
        preprocess(np.zeros((4, 4, 3)), ImageProcessing())


def test_image_arrays_match_transformers_too() -> None:
    """H x W x 4 arrays are blended onto white as transformers blends arrays (not as Pillow does)."""
    rng = np.random.default_rng(5)
    hf = Gemma3ImageProcessorPil(size={"height": 32, "width": 32})
    for array in (
        rng.integers(0, 256, (90, 50, 4), dtype=np.uint8),
        rng.integers(0, 256, (40, 70, 1), dtype=np.uint8),
    ):
        expected = hf(images=[array], return_tensors="np")["pixel_values"]
        ours, _ = preprocess(array, ImageProcessing(size=32))
        assert np.abs(ours - expected).max() <= 1e-6
