"""The win-rate figures, drawn with matplotlib's object API (no pyplot global state) and written
atomically (``file_io.replace_atomically``; the format follows the file extension).

Win rate (the online loop, checkpoint evaluation):
  * ``plot_winrate``: win rate ± s.e. (ties excluded) against interactions, one line per judged style,
    the in-context oracle as a dashed line per style, the simulated user's persona switches as vertical
    lines, and a panel below with the share of decided pairs (coverage). A point decided by fewer than
    ``min_decided`` pairs is drawn hollow, without an error bar. A style judged against the policy of its
    introduction (``--style_baseline introduced``) is drawn from that point on and says so in the legend.
  * ``plot_profile_grid``: one panel per run (paper Fig. 9): the run's style over interactions with its
    in-context oracle line.

Per-token SDPO signals: ``sdpo.evaluation.signal_plots`` (it shares ``save_figure``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from sdpo.evaluation.diagnostics import draw_diagnostics, has_diagnostics
from sdpo.utils.file_io import replace_atomically

SECONDARY_PREFIX = "secondary_"


def save_figure(figure: Figure, path: str | os.PathLike, *, dpi: int) -> None:
    """Write ``figure`` atomically to ``path``; the image format is the extension (PNG without one)."""
    path = Path(path)
    image_format = path.suffix.lstrip(".").lower() or "png"
    FigureCanvasAgg(figure)
    replace_atomically(
        path, lambda handle: figure.savefig(handle, format=image_format, dpi=dpi, bbox_inches="tight"), binary=True
    )


# --------------------------------------------------------------------------------------------------
# Win rate
# --------------------------------------------------------------------------------------------------

WINRATE_DPI = 120
STYLE_MARKERS = "osD^v<>p*h"
HOLLOW_MARKER_SIZE = 7
SWITCH_COLOR = "0.35"


def is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _interaction(entry: Mapping) -> int:
    """Where an evaluation sits on the x axis: several interactions may share one optimizer step."""
    interaction = entry.get("interaction")
    return entry["step"] if interaction is None else interaction


def _decided(metrics: Mapping) -> int:
    if metrics.get("n_effective") is not None:
        return int(metrics["n_effective"])
    return int(metrics.get("wins_a") or 0) + int(metrics.get("wins_b") or 0)


def _coverage(metrics: Mapping) -> float | None:
    if is_finite(metrics.get("coverage")):
        return float(metrics["coverage"])
    return _decided(metrics) / metrics["n"] if metrics.get("n") else None


def styles_in_history(eval_history: Sequence[Mapping], primary_style: str) -> list[str]:
    """``primary_style`` followed by every ``secondary_<style>`` of ``eval_history``, in first-seen order."""
    styles = [primary_style]
    for entry in eval_history:
        for key in entry:
            style = key[len(SECONDARY_PREFIX) :]
            if key.startswith(SECONDARY_PREFIX) and style not in styles:
                styles.append(style)
    return styles


@dataclass
class _StyleCurve:
    """One judged style's evaluations, split the way they are drawn."""

    certain_x: list[float] = field(default_factory=list)
    certain_winrate: list[float] = field(default_factory=list)
    certain_se: list[float] = field(default_factory=list)
    uncertain_x: list[float] = field(default_factory=list)
    uncertain_winrate: list[float] = field(default_factory=list)
    coverage_x: list[float] = field(default_factory=list)
    coverage: list[float] = field(default_factory=list)

    @property
    def any_decided(self) -> bool:
        return bool(self.certain_x or self.uncertain_x)


def _style_curve(eval_history: Sequence[Mapping], key: str | None, min_decided: int, shift: float) -> _StyleCurve:
    curve = _StyleCurve()
    for entry in eval_history:
        metrics = entry if key is None else entry.get(key)
        if not metrics:
            continue
        x = _interaction(entry) + shift
        coverage = _coverage(metrics)
        if coverage is not None:
            curve.coverage_x.append(x)
            curve.coverage.append(100.0 * coverage)
        winrate = metrics.get("winrate_a")
        if not is_finite(winrate) or _decided(metrics) == 0:
            continue
        if _decided(metrics) >= min_decided:
            se = metrics.get("se")
            curve.certain_x.append(x)
            curve.certain_winrate.append(winrate)
            curve.certain_se.append(se if is_finite(se) else 0.0)
        else:
            curve.uncertain_x.append(x)
            curve.uncertain_winrate.append(winrate)
    return curve


