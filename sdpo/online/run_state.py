"""An online run's folder: its files, the settings it was started with, and where ``--resume`` continues it.

``run_state.json`` holds the run's settings and its result-file index, with paths inside the run folder stored
relative to it, so a copied run folder resumes in the copy (the folder is always the ``--out_dir`` given).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from sdpo.data.data_sources import DataError
from sdpo.evaluation.evaluation_helpers import next_run_index
from sdpo.learner.updater import complete_checkpoint, read_extra_state
from sdpo.online.config import RESUME_OVERRIDABLE, OnlineArguments
from sdpo.utils.command_line import without_credentials
from sdpo.utils.file_io import write_json_atomic

logger = logging.getLogger(__name__)

RESUME_TAG = "last"
STATE_FILE = "run_state.json"


class RunFiles:
    """Paths of one run, all derived from the run folder, the results folder, the run name and its index."""

    def __init__(self, out_dir: Path, eval_dir: Path, run_name: str, index: int):
        self.out_dir, self.eval_dir, self.index = out_dir, eval_dir, index
        self.results = eval_dir / f"{run_name}_{index}.json"
        self.completions = eval_dir / f"{run_name}_completions_{index}.json"
        self.snapshot = out_dir / f"{run_name}_completions.jsonl"
        self.baseline = out_dir / "baseline_completions.json"
        self.oracle = out_dir / "oracle_completions.json"
        self.plot = out_dir / "winrate.png"
        self.state = out_dir / STATE_FILE
        self.checkpoints = out_dir / "checkpoints"

    def style_baseline(self, style: str) -> Path:
        """The answers a style introduced during the run is judged against (--style_baseline introduced)."""
        return self.out_dir / f"baseline_completions_{style}.json"

    def finished_interactions(self) -> int:
        """Interactions recorded in the results file (0 when it does not exist yet)."""
        if not self.results.is_file():
            return 0
        return len(read_results(self.results)["training_metrics"])


def read_json(path: Path, *required_keys: str) -> dict:
    """A JSON object with ``required_keys``, or one ``DataError`` line naming the file and what to do."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DataError(
            f"{path} cannot be read ({type(error).__name__}: {error}); it is not a file this run wrote"
        ) from None
    missing = [key for key in required_keys if not isinstance(value, dict) or key not in value]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; it is not a file this run wrote")
    return value


def read_results(path: Path) -> dict:
    """A results file this run wrote: ``meta`` an object, ``training_metrics`` and ``eval_history`` lists of
    objects each naming its ``interaction`` (a whole number); else one ``DataError`` line."""
    results = read_json(path, "meta", "training_metrics", "eval_history")
    if not isinstance(results["meta"], dict):
        raise DataError(f"{path}: 'meta' is not an object; it is not a file this run wrote")
    for key in ("training_metrics", "eval_history"):
        entries = results[key]
        if not isinstance(entries, list) or not all(
            isinstance(entry, dict) and type(entry.get("interaction")) is int for entry in entries
        ):
            raise DataError(
                f"{path}: {key!r} is not a list of records with an 'interaction' number; "
                "it is not a file this run wrote"
            )
    return results


def _relative_to(folder: Path, path: Path) -> str:
    """``path`` relative to ``folder`` when it lies inside it, else as given."""
    try:
        return str(path.resolve().relative_to(folder.resolve()))
    except ValueError:
        return str(path)


def _files_of(out_dir: Path, state: dict) -> RunFiles:
    eval_dir = Path(state["eval_dir"])
    if not eval_dir.is_absolute():
        eval_dir = out_dir / eval_dir
    return RunFiles(out_dir, eval_dir, state["settings"]["run_name"], int(state["index"]))


def _stored_state(out_dir: Path) -> dict:
    path = out_dir / STATE_FILE
    state = read_json(path, "settings", "index", "eval_dir")
    settings = state["settings"]
    if (
        not isinstance(settings, dict)
        or not isinstance(settings.get("run_name"), str)
        or type(state["index"]) is not int
        or not isinstance(state["eval_dir"], str)
    ):
        raise DataError(
            f"{path}: not the shape this run writes (settings with a run_name, a whole-number index, an eval_dir); "
            "restore it from a copy of the run folder, or start a new run with another --out_dir"
        )
    return state


def with_credentials_of(resumed: OnlineArguments, given: OnlineArguments) -> OnlineArguments:
    """The stored settings hold URLs without credentials: a resumed run takes them back from the same URL given
    now (``--openai_base_url`` or ``$OPENAI_BASE_URL``)."""
    url = given.participants.openai_base_url
    if not url or without_credentials(url) != resumed.participants.openai_base_url:
        return resumed
    return dataclasses.replace(resumed, participants=dataclasses.replace(resumed.participants, openai_base_url=url))


