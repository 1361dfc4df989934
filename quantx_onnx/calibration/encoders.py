"""Calibration of encoders: vision models (one image input [B, C, H, W]) and text encoders
(input_ids, attention_mask, token_type_ids; no KV cache).

With no data from the user they calibrate on inputs made up here (``synthetic``, the
default for encoders):

  images: half "dead leaves" pictures (overlapping discs and rectangles of random colours
          and sizes, the classic stand-in for natural-image statistics: edges, flat regions,
          occlusion at every scale), half colour noise with a natural 1/f amplitude spectrum;
          ImageNet-normalised, as ViTs are fed
  text:   sequences of whole words of the tokenizer's vocabulary drawn by Zipf's law over
          their token ids (vocabularies list common words first), with commas and a full
          stop, between its [CLS]/[SEP]-style special tokens when it adds them, of 8 to
          ``calib_seq_len`` tokens (``synthetic:uniform``: every word equally likely)

User data replaces them: ``--calib-images DIR`` (photos; random crops and flips when there
are fewer than ``calib_samples``) or ``--calib-text FILE`` (cut into sentences).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import onnx_ir as ir

from ..encoder_data import (
    IMAGE_MEAN,
    IMAGE_STD,
    image_input,
    load_photo,
    photo_paths,
    preprocess,
    sentences,
    text_feeds,
    text_inputs,
    tokenize,
)
from ..errors import InputError

SYNTHETIC = "synthetic"  # the default calibration spec of encoders
TEXT_LEN = 128  # longest calibration sentence of a text encoder, in tokens


def is_encoder(model: ir.Model) -> bool:
    return image_input(model) is not None or text_inputs(model) is not None


def default_spec(model: ir.Model, folder: Path) -> str | None:
    """``synthetic`` for an encoder that can make its own inputs: an image model with a
    square input, a text encoder with a tokenizer.json beside it; else None (data-free)."""
    image = image_input(model)
    if image is not None:
        return SYNTHETIC if image[2] == image[3] else None
    if text_inputs(model) is not None and (folder / "tokenizer.json").is_file():
        return SYNTHETIC
    return None


# --- images --------------------------------------------------------------------------------
def _normalise(rgb01: np.ndarray) -> np.ndarray:
    """[H, W, 3] in [0, 1] -> [3, H, W] ImageNet-normalised."""
    x = (rgb01 - np.array(IMAGE_MEAN, np.float32)) / np.array(IMAGE_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1).astype(np.float32))


def dead_leaves(size: int, rng: np.random.Generator, shapes: int = 300) -> np.ndarray:
    """[size, size, 3] in [0, 1]: random discs and rectangles painted over each other, radii
    with a 1/r^3 distribution (many small, few large), then a light blur and noise."""
    img = np.empty((size, size, 3), np.float32)
    img[:] = rng.random(3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    rmin, rmax = size / 100, size / 3
    for _ in range(shapes):
        u = rng.random()
        r = (rmin**-2 - u * (rmin**-2 - rmax**-2)) ** -0.5  # p(r) ~ r^-3 on [rmin, rmax]
        cy, cx = rng.random(2) * size
        color = rng.random(3).astype(np.float32)
        if rng.random() < 0.5:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        else:
            a = rng.uniform(0.3, 1.0)
            mask = (np.abs(yy - cy) <= r * a) & (np.abs(xx - cx) <= r / a)
        img[mask] = color
    img = _blur(img, rng.uniform(0.0, 1.5))
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return np.clip(img, 0, 1)


def pink_noise(size: int, rng: np.random.Generator) -> np.ndarray:
    """[size, size, 3] in [0, 1]: noise with amplitude ~ 1/f^alpha (alpha ~ 1, natural
    images), channels correlated as in photos."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    f = np.sqrt(fy**2 + fx**2)
    f[0, 0] = 1.0
    alpha = rng.uniform(0.8, 1.4)
    base = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(size, size))) / f**alpha, s=(size, size))
    chans = []
    for _ in range(3):
        own = np.fft.irfft2(np.fft.rfft2(rng.normal(size=(size, size))) / f**alpha, s=(size, size))
        chans.append(base + 0.5 * own)
    img = np.stack(chans, axis=2)
    img = (img - img.mean()) / (img.std() + 1e-9)
    img = img * rng.uniform(0.12, 0.25) + rng.uniform(0.3, 0.7, 3)
    return np.clip(img, 0, 1).astype(np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    if sigma < 0.3:
        return img
    r = int(np.ceil(2 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((r, r), (r, r), (0, 0)), mode="edge")
    out = sum(k[i] * pad[i : i + img.shape[0]] for i in range(2 * r + 1))
    return sum(k[i] * out[:, i : i + img.shape[1]] for i in range(2 * r + 1)).astype(np.float32)


IMAGE_KINDS = {"leaves": (dead_leaves,), "noise": (pink_noise,), "": (dead_leaves, pink_noise)}


def synthetic_images(count: int, size: int, seed: int = 0, kind: str = "") -> np.ndarray:
    """[count, 3, size, size]: dead leaves and 1/f noise alternately (``kind`` "leaves" or
    "noise": one of them only, ``synthetic:leaves`` / ``synthetic:noise``)."""
    if kind not in IMAGE_KINDS:
        raise InputError(f"synthetic:{kind}: choose synthetic, synthetic:leaves, synthetic:noise")
    rng = np.random.default_rng(seed)
    make = IMAGE_KINDS[kind]
    return np.stack([_normalise(make[i % len(make)](size, rng)) for i in range(count)])


def photo_images(spec: str, count: int, size: int, seed: int = 0) -> np.ndarray:
    """[count, 3, size, size] from the photos of ``spec``: each photo whole first, then
    random crops (half to all of the shorter side) with random horizontal flips."""
    photos = [load_photo(p) for p in photo_paths(spec)]
    rng = np.random.default_rng(seed)
    out = [preprocess(p, size) for p in photos[:count]]
    while len(out) < count:
        p = photos[len(out) % len(photos)]
        h, w = p.shape[:2]
        side = int(min(h, w) * rng.uniform(0.5, 1.0))
        y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        crop = p[y : y + side, x : x + side]
        out.append(
            preprocess(np.ascontiguousarray(crop[:, ::-1] if rng.random() < 0.5 else crop), size)
        )
    return np.stack(out)


# --- text ----------------------------------------------------------------------------------
_WORD = re.compile(r"^[a-z]{2,}$")
TEXT_KINDS = ("zipf", "uniform")
COMMA_RATE = 0.06  # commas per word in the zipf texts (about English prose's rate)


def vocabulary_words(folder: Path) -> list[str]:
    """The tokenizer's whole words (lower-case alphabetic entries, no sub-word pieces) in
    token-id order."""
    from tokenizers import Tokenizer

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"{folder}: no tokenizer.json to draw calibration words from")
    vocab = Tokenizer.from_file(str(path)).get_vocab()
    words = sorted((i, w) for w, i in vocab.items() if _WORD.match(w))
    if len(words) < 100:
        raise InputError(f"{path}: too few whole words in the vocabulary for calibration")
    return [w for _, w in words]


def ids_follow_frequency(words: list[str]) -> bool:
    """Whether token ids look frequency-ordered (WordPiece and BPE vocabularies list common
    words first, SentencePiece by score) rather than alphabetical: then a word's id rank
    stands in for its frequency rank."""
    pairs = sum(a < b for a, b in zip(words, words[1:]))
    return pairs < 0.9 * (len(words) - 1)


def random_word_texts(
    folder: Path, count: int, max_words: int, seed: int = 0, kind: str = "zipf"
) -> list[str]:
    """``count`` texts of 6..``max_words`` whole words of the tokenizer's vocabulary.

    ``zipf`` (the default): the word of id rank r (1: the lowest id) drawn with probability
    proportional to 1 / r, Zipf's law of natural text, with commas and a closing full stop,
    so that "the", "of", "and" are as common as in prose (on all-MiniLM-L6-v2 closer to real
    text than uniform draws: docs/ACCURACY.md); uniform draws where ids are alphabetical.
    ``uniform``: every whole word equally likely, no punctuation."""
    if kind not in TEXT_KINDS:
        known = "|".join(TEXT_KINDS)
        raise InputError(f"synthetic:{kind}: unknown synthetic text (synthetic:{known})")
    words = vocabulary_words(folder)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(6, max(7, max_words + 1), size=count)
    if kind == "uniform" or not ids_follow_frequency(words):
        alphabetical = sorted(words)  # the order the uniform draw has always used
        return [" ".join(rng.choice(alphabetical, size=n)) for n in lengths]
    p = 1.0 / np.arange(1, len(words) + 1)
    p /= p.sum()
    texts = []
    for n in lengths:
        drawn = rng.choice(words, size=n, p=p)
        commas = rng.random(n - 1) < COMMA_RATE
        text = "".join(w + ("," if c else "") + " " for w, c in zip(drawn[:-1], commas))
        texts.append(text + drawn[-1] + ".")
    return texts


# --- feeds ---------------------------------------------------------------------------------
ENCODER_SAMPLES = 32  # inputs per calibration run (64 images measured no better: ACCURACY.md)


def encoder_feeds(model: ir.Model, folder: Path, spec: str, config) -> list[dict]:
    """Calibration batches of an encoder from ``spec`` (``synthetic``, photos or text)."""
    samples = config.calib_samples or ENCODER_SAMPLES
    batch, seed = config.batch_windows(), config.seed
    image = image_input(model)
    if image is not None:
        name, c, h, w = image
        if h != w:
            raise InputError(f"image input {name}: {h}x{w}; calibration needs a square input")
        if spec.split(":")[0] == SYNTHETIC:
            x = synthetic_images(samples, h, seed, spec.partition(":")[2])
        else:
            x = photo_images(spec, samples, h, seed)
        if c == 1:
            x = x.mean(axis=1, keepdims=True)
        return [{name: x[i : i + batch]} for i in range(0, samples, batch)]
    names = text_inputs(model)
    if names is None:
        raise InputError("calibration of this model needs feeds (not an image or text encoder)")
    seq = min(config.calib_seq_len or TEXT_LEN, TEXT_LEN)
    if spec.split(":")[0] == SYNTHETIC:
        kind = spec.partition(":")[2] or TEXT_KINDS[0]
        texts = random_word_texts(folder, samples, seq - 2, seed, kind)
    else:
        texts = sentences(spec, samples, max_words=seq)
    ids, mask = tokenize(folder, texts, seq)
    order = np.argsort(mask.sum(axis=1), kind="stable")  # batches of like lengths: little padding
    ids, mask = ids[order], mask[order]
    out = []
    for i in range(0, len(ids), batch):
        n = int(mask[i : i + batch].sum(axis=1).max())
        out.append(text_feeds(names, ids[i : i + batch, :n], mask[i : i + batch, :n]))
    return out


TEXT_ENCODER_SAMPLES = 512  # text encoders' calibration inputs when the user gives no count
TEXT_ENCODER_EPOCHS = 2  # ... and passes of end-to-end tuning over them
# Error propagation for encoders (config.propagation): each matrix fitted half the way to the
# float layer's output on the quantized model's inputs: on all-MiniLM-L6-v2 1 - cosine 10%
# lower on both calibration seeds measured, on ViT-S 1 - Pearson 29% lower over three seeds
# (0.75 and 1 no better; docs/ACCURACY.md). Decoders keep it off.
ENCODER_PROPAGATION = 0.5
# A text encoder's bit plan (:mod:`.encoder_plan`) by default, at this many bits per matrix
# weight above --bits: the uniform recipe's own size (3.295 for 3 bits), spent by measured
# sensitivity (4 bits for some matrices, groups of 128 for others). On all-MiniLM-L6-v2
# 1 - cosine 17-21% lower than the uniform recipe on both seeds measured; on ViT-S no better
# over three seeds, so image encoders stay uniform (docs/ACCURACY.md).
TEXT_ENCODER_MARGIN_BITS = 0.3


def encoder_defaults(model: ir.Model, config):
    """``config`` with the encoder recipe's defaults where the user left them unset: GPTQ
    3-bit, groups of 32 with hierarchical scales, one recipe for every matrix of an image
    encoder and a bit plan of the same size for a text encoder (TEXT_ENCODER_MARGIN_BITS,
    :mod:`.encoder_plan`). A text encoder
    calibrates on TEXT_ENCODER_SAMPLES inputs and tunes TEXT_ENCODER_EPOCHS passes against the
    float model's outputs (on all-MiniLM-L6-v2 1 - cosine 20% lower than 32 inputs without
    tuning, 224 s against 24-49 s on 2 cores; docs/ACCURACY.md); an image encoder takes
    ENCODER_SAMPLES and no tuning (on ViT-S, tuning on synthetic images halved their error and
    left photos unchanged, or broke them at the text encoders' learning rate). Both propagate
    the earlier layers' error (ENCODER_PROPAGATION) unless calibrated layer by layer on float
    inputs (--no-sequential)."""
    import dataclasses

    if not config.calib or not is_encoder(model):
        return config
    text = image_input(model) is None and text_inputs(model) is not None
    fields = {}
    if config.budget_bpw is None and config.budget_mb is None:
        if text and not config.uniform:
            fields["budget_bpw"] = config.bits + TEXT_ENCODER_MARGIN_BITS
        else:
            fields["uniform"] = True
    if config.e2e_epochs is None:
        fields["e2e_epochs"] = TEXT_ENCODER_EPOCHS if text else 0
    if text and config.calib_samples is None:
        fields["calib_samples"] = TEXT_ENCODER_SAMPLES
    if config.e2e_span is None:  # blocks of 128 input channels: no gain on MiniLM
        fields["e2e_span"] = 0
    if config.propagation is None and config.sequential:
        fields["propagation"] = ENCODER_PROPAGATION
    return dataclasses.replace(config, **fields)
