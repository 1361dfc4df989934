"""Vision-language models (LLaVA): a folder of three ONNX graphs instead of one.

- ``vision_encoder.onnx``: ``pixel_values`` [images, 3, H, W] -> ``image_features``
  [images, tokens, hidden] (the CLIP tower's selected layer through the projector; for
  LLaVA-NeXT the images are an image's crops, and a second output ``image_newline`` is the
  row separator :mod:`.anyres` packs them with);
- ``embed_tokens.onnx``: ``input_ids`` -> ``inputs_embeds`` (the text model's table);
- ``decoder_model_merged.onnx``: optimum's decoder with a KV cache, fed ``inputs_embeds``
  instead of ``input_ids`` (inputs_embeds, attention_mask, position_ids,
  past_key_values.N.key/value -> logits, present.N.key/value);

plus config.json, the tokenizer and the processor files (preprocessor_config.json). Exported by
:mod:`.export`, quantized per component by :mod:`.optimize`, run by :mod:`.generate`.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError

VISION = "vision_encoder.onnx"
EMBED = "embed_tokens.onnx"
DECODER = "decoder_model_merged.onnx"
GRAPHS = {"vision": VISION, "embed": EMBED, "text": DECODER}  # component -> file
SUPPORTED = ("llava", "llava_next")  # config.json model_type values the exporter handles


def is_vlm_folder(path: str | Path) -> bool:
    """Whether ``path`` is a VLM export folder (it holds a vision encoder graph)."""
    p = Path(path)
    return p.is_dir() and (p / VISION).is_file()


def graph_paths(folder: str | Path) -> dict[str, Path]:
    """component -> graph file of a VLM folder; InputError naming the first missing file."""
    folder = Path(folder)
    paths = {c: folder / name for c, name in GRAPHS.items()}
    for path in paths.values():
        if not path.is_file():
            raise InputError(
                f"{path}: missing; a VLM export folder holds {', '.join(GRAPHS.values())} "
                "(python -m quantx_onnx export)"
            )
    return paths


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read the model config ({e})") from e


def image_token_id(folder: str | Path) -> int:
    cfg = read_config(folder)
    value = cfg.get("image_token_index", cfg.get("image_token_id"))
    if not isinstance(value, int):
        raise InputError(f"{Path(folder) / 'config.json'}: no image_token_index")
    return value
