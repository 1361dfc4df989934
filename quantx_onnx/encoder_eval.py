"""Accuracy of quantized encoders against their float model, on real inputs.

Vision models (one image input): every output of every photo, pooled, Pearson-correlated with
the float model's. Text encoders (input_ids, attention_mask, ...): sentence embeddings (mean
of the last hidden state over the sentence's tokens, L2-normalised, as sentence-transformers'
all-MiniLM pools), the mean cosine to the float embedding, and nearest-neighbour agreement: the
share of sentences whose nearest other sentence (cosine) is the same as with the float model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import model_io
from .encoder_data import image_input, photo_batch, sentences, text_feeds, text_inputs, tokenize
from .errors import InputError

DEFAULT_PHOTOS = "skimage:eval"
DEFAULT_SENTENCES = "gensim:lee"
DEFAULT_SENTENCE_COUNT = 300


def _session(path, threads):
    from .session import InferenceSession

    return InferenceSession(str(path), threads=threads)


def vision_outputs(model, images: np.ndarray, threads=None, batch: int = 4) -> np.ndarray:
    sess = _session(model, threads)
    name = sess.get_inputs()[0].name
    outs = [sess.run(None, {name: images[i : i + batch]})[0] for i in range(0, len(images), batch)]
    return np.concatenate(outs).astype(np.float64)


def sentence_embeddings(model, ids, mask, threads=None, batch: int = 32) -> np.ndarray:
    sess = _session(model, threads)
    names = [i.name for i in sess.get_inputs()]
    order = np.argsort(mask.sum(axis=1))  # batches of similar lengths: little padding
    parts = {}
    for s in range(0, len(ids), batch):
        rows = order[s : s + batch]
        n = int(mask[rows].sum(axis=1).max())
        m = mask[rows, :n]
        hidden = sess.run(None, text_feeds(names, ids[rows, :n], m))[0].astype(np.float64)
        pooled = (hidden * m[:, :, None]).sum(axis=1) / m.sum(axis=1, keepdims=True)
        for r, v in zip(rows, pooled):
            parts[int(r)] = v
    out = np.stack([parts[i] for i in range(len(ids))])
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def nearest_neighbours(e: np.ndarray) -> np.ndarray:
    sim = e @ e.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def text_metrics(ref: np.ndarray, emb: np.ndarray) -> dict:
    cos = np.sum(ref * emb, axis=1)
    agree = nearest_neighbours(ref) == nearest_neighbours(emb)
    return {
        "mean_cosine": float(cos.mean()),
        "min_cosine": float(cos.min()),
        "nn_agreement": float(agree.mean()),
        "sentences": len(ref),
    }


def model_kind(model) -> str:
    ir_model = model_io.load_model(model_io.resolve_input(model))
    if image_input(ir_model) is not None:
        return "vision"
    if text_inputs(ir_model) is not None:
        return "text"
    raise InputError(f"{model}: neither an image model nor a text encoder")


class Reference:
    """The float model's outputs on the evaluation inputs, computed once, compared with each
    candidate by :meth:`compare`."""

    def __init__(
        self,
        model,
        photos: str = DEFAULT_PHOTOS,
        text: str = DEFAULT_SENTENCES,
        count: int = DEFAULT_SENTENCE_COUNT,
        threads: int | None = None,
    ):
        self.threads = threads
        source = model_io.resolve_input(model)
        ir_model = model_io.load_model(source)
        image = image_input(ir_model)
        if image is not None:
            self.kind = "vision"
            _, c, h, w = image
            if h != w:
                raise InputError(f"{model}: non-square image input {h}x{w}")
            self.images = photo_batch(photos, h, c)
            self.ref = vision_outputs(source.model_path, self.images, threads)
            self.inputs = f"{len(self.images)} photos ({photos})"
        elif text_inputs(ir_model) is not None:
            self.kind = "text"
            folder = source.folder or source.model_path.parent
            self.ids, self.mask = tokenize(folder, sentences(text, count))
            self.ref = sentence_embeddings(source.model_path, self.ids, self.mask, threads)
            self.inputs = f"{len(self.ids)} sentences ({text})"
        else:
            raise InputError(f"{model}: neither an image model nor a text encoder")

    def compare(self, model) -> dict:
        if self.kind == "vision":
            out = vision_outputs(model, self.images, self.threads)
            return {"pearson": pearson(self.ref, out), "photos": len(self.images)}
        emb = sentence_embeddings(model, self.ids, self.mask, self.threads)
        return text_metrics(self.ref, emb)


def compare(reference: str | Path, models: list, **kw) -> list[dict]:
    ref = Reference(reference, **kw)
    return [{"model": str(m), **ref.compare(m)} for m in models]
