# Shared by every scripts/*.sh: sourced, never executed.
#
# What it gives a script:
#   sdpo_init "$@"        parse --dry-run (accepted anywhere), keep the other arguments in SDPO_ARGS,
#                         read .env as data, resolve BASE_WORK / CACHE_DIR / PYTHON, export HF caches
#   sdpo_require VAR msg  exit 1 with msg when VAR is empty
#   sdpo_mkdir DIR...     create directories (not in dry-run)
#   sdpo_run CMD...       dry-run: print the resolved command with secrets masked; else exec it
#
# .env is read as KEY=VALUE data (comments and blank lines skipped, optional surrounding quotes
# removed); it is never executed, and variables already set in the environment win over it.

set -euo pipefail

REPO_ROOT="${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
SDPO_SECRET_PATTERN='(KEY|TOKEN|SECRET|PASSWORD)'

sdpo_load_dotenv() {
  local file="$1" line key value lineno=0
  [[ -f "$file" ]] || return 0
  while IFS= read -r line || [[ -n "$line" ]]; do
    lineno=$((lineno + 1))
    line="${line%$'\r'}"
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] && continue
    line="${line#"${line%%[![:space:]]*}"}"
    line="${line#export }"
    if [[ ! "$line" =~ ^([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
      echo "warning: $file:$lineno is not KEY=VALUE; ignored" >&2
      continue
    fi
    key="${BASH_REMATCH[1]}"
    value="${BASH_REMATCH[2]}"
    if [[ "$value" =~ ^\"(.*)\"$ || "$value" =~ ^\'(.*)\'$ ]]; then
      value="${BASH_REMATCH[1]}"
    fi
    if [[ -z "${!key+x}" ]]; then
      export "$key=$value"
    fi
  done < "$file"
}

sdpo_init() {
  DRY_RUN=0
  SDPO_ARGS=()
  local arg
  for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then
      DRY_RUN=1
    else
      SDPO_ARGS+=("$arg")
    fi
  done
  sdpo_load_dotenv "$REPO_ROOT/.env"
  BASE_WORK="${BASE_WORK:-${SCRATCH:-${TMPDIR:-/tmp}}}"
  CACHE_DIR="${CACHE_DIR:-$BASE_WORK/hf-cache}"
  if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$REPO_ROOT/.venv/bin/python"; else PYTHON="python3"; fi
  fi
  export HF_HOME="${HF_HOME:-$CACHE_DIR/hf}"
  export HF_DATASETS_CACHE="${HF_DATASETS_CACHE:-$CACHE_DIR/datasets}"
  export HF_HUB_CACHE="${HF_HUB_CACHE:-$CACHE_DIR/hub}"
  export PYTHONPATH="$REPO_ROOT${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
  cd "$REPO_ROOT"
}

sdpo_require() {
  local name="$1" message="$2"
  if [[ -z "${!name:-}" ]]; then
    echo "error: $name is required. $message" >&2
    exit 1
  fi
}

sdpo_mkdir() {
  [[ "$DRY_RUN" == 1 ]] && return 0
  mkdir -p "$@"
}

# Replace secret values (env vars whose name looks like a key/token) and --*key*=/--*token* values.
sdpo_mask() {
  local text="$1" name value
  while IFS='=' read -r name value; do
    if [[ "$name" =~ $SDPO_SECRET_PATTERN && ${#value} -ge 4 ]]; then
      text="${text//"$value"/****}"
    fi
  done < <(env)
  printf '%s' "$text"
}

sdpo_run() {
  local rendered="" part
  for part in "$@"; do
    rendered+="$(printf '%q' "$part") "
  done
  rendered="${rendered% }"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "[dry-run] BASE_WORK=$BASE_WORK CACHE_DIR=$CACHE_DIR"
    echo "[dry-run] $(sdpo_mask "$rendered")"
    return 0
  fi
  echo "+ $(sdpo_mask "$rendered")" >&2
  exec "$@"
}