def start_or_resume(arguments: OnlineArguments) -> tuple[OnlineArguments, RunFiles, dict | None]:
    """New run: choose the result index and write ``run_state.json``. Resume: the stored settings and results.

    A ``run_state.json`` whose run finished no interaction (it failed at start-up) does not block a new start.
    """
    run = arguments.run
    out_dir = Path(run.out_dir)
    if run.resume:
        if not (out_dir / STATE_FILE).is_file():
            raise DataError(
                f"--resume needs {out_dir / STATE_FILE} from an earlier run; start a new run without --resume"
            )
        state = _stored_state(out_dir)
        stored = state["settings"]
        given = arguments.to_dict()
        defaults = OnlineArguments.from_dict({"resume": True}).to_dict()
        for name, value in given.items():
            if name not in RESUME_OVERRIDABLE and value != defaults.get(name) and value != stored.get(name):
                logger.warning("--resume keeps the run's original --%s=%r (ignoring %r)", name, stored.get(name), value)
        settings = {**stored, **{name: given[name] for name in RESUME_OVERRIDABLE}}
        try:
            OnlineArguments.from_dict({**settings, "resume": False})  # the stored settings pass every check again
            resumed = OnlineArguments.from_dict(settings)
        except (ValueError, TypeError) as error:
            raise DataError(f"{out_dir / STATE_FILE}: the stored settings no longer hold ({error})") from None
        resumed = with_credentials_of(resumed, arguments)
        files = _files_of(out_dir, state)
        results = read_results(files.results) if files.results.is_file() else None
        resumed.check_inputs()
        return resumed, files, results
    if (out_dir / STATE_FILE).is_file():
        previous = _files_of(out_dir, _stored_state(out_dir))
        if previous.finished_interactions() or (previous.checkpoints / RESUME_TAG).exists():
            raise DataError(f"{out_dir} already holds a run; continue it with --resume or choose another --out_dir")
        logger.info("%s holds a run that finished no interaction; starting over", out_dir)
    arguments.check_inputs()
    eval_dir = Path(run.eval_dir or run.out_dir)
    files = RunFiles(out_dir, eval_dir, run.run_name, next_run_index(eval_dir, run.run_name))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        eval_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            files.state,
            {"settings": arguments.to_dict(), "index": files.index, "eval_dir": _relative_to(out_dir, eval_dir)},
        )
    except OSError as error:
        raise DataError(f"--out_dir {out_dir} cannot be written ({error.strerror}); pass a writable folder") from None
    return arguments, files, None


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: the checkpoint (None: the untrained policy), the interactions it covers, and what
    was recorded since the checkpoint before it (the results file may not have been rewritten before a crash)."""

    checkpoint: Path | None = None
    interactions_done: int = 0
    pending: dict | None = None


def resume_point(files: RunFiles, previous: dict | None) -> ResumePoint:
    """The last complete checkpoint, proven consistent with the results file, or one line saying what is missing.

    The results file records the interaction its newest checkpoint covers; a checkpoint that is gone, incomplete or
    older stops the run instead of silently training again over finished interactions.
    """
    claimed = (previous or {}).get("meta", {}).get("resume_checkpoint_interactions", 0)
    checkpoint = complete_checkpoint(files.checkpoints / RESUME_TAG)
    if checkpoint is None:
        if claimed:
            raise DataError(
                f"{files.checkpoints / RESUME_TAG} is missing or incomplete, so the {claimed} finished interactions in "
                f"{files.results} cannot be continued; start a new run with another --out_dir"
            )
        return ResumePoint()
    state = read_extra_state(checkpoint)
    done = int(state.get("interactions_done", 0))
    if done < claimed:
        raise DataError(
            f"{checkpoint} covers {done} interactions but {files.results} was written after a checkpoint at {claimed}; "
            "the newer checkpoint is gone: start a new run with another --out_dir"
        )
    return ResumePoint(checkpoint, done, state.get("pending") or {})


def nothing_pending() -> dict:
    """What a run recorded since its last resume checkpoint, before anything was (baselines: the style baselines
    taken at introductions, see ``eval_online_sdpo.OnlineRun.take_style_baselines``)."""
    return {"records": [], "evaluations": [], "completions": [], "baselines": []}


def entries_between(entries: list[dict], after: int, until: int) -> list[dict]:
    """The entries whose ``interaction`` lies in (after, until] (after = -1 includes interaction 0)."""
    return [e for e in entries if after < e["interaction"] <= until]


def kept_history(kept: list[dict], pending: list[dict], done: int) -> list[dict]:
    """What the results file holds up to the checkpoint, then what the checkpoint recorded after that file was
    written: the history a resumed run continues from (an evaluation at interaction 0 included)."""
    history = entries_between(kept, -1, done)
    last = history[-1]["interaction"] if history else -1
    return history + entries_between(pending, last, done)
