"""onnxruntime-genai as a target: what a decoder export folder needs so that
``onnxruntime_genai.Model(folder)`` runs it.

- ``genai_config.json``: the decoder's input/output names, KV-cache name patterns, head counts
  and sizes, context length, special token ids and search defaults, read from the graph,
  config.json and generation_config.json.
- The QuantX custom-op library inside the folder: genai only loads a ``custom_ops_library``
  that lies inside the model folder (or the working directory), so a copy of
  ``libquantx_ops.so`` sits beside the model and the config names it by a relative path.
- A ``tokenizer.json`` genai's tokenizer reads: transformers' GGUF conversion writes a decoder
  ``Sequence[ByteFallback, Fuse, Replace("\u2581", " "), ByteLevel]`` over a byte-level BPE
  vocabulary; genai then takes the tokenizer for a SentencePiece one and encodes every space
  as id -1. On such a vocabulary (no ``<0xHH>`` byte tokens, no token holding the replaced
  pattern) the three extra steps change nothing, so the decoder becomes the ByteLevel step
  alone and transformers decodes every id sequence as before. genai also needs a
  ``tokenizer_config.json``; an empty one is written where the export has none.

``past_present_share_buffer`` (genai keeps one KV buffer of ``max_length`` positions) is on
only when every layer's attention is a GroupQueryAttention node (or QuantX's
QxGroupQueryAttention), which reads the valid length from the attention mask; the export's own
Concat attention needs separate past and present.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import onnx_ir as ir

from .errors import InputError
from .graph_outline import appends_kv_in_place, outline_of
from .runtime import library_path

CONFIG_NAME = "genai_config.json"
# model types genai knows for a decoder-only LLM with the standard inputs; others get its
# generic "decoder"
KNOWN_TYPES = ("llama", "mistral", "qwen2", "smollm3")
_PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)")
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_EXTRA_DECODERS = ("ByteFallback", "Fuse", "Replace")


@dataclasses.dataclass
class GenaiReport:
    written: bool
    reason: str = ""  # why not, when not written
    share_buffer: bool = False
    library: str | None = None  # the library's file name in the folder
    tokenizer_fixed: bool = False  # the decoder section was rewritten for genai

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not readable JSON ({e})") from e
    return data if isinstance(data, dict) else {}


def _ids(value) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def decoder_io(model: ir.Model) -> tuple[dict, dict, int] | str:
    """genai's ``inputs``/``outputs`` sections and the layer count of an optimum decoder export
    with a KV cache, or why it is not one genai can feed."""
    # inputs with an initializer of their name are optional (logits_to_keep): genai need not feed
    inputs = {v.name for v in model.graph.inputs if not v.is_initializer()}
    outputs = {v.name for v in model.graph.outputs}
    layers = {int(m.group(1)) for n in inputs if (m := _PAST.fullmatch(n))}
    if "input_ids" not in inputs or not layers:
        return "not a decoder export with input_ids and a KV cache"
    count = max(layers) + 1
    io_in = {"input_ids": "input_ids"}
    for name in ("attention_mask", "position_ids"):
        if name in inputs:
            io_in[name] = name
    io_in["past_key_names"] = "past_key_values.%d.key"
    io_in["past_value_names"] = "past_key_values.%d.value"
    expected = set(io_in.values()) - {io_in["past_key_names"], io_in["past_value_names"]}
    expected |= {f"past_key_values.{i}.{kv}" for i in range(count) for kv in ("key", "value")}
    if inputs != expected:
        extra = sorted(inputs ^ expected)
        return f"inputs genai does not feed or lacks: {', '.join(extra[:4])}"
    presents = {f"present.{i}.{kv}" for i in range(count) for kv in ("key", "value")}
    if "logits" not in outputs or not presents <= outputs:
        return "outputs are not logits and present.N.key/value"
    io_out = {
        "logits": "logits",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    return io_in, io_out, count


def _cache_shape(model: ir.Model) -> tuple[int, int]:
    value = next(v for v in model.graph.inputs if v.name == "past_key_values.0.key")
    shape = value.shape
    if shape is None or len(shape) != 4:
        raise InputError("past_key_values.0.key: KV-cache input without a [B, H, T, D] shape")
    heads, head_dim = shape[1], shape[3]
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        raise InputError("past_key_values.0.key: KV-cache input without static head sizes")
    return heads, head_dim


def genai_tokenizer(data: dict) -> dict | None:
    """``tokenizer.json`` (parsed) with the decoder genai needs, or None when it needs no
    change or when the change could alter transformers' decoding."""
    decoder = data.get("decoder") or {}
    if decoder.get("type") != "Sequence":
        return None
    steps = decoder.get("decoders") or []
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    others = [s for s in steps if s.get("type") != "ByteLevel"]
    if len(byte_level) != 1 or steps[-1] is not byte_level[0]:
        return None
    if not others or any(s.get("type") not in _EXTRA_DECODERS for s in others):
        return None
    model = data.get("model") or {}
    added = [t.get("content", "") for t in data.get("added_tokens") or []]
    tokens = list(model.get("vocab") or {}) + added
    for step in others:  # each removed step must leave every token as it is
        if step["type"] == "ByteFallback" and any(_BYTE_TOKEN.fullmatch(t) for t in tokens):
            return None
        if step["type"] == "Replace":
            pattern = step.get("pattern") or {}
            if "String" not in pattern or any(pattern["String"] in t for t in tokens):
                return None
    fixed = dict(data)
    fixed["decoder"] = byte_level[0]
    return fixed


