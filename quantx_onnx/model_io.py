"""Loading models (a .onnx file or an optimum export folder) and writing results atomically.

Nothing here ever writes next to or over the input: output is staged in a temporary folder
beside the destination and moved into place only when complete (model file last), so an
interrupted or failed run leaves the destination as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import signal
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from .errors import InputError, Interrupted, OutputError

MODEL_NAMES = ("model.onnx", "decoder_model_merged.onnx", "model_quantized.onnx")
TWO_GB = 2**31


@dataclasses.dataclass
class ModelSource:
    """Where a model came from: the .onnx file and, for an export folder, the folder."""

    model_path: Path
    folder: Path | None  # the optimum export folder, if the input was one

    @property
    def uses_external_data(self) -> bool:
        return bool(external_data_files(self.model_path, check=False))


def resolve_input(path: str | os.PathLike) -> ModelSource:
    """The .onnx file behind ``path`` (a file or an export folder), or a clear InputError."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such file or folder")
    if p.is_dir():
        candidates = [p / n for n in MODEL_NAMES if (p / n).is_file()]
        if not candidates:
            candidates = sorted(p.glob("*.onnx"))
        if not candidates:
            raise InputError(f"{p}: folder holds no .onnx model")
        if len(candidates) > 1 and candidates[0].name not in MODEL_NAMES:
            names = ", ".join(c.name for c in candidates)
            raise InputError(f"{p}: several models ({names}); pass the .onnx file itself")
        return ModelSource(candidates[0], p)
    if p.stat().st_size == 0:
        raise InputError(f"{p}: file is empty")
    return ModelSource(p, None)


def external_data_files(model_path: Path, check: bool = True) -> list[Path]:
    """External data files the model refers to; with ``check``, raise if one is missing or too
    short for the tensors that point into it."""
    import onnx

    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError, but also others for garbage
        raise InputError(
            f"{model_path}: not a readable ONNX model ({type(e).__name__}: {e})"
        ) from None
    needed: dict[Path, tuple[int, str]] = {}
    for t in _all_tensors(proto.graph):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        f = (model_path.parent / loc).resolve()
        if not f.is_relative_to(model_path.parent.resolve()):
            raise InputError(f"{model_path}: tensor {t.name!r} points outside the model folder")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > needed.get(f, (0, ""))[0]:
            needed[f] = (end, t.name)
    if check:
        for f, (end, tensor) in needed.items():
            if not f.is_file():
                raise InputError(
                    f"{model_path}: external data file {f.name} (tensor {tensor!r}) is missing"
                )
            if f.stat().st_size < end:
                raise InputError(
                    f"{model_path}: external data file {f.name} is truncated "
                    f"({f.stat().st_size} bytes, tensor {tensor!r} needs {end})"
                )
    return list(needed)


def _all_tensors(graph):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.t is not None and attr.HasField("t"):
                yield attr.t
            for g in list(attr.graphs) + ([attr.g] if attr.HasField("g") else []):
                yield from _all_tensors(g)


def load_model(source: ModelSource) -> ir.Model:
    """Load with external data left on disk (memory-mapped on use)."""
    external_data_files(source.model_path, check=True)
    try:
        return ir.load(str(source.model_path))
    except Exception as e:
        raise InputError(
            f"{source.model_path}: not a readable ONNX model ({type(e).__name__}: {e})"
        ) from e


def tensor_in_memory(name: str, value: ir.TensorProtocol) -> onnx.TensorProto:
    """``value`` as a TensorProto that holds its bytes: a model built from such protos can be
    handed to ONNX Runtime as bytes (an external-data reference would point nowhere then)."""
    if isinstance(value, ir.ExternalTensor):
        return onnx.numpy_helper.from_array(value.numpy(), name)
    tensor = ir.serde.serialize_tensor(value)
    tensor.name = name
    return tensor


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def default_output(source: ModelSource) -> Path:
    """Where output goes when none is given: beside the input, ``model.quantx.onnx`` for a
    file, ``<folder>-quantx/`` for an export folder. Refused if it already holds something,
    so that a second run never replaces an earlier one unasked."""
    if source.folder is not None:
        folder = source.folder.resolve()
        out = folder.with_name(folder.name + "-quantx")
        taken = out.exists() and (not out.is_dir() or any(out.iterdir()))
    else:
        out = source.model_path.with_name(source.model_path.stem + ".quantx.onnx")
        taken = out.exists()
    if taken:
        raise OutputError(
            f"{out}: the default output already exists (an earlier run?); remove it or choose "
            "another with -o"
        )
    return out


