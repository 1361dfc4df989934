"""LLaVA-NeXT's any-resolution images, without transformers: the image cut into crops at the
best of the configured resolutions (plus the whole image as the first crop), as
LlavaNextImageProcessor makes them, and the crops' features packed back into one sequence
(unpadded, an ``image_newline`` row after each row of patches), as
LlavaNextModel.pack_image_features does."""

from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from .image import processed, to_pil


def best_resolution(size: tuple[int, int], resolutions) -> tuple[int, int]:
    """(height, width) of the resolution keeping most of the image and wasting least."""
    h, w = size
    best, most, waste = None, 0, math.inf
    for rh, rw in resolutions:
        scale = min(rw / w, rh / h)
        effective = min(int(w * scale) * int(h * scale), w * h)
        wasted = rw * rh - effective
        if effective > most or (effective == most and wasted < waste):
            best, most, waste = (int(rh), int(rw)), effective, wasted
    return best


def _fit(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    (h, w), (th, tw) = size, target
    if tw / w < th / h:
        return min(math.ceil(h * tw / w), th), tw
    return th, min(math.ceil(w * th / h), tw)


def crops(image, cfg: dict) -> tuple[np.ndarray, tuple[int, int]]:
    """(pixel values [crops, 3, S, S], the image's (height, width)) for one image."""
    pinpoints = cfg.get("image_grid_pinpoints")
    if not pinpoints:
        raise InputError("preprocessor_config.json: no image_grid_pinpoints (LLaVA-NeXT)")
    from PIL import Image

    img = to_pil(image)
    size = (img.height, img.width)
    side = int(cfg["crop_size"]["height"])
    edge = cfg["size"].get("shortest_edge") or min(cfg["size"]["height"], cfg["size"]["width"])
    resample = int(cfg.get("resample", 3))
    target = best_resolution(size, pinpoints)
    h, w = _fit(size, target)
    resized = np.asarray(img.resize((w, h), resample=resample))
    top, left = (target[0] - h) // 2, (target[1] - w) // 2
    padded = np.zeros((*target, 3), np.uint8)
    padded[top : top + h, left : left + w] = resized
    parts = [img.resize((edge, edge), resample=resample)]
    parts += [
        Image.fromarray(padded[i : i + side, j : j + side])
        for i in range(0, target[0], side)
        for j in range(0, target[1], side)
    ]
    return np.concatenate([processed(p, cfg) for p in parts]), size


def _unpad(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[D, H, W] features of a padded image -> those of the image itself."""
    (h, w), (ch, cw) = size, x.shape[1:]
    if w / h > cw / ch:
        new = int(round(h * (cw / w), 7))
        pad = (ch - new) // 2
        return x[:, pad : ch - pad, :]
    new = int(round(w * (ch / h), 7))
    pad = (cw - new) // 2
    return x[:, :, pad : cw - pad]


def pack(features: np.ndarray, size, newline: np.ndarray, config: dict) -> np.ndarray:
    """One image's crop features [crops, tokens, D] -> its token sequence [n, D]."""
    base = features[0]
    if len(features) == 1:
        return np.concatenate([base, newline[None]])
    vision = config["vision_config"]
    side = int(vision["image_size"]) // int(vision["patch_size"])
    gh, gw = (
        d // int(vision["image_size"])
        for d in best_resolution(size, config["image_grid_pinpoints"])
    )
    x = features[1:].reshape(gh, gw, side, side, -1).transpose(4, 0, 2, 1, 3)
    x = _unpad(x.reshape(x.shape[0], gh * side, gw * side), size)
    rows = np.broadcast_to(newline[:, None, None], (x.shape[0], x.shape[1], 1))
    x = np.concatenate([x, rows], axis=2).reshape(x.shape[0], -1).T
    return np.concatenate([base, x])