def _draw_style(
    axes, coverage_axes, style: str, curve: _StyleCurve, *, color, marker: str, primary: bool, min_decided: int
):
    """Win-rate and coverage artists of one style; returns its legend handle."""
    width = 2.2 if primary else 1.4
    if curve.certain_x:
        # Only the filled points are joined: a line through hollow ones would draw noise as a trend.
        axes.plot(
            curve.certain_x,
            curve.certain_winrate,
            color=color,
            linewidth=width,
            alpha=0.55,
            gid=f"winrate-line:{style}",
        )
        points_line, _, (bars,) = axes.errorbar(
            curve.certain_x,
            curve.certain_winrate,
            yerr=curve.certain_se,
            fmt=marker,
            color=color,
            markersize=6,
            capsize=3,
            elinewidth=1.2,
        )
        points_line.set_gid(f"winrate-certain:{style}")
        bars.set_gid(f"winrate-errorbars:{style}")
    if curve.uncertain_x:
        axes.plot(
            curve.uncertain_x,
            curve.uncertain_winrate,
            linestyle="none",
            marker=marker,
            markersize=HOLLOW_MARKER_SIZE,
            markerfacecolor="none",
            markeredgecolor=color,
            markeredgewidth=1.5,
            gid=f"winrate-hollow:{style}",
        )
    if curve.coverage_x:
        coverage_axes.plot(
            curve.coverage_x,
            curve.coverage,
            color=color,
            marker=marker,
            markersize=4,
            linewidth=width * 0.7,
            gid=f"coverage:{style}",
        )
    if not curve.any_decided:
        label = f"{style} (no decided pairs)"
    elif not curve.certain_x:
        label = f"{style} (< {min_decided} decided pairs at every evaluation)"
    else:
        label = style
    return Line2D([], [], color=color, marker=marker, linewidth=width, label=label)


def _draw_oracle(axes, coverage_axes, style: str, metrics: Mapping, *, color, min_decided: int):
    """The in-context oracle's win rate (and coverage) as horizontal lines; returns its legend handle."""
    decided, winrate = _decided(metrics), metrics.get("winrate_a")
    name = f"{style} in-context oracle"
    if decided == 0 or not is_finite(winrate):
        return Line2D([], [], color=color, linestyle=":", alpha=0.45, label=f"{name} (no decided pairs, not drawn)")
    if decided < min_decided:
        line = {"linestyle": ":", "linewidth": 1.4, "alpha": 0.45}
        label = f"{name}: {winrate:.0f}%, only {decided} decided pairs (< {min_decided}, unreliable)"
    else:
        se = metrics.get("se")
        line = {"linestyle": "--", "linewidth": 1.6, "alpha": 0.9}
        label = f"{name}: {winrate:.0f}%" + (f" ± {se:.0f}" if is_finite(se) else "") + f" ({decided} decided)"
    artist = axes.axhline(winrate, color=color, label=label, gid=f"oracle:{style}", **line)
    coverage = _coverage(metrics)
    if coverage is not None:
        coverage_axes.axhline(100.0 * coverage, color=color, gid=f"oracle-coverage:{style}", **line)
    return artist


