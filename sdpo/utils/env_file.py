"""``.env`` for the Python entry points, read the way the scripts read it: as data, the environment wins.

The scripts (``scripts/common.sh``) and the Python entry points both look for ``.env`` in the repository
root, so ``python eval_online_sdpo.py --resume ...`` finds the API key a script run found.
"""

from __future__ import annotations

from pathlib import Path

from dotenv import load_dotenv

from sdpo.utils.command_line import UsageError

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent.parent


def load_project_env(path: Path | None = None) -> None:
    """Export the KEY=VALUE lines of ``path`` (default: the repository's ``.env``) that the environment does not
    already set (never executed). A file that is not UTF-8 text is one ``UsageError`` line."""
    path = REPOSITORY_ROOT / ".env" if path is None else Path(path)
    if not path.is_file():
        return
    try:
        path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UsageError(
            f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x} at offset {error.start}); "
            "write it as NAME=value lines, or remove it"
        ) from None
    load_dotenv(path, override=False, interpolate=False)
