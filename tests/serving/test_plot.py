"""`tide plot`: the PNG marks draft swaps and the moments drift was detected."""

import pytest

from serving.plot import plot_history


def test_plot_marks_swaps_and_drift(tmp_path):
    rows = [{"elapsed_s": float(t), "accept_len": 1.5 + 0.01 * t, "draft_version": 1 if t < 30 else 2,
             "drift": 20 <= t < 25 or 40 <= t < 42} for t in range(60)]
    out = plot_history(rows, tmp_path / "a.png")
    assert out["swaps"] == 1 and out["drifts"] == 2 and out["points"] == 60
    assert (tmp_path / "a.png").stat().st_size > 10_000


def test_plot_without_traffic_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no served traffic"):
        plot_history([{"elapsed_s": 1.0, "draft_version": 1}], tmp_path / "a.png")
