"""Running an optimum decoder export (``text-generation-with-past``) in ONNX Runtime: feeds
for prefill and decode steps with a KV cache that stays in ORT values between steps
(:class:`KVCache`).

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
from .graph_outline import appends_kv_in_place, read_graph_outline
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

    @property
    def past_names(self) -> list[str]:
        """The past inputs interleaved k, v, in the order of present_names."""
        return [name for kv in zip(self.key_names, self.value_names) for name in kv]


class KVCache:
    """The KV cache between steps: one tensor per layer and kind (keys and values interleaved,
    in the order of ``CacheSpec``), ``length`` positions valid.

    - Copied (any export): ``values`` are the last step's present outputs [B, H, length, D].
      Each step reads them as past and writes a present one position longer, so ONNX Runtime
      copies the whole cache once per layer and step.
    - Shared (every present output comes from a GroupQueryAttention node, as ``optimize``
      fuses attention): ``buffers`` [B, H, capacity, D] are bound as both past and present of
      one-token steps, and the kernel appends the new position in place (it reads the valid
      length from the attention mask, past/present sharing as onnxruntime-genai runs it).
      SmolLM2 at depth 128-192 decodes 1.12-1.15x faster on 2 Zen 1 cores (docs/PERF.md); the
      copy grows with the depth. Multi-token steps (prefill, chunks) run as copied ones and
      write their present back: they need ``logits_to_keep``, an optional input that ONNX
      Runtime's IO binding cannot bind, and their copy is small against their compute.
    """

    def __init__(self, values: list[ort.OrtValue], length: int, buffers=None):
        self.values = values
        self.length = length
        self.buffers: list[np.ndarray] | None = buffers  # numpy memory under values, shared
        self.binding = None  # the IO binding of the shared buffers, reused by its session
        self.binding_session = None
        self.logits: np.ndarray | None = None  # where that binding writes a step's logits

    @property
    def shared(self) -> bool:
        return self.buffers is not None

    @property
    def capacity(self) -> int:
        return self.buffers[0].shape[2] if self.shared else self.length

    def arrays(self) -> list[np.ndarray]:
        """The valid part of every tensor, [B, H, length, D] each (copies)."""
        if self.shared:
            return [b[:, :, : self.length].copy() for b in self.buffers]
        return [v.numpy() for v in self.values]


class DecoderSession:
    """One ORT session over a decoder export, with KV-cache bookkeeping."""

    def __init__(
        self,
        model: str | Path,
        threads: int | None = None,
        options=None,
        quantx_ops=True,
        share_kv: bool = True,
    ):
        """``quantx_ops=False``: a plain ONNX Runtime session, without the QuantX library (for
        portable models, which need none). ``share_kv=False``: copied caches even where the
        graph could append in place (:class:`KVCache`)."""
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
        self._graph_inputs = inputs
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
        past_dims = inputs[keys[0]].shape if keys else []
        self.shares_kv = (
            share_kv
            and bool(keys)
            and not isinstance(past_dims[2], int)
            and _attention_writes_presents(self.path)
        )

    # --- feeds ----------------------------------------------------------------------------------
    def empty_cache(self, batch: int = 1, capacity: int = 0) -> KVCache:
        """An empty cache for ``batch`` rows; shared (see :class:`KVCache`) where the graph
        allows, with room for ``capacity`` positions before it grows (0: 256)."""
        if self.shares_kv:
            return self._shared_cache(batch, int(capacity) or 256)
        shape = (batch, self.cache.heads, 0, self.cache.head_dim)
        values = [
            ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
            for _ in range(2 * self.cache.layers)
        ]
        return KVCache(values, 0)

    def _shared_cache(self, batch: int, capacity: int, keep: KVCache | None = None) -> KVCache:
        shape = (batch, self.cache.heads, capacity, self.cache.head_dim)
        buffers = [np.zeros(shape, np.float32) for _ in range(2 * self.cache.layers)]
        length = 0
        if keep is not None:  # grown: the valid positions move over
            length = keep.length
            for new, old in zip(buffers, keep.buffers):
                new[:, :, :length] = old[:, :, :length]
        values = [ort.OrtValue.ortvalue_from_numpy(b) for b in buffers]
        return KVCache(values, length, buffers)

    def step(
        self, ids: np.ndarray, past: KVCache, past_len: int, last_only: bool = False
    ) -> tuple[np.ndarray, KVCache]:
        """Run `ids` [batch, seq] after `past_len` cached positions; returns (logits as numpy,
        the cache after the step: a shared cache is updated in place and returned).
        ``last_only``: only the last position's logits are needed (generation); a model with
        a ``logits_to_keep`` input then computes just that row."""
        if self.first_input != "input_ids":
            raise InputError(
                f"{self.path}: this decoder takes inputs_embeds, not token ids (a VLM export: "
                "generate with quantx_onnx.generate on its folder)"
            )
        return self._run(np.ascontiguousarray(ids, np.int64), past, past_len, last_only)

    def step_embeds(
        self, embeds: np.ndarray, past: KVCache, past_len: int, last_only: bool = False
    ) -> tuple[np.ndarray, KVCache]:
        """``step`` for a decoder fed ``inputs_embeds`` [batch, seq, hidden]."""
        if self.first_input != "inputs_embeds":
            raise InputError(f"{self.path}: this decoder takes input_ids, not inputs_embeds")
        return self._run(np.ascontiguousarray(embeds, np.float32), past, past_len, last_only)

    def _feeds(self, first: np.ndarray, past_len: int, last_only: bool) -> dict[str, np.ndarray]:
        batch, seq = first.shape[:2]
        feeds = {self.first_input: first}
        if last_only and "logits_to_keep" in self.input_names:
            feeds["logits_to_keep"] = np.ones(1, np.int64)
        elif "logits_to_keep" in self._graph_inputs:  # required: 0 keeps every position
            feeds["logits_to_keep"] = np.zeros(1, np.int64)
        if "attention_mask" in self.input_names:
            feeds["attention_mask"] = np.ones((batch, past_len + seq), np.int64)
        if "position_ids" in self.input_names:
            pos = np.arange(past_len, past_len + seq, dtype=np.int64)[None, :].repeat(batch, 0)
            feeds["position_ids"] = pos
        return feeds

    def _run(self, first: np.ndarray, past, past_len: int, last_only: bool):
        if not isinstance(past, KVCache):  # a list of ORT values, as callers kept them before
            past = KVCache(list(past), past_len)
        if past.length != past_len:
            raise InputError(
                f"{self.path}: the cache holds {past.length} positions, not {past_len}"
            )
        if past.length and past.values[0].shape()[0] != first.shape[0]:
            raise InputError(
                f"{self.path}: the cache holds {past.values[0].shape()[0]} rows, the step "
                f"{first.shape[0]}"
            )
        feeds = self._feeds(first, past_len, last_only)
        if past.shared and first.shape[1] == 1:
            # one position: logits_to_keep is moot, and IO binding takes it only where it is
            # a plain graph input, not an optional one backed by an initializer
            if "logits_to_keep" not in self._graph_inputs:
                feeds.pop("logits_to_keep", None)
            return self._run_shared(feeds, past)
        if past.shared:  # the valid part, as a copied cache would hold it
            batch = first.shape[0]
            values = [
                ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(b[:, :, :past_len])
                    if past_len
                    else np.zeros((batch, *b.shape[1:2], 0, *b.shape[3:]), np.float32)
                )
                for b in past.buffers
            ]
        else:
            values = past.values
        ort_feeds = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in feeds.items()}
        ort_feeds.update(zip(self.cache.past_names, values))
        outs = self.session.run_with_ort_values(self.output_names, ort_feeds)
        length = past_len + first.shape[1]
        if not past.shared:
            return outs[0].numpy(), KVCache(list(outs[1:]), length)
        if length > past.capacity or past.buffers[0].shape[0] != first.shape[0]:
            past = self._shared_cache(first.shape[0], 2 * length)  # (an empty cache's batch)
        for buffer, present in zip(past.buffers, outs[1:]):
            buffer[:, :, :length] = present.numpy()
        past.length = length
        return outs[0].numpy(), past

    def _run_shared(self, feeds: dict[str, np.ndarray], cache: KVCache):
        """One token per row, appended in place to the shared buffers."""
        if cache.length + 1 > cache.capacity:
            cache = self._shared_cache(cache.buffers[0].shape[0], 2 * cache.capacity, cache)
        if cache.binding is None or cache.binding_session is not self.session:
            binding = self.session.io_binding()
            if isinstance(self.vocab, int):
                # logits into memory of ours: reading them back wraps no other output
                cache.logits = np.empty((cache.buffers[0].shape[0], 1, self.vocab), np.float32)
                logits = ort.OrtValue.ortvalue_from_numpy(cache.logits)
                binding.bind_ortvalue_output(self.logits_name, logits)
            else:  # a symbolic vocabulary size: ORT allocates them, output 0
                binding.bind_output(self.logits_name)
            names = zip(self.cache.past_names, self.cache.present_names, cache.values)
            for past, present, value in names:
                binding.bind_ortvalue_input(past, value)
                binding.bind_ortvalue_output(present, value)
            cache.binding, cache.binding_session = binding, self.session
        for name, array in feeds.items():
            cache.binding.bind_cpu_input(name, array)
        self.session.run_with_iobinding(cache.binding)
        cache.length += 1
        if cache.logits is None:
            return cache.binding.get_outputs()[0].numpy().copy(), cache  # numpy(): a view
        return cache.logits.copy(), cache  # the next step overwrites cache.logits

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits for a whole sequence from an empty cache (prefill only)."""
        logits, _ = self.step(ids, self.empty_cache(ids.shape[0]), 0)
        return logits


def _attention_writes_presents(path: Path) -> bool:
    """``graph_outline.appends_kv_in_place`` of the file, read without its weights."""
    try:
        return appends_kv_in_place(read_graph_outline(path))
    except (OSError, ValueError):  # ONNX Runtime loaded it; copied caches work for any graph
        return False


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
