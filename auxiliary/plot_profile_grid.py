"""One figure from several online runs, a panel per run with its in-context oracle (paper Fig. 9, 2x3).

    python auxiliary/plot_profile_grid.py --out runs/fig9/fig9_profiles.png runs/fig9/detailed_professional_expert ...

Each argument is a run folder of ``eval_online_sdpo.py`` (its ``run_state.json`` names the results file); the
panels follow the order of the arguments. ``FIGURE=fig9 ./scripts/reproduce_paper.sh`` calls this after its six
runs. A folder without a finished results file ends the command with one line naming it (exit 1).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sdpo.data.data_sources import DataError
from sdpo.evaluation.plots import plot_profile_grid
from sdpo.online.run_state import STATE_FILE, read_json


def run_panel(folder: Path) -> tuple[str, list[dict], dict | None]:
    """(primary style, eval_history, its oracle metrics or None) of the run in ``folder``."""
    state = read_json(folder / STATE_FILE, "settings", "index", "eval_dir")
    eval_dir = Path(state["eval_dir"])
    results_path = (eval_dir if eval_dir.is_absolute() else folder / eval_dir) / (
        f"{state['settings']['run_name']}_{state['index']}.json"
    )
    if not results_path.is_file():
        raise DataError(f"{folder}: no results file {results_path.name} yet; finish (or --resume) that run first")
    results = read_json(results_path, "meta", "eval_history")
    style = results["meta"]["judged_styles"][0]
    return style, results["eval_history"], (results["meta"].get("oracle") or {}).get(style)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (--out_dir of eval_online_sdpo.py)")
    parser.add_argument("--out", required=True, type=Path, help="the figure (png, pdf or svg)")
    parser.add_argument("--title", default=None)
    args = parser.parse_args(argv)
    try:
        panels = [run_panel(folder) for folder in args.runs]
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    plot_profile_grid(panels, args.out, title=args.title)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
