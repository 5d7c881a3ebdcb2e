"""Experiment tracking for the online loop: ``--report_to wandb | trackio | none`` behind one small object.

trackio mirrors wandb's ``init``/``log``/``finish``; both run offline (``WANDB_MODE=offline``; trackio keeps
its runs in a local database). The offline trainer uses transformers' own ``report_to`` instead.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from sdpo.utils.command_line import mask_words

REPORT_TO = ("none", "wandb", "trackio")


@dataclass
class Tracker:
    """Logs numeric metrics to the chosen backend; ``report_to="none"`` logs nothing."""

    report_to: str = "none"
    module: object = None

    @classmethod
    def start(cls, report_to: str, *, project: str, name: str, config: dict, directory: str, run_id: str) -> Tracker:
        if report_to == "none":
            return cls()
        try:
            module = importlib.import_module(report_to)
        except ImportError:
            raise ValueError(
                f"--report_to {report_to} needs the {report_to} package: pip install {report_to}"
            ) from None
        if report_to == "wandb":
            # wandb stores the command line in its run files: it sees the one with its secrets masked.
            given = sys.argv
            sys.argv = [given[0], *mask_words(given[1:])] if given else given
            try:
                module.init(project=project, name=name, config=config, dir=directory, id=run_id, resume="allow")
            finally:
                sys.argv = given
        else:
            module.init(project=project, name=name, config=config, resume="allow")
        return cls(report_to, module)

    def log(self, metrics: dict, *, step: int, prefix: str) -> None:
        if self.module is not None:
            numeric = {
                f"{prefix}/{k}": v
                for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)
            }
            self.module.log(numeric, step=step)

    def finish(self) -> None:
        if self.module is not None:
            self.module.finish()
