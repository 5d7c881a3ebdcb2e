"""IFEval, MMLU-Pro and the Table-6 tasks through EleutherAI's lm-evaluation-harness (``lm_eval``).

The harness does the prompting, generation / log-likelihood scoring and metrics; this module only says
which model it loads (a full checkpoint, or a base model plus a LoRA adapter: ``peft=`` for the HF
backend, ``lora_local_path=`` for vLLM) and, for machines without the Hugging Face Hub, where the task
data lies. ``--data_dir DIR`` holds local copies of the tasks' Hub datasets, in the Hub schema, one JSON
Lines file per split:

    DIR/<owner>__<name>[/<config>]/<split>.jsonl      e.g. DIR/google__IFEval/train.jsonl,
                                                            DIR/truthfulqa__truthful_qa/multiple_choice/validation.jsonl

For each requested task whose dataset has such a folder, a task YAML with the same task name is written
that ``include``s the harness's own YAML (so prompts, filters, metrics and ``!function`` hooks stay the
harness's) and only swaps the data source for the ``json`` builder over those files; the TaskManager's
``include_path`` makes it win over the built-in one. Splits without a local file are switched off.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

SPLIT_KEYS = ("training_split", "validation_split", "test_split", "fewshot_split")


@dataclass(frozen=True)
class LMEvalModel:
    """What lm-eval loads: ``pretrained`` (folder or Hub id) and optionally a LoRA adapter folder."""

    pretrained: str
    adapter: str | None = None

    def model_args(self, backend: str, dtype: str, extra: dict | None = None) -> dict:
        args = {"pretrained": self.pretrained, "dtype": dtype, **(extra or {})}
        if self.adapter:
            args["peft" if backend == "hf" else "lora_local_path"] = self.adapter
        if backend == "vllm" and self.adapter:
            args.setdefault("max_lora_rank", 256)
        return args


def missing_lm_eval_packages(tasks: list[str], backend: str) -> list[str]:
    """pip names of what the requested tasks and backend need and is not installed."""
    missing = []
    if importlib.util.find_spec("lm_eval") is None:
        missing.append("lm-eval")
    if any(task.startswith("ifeval") for task in tasks):
        missing += [name for name in ("langdetect", "immutabledict", "nltk") if importlib.util.find_spec(name) is None]
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        missing.append("vllm")
    return missing


@cache
def builtin_task_manager():
    """lm-eval's index of its own tasks (built once: it reads every task YAML of the package)."""
    from lm_eval.tasks import TaskManager

    return TaskManager()


def local_dataset_folder(data_dir: Path, dataset_path: str, dataset_name: str | None) -> Path:
    return data_dir / dataset_path.replace("/", "__") / (dataset_name or "")


def _leaf_tasks(task_manager, name: str) -> list[str]:
    """A task's own name, or the leaf tasks of a group (its YAML's ``task`` list, recursively)."""
    from lm_eval.tasks._index import Kind

    entry = task_manager.task_index.get(name)
    if entry is None or entry.kind != Kind.GROUP or entry.yaml_path is None:
        return [name]
    from lm_eval.tasks._yaml_loader import load_yaml

    members = load_yaml(entry.yaml_path, resolve_func=False).get("task", [])
    return [leaf for member in members if isinstance(member, str) for leaf in _leaf_tasks(task_manager, member)]


def write_local_task_configs(tasks: list[str], data_dir: Path, config_dir: Path) -> dict[str, Path]:
    """Task YAMLs reading ``data_dir``'s files for every requested (leaf) task that has them; returns
    task name → local dataset folder. Tasks without local data are left to the harness (Hub)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    manager = builtin_task_manager()
    config_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for task in [leaf for name in tasks for leaf in _leaf_tasks(manager, name)]:
        entry = manager.task_index.get(task)
        if entry is None or entry.yaml_path is None:
            continue
        config = load_yaml(entry.yaml_path, resolve_func=False)
        if "dataset_path" not in config:
            continue
        folder = local_dataset_folder(data_dir, config["dataset_path"], config.get("dataset_name"))
        files = {path.stem: str(path.resolve()) for path in sorted(folder.glob("*.jsonl"))}
        if not files:
            continue
        override = {
            "include": str(Path(entry.yaml_path).resolve()),
            "task": task,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": files},
        }
        for key in SPLIT_KEYS:
            if config.get(key) is not None and config[key] not in files:
                override[key] = None
        (config_dir / f"{task}.yaml").write_text(yaml.safe_dump(override, sort_keys=False), encoding="utf-8")
        written[task] = folder
    return written


def run_lm_eval(
    model: LMEvalModel,
    tasks: list[str],
    *,
    backend: str = "hf",
    dtype: str = "auto",
    device: str | None = None,
    batch_size: int | str = 1,
    limit: float | None = None,
    num_fewshot: int | None = None,
    gen_kwargs: str | None = None,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool = False,
    data_dir: Path | None = None,
    work_dir: Path,
    model_args: dict | None = None,
    seed: int = 1234,
) -> dict:
    """Run the harness; returns the JSON part of its output (``results``, ``n-samples``, ``versions``,
    ``higher_is_better``; not the task configs, which hold functions). ``model_args`` adds to the backend's
    arguments (e.g. ``max_model_len`` for vLLM)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    include_path = None
    if data_dir is not None:
        config_dir = work_dir / "lm_eval_local_tasks"
        if write_local_task_configs(tasks, data_dir, config_dir):
            include_path = str(config_dir)
    output = lm_eval.simple_evaluate(
        model=backend,
        model_args=model.model_args(backend, dtype, model_args),
        tasks=tasks,
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        gen_kwargs=gen_kwargs,
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=fewshot_as_multiturn,
        task_manager=TaskManager(include_path=include_path),
        log_samples=False,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    if output is None:  # only non-zero ranks get None under multi-process HF runs
        return {}
    return {key: output[key] for key in ("results", "n-samples", "versions", "higher_is_better") if key in output}
