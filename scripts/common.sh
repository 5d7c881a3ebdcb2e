# Shared by every scripts/*.sh: sourced, never executed.
#
# What it gives a script:
#   sdpo_init "$@"        parse --dry-run (accepted anywhere), keep the other arguments in SDPO_ARGS,
#                         read .env as data, resolve BASE_WORK / CACHE_DIR / PYTHON, export HF caches
#   sdpo_python           the interpreter the user chose: $PYTHON, else the active virtualenv
#                         ($VIRTUAL_ENV), else the project's .venv, else python3
#   sdpo_require VAR msg  exit 1 with msg when VAR is empty
#   sdpo_mkdir DIR...     create directories (not in dry-run)
#   sdpo_run CMD...       dry-run: print the resolved command with secrets masked; else exec it
#   sdpo_mask_words W...  the words with secrets replaced by **** (see the function)
#
# .env is read as KEY=VALUE data (comments and blank lines skipped, optional surrounding quotes
# removed); it is never executed, and variables already set in the environment win over it.

set -euo pipefail

REPO_ROOT="${REPO_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

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
  PYTHON="$(sdpo_python)"
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

sdpo_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    echo "$PYTHON"
  elif [[ -n "${VIRTUAL_ENV:-}" && -x "$VIRTUAL_ENV/bin/python" ]]; then
    echo "$VIRTUAL_ENV/bin/python"
  elif [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
    echo "$REPO_ROOT/.venv/bin/python"
  else
    echo python3
  fi
}

# A secret name ends in key, token, secret or password (any case, after leading dashes): ANTHROPIC_API_KEY,
# HF_TOKEN, --api_key, --hf-token; not MAX_NEW_TOKENS or --max_new_tokens. What sdpo_run prints instead of
# secrets, word by word before quoting (so a secret is hidden however it is quoted):
#   * the word after a secret flag, and the value of --secret_flag=... and SECRET_NAME=... words;
#   * any word holding the value of an exported variable with a secret name, when that value has 8+
#     characters (real keys do). Shorter values are masked only in the places above, so HF_TOKEN=1234
#     leaves `--seed 1234` alone;
#   * the password of a URL (scheme://user:password@host → scheme://user:****@host), or its token
#     (scheme://token@host → scheme://****@host).
# sdpo/utils/command_line.py's mask_words applies the same rules (tests/test_secrets.py compares the two).
SDPO_SECRET_NAME='^-*([a-z0-9]+[_-])*(api_?key|key|token|secret|password)$'
SDPO_URL_CREDENTIALS='^(.*[A-Za-z][A-Za-z0-9+.-]*://)([^[:space:]/@:]+:)?[^[:space:]/@]+@(.*)$'
SDPO_MASK='****'

sdpo_is_secret_name() {
  local lower="${1,,}"
  [[ "$lower" =~ $SDPO_SECRET_NAME ]]
}

sdpo_mask_words() {
  local -a secrets=()
  local name word secret after_flag=0
  while IFS= read -r name; do
    secret="${!name:-}"
    if [[ ${#secret} -ge 8 ]] && sdpo_is_secret_name "$name"; then secrets+=("$secret"); fi
  done < <(compgen -e)
  for word in "$@"; do
    name="${word%%=*}"
    if [[ "$after_flag" == 1 ]]; then
      word="$SDPO_MASK"
    elif [[ "$word" == *=* ]] && sdpo_is_secret_name "$name"; then
      word="$name=$SDPO_MASK"
    else
      for secret in "${secrets[@]}"; do
        word="${word//"$secret"/$SDPO_MASK}"
      done
      if [[ "$word" =~ $SDPO_URL_CREDENTIALS ]]; then
        word="${BASH_REMATCH[1]}${BASH_REMATCH[2]}$SDPO_MASK@${BASH_REMATCH[3]}"
      fi
    fi
    after_flag=0
    if [[ "$word" == -* ]] && sdpo_is_secret_name "$word"; then after_flag=1; fi
    printf '%s\0' "$word"
  done
}

sdpo_run() {
  local rendered="" part
  while IFS= read -r -d '' part; do
    part="$(printf '%q' "$part")"
    rendered+="${part//'\*\*\*\*'/$SDPO_MASK} "
  done < <(sdpo_mask_words "$@")
  rendered="${rendered% }"
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "[dry-run] BASE_WORK=$BASE_WORK CACHE_DIR=$CACHE_DIR"
    echo "[dry-run] $rendered"
    return 0
  fi
  echo "+ $rendered" >&2
  exec "$@"
}