def plot_winrate(
    eval_history: Sequence[Mapping],
    path: str | os.PathLike,
    *,
    styles: Sequence[str],
    oracle: Mapping[str, Mapping] | None = None,
    switch_points: Sequence[tuple[int, str]] = (),
    min_decided: int = 5,
    title: str | None = None,
    baseline_at: Mapping[str, int] | None = None,
    preflight: Mapping[str, Mapping] | None = None,
) -> Figure:
    """Draw the win rate of the trained policy against the baseline over interactions; return the figure.

    ``eval_history`` entries (the results file's ``eval_history``) hold ``interaction`` (else ``step``
    is used), the metrics of ``styles[0]`` at the top level and those of every other style under
    ``secondary_<style>``; metrics are ``compute_metrics`` dicts (``winrate_a``, ``se``, ``coverage``,
    ``n_effective``, ``n``, ...). ``oracle`` maps a style to the in-context oracle's metrics (a dashed
    line in the style's colour; dotted and faint when fewer than ``min_decided`` pairs were decided).
    ``switch_points`` are ``(interaction, new_style)`` pairs where the simulated user changed persona.
    ``baseline_at`` maps a style to the interaction its baseline was taken at (results meta
    ``style_baselines``); a style whose baseline is a later policy is labelled with it (its curve has
    points only from there, where the history starts judging it). ``preflight`` maps a style to the
    pre-flight check's teacher-vs-policy metrics (a dash-dot line in the style's colour, beside the oracle's).

    A point decided by fewer than ``min_decided`` pairs is drawn hollow and without an error bar; a style
    that had only ties stays in the legend, marked "(no decided pairs)". The lower panel shows each
    style's coverage (share of pairs the judge decided). The file is replaced atomically.
    """
    if not styles:
        raise ValueError("plot_winrate needs at least one style (styles[0] is the primary judge's)")
    if min_decided < 1:
        raise ValueError(f"min_decided must be >= 1, got {min_decided}")
    oracle = oracle or {}
    palette = colormaps["tab10"].colors
    ordered = list(dict.fromkeys([*styles, *oracle, *(style for _, style in switch_points)]))
    colors = {style: palette[index % len(palette)] for index, style in enumerate(ordered)}

    diagnostics = has_diagnostics(eval_history)  # a third panel: collapse diagnostics (sdpo.evaluation.diagnostics)
    figure = Figure(figsize=(11, 7.8 if diagnostics else 6.2), layout="constrained")
    panels = figure.subplots(
        3 if diagnostics else 2, 1, sharex=True, height_ratios=[3, 1, 1.4][: 3 if diagnostics else 2]
    )
    axes, coverage_axes = panels[0], panels[1]
    reference = axes.axhline(50.0, color="grey", linewidth=1, linestyle=(0, (1, 3)), label="50% = no preference")

    xs = sorted({_interaction(entry) for entry in eval_history})
    spacing = float(min(np.diff(xs))) if len(xs) > 1 else 1.0
    handles = [reference]
    for position, style in enumerate(styles):
        # Styles are judged at the same interactions; a small sideways shift keeps their error bars apart.
        shift = (position - (len(styles) - 1) / 2) * 0.02 * spacing
        key = None if position == 0 else f"{SECONDARY_PREFIX}{style}"
        curve = _style_curve(eval_history, key, min_decided, shift)
        handle = _draw_style(
            axes,
            coverage_axes,
            style,
            curve,
            color=colors[style],
            marker=STYLE_MARKERS[position % len(STYLE_MARKERS)],
            primary=position == 0,
            min_decided=min_decided,
        )
        introduced = (baseline_at or {}).get(style, 0)
        if introduced:
            handle.set_label(f"{handle.get_label()} (vs the policy at interaction {introduced})")
        handles.append(handle)
    handles += [
        _draw_oracle(axes, coverage_axes, style, metrics, color=colors[style], min_decided=min_decided)
        for style, metrics in oracle.items()
    ]
    for style, metrics in (preflight or {}).items():
        if is_finite(metrics.get("winrate_a")) and _decided(metrics):
            handles.append(
                axes.axhline(
                    metrics["winrate_a"],
                    color=colors.get(style, "0.3"),
                    linestyle="-.",
                    linewidth=1.3,
                    alpha=0.8,
                    gid=f"preflight:{style}",
                    label=f"{style} pre-flight: teacher x⊕o vs policy {metrics['winrate_a']:.0f}% "
                    f"({_decided(metrics)} decided)",
                )
            )
    for interaction, new_style in switch_points:
        for panel in (axes, coverage_axes):
            panel.axvline(interaction, color=SWITCH_COLOR, linestyle="-.", linewidth=1.2, gid=f"switch:{interaction}")
        axes.annotate(
            f" user → {new_style}",
            xy=(interaction, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -4),
            textcoords="offset points",
            rotation=90,
            ha="left",
            va="top",
            fontsize="small",
            color=colors[new_style],
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1},
            gid=f"switch-label:{interaction}",
        )
    if switch_points:
        handles.append(Line2D([], [], color=SWITCH_COLOR, linestyle="-.", label="simulated user switches persona"))
    handles += [
        Line2D(
            [],
            [],
            color="0.2",
            marker="o",
            linestyle="none",
            label=f"filled: ± 1 s.e., ≥ {min_decided} decided pairs",
        ),
        Line2D(
            [],
            [],
            color="0.2",
            marker="o",
            markerfacecolor="none",
            linestyle="none",
            label=f"hollow: < {min_decided} decided pairs, no error bar",
        ),
    ]

    all_x = xs + [interaction for interaction, _ in switch_points]
    if len(set(all_x)) == 1:
        # Otherwise matplotlib zooms into a sub-unit range around the lone interaction.
        axes.set_xlim(all_x[0] - 1, all_x[0] + 1)
        axes.set_xticks([all_x[0]])
    else:
        coverage_axes.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
    # A little room beyond 0 and 100 keeps markers and oracle lines there visible.
    axes.set_ylim(-3, 103)
    axes.set_yticks(range(0, 101, 20))
    axes.set_ylabel("win rate vs baseline\n(%, ties excluded)")
    axes.grid(alpha=0.3)
    coverage_axes.set_ylim(-5, 105)
    coverage_axes.set_yticks([0, 50, 100])
    coverage_axes.set_ylabel("decided\npairs (%)")
    coverage_axes.grid(alpha=0.3)
    if diagnostics:
        draw_diagnostics(panels[2], eval_history)
    panels[-1].set_xlabel("interactions")
    figure.legend(handles=handles, loc="outside right upper", fontsize="small", frameon=False)
    if title:
        axes.set_title(title)
    save_figure(figure, path, dpi=WINRATE_DPI)
    return figure


