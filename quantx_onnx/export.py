"""`python -m quantx_onnx export SRC -o DIR`: a Hugging Face folder or a GGUF file -> the
optimum ONNX layout (``text-generation-with-past``: model.onnx + config + tokenizer).

GGUF weights are loaded (and dequantized to float32) by transformers' GGUF support, saved as
an ordinary Hugging Face folder in a temporary directory, then exported by optimum. Needs the
``export`` extra (torch, transformers, optimum, gguf, accelerate).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from .errors import InputError, OutputError
from .model_io import staged_output


def _require_export_deps():
    missing = []
    for mod in ("torch", "transformers", "optimum.exporters.onnx"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod.split(".")[0])
    if missing:
        raise InputError(
            f"export needs {', '.join(missing)}: pip install 'quantx-onnx[export]' "
            "(install torch==2.13.0 first for the CPU build)"
        )


def _load_hf(src: Path, tmp: Path, quiet: bool) -> Path:
    """An HF folder for `src`: itself, or a float32 re-save of a GGUF file."""
    if src.is_dir():
        if not (src / "config.json").is_file():
            raise InputError(f"{src}: not a Hugging Face model folder (no config.json)")
        return src
    if src.suffix.lower() != ".gguf":
        raise InputError(f"{src}: expected a Hugging Face folder or a .gguf file")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(src.parent), src.name
    with _quiet(quiet):
        try:
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=torch.float32
            )
        except Exception as e:
            raise InputError(f"{src}: transformers cannot load this GGUF file ({e})") from e
        hf = tmp / "hf"
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
    return hf


@contextlib.contextmanager
def _quiet(quiet: bool):
    if not quiet:
        yield
        return
    level = logging.root.manager.disable
    # the library loggers keep handlers bound to the real stderr: silence them at the source
    loggers = [logging.getLogger(n) for n in ("optimum", "transformers", "torch", "gguf")]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    logging.disable(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(level)
        for lg, lvl in zip(loggers, saved):
            lg.setLevel(lvl)


def export(src: str | Path, out: str | Path, *, quiet: bool = True) -> Path:
    """Export `src` (HF folder or .gguf) to the optimum layout in folder `out` (written
    atomically); returns the model.onnx path."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    if out.resolve() == src.resolve() or (src.is_dir() and src.resolve() in out.resolve().parents):
        raise OutputError(f"{out}: choose an output folder outside the input")
    _require_export_deps()
    from optimum.exporters.onnx import main_export

    with tempfile.TemporaryDirectory(prefix="quantx-export-") as tmp:
        tmp = Path(tmp)
        hf = _load_hf(src, tmp, quiet)
        onnx_dir = tmp / "onnx"
        with _quiet(quiet):
            try:
                main_export(
                    str(hf), output=str(onnx_dir), task="text-generation-with-past", device="cpu"
                )
            except Exception as e:
                raise InputError(f"{src}: optimum could not export it ({e})") from e
        target = out / "model.onnx"
        with staged_output(target) as stage:
            for f in onnx_dir.iterdir():
                shutil.copy2(f, stage / f.name)
    return target
