"""Running an optimum decoder export (``text-generation-with-past``) in ONNX Runtime: feeds
for prefill and decode steps with a KV cache that stays in ORT values between steps.

Used by generation, perplexity evaluation and the decode benchmark alike, for fp32, ORT 4-bit
and QuantX exports (the QuantX ops are registered in every session; they cost nothing when a
model has none).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import InputError
from .model_io import resolve_input
from .runtime import session_options


@dataclasses.dataclass
class CacheSpec:
    layers: int
    heads: int
    head_dim: int
    key_names: list[str]
    value_names: list[str]
    present_names: list[str]  # in the order matching key/value names, interleaved k, v


class DecoderSession:
    """One ORT session over a decoder export, with KV-cache bookkeeping."""

    def __init__(
        self, model: str | Path, threads: int | None = None, options=None, quantx_ops=True
    ):
        """``quantx_ops=False``: a plain ONNX Runtime session, without the QuantX library (for
        portable models, which need none)."""
        source = resolve_input(model)
        self.path = source.model_path
        self.folder = source.folder or source.model_path.parent
        if options is None:
            options = ort.SessionOptions()
            # ORT warns at every load that the optional input logits_to_keep (an initializer
            # of that name is its default) is not folded as a constant; that is the intent
            options.log_severity_level = 3
        if quantx_ops:
            so = session_options(options, threads=threads)
        else:
            so = options
            if threads:
                so.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(
                str(self.path), so, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise InputError(f"{self.path}: ONNX Runtime cannot load it ({e})") from e
        inputs = {i.name: i for i in self.session.get_inputs()}
        # a VLM's decoder takes inputs_embeds (the embedding is its own graph, quantx_onnx.vlm)
        self.first_input = next((n for n in ("input_ids", "inputs_embeds") if n in inputs), None)
        if self.first_input is None:
            raise InputError(f"{self.path}: not a decoder export (no input_ids input)")
        # optional inputs (an initializer of the same name gives the default: logits_to_keep)
        self.input_names = set(inputs) | {
            i.name for i in self.session.get_overridable_initializers()
        }
        keys = sorted(
            (n for n in inputs if n.startswith("past_key_values.") and n.endswith(".key")),
            key=lambda n: int(n.split(".")[1]),
        )
        values = [k[: -len(".key")] + ".value" for k in keys]
        outputs = [o.name for o in self.session.get_outputs()]
        if keys:
            shape = inputs[keys[0]].shape
            heads, head_dim = int(shape[1]), int(shape[3])
        else:
            heads = head_dim = 0
        presents = []
        for k in keys:
            i = k.split(".")[1]
            presents += [f"present.{i}.key", f"present.{i}.value"]
        missing = [p for p in presents if p not in outputs]
        if missing:
            raise InputError(f"{self.path}: KV-cache outputs missing: {missing[:3]}")
        self.cache = CacheSpec(len(keys), heads, head_dim, keys, values, presents)
        self.logits_name = "logits"
        self.output_names = ["logits", *presents]
        self.vocab = self.session.get_outputs()[0].shape[-1]

    # --- feeds ----------------------------------------------------------------------------------
    def empty_cache(self, batch: int = 1) -> list[ort.OrtValue]:
        shape = (batch, self.cache.heads, 0, self.cache.head_dim)
        return [
            ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
            for _ in range(2 * self.cache.layers)
        ]

    def step(
        self, ids: np.ndarray, past: list[ort.OrtValue], past_len: int, last_only: bool = False
    ):
        """Run `ids` [batch, seq] after `past_len` cached positions; returns (logits as numpy,
        new cache as ORT values). ``last_only``: only the last position's logits are needed
        (generation); a model with a ``logits_to_keep`` input then computes just that row."""
        if self.first_input != "input_ids":
            raise InputError(
                f"{self.path}: this decoder takes inputs_embeds, not token ids (a VLM export: "
                "generate with quantx_onnx.generate on its folder)"
            )
        return self._run(np.ascontiguousarray(ids, np.int64), past, past_len, last_only)

    def step_embeds(
        self, embeds: np.ndarray, past: list[ort.OrtValue], past_len: int, last_only: bool = False
    ):
        """``step`` for a decoder fed ``inputs_embeds`` [batch, seq, hidden]."""
        if self.first_input != "inputs_embeds":
            raise InputError(f"{self.path}: this decoder takes input_ids, not inputs_embeds")
        return self._run(np.ascontiguousarray(embeds, np.float32), past, past_len, last_only)

    def _run(self, first: np.ndarray, past: list[ort.OrtValue], past_len: int, last_only: bool):
        batch, seq = first.shape[:2]
        feeds = {self.first_input: ort.OrtValue.ortvalue_from_numpy(first)}
        if last_only and "logits_to_keep" in self.input_names:
            feeds["logits_to_keep"] = ort.OrtValue.ortvalue_from_numpy(np.ones(1, np.int64))
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = ort.OrtValue.ortvalue_from_numpy(
                np.ones((batch, past_len + seq), np.int64)
            )
        if "position_ids" in self.input_names:
            pos = np.arange(past_len, past_len + seq, dtype=np.int64)[None, :].repeat(batch, 0)
            feeds["position_ids"] = ort.OrtValue.ortvalue_from_numpy(pos)
        for i, (k, v) in enumerate(zip(self.cache.key_names, self.cache.value_names)):
            feeds[k] = past[2 * i]
            feeds[v] = past[2 * i + 1]
        outs = self.session.run_with_ort_values(self.output_names, feeds)
        return outs[0].numpy(), list(outs[1:])

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits for a whole sequence from an empty cache (prefill only)."""
        logits, _ = self.step(ids, self.empty_cache(ids.shape[0]), 0)
        return logits


def uses_quantx_ops(model: str | Path) -> bool:
    """Whether the model (file or export folder) imports the QuantX op domain."""
    import onnx

    from .format import DOMAIN

    proto = onnx.load(str(resolve_input(model).model_path), load_external_data=False)
    return any(o.domain == DOMAIN for o in proto.opset_import)


def load_generation_config(folder: Path) -> dict:
    cfg = {}
    for name in ("generation_config.json", "config.json"):
        p = folder / name
        if p.is_file():
            try:
                data = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            for key in ("eos_token_id", "bos_token_id"):
                if key in data and key not in cfg:
                    cfg[key] = data[key]
    return cfg
