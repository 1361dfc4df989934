"""Export of a transformers LLaVA model (``LlavaForConditionalGeneration``,
``LlavaNextForConditionalGeneration``) to the three graphs of a VLM folder (see
:mod:`quantx_onnx.vlm`).

optimum exports neither, so the graphs are made here: the vision tower + projector and
the token embedding with ``torch.onnx.export``; the text decoder with optimum's exporter for
the text model's architecture (its KV-cache handling and input/output names), on a
configuration whose first input is ``inputs_embeds`` instead of ``input_ids``. The export ends
with one check of the whole chain (image features spliced into the embeddings, a prefill and a
KV-cache step) against the transformers model's logits.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..model_io import staged_output
from . import DECODER, EMBED, SUPPORTED, VISION

STEPS = ("loading the model", "exporting the vision encoder", "exporting the decoder", "checking")
OPSET = 17
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack")


@dataclasses.dataclass
class GraphCheck:
    """Largest absolute differences of the exported graphs from the transformers model."""

    vision: float
    embed: float
    logits: float
    max_abs_logit: float
    tokens: int

    @property
    def max_abs_diff(self) -> float:
        return max(self.vision, self.embed, self.logits)

    def summary(self) -> str:
        return (
            f"image features match transformers to {self.vision:.2g}, embeddings to "
            f"{self.embed:.2g}, logits to {self.logits:.2g} (largest logit "
            f"{self.max_abs_logit:.3g}; {self.tokens} tokens with an image, prefill + a "
            "KV-cache step)"
        )


def model_type(src: Path) -> str | None:
    """config.json's model_type of a Hugging Face folder (None if unreadable)."""
    from . import read_config

    try:
        return read_config(src).get("model_type")
    except InputError:
        return None


def is_vlm_source(src: Path) -> bool:
    """A Hugging Face folder of a vision-language model (supported or not)."""
    kind = model_type(src) if src.is_dir() else None
    return bool(kind) and (kind in SUPPORTED or kind.startswith("llava"))


def _vision_module(llava):
    """pixel_values -> projected image features [images, tokens, hidden], as
    LlavaModel.get_image_features computes them (which returns a per-image list; traced, that
    would fix the number of images)."""
    import torch

    cfg = llava.config
    layers = cfg.vision_feature_layer
    layers = [layers] if isinstance(layers, int) else list(layers)
    if cfg.vision_feature_select_strategy not in ("default", "full"):
        raise InputError(f"vision_feature_select_strategy {cfg.vision_feature_select_strategy!r}")
    first = 1 if cfg.vision_feature_select_strategy == "default" else 0  # drop CLS

    class Vision(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tower = llava.model.vision_tower
            self.projector = llava.model.multi_modal_projector
            self.newline = getattr(llava.model, "image_newline", None)  # LLaVA-NeXT

        def forward(self, pixel_values):
            hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states
            selected = torch.cat([hidden[i][:, first:] for i in layers], dim=-1)
            if self.newline is None:
                return self.projector(selected)
            return self.projector(selected), self.newline * 1.0

    return Vision().eval()


def _embed_module(llava):
    import torch

    class Embed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = llava.get_input_embeddings()

        def forward(self, input_ids):
            return self.table(input_ids)

    return Embed().eval()


def _export_module(module, args, path: Path, inputs, outputs, axes) -> None:
    import torch

    with torch.no_grad():
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
            dynamo=False,
        )
    _name_outputs(path, outputs)


def _name_outputs(path: Path, names: list[str]) -> None:
    """Give the graph outputs their names where the exporter could not (an output that is a
    constant, like LLaVA-NeXT's image_newline, keeps its initializer's name)."""
    import onnx

    model = onnx.load(str(path))
    renamed = False
    for output, name in zip(model.graph.output, names):
        if output.name != name:
            model.graph.node.append(onnx.helper.make_node("Identity", [output.name], [name]))
            output.name = name
            renamed = True
    if renamed:
        onnx.save(model, str(path))


