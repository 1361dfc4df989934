"""Images -> pixel_values as the folder's CLIP image processor makes them
(preprocessor_config.json: RGB, shortest edge resized with PIL, center crop, rescale,
normalize), without transformers. Needs Pillow for files and resizing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError

PROCESSOR = "preprocessor_config.json"


def processor_config(folder: Path) -> dict:
    path = Path(folder) / PROCESSOR
    if not path.is_file():
        raise InputError(f"{path}: missing (the image processor's settings; export with one)")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read it ({e})") from e


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise InputError("images need Pillow: pip install pillow") from None
    return Image


def to_pil(image):
    """A PIL RGB image from a PIL image, a path, or an HxWxC (or HxW) uint8/float array."""
    Image = _pil()
    if isinstance(image, (str, Path)):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, ValueError) as e:
            raise InputError(f"{image}: not a readable image ({e})") from e
    elif isinstance(image, np.ndarray):
        a = image
        if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3, 4):
            a = a.transpose(1, 2, 0)  # CHW -> HWC
        if a.ndim == 3 and a.shape[-1] == 1:
            a = a[..., 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
            raise InputError(f"image array of shape {image.shape}: expected HxW, HxWx3 or HxWx4")
        if a.dtype != np.uint8:  # floats in [0, 1], as transformers reads them
            a = np.clip(np.rint(np.asarray(a, np.float64) * 255), 0, 255).astype(np.uint8)
        image = Image.fromarray(a)
    elif not isinstance(image, Image.Image):
        raise InputError(f"image of type {type(image).__name__}: give a path, PIL image or array")
    return image.convert("RGB")


def _resize_shape(h: int, w: int, size: dict) -> tuple[int, int]:
    if "shortest_edge" in size:
        s = int(size["shortest_edge"])
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(s * long / short)
        return (new_long, s) if w <= h else (s, new_long)
    return int(size["height"]), int(size["width"])


def pixel_values(image, folder: Path) -> np.ndarray:
    """[1, 3, H, W] float32 for one image (a path, PIL image or HxWxC array; an array of shape
    [1, 3, H, W] float32 is taken as pixel values already)."""
    if isinstance(image, np.ndarray) and image.ndim == 4:
        if image.shape[:2] != (1, 3):
            raise InputError(f"pixel values of shape {image.shape}: expected [1, 3, H, W]")
        return np.ascontiguousarray(image, np.float32)
    return processed(to_pil(image), processor_config(folder))


def processed(img, cfg: dict) -> np.ndarray:
    """A PIL RGB image -> [1, 3, h, w] float32: resize, center crop, rescale, normalize."""
    if cfg.get("do_resize", True):
        h, w = _resize_shape(img.height, img.width, cfg["size"])
        img = img.resize((w, h), resample=int(cfg.get("resample", 3)))
    a = np.asarray(img)
    if cfg.get("do_center_crop", False):
        ch, cw = int(cfg["crop_size"]["height"]), int(cfg["crop_size"]["width"])
        h, w = a.shape[:2]
        if ch > h or cw > w:
            raise InputError(f"image of {w}x{h} pixels is smaller than the {cw}x{ch} crop")
        top, left = (h - ch) // 2, (w - cw) // 2
        a = a[top : top + ch, left : left + cw]
    x = a.astype(np.float32)
    if cfg.get("do_rescale", True):
        x = (a.astype(np.float64) * float(cfg.get("rescale_factor", 1 / 255))).astype(np.float32)
    if cfg.get("do_normalize", True):
        mean = np.asarray(cfg["image_mean"], np.float32)
        std = np.asarray(cfg["image_std"], np.float32)
        x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32)
