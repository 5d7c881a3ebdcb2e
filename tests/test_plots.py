"""auxiliary/plots.py: the win-rate figure (read back from its matplotlib artists, not its pixels), the
signal colour scale, and the signal figures."""

import json
import math

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_hex, to_rgb

from sdpo.evaluation.evaluation_helpers import compute_metrics
from sdpo.evaluation.plots import plot_profile_grid, plot_winrate, save_figure, styles_in_history
from sdpo.evaluation.signal_plots import (
    SIGNAL_HEATMAP_FILES,
    SignalFigureSettings,
    plot_heatmap,
    plot_token_boxes,
    signal_color_hex,
    signal_colormap,
    signal_matrix,
    text_color_hex,
    token_display_text,
    write_signal_figures,
)
from sdpo.utils.file_io import to_json_safe

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def metrics(wins: int, losses: int, ties: int) -> dict:
    return compute_metrics([0] * wins + [1] * losses + [-1] * ties, seed=0, n_bootstrap=50)


def entry(step: int, interaction: int, primary: dict, **secondary: dict) -> dict:
    return {**primary, "step": step, "interaction": interaction, **{f"secondary_{s}": m for s, m in secondary.items()}}


# Two interactions per optimizer step; `short` has 3 decided pairs at interaction 4 (below the minimum of 5),
# `no_lists` has 2 at interaction 0, `answer_directly` only ties.
HISTORY = [
    entry(0, 0, metrics(4, 4, 16), no_lists=metrics(1, 1, 22), answer_directly=metrics(0, 0, 24)),
    entry(2, 4, metrics(2, 1, 21), no_lists=metrics(6, 3, 15), answer_directly=metrics(0, 0, 24)),
    entry(4, 8, metrics(12, 2, 10), no_lists=metrics(8, 2, 14), answer_directly=metrics(0, 0, 24)),
]
STYLES = ["short", "no_lists", "answer_directly"]
ORACLE = {"short": metrics(14, 3, 7), "no_lists": metrics(2, 1, 21), "answer_directly": metrics(0, 0, 24)}


def by_gid(axes, gid: str):
    found = [artist for artist in axes.get_children() if artist.get_gid() == gid]
    assert len(found) == 1, (gid, [a.get_gid() for a in axes.get_children() if a.get_gid()])
    return found[0]


def legend_texts(figure) -> list[str]:
    return [text.get_text() for text in figure.legends[0].get_texts()]


@pytest.fixture()
def winrate_figure(tmp_path):
    path = tmp_path / "winrate.png"
    figure = plot_winrate(HISTORY, path, styles=STYLES, oracle=ORACLE, switch_points=[(6, "no_lists")], title="run_1")
    return figure, path


def test_the_figure_is_written_atomically_as_the_extension_says(tmp_path, winrate_figure):
    _, path = winrate_figure
    assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 10_000
    assert [p.name for p in path.parent.iterdir()] == ["winrate.png"]  # no temp file left
    for name, magic in (("w.pdf", b"%PDF"), ("w.svg", b"<?xml")):
        plot_winrate(HISTORY, tmp_path / name, styles=STYLES)
        assert (tmp_path / name).read_bytes().startswith(magic)


def test_same_input_gives_the_same_png(tmp_path):
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    for path in (first, second):
        plot_winrate(HISTORY, path, styles=STYLES, oracle=ORACLE, switch_points=[(6, "no_lists")])
    assert first.read_bytes() == second.read_bytes()


def test_points_with_few_decided_pairs_are_hollow_and_have_no_error_bar(winrate_figure):
    figure, _ = winrate_figure
    axes = figure.axes[0]
    hollow = by_gid(axes, "winrate-hollow:short")
    assert hollow.get_markerfacecolor() == "none" and hollow.get_linestyle() == "None"
    # x is the interaction (4), not the optimizer step (2); the primary style is shifted slightly left.
    (x,), (y,) = hollow.get_data()
    assert x == pytest.approx(4, abs=0.2) and x < 4 and y == pytest.approx(HISTORY[1]["winrate_a"])
    filled = by_gid(axes, "winrate-certain:short")
    assert [round(x) for x in filled.get_xdata()] == [0, 8] and filled.get_markerfacecolor() != "none"
    bars = by_gid(axes, "winrate-errorbars:short").get_segments()
    assert len(bars) == 2  # one error bar per filled point, none for the hollow one
    se = HISTORY[2]["se"]
    assert bars[1][:, 1] == pytest.approx([HISTORY[2]["winrate_a"] - se, HISTORY[2]["winrate_a"] + se])
    assert [round(x) for x in by_gid(axes, "winrate-line:short").get_xdata()] == [0, 8]  # the line skips hollow points
    no_lists_hollow = by_gid(axes, "winrate-hollow:no_lists")
    assert [round(x) for x in no_lists_hollow.get_xdata()] == [0]
    assert any("< 5 decided pairs" in text for text in legend_texts(figure))