def fix_tokenizer(folder: Path) -> bool:
    """Rewrite ``folder/tokenizer.json`` in place when :func:`genai_tokenizer` changes it."""
    path = Path(folder) / "tokenizer.json"
    data = _read_json(path)
    if not data:
        return False
    fixed = genai_tokenizer(data)
    if fixed is None:
        return False
    path.write_text(json.dumps(fixed, ensure_ascii=False, indent=2))
    return True


def _search(generation: dict, context: int) -> dict:
    """genai's search section from generation_config.json (Hugging Face's defaults where it
    says nothing)."""

    def get(key, default):
        value = generation.get(key)
        return default if value is None else value

    return {
        "diversity_penalty": float(get("diversity_penalty", 0.0)),
        "do_sample": bool(get("do_sample", False)),
        "early_stopping": True,
        "length_penalty": float(get("length_penalty", 1.0)),
        "max_length": context,
        "min_length": 0,
        "no_repeat_ngram_size": int(get("no_repeat_ngram_size", 0)),
        "num_beams": int(get("num_beams", 1)),
        "num_return_sequences": int(get("num_return_sequences", 1)),
        "past_present_share_buffer": False,
        "repetition_penalty": float(get("repetition_penalty", 1.0)),
        "temperature": float(get("temperature", 1.0)),
        "top_k": int(get("top_k", 50)),
        "top_p": float(get("top_p", 1.0)),
    }


def write_genai_config(
    folder: str | Path,
    model: ir.Model | None = None,
    filename: str = "model.onnx",
    library: str | None = None,
) -> GenaiReport:
    """Make ``folder`` (a decoder export: ``filename``, config.json, tokenizer files) loadable
    by ``onnxruntime_genai.Model``: write genai_config.json, copy the custom-op library
    (default: :func:`library_path`) beside the model and fix tokenizer.json for genai when it
    needs it. ``model`` is the graph in ``filename`` when the caller has it in memory. Folders
    that are not such a decoder, or whose companion files cannot be read, are left alone
    (``written`` False, with the reason): the model itself is still fine for ONNX Runtime."""
    try:
        return _write(Path(folder), model, filename, library)
    except InputError as e:
        return GenaiReport(False, str(e))


def _write(folder: Path, model: ir.Model | None, filename: str, library: str | None):
    config = _read_json(folder / "config.json")
    if not config:
        return GenaiReport(False, "no config.json")
    if model is None:
        path = folder / filename
        if not path.is_file():
            return GenaiReport(False, f"no {filename}")
        model = ir.load(str(path))
    io = decoder_io(model)
    if isinstance(io, str):
        return GenaiReport(False, io)
    inputs, outputs, layers = io
    kv_heads, head_dim = _cache_shape(model)
    heads = int(config.get("num_attention_heads") or kv_heads)
    hidden = int(config.get("hidden_size") or heads * head_dim)
    context = int(config.get("max_position_embeddings") or 4096)
    vocab = config.get("vocab_size")
    generation = _read_json(folder / "generation_config.json")

    def token(key):
        ids = _ids(generation.get(key, config.get(key)))
        return ids[0] if ids else None

    from .generate import eos_ids  # imports onnxruntime

    try:
        eos = eos_ids(folder)
    except Exception as e:  # tokenizers raises plain Exceptions for a broken tokenizer.json
        raise InputError(f"{folder / 'tokenizer.json'}: {e}") from e
    if not eos:
        return GenaiReport(False, "no eos_token_id in generation_config.json/config.json")
    bos, pad = token("bos_token_id"), token("pad_token_id")
    pad = eos[0] if pad is None else pad

    has_custom_ops = any(
        node.domain not in ("", "ai.onnx", "com.microsoft")
        and node.op_identifier() not in model.functions  # model-local functions are inlined
        for node in model.graph.all_nodes()
    )
    session_options: dict = {"log_id": "onnxruntime-genai", "provider_options": []}
    lib_name = None
    if has_custom_ops:
        source = Path(library or library_path())
        lib_name = source.name
        if source.resolve() != (folder / lib_name).resolve():
            shutil.copy2(source, folder / lib_name)
        session_options["custom_ops_library"] = lib_name

    share = appends_kv_in_place(outline_of(model))
    search = _search(generation, context)
    search["past_present_share_buffer"] = share
    model_type = str(config.get("model_type", ""))
    genai = {
        "model": {
            "bos_token_id": bos,
            "context_length": context,
            "decoder": {
                "session_options": session_options,
                "filename": filename,
                "head_size": head_dim,
                "hidden_size": hidden,
                "inputs": inputs,
                "outputs": outputs,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": kv_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad,
            "type": model_type if model_type in KNOWN_TYPES else "decoder",
            "vocab_size": int(vocab) if vocab else None,
        },
        "search": search,
    }
    if genai["model"]["vocab_size"] is None:
        del genai["model"]["vocab_size"]
    if bos is None:
        del genai["model"]["bos_token_id"]
    fixed = fix_tokenizer(folder)
    tokenizer_config = folder / "tokenizer_config.json"
    if (folder / "tokenizer.json").is_file() and not tokenizer_config.is_file():
        tokenizer_config.write_text("{}\n")  # genai's tokenizer refuses a folder without one
    (folder / CONFIG_NAME).write_text(json.dumps(genai, indent=2))
    return GenaiReport(True, share_buffer=share, library=lib_name, tokenizer_fixed=fixed)
