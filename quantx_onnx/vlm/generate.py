"""Generation with a VLM folder: the image's features (vision_encoder.onnx) replace the image
tokens' embeddings (embed_tokens.onnx) in the prompt, then the decoder runs with its KV cache,
each new token embedded on the way. :func:`quantx_onnx.generate.generate` dispatches here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from ..errors import InputError
from ..llm import DecoderSession
from ..runtime import session_options
from ..tokenizer import Tokenizer
from . import anyres, graph_paths, image_token_id, is_vlm_folder, read_config
from .image import pixel_values, processor_config


def _session(path: Path, threads: int | None) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(
            str(path), session_options(threads=threads), providers=["CPUExecutionProvider"]
        )
    except Exception as e:
        raise InputError(f"{path}: ONNX Runtime cannot load it ({e})") from e


class VlmSession:
    """The three graphs of a VLM folder (fp32 or QuantX), with the decoder's KV cache.

    ``step(ids, cache, pos)`` embeds ``ids`` and runs the decoder, as DecoderSession.step does
    for a text export; image features set by ``with_images`` replace the image tokens'
    embeddings in the next step (the prefill)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        self.folder = Path(folder)
        paths = graph_paths(self.folder)
        self.vision = _session(paths["vision"], threads)
        self.embed = _session(paths["embed"], threads)
        self.decoder = DecoderSession(paths["text"], threads=threads)
        self.image_token = image_token_id(self.folder)
        self.config = read_config(self.folder)
        self.pending: list[np.ndarray] | None = None

    # the graphs, one at a time
    def image_features(self, pixels: np.ndarray) -> np.ndarray:
        """[images (LLaVA-NeXT: crops), tokens, hidden] for pixel values [n, 3, H, W]."""
        return self.vision.run(None, {"pixel_values": np.asarray(pixels, np.float32)})[0]

    @property
    def anyres(self) -> bool:
        return self.config.get("model_type") == "llava_next"

    def pixels(self, image) -> tuple[np.ndarray, tuple[int, int] | None]:
        """The vision encoder's input for one image, [1, 3, H, W] (LLaVA-NeXT: [crops, 3, H,
        W] and the image's (height, width), which packing its features needs)."""
        if self.anyres:
            return anyres.crops(image, processor_config(self.folder))
        return pixel_values(image, self.folder), None

    def encode(self, images: list) -> list[np.ndarray]:
        """Each image's features [tokens, hidden], in the order its image tokens take them
        (LLaVA-NeXT: its crops' features packed, anyres.pack)."""
        out = []
        for image in images:
            pixels, size = self.pixels(image)
            if self.anyres:
                feats, newline = self.vision.run(None, {"pixel_values": pixels})
                out.append(anyres.pack(feats, size, newline, self.config))
            else:
                out.append(self.image_features(pixels)[0])
        return out

    def token_embeds(self, ids: np.ndarray) -> np.ndarray:
        return self.embed.run(None, {"input_ids": np.asarray(ids, np.int64)})[0]

    def splice(self, ids: np.ndarray, embeds: np.ndarray, features) -> np.ndarray:
        """``embeds`` with the image tokens' rows replaced by the image features (an array or
        a list of per-image [tokens, hidden]), in order (as transformers' masked_scatter
        does)."""
        mask = np.asarray(ids) == self.image_token
        rows = np.concatenate([np.reshape(f, (-1, embeds.shape[-1])) for f in features])
        if int(mask.sum()) != len(rows):
            raise InputError(
                f"the prompt holds {int(mask.sum())} image tokens for {len(rows)} image "
                "features (one <image> per image)"
            )
        out = embeds.copy()
        out[mask] = rows
        return out

    # DecoderSession's interface for generate_ids
    def empty_cache(self, batch: int = 1):
        return self.decoder.empty_cache(batch)

    def with_images(self, features: list[np.ndarray] | None) -> VlmSession:
        self.pending = features
        return self

    def step(self, ids: np.ndarray, past, past_len: int, last_only: bool = False):
        embeds = self.token_embeds(ids)
        if self.pending is not None:
            embeds = self.splice(ids, embeds, self.pending)
            self.pending = None
        return self.decoder.step_embeds(embeds, past, past_len, last_only)


def _as_list(images) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def prepare(folder, prompt: str, images, chat: bool, threads, session=None):
    """(session, prompt ids, tokenizer) for generating from ``prompt`` and ``images`` (one or a
    list: paths, PIL images or arrays) with the VLM folder. Each ``<image>`` in the prompt
    takes one image; a prompt without any gets them all in front, one line each."""
    folder = Path(folder)
    images = _as_list(images)
    if not is_vlm_folder(folder):
        raise InputError(
            f"{folder}: not a vision-language export (no vision_encoder.onnx); an image needs "
            "one (python -m quantx_onnx export of a LLaVA model)"
        )
    session = session if isinstance(session, VlmSession) else VlmSession(folder, threads)
    tok = Tokenizer(folder)
    marker = tok.decode([session.image_token], skip_special=False)
    placed = marker in prompt
    if chat and tok.takes_parts:  # a processor's template places the images itself
        text = tok.chat_prompt(prompt, images=0 if placed else len(images))
    else:
        if images and not placed:
            prompt = f"{marker}\n" * len(images) + prompt
        text = tok.chat_prompt(prompt) if chat else prompt
    ids = tok.encode(text)
    if ids.count(session.image_token) != len(images):
        raise InputError(
            f"the prompt has {ids.count(session.image_token)} {marker} for {len(images)} images"
        )
    features = None
    if images:
        features = session.encode(images)
        sizes = iter(len(f) for f in features)
        expanded: list[int] = []
        for t in ids:
            expanded += [t] * next(sizes) if t == session.image_token else [t]
        ids = expanded
    return session.with_images(features), ids, tok
