"""Image preprocessing for HRMGemma's vision encoder: what Gemma 3's image processor does, with Pillow.

    image (PIL.Image, or an H x W [x C] uint8 array)
      -> RGB: transparency composited onto white, grey and palette images expanded
      -> [the image, then its pan-and-scan crops when enabled and the image is elongated enough]
      -> each: resized to size x size (Pillow bilinear; the aspect ratio is not kept)
               -> x / 255 (in float64, then float32) -> (x - mean) / std (float32, 0.5 and 0.5 for Gemma 3)
      -> pixel_values [1 + crops, 3, size, size] float32

Pan-and-scan (Gemma 3's crop policy for wide or tall images): a landscape image whose width / height
is at least `min_ratio` is cut into n side-by-side crops, with n = width / height rounded half up,
at most width // min_crop_size, then clamped to [2, max_crops]; portrait images likewise top to bottom.
A crop is ceil(side / n) long (the last one may be shorter), and if either side of a crop would be
under min_crop_size the image is not cropped at all. The crops follow the full image, left to right
(or top to bottom). Each crop and the full image then become one image of the model each: a row holds
one placeholder run per entry of pixel_values (see HRMGemma.forward).

These are the decisions transformers' Gemma3ImageProcessorPil makes, pixel for pixel
(tests/test_vision.py compares them); nothing here depends on transformers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from hrm_mega.config.model import VisionConfig


@dataclass(frozen=True)
class ImageProcessing:
    """Gemma 3's preprocessing settings (its preprocessor_config.json and processor defaults)."""

    size: int = 896  # the vision tower's input side (model.vision.image_size)
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    pan_and_scan: bool = False  # Gemma 3's processor leaves it off unless asked
    min_crop_size: int = 256
    max_crops: int = 4
    min_ratio: float = 1.2  # the long side / short side from which an image is cropped

    @classmethod
    def for_model(cls, vision: VisionConfig, **settings: Any) -> ImageProcessing:
        """The settings for a model's vision encoder (size = model.vision.image_size)."""
        return cls(size=vision.image_size, **settings)


def to_rgb(image: Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image: transparency (an alpha band, or a palette's transparent colour) is composited
    onto white; grey, palette and CMYK images are converted. An array is H x W (grey) or H x W x C uint8
    with C = 1, 3 or 4 (RGBA: blended onto white in floating point and rounded, as transformers does for
    arrays; Pillow's integer compositing, used for RGBA images, can differ by one level)."""
    if isinstance(image, np.ndarray):
        channels = image.shape[-1] if image.ndim == 3 else 1
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or channels not in (1, 3, 4):
            raise ValueError(
                f"an image array must be H x W or H x W x C (C = 1, 3, 4) uint8; got {image.dtype} {image.shape}"
            )
        if image.ndim == 2 or image.shape[-1] == 1:
            return Image.fromarray(np.repeat(image.reshape(*image.shape[:2], 1), 3, axis=-1))
        if image.shape[-1] == 4:
            alpha = image[..., 3:] / 255
            image = np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(np.uint8)
        return Image.fromarray(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def pan_and_scan_boxes(
    width: int, height: int, min_crop_size: int, max_crops: int, min_ratio: float
) -> list[tuple[int, int, int, int]]:
    """The crops of a width x height image as (left, top, right, bottom) boxes, in order; [] when the
    image is not cropped (module docstring)."""
    landscape = width >= height
    long_side, short_side = (width, height) if landscape else (height, width)
    if long_side / short_side < min_ratio:
        return []
    n = min(math.floor(long_side / short_side + 0.5), long_side // min_crop_size)
    n = min(max(2, n), max_crops)
    columns, rows = (n, 1) if landscape else (1, n)
    crop_width, crop_height = math.ceil(width / columns), math.ceil(height / rows)
    if min(crop_width, crop_height) < min_crop_size:
        return []
    return [
        (left, top, min(left + crop_width, width), min(top + crop_height, height))
        for top in range(0, rows * crop_height, crop_height)
        for left in range(0, columns * crop_width, crop_width)
    ]


def normalize(image: Image.Image, processing: ImageProcessing) -> np.ndarray:
    """One RGB image -> [3, size, size] float32: bilinear resize, x / 255, (x - mean) / std."""
    size = processing.size
    resized = np.asarray(image.resize((size, size), resample=Image.Resampling.BILINEAR))  # [size, size, 3]
    x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean, std = np.array(processing.mean, np.float32), np.array(processing.std, np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


def preprocess(image: Image.Image | np.ndarray, processing: ImageProcessing) -> tuple[np.ndarray, int]:
    """One image -> (pixel_values [1 + crops, 3, size, size] float32: the full image, then its crops;
    the number of crops)."""
    rgb = to_rgb(image)
    boxes = []
    if processing.pan_and_scan:
        boxes = pan_and_scan_boxes(
            *rgb.size, processing.min_crop_size, processing.max_crops, processing.min_ratio
        )
    views = [rgb, *(rgb.crop(box) for box in boxes)]
    return np.stack([normalize(view, processing) for view in views]), len(boxes)


def pixel_values(
    images: list[Image.Image | np.ndarray], processing: ImageProcessing
) -> tuple[torch.Tensor, list[int]]:
    """Images -> (pixel_values [n, 3, size, size] for HRMGemma, every image followed by its crops; the
    number of crops of each image)."""
    if not images:
        return torch.empty(0, 3, processing.size, processing.size), []
    done = [preprocess(image, processing) for image in images]
    return torch.from_numpy(np.concatenate([p for p, _ in done])), [k for _, k in done]