GRID_COLUMNS = 3


def plot_profile_grid(
    panels: Sequence[tuple[str, Sequence[Mapping], Mapping | None]],
    path: str | os.PathLike,
    *,
    min_decided: int = 5,
    title: str | None = None,
) -> Figure:
    """One panel per run, three per row (paper Fig. 9): ``(style, eval_history, oracle metrics or None)``.

    Each panel draws the run's primary style (the history's top-level metrics) ± s.e. against interactions and,
    when given, its in-context oracle as a dashed line; hollow points as in ``plot_winrate``.
    """
    if not panels:
        raise ValueError("plot_profile_grid needs at least one run")
    rows = math.ceil(len(panels) / GRID_COLUMNS)
    figure = Figure(figsize=(4.6 * GRID_COLUMNS, 3.6 * rows), layout="constrained")
    grid = np.atleast_2d(figure.subplots(rows, GRID_COLUMNS, sharey=True, squeeze=False))
    color = colormaps["tab10"].colors[0]
    for index, axes in enumerate(grid.flat):
        if index >= len(panels):
            axes.set_visible(False)
            continue
        style, history, oracle = panels[index]
        axes.axhline(50.0, color="grey", linewidth=1, linestyle=(0, (1, 3)))
        # The grid shows win rates only: the coverage artists go to a hidden twin.
        hidden = axes.twinx()
        hidden.set_visible(False)
        curve = _style_curve(history, None, min_decided, 0.0)
        _draw_style(axes, hidden, style, curve, color=color, marker="o", primary=True, min_decided=min_decided)
        if oracle:
            _draw_oracle(axes, hidden, style, oracle, color=color, min_decided=min_decided)
        axes.set_title(style.replace("_", " / "), fontsize="medium")
        axes.set_ylim(-3, 103)
        axes.set_yticks(range(0, 101, 20))
        axes.grid(alpha=0.3)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
        if index % GRID_COLUMNS == 0:
            axes.set_ylabel("win rate vs base (%)")
        if index >= len(panels) - GRID_COLUMNS:
            axes.set_xlabel("interactions")
    handles = [
        Line2D([], [], color=color, marker="o", label="SDPO, ± 1 s.e."),
        Line2D([], [], color=color, linestyle="--", label="in-context oracle"),
    ]
    figure.legend(handles=handles, loc="outside lower center", ncols=2, frameon=False)
    if title:
        figure.suptitle(title)
    save_figure(figure, path, dpi=WINRATE_DPI)
    return figure


# --------------------------------------------------------------------------------------------------
# Per-token signals
# --------------------------------------------------------------------------------------------------
