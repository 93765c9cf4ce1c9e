"""pipeline.io.plots: the sweep's results plot."""

from __future__ import annotations

import warnings

from pipeline.io import plots


def test_results_plot_of_choices_only_draws_without_a_legend_warning(tmp_path):
    """A sweep over choices (strings) has no numeric key: the first panel has no points, and asking
    for its legend printed matplotlib's 'No artists with labels found' in every such sweep."""
    rows = [
        {"loss.name": "hinge", "status": "finished", "w1": 0.2},
        {"loss.name": "wgan-gp", "status": "failed", "w1": None},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plots.scatter_metric(rows, ["loss.name"], "w1", tmp_path / "results.png")
    assert (tmp_path / "results.png").stat().st_size > 0
    numeric = [
        {"train.lr_g": 1e-3, "status": "finished", "w1": 0.2},
        {"train.lr_g": 2e-3, "status": "failed", "w1": 0.5},
    ]
    plots.scatter_metric(numeric, ["train.lr_g"], "w1", tmp_path / "numeric.png")
    assert (tmp_path / "numeric.png").stat().st_size > 0