def check_output(source: ModelSource, out: Path) -> Path:
    """Refuse outputs that would overwrite the input; return the output .onnx path."""
    out = Path(out)
    if source.folder is not None:
        if same_file(out, source.folder) or out.resolve() == source.folder.resolve():
            raise OutputError(f"{out}: output folder is the input folder; choose another -o")
        target = out / source.model_path.name
    else:
        target = out if out.suffix == ".onnx" else out / source.model_path.name
    inputs = [source.model_path, *external_data_files(source.model_path, check=False)]
    for p in inputs:
        if target.resolve() == p.resolve() or same_file(target, p):
            raise OutputError(f"{out}: output would overwrite the input {p}; choose another -o")
        data = target.with_name(target.name + ".data")
        if data.resolve() == p.resolve():
            raise OutputError(f"{out}: output data file would overwrite the input {p}")
    return target


_received: list[int] = []  # signals whose Interrupted has not been seen to propagate


def _interrupted(signum: int) -> Interrupted:
    return Interrupted(f"interrupted by {signal.Signals(signum).name}; partial output was removed")


def raise_interrupted(signum: int, frame=None):
    """Signal handler: unwind as Interrupted, so every cleanup (staging folders, spill files)
    runs. The signal is remembered too, because code that catches every Exception (tqdm
    starting its monitor thread does) can swallow the raise: see check_interrupted."""
    _received.append(signum)
    raise _interrupted(signum)


def check_interrupted() -> None:
    """Raise Interrupted (once) if a signal arrived whose exception was swallowed."""
    if _received:
        signum = _received[0]
        _received.clear()
        raise _interrupted(signum)


@contextlib.contextmanager
def _signals_as_exceptions():
    """SIGTERM/SIGINT raise Interrupted inside the block so staged output is cleaned up."""
    previous = {}
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, raise_interrupted)
    except ValueError:  # not the main thread: leave signals alone
        previous = {}
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


@contextlib.contextmanager
def staged_output(target: Path):
    """Yields a temporary folder beside ``target``'s folder; on success its files are moved
    into ``target``'s folder (the .onnx model last). On any error or signal the staging folder
    is removed and the destination is untouched."""
    dest_dir = target.parent
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=dest_dir))
    except OSError as e:
        raise OutputError(f"{dest_dir}: cannot write output ({e.strerror or e})") from e
    try:
        with _signals_as_exceptions():
            try:
                yield stage
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    raise OutputError(f"{dest_dir}: no space left on device") from e
                raise OutputError(f"{dest_dir}: cannot write output ({e.strerror or e})") from e
            check_interrupted()  # nothing is committed after a signal, even a swallowed one
            files = sorted(stage.rglob("*"), key=lambda f: f.suffix == ".onnx")
            for f in files:
                if f.is_file():
                    rel = f.relative_to(stage)
                    (dest_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, dest_dir / rel)
    except Interrupted:
        _received.clear()  # it reached the caller: nothing left to report later
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def save_model(model: ir.Model, path: Path, external: bool | None = None, progress=None) -> None:
    """Write ``model`` to ``path``; tensors go to ``<name>.data`` when ``external`` (default:
    when the model would exceed protobuf's 2 GB limit)."""
    if external is None:
        total = sum(
            v.const_value.nbytes
            for v in model.graph.initializers.values()
            if v.const_value is not None
        )
        external = total > TWO_GB - (64 << 20)
    data_name = path.name + ".data" if external else None
    ir.save(model, path, external_data=data_name)


def copy_companions(source: ModelSource, stage: Path) -> list[str]:
    """Copy an export folder's non-model files (config, tokenizer...) into ``stage``."""
    if source.folder is None:
        return []
    skip = {
        source.model_path.resolve(),
        *[p.resolve() for p in external_data_files(source.model_path, check=False)],
    }
    copied = []
    for f in sorted(source.folder.iterdir()):
        if not f.is_file() or f.resolve() in skip or f.suffix in (".onnx", ".onnx_data"):
            continue
        if f.name.endswith(".onnx.data"):
            continue
        shutil.copy2(f, stage / f.name)
        copied.append(f.name)
    return copied


def rewrite_command(argv: list[str] | None, prog: str, rewrite, nothing: str, done) -> int:
    """The command line of a graph pass, ``prog IN OUT``: loads IN (an export folder or .onnx
    file), applies ``rewrite(ir_model)`` (truthy when it changed something: a count or True)
    and writes the result to OUT, a folder's companions copied; IN is never touched. Prints
    ``done(result)`` and returns 0, or prints ``nothing`` and returns 1 (nothing written)."""
    import argparse

    p = argparse.ArgumentParser(prog=prog)
    p.add_argument("model")
    p.add_argument("output")
    args = p.parse_args(argv)
    source = resolve_input(args.model)
    ir_model = load_model(source)
    result = rewrite(ir_model)
    if not result:
        print(f"{args.model}: nothing to do ({nothing})")
        return 1
    out = Path(args.output)
    target = out / source.model_path.name if source.folder is not None else out
    with staged_output(target) as stage:
        save_model(ir_model, stage / target.name, external=source.uses_external_data or None)
        if source.folder is not None:
            copy_companions(source, stage)
    print(f"{target}: {done(result)}")
    return 0
