"""``.env`` for the Python entry points, read the way the scripts read it: as data, the environment wins.

The scripts (``scripts/common.sh``) and the Python entry points both look for ``.env`` in the repository
root, so ``python eval_online_sdpo.py --resume ...`` finds the API key a script run found.
"""

from __future__ import annotations

from pathlib import Path

from dotenv import load_dotenv

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


def load_project_env(path: Path = REPOSITORY_ROOT / ".env") -> None:
    """Export the KEY=VALUE lines of ``path`` that the environment does not already set (never executed)."""
    if path.is_file():
        load_dotenv(path, override=False, interpolate=False)