def test_the_minimum_is_a_parameter_and_stated(tmp_path):
    figure = plot_winrate(HISTORY, tmp_path / "w.png", styles=STYLES, min_decided=2)
    axes = figure.axes[0]
    assert not [a for a in axes.get_children() if a.get_gid() == "winrate-hollow:short"]  # 3 decided ≥ 2
    assert [round(x) for x in by_gid(axes, "winrate-certain:no_lists").get_xdata()] == [0, 4, 8]
    assert any("< 2 decided pairs" in text for text in legend_texts(figure))


def test_a_style_with_only_ties_stays_in_the_legend_and_in_the_coverage_panel(winrate_figure):
    figure, _ = winrate_figure
    axes, coverage_axes = figure.axes
    assert "answer_directly (no decided pairs)" in legend_texts(figure)
    assert not [
        a for a in axes.get_children() if str(a.get_gid()).endswith(":answer_directly") and "winrate" in a.get_gid()
    ]
    assert list(by_gid(coverage_axes, "coverage:answer_directly").get_ydata()) == [0, 0, 0]


def test_coverage_panel_shows_the_share_of_decided_pairs_per_style(winrate_figure):
    figure, _ = winrate_figure
    coverage_axes = figure.axes[1]
    for style, key in (("short", None), ("no_lists", "secondary_no_lists")):
        expected = [100 * (e if key is None else e[key])["coverage"] for e in HISTORY]
        assert list(by_gid(coverage_axes, f"coverage:{style}").get_ydata()) == pytest.approx(expected)
    assert coverage_axes.get_xlabel() == "interactions"


def test_oracle_lines_are_dashed_in_the_style_colour_and_faint_when_few_pairs_were_decided(winrate_figure):
    figure, _ = winrate_figure
    axes, coverage_axes = figure.axes
    short_curve = by_gid(axes, "winrate-line:short")
    oracle = by_gid(axes, "oracle:short")
    assert oracle.get_linestyle() == "--" and to_hex(oracle.get_color()) == to_hex(short_curve.get_color())
    assert oracle.get_ydata()[0] == pytest.approx(ORACLE["short"]["winrate_a"])
    assert by_gid(coverage_axes, "oracle-coverage:short").get_ydata()[0] == pytest.approx(
        100 * ORACLE["short"]["coverage"]
    )
    faint = by_gid(axes, "oracle:no_lists")
    assert faint.get_linestyle() == ":" and faint.get_alpha() < 0.5
    assert to_hex(faint.get_color()) == to_hex(by_gid(axes, "winrate-line:no_lists").get_color())
    texts = legend_texts(figure)
    assert any(t.startswith("short in-context oracle: 82%") for t in texts)
    assert any(t.startswith("no_lists in-context oracle") and "only 3 decided pairs" in t for t in texts)
    assert "answer_directly in-context oracle (no decided pairs, not drawn)" in texts


def test_switch_points_are_vertical_lines_on_both_panels_labelled_with_the_new_style(winrate_figure):
    figure, _ = winrate_figure
    for panel in figure.axes:
        assert list(by_gid(panel, "switch:6").get_xdata()) == [6, 6]
    label = by_gid(figure.axes[0], "switch-label:6")
    assert label.get_text().strip() == "user → no_lists"
    assert to_hex(label.get_color()) == to_hex(by_gid(figure.axes[0], "winrate-line:no_lists").get_color())
    assert "simulated user switches persona" in legend_texts(figure)


def test_x_falls_back_to_step_and_a_lone_or_empty_history_still_draws(tmp_path):
    old_entry = {key: value for key, value in HISTORY[2].items() if key != "interaction"}
    figure = plot_winrate([old_entry], tmp_path / "w.png", styles=["short"])
    assert list(by_gid(figure.axes[0], "winrate-certain:short").get_xdata()) == [4]
    assert figure.axes[0].get_xlim() == (3, 5)
    figure = plot_winrate([], tmp_path / "w.png", styles=["short", "no_lists"], oracle={"short": ORACLE["short"]})
    assert by_gid(figure.axes[0], "oracle:short").get_ydata()[0] == pytest.approx(ORACLE["short"]["winrate_a"])
    assert legend_texts(figure)[1:3] == ["short (no decided pairs)", "no_lists (no decided pairs)"]


