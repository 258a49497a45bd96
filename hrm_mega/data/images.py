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

import io
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
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


def resize(image: Image.Image, processing: ImageProcessing) -> np.ndarray:
    """One RGB image -> [3, size, size] uint8: the bilinear resize, before any arithmetic."""
    size = processing.size
    resized = np.asarray(image.resize((size, size), resample=Image.Resampling.BILINEAR))  # [size, size, 3]
    return np.ascontiguousarray(resized.transpose(2, 0, 1))


def normalize(image: Image.Image, processing: ImageProcessing) -> np.ndarray:
    """One RGB image -> [3, size, size] float32: bilinear resize, x / 255, (x - mean) / std."""
    return rescale_normalize(resize(image, processing), processing)


def rescale_normalize(pixels: np.ndarray, processing: ImageProcessing) -> np.ndarray:
    """Resized uint8 pixels [..., 3, S, S] -> float32: x / 255 (in float64, then float32), (x - mean) / std."""
    x = (pixels.astype(np.float64) * (1 / 255)).astype(np.float32)
    shape = (3, 1, 1)
    mean, std = (
        np.array(processing.mean, np.float32).reshape(shape),
        np.array(processing.std, np.float32).reshape(shape),
    )
    return (x - mean) / std


def normalize_pixels(pixels: torch.Tensor, processing: ImageProcessing) -> torch.Tensor:
    """`rescale_normalize` on a uint8 tensor [n, 3, S, S], on its device: the same float32 values bit for
    bit. Batches carry images as uint8 (a quarter of the bytes through loader workers and to the
    accelerator) and become pixel_values here."""
    x = (pixels.to(torch.float64) * (1 / 255)).to(torch.float32)
    mean = torch.tensor(processing.mean, dtype=torch.float32, device=x.device).view(3, 1, 1)
    std = torch.tensor(processing.std, dtype=torch.float32, device=x.device).view(3, 1, 1)
    return (x - mean) / std


def views(image: Image.Image | np.ndarray, processing: ImageProcessing) -> list[Image.Image]:
    """The RGB image, then its pan-and-scan crops (none unless enabled and the image is elongated)."""
    rgb = to_rgb(image)
    boxes = []
    if processing.pan_and_scan:
        boxes = pan_and_scan_boxes(
            *rgb.size, processing.min_crop_size, processing.max_crops, processing.min_ratio
        )
    return [rgb, *(rgb.crop(box) for box in boxes)]


def resized_views(image: Image.Image | np.ndarray, processing: ImageProcessing) -> np.ndarray:
    """One image -> uint8 [1 + crops, 3, size, size]: `preprocess` before rescaling and normalising."""
    return np.stack([resize(view, processing) for view in views(image, processing)])


def preprocess(image: Image.Image | np.ndarray, processing: ImageProcessing) -> tuple[np.ndarray, int]:
    """One image -> (pixel_values [1 + crops, 3, size, size] float32: the full image, then its crops;
    the number of crops)."""
    pixels = resized_views(image, processing)
    return rescale_normalize(pixels, processing), len(pixels) - 1


def pixel_values(
    images: list[Image.Image | np.ndarray], processing: ImageProcessing
) -> tuple[torch.Tensor, list[int]]:
    """Images -> (pixel_values [n, 3, size, size] for HRMGemma, every image followed by its crops; the
    number of crops of each image)."""
    if not images:
        return torch.empty(0, 3, processing.size, processing.size), []
    done = [preprocess(image, processing) for image in images]
    return torch.from_numpy(np.concatenate([p for p, _ in done])), [k for _, k in done]


# ---- images in datasets -------------------------------------------------------------------------------


class ImageError(ValueError):
    """An image that cannot be read or preprocessed; the message is one line naming it."""


def load_image(source: bytes | str | Path, where: str) -> Image.Image:
    """Opens and fully decodes an encoded image (bytes or a file), so that a truncated or damaged file
    fails here, with one line naming `where`, and not later inside the model's input pipeline. Images
    past Pillow's decompression-bomb limit are refused, never decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
            image.load()
            to_rgb(image)  # modes Pillow cannot convert (e.g. "La") fail here
    except FileNotFoundError:
        raise ImageError(f"{where}: no such file") from None
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        Image.DecompressionBombError,
        Image.DecompressionBombWarning,
    ) as exn:
        text = str(exn).splitlines()[0] if str(exn) else ""
        raise ImageError(
            f"{where}: cannot read the image ({type(exn).__name__}: {text})".replace(": )", ")")
        ) from None
    return image


@dataclass(frozen=True)
class ImageSpec:
    """How a dataset's rows hold images (manifest extra.image, written by `hrm-mega prep images`): the
    preprocessing that turns each stored image into views, and the tokens that stand for each view.

    A view (the image, or one of its pan-and-scan crops) is the run [boi, image_token x
    mm_tokens_per_image, eoi] in the row's tokens, in the order the images are stored."""

    processing: ImageProcessing
    mm_tokens_per_image: int
    image_token_id: int
    boi_token_id: int
    eoi_token_id: int

    def to_json(self) -> dict[str, Any]:
        p = self.processing
        return {
            "image_size": p.size, "mean": list(p.mean), "std": list(p.std), "pan_and_scan": p.pan_and_scan,
            "min_crop_size": p.min_crop_size, "max_crops": p.max_crops, "min_ratio": p.min_ratio,
            "mm_tokens_per_image": self.mm_tokens_per_image, "image_token_id": self.image_token_id,
            "boi_token_id": self.boi_token_id, "eoi_token_id": self.eoi_token_id,
        }  # fmt: skip

    @classmethod
    def from_json(cls, value: Any) -> ImageSpec:
        """Parses manifest extra.image; ValueError (one line naming the field) when it is malformed."""
        if not isinstance(value, dict):
            raise ValueError("extra.image must be an object")
        try:
            processing = ImageProcessing(
                size=int(value["image_size"]), mean=tuple(map(float, value["mean"])),
                std=tuple(map(float, value["std"])), pan_and_scan=bool(value["pan_and_scan"]),
                min_crop_size=int(value["min_crop_size"]), max_crops=int(value["max_crops"]),
                min_ratio=float(value["min_ratio"]),
            )  # type: ignore[arg-type]  # fmt: skip
            spec = cls(processing, *(int(value[k]) for k in TOKEN_FIELDS))
        except KeyError as e:
            raise ValueError(f"extra.image has no field {e.args[0]}") from None
        except (TypeError, ValueError) as e:
            raise ValueError(f"extra.image: a malformed field ({e})") from None
        if len(processing.mean) != 3 or len(processing.std) != 3 or processing.size < 1:
            raise ValueError("extra.image: image_size must be >= 1, mean and std 3 numbers each")
        if spec.mm_tokens_per_image < 1:
            raise ValueError("extra.image.mm_tokens_per_image must be >= 1")
        return spec

    @property
    def run(self) -> list[int]:
        """The ids of one view: boi, the placeholders, eoi."""
        return [self.boi_token_id, *[self.image_token_id] * self.mm_tokens_per_image, self.eoi_token_id]


TOKEN_FIELDS = ("mm_tokens_per_image", "image_token_id", "boi_token_id", "eoi_token_id")


def view_count(image: Image.Image, processing: ImageProcessing) -> int:
    """How many views (runs of placeholders) an image becomes: 1, plus its pan-and-scan crops."""
    if not processing.pan_and_scan:
        return 1
    width, height = image.size
    return 1 + len(
        pan_and_scan_boxes(
            width, height, processing.min_crop_size, processing.max_crops, processing.min_ratio
        )
    )