def _text_model(llava):
    """The text decoder as a causal LM sharing the LLaVA model's modules (built on the meta
    device first: no second copy of the weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        text = AutoModelForCausalLM.from_config(llava.config.text_config)
    text.model = llava.model.language_model
    text.lm_head = llava.lm_head
    return text.eval()


def _embeds_onnx_config(text):
    """optimum's decoder configuration for ``text``'s architecture, fed inputs_embeds."""
    from optimum.exporters.tasks import TasksManager

    try:
        ctor = TasksManager.get_exporter_config_constructor(
            "onnx", model=text, task="text-generation-with-past", library_name="transformers"
        )
    except Exception as e:
        raise InputError(f"optimum cannot export the text model ({e})") from e
    base = getattr(ctor, "func", ctor)  # a functools.partial of the config class

    class EmbedsConfig(base):
        embeds = True  # False while optimum makes its dummy inputs (it reads input_ids)

        @property
        def inputs(self):
            common = super().inputs
            if not self.embeds:
                return common
            return {("inputs_embeds" if k == "input_ids" else k): v for k, v in common.items()}

        def generate_dummy_inputs(self, framework="pt", **kwargs):
            import torch

            self.embeds = False
            try:
                dummy = super().generate_dummy_inputs(framework, **kwargs)
            finally:
                self.embeds = True
            batch, seq = dummy.pop("input_ids").shape
            hidden = text.config.hidden_size
            return {"inputs_embeds": torch.rand(batch, seq, hidden) * 2 - 1, **dummy}

    # the single-graph layout of optimum's text-generation-with-past (past in inputs too)
    kwargs = {**getattr(ctor, "keywords", {}), "use_past": True, "use_past_in_inputs": True}
    return EmbedsConfig(text.config, **kwargs)


def _export_decoder(llava, path: Path) -> None:
    from optimum.exporters.onnx.convert import export as optimum_export

    text = _text_model(llava)
    config = _embeds_onnx_config(text)
    optimum_export(text, config, path)


def _copy_companions(src: Path, stage: Path) -> list[str]:
    """config, tokenizer and processor files of the source folder (not its weights)."""
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix not in WEIGHT_SUFFIXES and not f.name.endswith(".index.json"):
            shutil.copy2(f, stage / f.name)
            copied.append(f.name)
    return copied


def _check(llava, folder: Path, tokens: int = 24, seed: int = 0) -> GraphCheck:
    """The exported graphs against the transformers model on a random image and tokens
    holding the image's tokens: features, embeddings and logits (prefill + one KV step)."""
    import torch

    from .generate import VlmSession

    cfg = llava.config
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (40, 52, 3), dtype=np.uint8)
    session = VlmSession(folder, threads=None)
    pixels, size = session.pixels(image)
    inputs = {"pixel_values": torch.from_numpy(pixels)}
    if size is not None:
        inputs["image_sizes"] = torch.tensor([size])
    with torch.no_grad():
        feats = llava.model.get_image_features(**inputs)[0].numpy()
    text_ids = rng.integers(0, cfg.text_config.vocab_size, tokens, dtype=np.int64)
    text_ids[text_ids == cfg.image_token_index] = 0
    ids = np.concatenate([text_ids[:2], np.full(len(feats), cfg.image_token_index), text_ids[2:]])
    ids = ids[None, :]
    with torch.no_grad():
        want = llava(input_ids=torch.from_numpy(ids), **inputs).logits.numpy()
        table = llava.get_input_embeddings()(torch.from_numpy(ids)).numpy()
    got_feats = session.encode([image])[0]
    got_table = session.token_embeds(ids)
    embeds = session.splice(ids, got_table, [got_feats])
    split = ids.shape[1] - 4
    first, cache = session.decoder.step_embeds(embeds[:, :split], session.decoder.empty_cache(), 0)
    rest, _ = session.decoder.step_embeds(embeds[:, split:], cache, split)
    got = np.concatenate([first, rest], axis=1)
    return GraphCheck(
        vision=float(np.abs(got_feats - feats).max()),
        embed=float(np.abs(got_table - table).max()),
        logits=float(np.abs(got - want).max()),
        max_abs_logit=float(np.abs(want).max()),
        tokens=ids.shape[1],
    )


def export_vlm(src: Path, out: Path, quiet: bool = True, next_step=None):
    """Export the LLaVA folder ``src`` to the VLM folder ``out`` (written atomically)."""
    from ..export import Exported, _quiet

    kind = model_type(src)
    if kind not in SUPPORTED:
        raise InputError(
            f"{src / 'config.json'}: model_type {kind!r} is not supported for export yet "
            f"(vision-language models: {', '.join(SUPPORTED)})"
        )
    from .image import PROCESSOR

    if not (src / PROCESSOR).is_file():
        raise InputError(f"{src / PROCESSOR}: missing (save the model's processor with it)")
    import torch
    from transformers import AutoModelForImageTextToText

    next_step = next_step or (lambda: None)
    next_step()
    with _quiet(quiet):
        try:
            llava = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32).eval()
        except Exception as e:
            raise InputError(f"{src}: transformers cannot load this {kind} model ({e})") from e
    size = llava.config.vision_config.image_size
    vision_outputs = ["image_features"]
    if getattr(llava.model, "image_newline", None) is not None:
        vision_outputs.append("image_newline")
    with tempfile.TemporaryDirectory(prefix="quantx-export-") as tmp:
        tmp = Path(tmp)
        next_step()
        with _quiet(quiet):
            pixels = torch.zeros(1, 3, size, size)
            _export_module(
                _vision_module(llava),
                (pixels,),
                tmp / VISION,
                ["pixel_values"],
                vision_outputs,
                {"pixel_values": {0: "images"}, "image_features": {0: "images"}},
            )
            _export_module(
                _embed_module(llava),
                (torch.zeros(1, 4, dtype=torch.long),),
                tmp / EMBED,
                ["input_ids"],
                ["inputs_embeds"],
                {
                    "input_ids": {0: "batch_size", 1: "sequence_length"},
                    "inputs_embeds": {0: "batch_size", 1: "sequence_length"},
                },
            )
        next_step()
        with _quiet(quiet):
            try:
                _export_decoder(llava, tmp / DECODER)
            except InputError:
                raise
            except Exception as e:
                raise InputError(f"{src}: the text decoder could not be exported ({e})") from e
        _copy_companions(src, tmp)
        next_step()
        with _quiet(quiet):
            check = _check(llava, tmp)
        target = out / DECODER
        with staged_output(target) as stage:
            for f in tmp.iterdir():
                shutil.copy2(f, stage / f.name)
    return Exported(target, check)