def test_styles_in_history_and_argument_checks(tmp_path):
    assert styles_in_history(HISTORY, "short") == STYLES
    with pytest.raises(ValueError, match="at least one style"):
        plot_winrate(HISTORY, tmp_path / "w.png", styles=[])
    with pytest.raises(ValueError, match="min_decided must be >= 1"):
        plot_winrate(HISTORY, tmp_path / "w.png", styles=STYLES, min_decided=0)


# ------------------------------------------------------------------ signal colours and figures


def test_signal_colour_scale_is_rdbu_centred_on_zero_and_clipped():
    rdbu = colormaps["RdBu"]
    assert signal_color_hex(-15, -15, 3) == to_hex(rdbu(0.0)) == signal_color_hex(-100, -15, 3)
    assert signal_color_hex(3, -15, 3) == to_hex(rdbu(1.0)) == signal_color_hex(7.5, -15, 3)
    assert signal_color_hex(0.0, -15, 3) == to_hex(rdbu(0.5))
    assert signal_color_hex(-7.5, -15, 3) == to_hex(rdbu(0.25)) and signal_color_hex(1.5, -15, 3) == to_hex(rdbu(0.75))
    assert signal_color_hex(float("nan"), -15, 3) == signal_color_hex(None, -15, 3) == "#ffffff"
    red, _, blue = to_rgb(signal_color_hex(-2, -15, 3))
    assert red > blue  # less likely → red
    norm, cmap = signal_colormap(-15, 3)
    assert (norm.vmin, norm.vcenter, norm.vmax) == (-15, 0, 3) and to_hex(cmap.get_bad()) == "#ffffff"
    for vmin, vmax in ((0, 3), (-1, 0), (-math.inf, 3), (1, -1)):
        with pytest.raises(ValueError, match="vmin < 0 < vmax"):
            signal_colormap(vmin, vmax)


def test_text_colour_contrasts_with_the_box():
    assert text_color_hex("#ffffff") == "#000000" and text_color_hex(signal_color_hex(0, -15, 3)) == "#000000"
    assert text_color_hex(signal_color_hex(-15, -15, 3)) == "#ffffff" and text_color_hex("#08306b") == "#ffffff"


def test_signal_matrix_clips_and_pads():
    matrix = signal_matrix([[-20.0, 5.0, 1.0], [0.5]], max_cols=2, vmin=-15, vmax=3)
    np.testing.assert_array_equal(matrix[0], [-15.0, 3.0])
    assert matrix[1, 0] == 0.5 and np.isnan(matrix[1, 1])


def test_token_display_text_glyphs():
    assert token_display_text("\n\n") == (0, "⏎⏎")
    assert token_display_text("\t") == (0, "⇥")
    assert token_display_text("   ") == (0, "␠")
    assert token_display_text("  ", space_glyph="␣") == (0, "␣")
    assert token_display_text("") == (0, "∅")
    assert token_display_text("  Hello") == (2, "Hello")
    assert token_display_text("\n world") == (0, "⏎ world")


def test_heatmap_uses_the_shared_scale_and_leaves_missing_tokens_blank(tmp_path):
    matrix = signal_matrix([[-4.0, 0.5, 2.0], [1.0]], max_cols=3, vmin=-15, vmax=3)
    figure = plot_heatmap(matrix, tmp_path / "h.png", -15, 3)
    (image,) = figure.axes[0].get_images()
    assert (image.norm.vmin, image.norm.vcenter, image.norm.vmax) == (-15, 0, 3) and image.cmap.name.startswith("RdBu")
    assert list(image.get_array().mask[1]) == [False, True, True]
    assert (tmp_path / "h.png").read_bytes().startswith(PNG_MAGIC)


def test_token_boxes_are_coloured_by_signal_color_hex(tmp_path):
    values_unrel, values_follow = [0.1, -0.2, 0.0], [-12.0, 2.5, -3.0]
    figure = plot_token_boxes(["Hi", " there", "\n"], values_unrel, values_follow, 2, tmp_path / "t.png", -15, 3)
    faces = [to_hex(box.get_facecolor(), keep_alpha=False) for box in figure.artists]
    assert faces == [signal_color_hex(v, -15, 3) for v in values_unrel + values_follow]
    texts = [t.get_text() for t in figure.texts]
    assert texts == [
        "Case 2 — Unrelated — first 3 tokens:",
        "Hi",
        "there",
        "⏎",
        "Case 2 — Follow-up — first 3 tokens:",
        "Hi",
        "there",
        "⏎",
    ]
    assert to_hex(figure.texts[5].get_color()) == "#ffffff"  # white on the dark red of -12


