"""``optimize`` of a VLM folder: every graph quantized with its component's recipe, the folder's
other files copied, written atomically as one folder; a report per component.

Components: ``vision`` (vision_encoder.onnx, default 4 bits: a small share of the weights and
the image's only path into the model; its position-embedding table stays float), ``text``
(decoder_model_merged.onnx, default the run's ``--bits``) and ``embed`` (embed_tokens.onnx,
default the text component's bits; its table gets the embedding recipe as a decoder's would).
``--component vision=4,text=3`` changes them; ``float`` keeps a component unquantized.

Calibration (``--calib-text``, ``--calib-images``): images feed the vision encoder; text
windows, embedded by the float embedding graph and each preceded by one calibration image's
features when there are images, feed the decoder. Without either the run is data-free.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np

from .. import model_io
from ..calibration.feeds import batches, decoder_feeds, token_windows
from ..calibration.selfgen import SELF
from ..config import QuantConfig
from ..encoder_data import photo_paths
from ..errors import InputError, OutputError
from ..format import SUPPORTED_BITS
from ..pipeline import OptimizeReport, _decoder_past_shapes, optimize, write_report
from . import DECODER, GRAPHS, graph_paths
from .generate import VlmSession

DEFAULT_BITS = {"vision": 4}  # others: text = --bits, embed = text's
FLOAT = "float"


def parse_components(specs) -> dict[str, int | None]:
    """``["vision=4,text=3", ...]`` -> {component: bits, or None for float}."""
    out: dict[str, int | None] = {}
    for spec in specs:
        for item in filter(None, (s.strip() for s in spec.split(","))):
            name, sep, value = item.partition("=")
            name, value = name.strip(), value.strip()
            if not sep or name not in GRAPHS:
                raise InputError(
                    f"--component {item!r}: expected NAME=BITS with NAME one of "
                    f"{', '.join(GRAPHS)} (e.g. vision=4,text=3)"
                )
            if value == FLOAT:
                out[name] = None
                continue
            if not value.isdigit() or int(value) not in SUPPORTED_BITS:
                raise InputError(
                    f"--component {item!r}: bits must be one of "
                    f"{', '.join(map(str, SUPPORTED_BITS))} or {FLOAT}"
                )
            out[name] = int(value)
    return out


def component_bits(config: QuantConfig) -> dict[str, int | None]:
    """Each component's bits (None: left in float), defaults filled in."""
    given = parse_components(config.components)
    text = given.get("text", config.bits)
    defaults = {"vision": DEFAULT_BITS["vision"], "text": config.bits, "embed": text}
    return {c: given.get(c, defaults[c]) for c in GRAPHS}


@dataclasses.dataclass
class VlmReport:
    input: str
    output: str
    seconds: float
    components: dict[str, OptimizeReport]  # component -> its graph's report
    kept_float: list[str]
    copied: list[str]

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.components.values())

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.components.values())

    def to_json(self) -> dict:
        return {
            "input": self.input,
            "output": self.output,
            "seconds": self.seconds,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "kept_float": self.kept_float,
            "copied": self.copied,
            "components": {c: r.to_json() for c, r in self.components.items()},
        }


def _calibration(folder: Path, paths: dict[str, Path], config: QuantConfig) -> dict[str, list]:
    """component -> calibration feeds (the float graphs make the decoder's embeddings; with
    LLaVA-NeXT's varying image lengths, each image's features cut to the shortest's)."""
    feeds: dict[str, list] = {}
    session = VlmSession(folder)
    features = None
    if config.calib_images:
        files = photo_paths(config.calib_images)[: config.samples_for(config.calib)]
        pixels = np.concatenate([session.pixels(f)[0] for f in files])
        feeds["vision"] = [{"pixel_values": b} for b in batches(pixels, config.batch_windows())]
        features = session.encode(files)
        shortest = min(len(f) for f in features)  # (LLaVA-NeXT: lengths vary with the image)
        features = np.stack([f[:shortest] for f in features])
    if config.calib:
        if SELF in config.calib.split("+"):
            raise InputError(
                f"{folder}: --calib-text {config.calib}: a VLM folder does not write its own "
                "calibration text; give a text file or gensim:wiki-calib"
            )
        windows = token_windows(
            config.calib,
            folder,
            config.samples_for(config.calib),
            config.seq_len_for(config.calib),
            config.seed,
        )
        embeds = session.token_embeds(windows)
        if features is not None:  # each window after one image, as a prompt would be
            rows = features[np.arange(len(embeds)) % len(features)]
            embeds = np.concatenate([rows, embeds], axis=1)
        decoder = model_io.load_model(model_io.resolve_input(paths["text"]))
        names = [v.name for v in decoder.graph.inputs]
        past = _decoder_past_shapes(decoder)
        text = []
        for b in batches(embeds, config.batch_windows(embeds.shape[1])):  # image + text
            f = decoder_feeds(names, past, np.zeros(b.shape[:2], np.int64))
            del f["input_ids"]
            text.append({"inputs_embeds": b, **f})
        feeds["text"] = text
    return feeds


def _component_config(config: QuantConfig, component: str, bits: int, calibrated: bool):
    fields = {"bits": bits, "components": (), "calib_images": None, "report": None}
    if not calibrated:
        fields.update(calib=None, data_free=True)
    elif component == "vision":  # no logits: no sensitivity-driven plan, no KL tuning
        fields.update(uniform=True, e2e_epochs=0)
    if component == "vision":  # its only table holds position embeddings: small, read by all
        fields["embeddings"] = False
    return dataclasses.replace(config, **fields)


def optimize_vlm(folder, output, config: QuantConfig, progress=None) -> VlmReport:
    """Quantize every graph of the VLM folder ``folder`` into the folder ``output`` (default
    ``<folder>-quantx``), each with its component's bits (see the module docstring)."""
    start = time.perf_counter()
    folder = Path(folder)
    paths = graph_paths(folder)
    bits = component_bits(config)
    source = model_io.ModelSource(paths["text"], folder)
    out = Path(output) if output is not None else model_io.default_output(source)
    if out.resolve() == folder.resolve() or folder.resolve() in out.resolve().parents:
        raise OutputError(f"{out}: choose an output folder outside the input folder")
    feeds = _calibration(folder, paths, config) if config.calib or config.calib_images else {}
    reports: dict[str, OptimizeReport] = {}
    kept = []
    with model_io.staged_output(out / DECODER) as stage:
        for component, path in paths.items():
            if bits[component] is None:
                shutil.copy2(path, stage / path.name)
                kept.append(component)
                continue
            given = feeds.get(component)
            cfg = _component_config(config, component, bits[component], given is not None)
            bar = None
            if progress is not None:
                bar = lambda items, desc, c=component: progress(items, f"{c}: {desc}")  # noqa: E731
            try:
                reports[component] = optimize(
                    path, stage / path.name, cfg, progress=bar, calib_feeds=given
                )
            except InputError as e:
                msg = str(e) if str(path) in str(e) else f"{path}: {e}"
                raise InputError(msg) from e
        copied = model_io.copy_companions(source, stage)
    for r in reports.values():
        r.output = str(out / Path(r.output).name)
    report = VlmReport(
        input=str(folder),
        output=str(out),
        seconds=time.perf_counter() - start,
        components=reports,
        kept_float=kept,
        copied=copied,
    )
    write_report(config.report, report)
    return report
