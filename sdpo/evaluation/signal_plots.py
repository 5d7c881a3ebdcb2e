"""Per-token SDPO signal figures (``sdpo_signal_analysis.py``, the live chat's token colours).

* ``signal_colormap`` / ``signal_color_hex``: the one colour scale of a signal (RdBu on a
  TwoSlopeNorm centred on 0; red = the follow-up makes the token less likely, blue = more likely,
  white ≈ unchanged or missing), shared with anything else that colours tokens by their signal;
* ``write_signal_figures``: heatmaps (one row per case), stacked and side-by-side comparisons, and
  one case's first tokens as coloured boxes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm, to_hex, to_rgb
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties, findfont
from matplotlib.ft2font import FT2Font
from matplotlib.patches import FancyBboxPatch
from matplotlib.transforms import Affine2D

from sdpo.evaluation.plots import is_finite, save_figure

SIGNAL_COLORMAP = "RdBu"
MISSING_SIGNAL_COLOR = "white"
FIGURE_DPI = 220
TICK_STEP = 25
TICK_FONTSIZE = 14
SPINE_WIDTH = 2.2
TOKEN_FONTSIZE = 14
TOKEN_LABEL_FONTSIZE = 16
LIGHT_BACKGROUND_LUMINANCE = 0.62


def signal_colormap(vmin: float, vmax: float) -> tuple[TwoSlopeNorm, object]:
    """``(norm, cmap)`` of a signal: RdBu on ``TwoSlopeNorm(vmin, 0, vmax)``, NaN drawn white.

    Red = the follow-up makes the token less likely, white ≈ unchanged, blue = more likely. Needs
    finite ``vmin < 0 < vmax``; callers clip values to ``[vmin, vmax]``.
    """
    if not (is_finite(vmin) and is_finite(vmax) and vmin < 0 < vmax):
        raise ValueError(f"the signal colour scale needs finite vmin < 0 < vmax, got {vmin} and {vmax}")
    return TwoSlopeNorm(vmin=vmin, vcenter=0.0, vmax=vmax), colormaps[SIGNAL_COLORMAP].with_extremes(
        bad=MISSING_SIGNAL_COLOR
    )


def signal_color_hex(value: float | None, vmin: float, vmax: float) -> str:
    """``"#rrggbb"`` of one signal value on ``signal_colormap(vmin, vmax)``, clipped; None/NaN → white."""
    norm, cmap = signal_colormap(vmin, vmax)
    if not is_finite(value):
        return to_hex(MISSING_SIGNAL_COLOR)
    return to_hex(cmap(norm(min(max(float(value), vmin), vmax))), keep_alpha=False)


def text_color_hex(background: str) -> str:
    """Black or white, whichever reads better on ``background`` (any matplotlib colour)."""
    red, green, blue = to_rgb(background)
    luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
    return "#000000" if luminance > LIGHT_BACKGROUND_LUMINANCE else "#ffffff"


@dataclass(frozen=True)
class SignalFigureSettings:
    """What the signal figures show: ``max_cols`` tokens per heatmap row, the colour range, and the
    first ``token_n`` tokens of case ``token_case_index`` (1-based heatmap row) as token boxes."""

    max_cols: int = 120
    vmin: float = -15.0
    vmax: float = 3.0
    token_case_index: int = 1
    token_n: int = 15


def signal_matrix(rows: Sequence[Sequence[float]], max_cols: int, vmin: float, vmax: float) -> np.ndarray:
    """(len(rows), max_cols) array of the first ``max_cols`` values per row, clipped; shorter rows NaN-padded."""
    matrix = np.full((len(rows), max_cols), np.nan, dtype=np.float64)
    for index, row in enumerate(rows):
        values = np.asarray(row[:max_cols], dtype=np.float64)
        matrix[index, : values.size] = np.clip(values, vmin, vmax)
    return matrix


def _draw_heatmap(axes, matrix: np.ndarray, norm, cmap):
    image = axes.imshow(np.ma.masked_invalid(matrix), cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    axes.set_yticks([])
    ticks = np.arange(0, matrix.shape[1], TICK_STEP)
    axes.set_xticks(ticks)
    axes.set_xticklabels([str(t) for t in ticks], fontsize=TICK_FONTSIZE)
    for spine in axes.spines.values():
        spine.set_color("black")
        spine.set_linewidth(SPINE_WIDTH)
    return image


def _style_colorbar(colorbar, vmin: float, vmax: float) -> None:
    colorbar.set_ticks([vmin, 0.0, vmax])
    colorbar.set_ticklabels([f"{vmin:g}", "0", f"{vmax:+g}"])
    colorbar.ax.tick_params(labelsize=TICK_FONTSIZE)


def plot_heatmap(matrix: np.ndarray, path: Path, vmin: float, vmax: float) -> Figure:
    """One signal matrix with its colorbar (``unrelated.png`` / ``followup.png``)."""
    norm, cmap = signal_colormap(vmin, vmax)
    figure = Figure(figsize=(12, 2.7))
    axes = figure.add_subplot()
    image = _draw_heatmap(axes, matrix, norm, cmap)
    _style_colorbar(figure.colorbar(image, ax=axes, fraction=0.035, pad=0.02), vmin, vmax)
    save_figure(figure, path, dpi=FIGURE_DPI)
    return figure


def plot_stacked(unrelated: np.ndarray, followup: np.ndarray, path: Path, vmin: float, vmax: float) -> Figure:
    """Unrelated above feedback on a shared x axis, one colorbar spanning both rows."""
    norm, cmap = signal_colormap(vmin, vmax)
    figure = Figure(figsize=(12, 5.4))
    grid = figure.add_gridspec(2, 2, width_ratios=[1, 0.045], wspace=0.12, hspace=0.20)
    top = figure.add_subplot(grid[0, 0])
    bottom = figure.add_subplot(grid[1, 0], sharex=top)
    image = _draw_heatmap(top, unrelated, norm, cmap)
    _draw_heatmap(bottom, followup, norm, cmap)
    top.tick_params(labelbottom=False)
    _style_colorbar(figure.colorbar(image, cax=figure.add_subplot(grid[:, 1])), vmin, vmax)
    save_figure(figure, path, dpi=FIGURE_DPI)
    return figure


def plot_side_by_side(unrelated: np.ndarray, followup: np.ndarray, path: Path, vmin: float, vmax: float) -> Figure:
    """Unrelated (left) and feedback (right) panels sharing the y axis, colorbar on the right panel."""
    norm, cmap = signal_colormap(vmin, vmax)
    figure = Figure(figsize=(12, 2.7))
    left, right = figure.subplots(1, 2, sharey=True)
    _draw_heatmap(left, unrelated, norm, cmap)
    image = _draw_heatmap(right, followup, norm, cmap)
    _style_colorbar(figure.colorbar(image, ax=right, fraction=0.035, pad=0.02), vmin, vmax)
    save_figure(figure, path, dpi=FIGURE_DPI)
    return figure


def _monospace_has_glyph(character: str) -> bool:
    return ord(character) in FT2Font(findfont(FontProperties(family="monospace"))).get_charmap()


def token_display_text(piece: str, space_glyph: str = "␠") -> tuple[int, str]:
    """(number of leading spaces, text to draw in the box) for one decoded token.

    Newlines show as ⏎ and tabs as ⇥; a token of spaces only shows as ``space_glyph``; an empty token as ∅.
    Leading spaces are returned separately so they can be drawn as a gap before the box.
    """
    text = piece.replace("\r", "").replace("\n", "⏎").replace("\t", "⇥")
    if not text:
        return 0, "∅"
    if not text.strip(" "):
        return 0, space_glyph
    stripped = text.lstrip(" ")
    return len(text) - len(stripped), stripped


def plot_token_boxes(
    pieces: Sequence[str],
    sig_unrel: Sequence[float],
    sig_follow: Sequence[float],
    case_number: int,
    path: Path,
    vmin: float,
    vmax: float,
) -> Figure:
    """Two labelled rows of rounded token boxes coloured by each token's signal (``case{N}_tokens.png``).

    The figure size follows the measured text extents, so long tokens never overlap.
    """
    # DejaVu Sans Mono (matplotlib's default monospace) has no U+2420 "␠"; fall back to "␣".
    space_glyph = "␠" if _monospace_has_glyph("␠") else "␣"
    token_font = FontProperties(family="monospace", size=TOKEN_FONTSIZE)
    label_font = FontProperties(size=TOKEN_LABEL_FONTSIZE)
    renderer = FigureCanvasAgg(Figure(dpi=FIGURE_DPI)).get_renderer()
    to_points = 72.0 / FIGURE_DPI

    def measure(text: str, font) -> tuple[float, float, float]:
        width, height, descent = renderer.get_text_width_height_descent(text, font, ismath=False)
        return width * to_points, height * to_points, descent * to_points

    margin, box_pad, box_gap, label_gap, row_gap = 10.0, 4.0, 5.0, 6.0, 14.0
    char_width = measure("M" * 10, token_font)[0] / 10
    _, line_height, line_descent = measure("Ag|⏎", token_font)
    box_height = line_height + 2 * box_pad
    display = [token_display_text(piece, space_glyph) for piece in pieces]
    widths = [measure(text, token_font)[0] + 2 * box_pad for _, text in display]
    boxes_width = sum(lead * char_width + width for (lead, _), width in zip(display, widths)) + box_gap * (
        len(display) - 1
    )
    labels = [f"Case {case_number} — {kind} — first {len(pieces)} tokens:" for kind in ("Unrelated", "Follow-up")]
    label_sizes = [measure(label, label_font) for label in labels]
    row_heights = [size[1] + label_gap + box_height for size in label_sizes]
    fig_width = 2 * margin + max(boxes_width, *(size[0] for size in label_sizes))
    fig_height = 2 * margin + sum(row_heights) + row_gap

    figure = Figure(figsize=(fig_width / 72, fig_height / 72), dpi=FIGURE_DPI)
    points = Affine2D().scale(1 / 72) + figure.dpi_scale_trans
    top = fig_height - margin
    rows = zip(labels, label_sizes, (sig_unrel, sig_follow), row_heights)
    for label, (_, label_height, label_descent), values, row_height in rows:
        figure.text(margin, top - label_height + label_descent, label, fontproperties=label_font, transform=points)
        box_bottom = top - row_height
        x = margin
        for (lead, text), width, value in zip(display, widths, values):
            x += lead * char_width
            face = signal_color_hex(value, vmin, vmax)
            figure.add_artist(
                FancyBboxPatch(
                    (x, box_bottom),
                    width,
                    box_height,
                    boxstyle="round,pad=0,rounding_size=4",
                    facecolor=(*to_rgb(face), 0.95),
                    edgecolor=(0, 0, 0, 0.25),
                    linewidth=0.8,
                    transform=points,
                )
            )
            figure.text(
                x + box_pad,
                box_bottom + box_pad + line_descent,
                text,
                fontproperties=token_font,
                color=text_color_hex(face),
                transform=points,
            )
            x += width + box_gap
        top = box_bottom - row_gap
    save_figure(figure, path, dpi=FIGURE_DPI)
    return figure


SIGNAL_HEATMAP_FILES = ("unrelated.png", "followup.png", "stacked.png", "side_by_side.png")


def token_figure_name(case_index: int) -> str:
    return f"case{case_index}_tokens.png"


def write_signal_figures(cases: Sequence[Mapping], out_dir: Path, settings: SignalFigureSettings) -> list[Path]:
    """Draw every signal figure for the kept cases into ``out_dir``; return the paths written.

    Each case needs ``sig_unrel``, ``sig_follow``, ``n_tokens`` and ``completion_pieces`` (the decoded
    tokens). The token-box figure is drawn only when ``settings.token_case_index`` names a kept case.
    """
    vmin, vmax = settings.vmin, settings.vmax
    unrelated = signal_matrix([c["sig_unrel"] for c in cases], settings.max_cols, vmin, vmax)
    followup = signal_matrix([c["sig_follow"] for c in cases], settings.max_cols, vmin, vmax)
    written = [out_dir / name for name in SIGNAL_HEATMAP_FILES]
    plot_heatmap(unrelated, written[0], vmin, vmax)
    plot_heatmap(followup, written[1], vmin, vmax)
    plot_stacked(unrelated, followup, written[2], vmin, vmax)
    plot_side_by_side(unrelated, followup, written[3], vmin, vmax)
    if 1 <= settings.token_case_index <= len(cases):
        case = cases[settings.token_case_index - 1]
        n = min(settings.token_n, case["n_tokens"])
        path = out_dir / token_figure_name(settings.token_case_index)
        plot_token_boxes(
            case["completion_pieces"][:n],
            case["sig_unrel"][:n],
            case["sig_follow"][:n],
            settings.token_case_index,
            path,
            vmin,
            vmax,
        )
        written.append(path)
    return written
