"""`python -m quantx_onnx export SRC -o DIR`: a Hugging Face folder or a GGUF file -> the
optimum ONNX layout (``text-generation-with-past``: model.onnx + config + tokenizer).

GGUF weights are loaded (and dequantized to float32) by transformers' GGUF support, saved as
an ordinary Hugging Face folder in a temporary directory, then exported by optimum. The special
tokens (bos, eos, padding, whether BOS is added) are the GGUF metadata's (:mod:`.gguf_tokens`).
optimum's own validation (a log line per output, errors for every value beyond 1e-5) runs only
when not quiet; the export ends with one logit comparison instead (:mod:`.export_check`).
Needs the ``export`` extra (torch, transformers, optimum, gguf, accelerate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import tempfile
from pathlib import Path

from . import gguf_tokens
from .errors import InputError, OutputError
from .export_check import LogitCheck, compare_logits
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
        gguf_tokens.apply(gguf_tokens.read(src), tok, model)
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


STEPS = ("loading the model", "exporting with optimum", "checking logits")


@dataclasses.dataclass
class Exported:
    model: Path  # the exported model.onnx (a VLM's decoder_model_merged.onnx)
    check: LogitCheck  # a VLM's: vlm.export.GraphCheck


def _steps(progress, steps=STEPS):
    """``next_step()`` advancing a progress bar over ``steps`` (nothing without ``progress``)."""
    bar = progress(steps, desc="export") if progress else None
    it = iter(bar if bar is not None else steps)

    def next_step():
        name = next(it, None)
        if name is not None and hasattr(bar, "set_postfix_str"):
            bar.set_postfix_str(name)

    return next_step, lambda: next(it, None)


def export(src: str | Path, out: str | Path, *, quiet: bool = True, progress=None) -> Exported:
    """Export `src` (HF folder or .gguf) to the optimum layout in folder `out` (written
    atomically) and compare its logits with the transformers model's. ``progress(items,
    desc)`` may wrap the steps (a progress bar)."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder")
    if out.resolve() == src.resolve() or (src.is_dir() and src.resolve() in out.resolve().parents):
        raise OutputError(f"{out}: choose an output folder outside the input")
    _require_export_deps()
    from .vlm import export as vlm_export

    if vlm_export.is_vlm_source(src):  # LLaVA: three graphs (quantx_onnx.vlm)
        next_step, finish = _steps(progress, vlm_export.STEPS)
        done = vlm_export.export_vlm(src, out, quiet, next_step)
        finish()
        return done
    from optimum.exporters.onnx import main_export

    next_step, finish = _steps(progress)
    with tempfile.TemporaryDirectory(prefix="quantx-export-") as tmp:
        tmp = Path(tmp)
        next_step()
        hf = _load_hf(src, tmp, quiet)
        onnx_dir = tmp / "onnx"
        next_step()
        with _quiet(quiet):
            try:
                main_export(
                    str(hf),
                    output=str(onnx_dir),
                    task="text-generation-with-past",
                    device="cpu",
                    do_validation=not quiet,
                )
            except Exception as e:
                raise InputError(f"{src}: optimum could not export it ({e})") from e
        next_step()
        with _quiet(quiet):
            check = compare_logits(hf, onnx_dir)
        finish()
        target = out / "model.onnx"
        with staged_output(target) as stage:
            for f in onnx_dir.iterdir():
                shutil.copy2(f, stage / f.name)
    return Exported(target, check)
