"""``quantx_onnx.InferenceSession``: an ``onnxruntime.InferenceSession`` with the QuantX ops
registered, so a QuantX model loads like any other."""

from __future__ import annotations

import os
from collections.abc import Sequence

import onnxruntime as ort

from .runtime import session_options


class InferenceSession(ort.InferenceSession):
    """``onnxruntime.InferenceSession`` that registers the QuantX custom-op library in
    ``sess_options`` (a new ``SessionOptions`` when None; one given is updated in place).

    ``path_or_bytes`` may also be an export folder (its model.onnx is loaded); ``threads``
    sets the intra-op thread count; ``providers`` defaults to the CPU execution provider,
    where the QuantX kernels run. Other arguments are onnxruntime's."""

    def __init__(
        self,
        path_or_bytes: str | bytes | os.PathLike,
        sess_options: ort.SessionOptions | None = None,
        providers: Sequence[str | tuple[str, dict]] | None = None,
        provider_options: Sequence[dict] | None = None,
        *,
        threads: int | None = None,
        **kwargs,
    ) -> None:
        if isinstance(path_or_bytes, (str, os.PathLike)):
            from .model_io import resolve_input

            path_or_bytes = str(resolve_input(path_or_bytes).model_path)
        super().__init__(
            path_or_bytes,
            session_options(sess_options, threads),
            providers if providers is not None else ["CPUExecutionProvider"],
            provider_options,
            **kwargs,
        )
