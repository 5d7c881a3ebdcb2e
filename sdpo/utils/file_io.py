"""JSON/JSONL files: crash-safe writing and line-numbered reading (no torch import, so the
preprocessors can use it too).

Every writer goes through a temp file in the target folder and ``os.replace``: same filesystem, so
the rename is atomic and a reader (or a crash) sees the old file or the complete new one, never a
partial one. JSON is written strictly: NaN and ±inf become ``null``. ``iter_jsonl`` gives each
non-blank line's number with its decoded value or why it did not parse, so every reader can name
``file:line`` in its errors.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np


def to_json_safe(obj):
    """A copy of ``obj`` that strict JSON can hold: NaN/±inf → None, numpy scalars/arrays → Python.

    Dicts, lists and tuples are converted recursively (tuples become lists); other values are
    returned unchanged, so something JSON cannot encode still fails loudly when written.
    """
    if isinstance(obj, dict):
        return {key: to_json_safe(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(value) for value in obj]
    if isinstance(obj, np.ndarray):
        return to_json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return to_json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def replace_atomically(path: str | os.PathLike, write: Callable[[object], None], *, binary: bool = False) -> None:
    """Call ``write(handle)`` on a temp file beside ``path`` (UTF-8 text, or bytes with ``binary``),
    fsync it, rename it over ``path``. Creates missing folders; removes the temp file if writing fails.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_name, 0o666 & ~umask)
        with open(descriptor, "wb") if binary else open(descriptor, "w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


class OutputFolderError(ValueError):
    """An output folder that cannot be used; the message is one line naming the flag and what to pass."""


def check_output_folder(value: str | os.PathLike, flag: str = "--out_dir") -> Path:
    """``value`` as an output folder, refused when it or its nearest existing parent is a file or not writable.

    The one output-folder check of every entry point: cheap, before any model loads, and nothing is created (a
    run that fails later leaves no empty folder).
    """
    path = Path(value)
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    if not existing.is_dir():
        where = "" if existing == path else f": {existing}"
        raise OutputFolderError(f"{flag} {path}{where} is a file; pass a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{flag} {path}: {existing} is not writable; pass a writable folder")
    return path


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented strict JSON (NaN/inf as null) atomically."""
    # Serialise first: an unencodable value raises before any file is touched.
    text = json.dumps(to_json_safe(obj), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    replace_atomically(path, lambda handle: handle.write(text))


def write_jsonl_atomic(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write ``rows`` (consumed lazily) as UTF-8 JSON Lines, atomically; returns the number of rows."""
    count = 0

    def write(handle) -> None:
        nonlocal count
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1

    replace_atomically(path, write)
    return count


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object, str | None]]:
    """``(line_number, value, error)`` for every non-blank line (1-based numbers).

    ``error`` is None for a line that parses, else a short reason (``not valid JSON (... at column c)``,
    ``not UTF-8 text ...``) and ``value`` is None. Lines are decoded one by one, so a stray byte is reported
    with its line number instead of failing the whole file.
    """
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield line_number, None, _not_utf8(raw, error)
                continue
            if not line.strip():
                continue
            try:
                yield line_number, json.loads(line), None
            except json.JSONDecodeError as error:
                yield line_number, None, f"not valid JSON ({error.msg} at column {error.colno})"


def installed_package_folder(package: str) -> Path | None:
    """Folder of an installed package, found without importing it (some bundled-data packages have
    ``__init__`` modules that import things not installed here); None when it is not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def find_utf8_error(path: str | os.PathLike) -> str | None:
    """One line naming the first line of ``path`` that is not UTF-8 (a reader's ``UnicodeDecodeError``
    names neither the file nor the line), or None when the whole file decodes."""
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                return f"{path}:{line_number}: {_not_utf8(raw, error)}"
    return None


def _not_utf8(raw: bytes, error: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1}); convert the file to UTF-8"