@pytest.mark.slow
def test_write_signal_figures_writes_every_file_and_skips_an_out_of_range_token_case(tmp_path):
    cases = [
        {
            "sig_unrel": [0.1, -0.3, 0.2],
            "sig_follow": [-5.0, 1.0, 0.4],
            "n_tokens": 3,
            "completion_pieces": ["a", " b", "c"],
        },
        {"sig_unrel": [0.0, 0.2], "sig_follow": [2.0, -1.0], "n_tokens": 2, "completion_pieces": ["x", "y"]},
    ]
    written = write_signal_figures(cases, tmp_path, SignalFigureSettings(max_cols=4, token_case_index=2, token_n=5))
    assert [p.name for p in written] == [*SIGNAL_HEATMAP_FILES, "case2_tokens.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in written)
    assert all(p.read_bytes().startswith(PNG_MAGIC) for p in written)
    other = tmp_path / "other"
    assert [p.name for p in write_signal_figures(cases, other, SignalFigureSettings(token_case_index=3))] == list(
        SIGNAL_HEATMAP_FILES
    )


def test_save_figure_keeps_the_old_file_when_drawing_fails(tmp_path):
    from matplotlib.figure import Figure

    path = tmp_path / "w.png"
    plot_winrate(HISTORY, path, styles=STYLES)
    before = path.read_bytes()
    broken = Figure()
    broken.text(0.5, 0.5, r"$\notacommand{x}$")  # mathtext fails only while the figure is drawn
    with pytest.raises(ValueError):
        save_figure(broken, path, dpi=72)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["w.png"]


def test_a_history_reloaded_from_json_draws_the_same_points(tmp_path):
    reloaded = json.loads(json.dumps(to_json_safe(HISTORY)))  # NaN win rates of all-tie styles become null
    assert reloaded[0]["secondary_answer_directly"]["winrate_a"] is None
    figures = [plot_winrate(history, tmp_path / "w.png", styles=STYLES) for history in (HISTORY, reloaded)]
    for gid in (
        "winrate-certain:short",
        "winrate-hollow:short",
        "winrate-certain:no_lists",
        "coverage:answer_directly",
    ):
        original, again = (by_gid(figure.axes[0 if "winrate" in gid else 1], gid) for figure in figures)
        assert list(original.get_xydata().ravel()) == pytest.approx(list(again.get_xydata().ravel()))
    assert legend_texts(figures[0]) == legend_texts(figures[1])


def test_a_style_introduced_later_starts_at_its_introduction_and_says_against_what(tmp_path):
    history = [
        entry(0, 0, metrics(4, 4, 16)),
        entry(2, 4, metrics(6, 2, 16), no_lists=metrics(5, 5, 14)),  # no_lists enters at 4, against the policy there
        entry(4, 8, metrics(9, 2, 13), no_lists=metrics(9, 3, 12)),
    ]
    figure = plot_winrate(
        history, tmp_path / "w.png", styles=["short", "no_lists"], baseline_at={"short": 0, "no_lists": 4}
    )
    assert list(by_gid(figure.axes[0], "winrate-certain:no_lists").get_xdata())[0] == pytest.approx(4, abs=0.2)
    assert list(by_gid(figure.axes[0], "winrate-certain:short").get_xdata())[0] == pytest.approx(0, abs=0.2)
    assert "no_lists (vs the policy at interaction 4)" in legend_texts(figure) and "short" in legend_texts(figure)


def test_profile_grid_has_one_panel_per_run_with_its_oracle(tmp_path):
    panels = [(f"style_{i}", HISTORY, ORACLE["short"] if i != 2 else None) for i in range(6)]
    path = tmp_path / "grid.png"
    figure = plot_profile_grid(panels, path)
    visible = [axes for axes in figure.axes if axes.get_visible()]
    assert len(visible) == 6 and path.read_bytes()[:8] == PNG_MAGIC
    assert [axes.get_title() for axes in visible] == [f"style / {i}" for i in range(6)]
    oracle_lines = [
        [a for a in axes.get_children() if a.get_gid() == f"oracle:style_{i}"] for i, axes in enumerate(visible)
    ]
    assert [len(lines) for lines in oracle_lines] == [1, 1, 0, 1, 1, 1]
    assert list(by_gid(visible[0], "winrate-certain:style_0").get_xdata()) == [0, 8]  # interaction 4 had 3 decided
    with pytest.raises(ValueError, match="at least one"):
        plot_profile_grid([], path)
