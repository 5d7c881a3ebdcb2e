"""Experiment tracking for the online loop: ``--report_to wandb | trackio | none`` behind one small object.

trackio mirrors wandb's ``init``/``log``/``finish``; both run offline (``WANDB_MODE=offline``; trackio keeps
its runs in a local database). The offline trainer uses transformers' own ``report_to`` instead.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

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
            raise ValueError(f"--report_to {report_to} needs the {report_to} package: pip install {report_to}") from None
        if report_to == "wandb":
            module.init(project=project, name=name, config=config, dir=directory, id=run_id, resume="allow")
        else:
            module.init(project=project, name=name, config=config, resume="allow")
        return cls(report_to, module)

    def log(self, metrics: dict, *, step: int, prefix: str) -> None:
        if self.module is not None:
            numeric = {f"{prefix}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            self.module.log(numeric, step=step)

    def finish(self) -> None:
        if self.module is not None:
            self.module.finish()
