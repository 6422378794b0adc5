import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from biasgen.images import figures
from biasgen.errors import BiasgenError
from biasgen.images.figures import (
    plot_all,
    plot_gallery,
    plot_loss_and_twin_distance,
    plot_memorization,
    plot_score_similarity,
)

SUMMARY = {
    "tau_bias": {"step": 100, "ci": [30, 300]},
    "tau_loss": {"step": 1000, "ci": [300, 3000]},
    "window": [100, 1000],
    "verdict": "biased-generalization-detected",
}


def record(step: int) -> dict:
    u = math.log10(step + 1) / math.log10(3001)
    return {
        "step": step, "test_loss": 0.6 - 0.3 * u, "test_loss_sem": 0.01, "train_loss": 0.6 - 0.4 * u,
        "twin_distance": 0.5 - 0.8 * u + 0.9 * u * u, "twin_distance_sem": 0.02, "twin_distance_pairs": [0.1, 0.2],
        "nn_own_sim": 0.5 + 0.4 * u, "nn_other_sim": 0.5 + 0.2 * u, "nn_test_sim": 0.5 + 0.2 * u,
        "nn_own_l2": 5 - 2 * u, "nn_other_l2": 5 - u, "nn_test_l2": 5 - u,
        "f_mem": 0.3 * u**3, "f_mem_ci": [0.2 * u**3, 0.4 * u**3], "copy_z": -2 * u,
        "score_sim": {str(t): {"train": 0.9 - 0.2 * u, "train_sem": 0.01, "test": 0.9, "test_sem": 0.01} for t in (50, 100)},
    }


RECORDS = [record(s) for s in (0, 10, 30, 100, 300, 1000, 3000)]


def gallery_rows(channels: int = 1, low: float = -1.0):
    g = torch.Generator().manual_seed(0)
    return [
        ("model A", torch.rand(6, channels, 8, 8, generator=g) * (1 - low) + low),
        ("model B (same noise)", torch.rand(6, channels, 8, 8, generator=g) * (1 - low) + low),
        ("A: nearest in own split", torch.rand(4, channels, 8, 8, generator=g) * (1 - low) + low),
    ]


def assert_png(path):
    assert path.exists() and path.stat().st_size > 0
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] > 100 and im.size[1] > 100
        pixels = np.asarray(im.convert("L"))
    assert pixels.std() > 0  # something was drawn


def test_plot_all_writes_every_figure(tmp_path):
    written = plot_all(tmp_path / "run", RECORDS, SUMMARY, gallery_rows())
    names = {"fig_loss_twin.png", "fig_score_similarity.png", "fig_memorization.png", "fig_gallery.png"}
    assert {p.name for p in written.values()} == names
    assert {p.name for p in (tmp_path / "run").iterdir()} == names  # no temporary files left behind
    for path in written.values():
        assert_png(path)


def test_plot_all_without_gallery_skips_it(tmp_path):
    written = plot_all(tmp_path, RECORDS[:2], None, None)
    assert "gallery" not in written and not (tmp_path / "fig_gallery.png").exists()


def test_score_similarity_puts_the_default_noise_levels_in_rows_of_four(tmp_path):
    from biasgen.images.audit import SCORE_TS

    six = [{**r, "score_sim": {str(t): r["score_sim"]["50"] for t in SCORE_TS}} for r in RECORDS]
    with Image.open(plot_score_similarity(six, SUMMARY, tmp_path / "six.png")) as a, \
            Image.open(plot_score_similarity(RECORDS, SUMMARY, tmp_path / "two.png")) as b:
        assert len(SCORE_TS) == 6 and a.size[1] > 1.7 * b.size[1]  # two rows
        assert 1.5 * b.size[0] < a.size[0] < 2.5 * b.size[0]  # four panels a row, not six


PARTIAL = [
    {"step": 0},
    {"step": 10, "test_loss": 0.5, "test_loss_sem": None, "twin_distance": None, "score_sim": None},
    {"step": 30, "test_loss": float("nan"), "twin_distance": 0.3, "f_mem": 0.0, "f_mem_ci": None,
     "score_sim": {"50": {"train": 0.8}}},
    {"step": 100, "train_loss": 0.4, "nn_own_sim": 0.7, "f_mem_ci": [0.0], "score_sim": {"100": {"test": 0.9, "test_sem": None}}},
    {"test_loss": 0.1},  # no step at all
]


@pytest.mark.parametrize(
    "records, summary",
    [
        (PARTIAL, {"tau_bias": None, "tau_loss": {"step": 30, "ci": [None, 40]}, "window": None, "verdict": None}),
        ([], None),
        ([{"step": 5}], {}),
    ],
)
def test_partial_runs_do_not_crash(tmp_path, records, summary):
    for path in (
        plot_loss_and_twin_distance(records, summary, tmp_path / "a.png"),
        plot_score_similarity(records, summary, tmp_path / "b.png"),
        plot_memorization(records, tmp_path / "c.png"),
    ):
        assert_png(path)


def test_score_panels_follow_the_recorded_noise_levels():
    assert figures._score_keys(PARTIAL) == ["50", "100"]  # numeric order, not string order
    assert figures._score_keys(RECORDS) == ["50", "100"]


def test_series_skips_missing_values_and_sorts_by_step():
    steps, values = figures._series(list(reversed(PARTIAL)), figures._key("test_loss"))
    assert steps.tolist() == [10.0] and values.tolist() == [0.5]  # NaN, missing and step-less records dropped


@pytest.mark.parametrize("channels, low", [(1, -1.0), (3, 0.0)])
def test_gallery_grayscale_and_rgb(tmp_path, channels, low):
    path = plot_gallery(gallery_rows(channels, low), tmp_path / "g.png", value_range=(low, 1.0))
    assert_png(path)


def test_gallery_maps_the_value_range_to_black_and_white(tmp_path):
    rows = [("black", -torch.ones(1, 1, 8, 8)), ("white", torch.ones(1, 1, 8, 8))]
    with Image.open(plot_gallery(rows, tmp_path / "g.png")) as im:
        pixels = np.asarray(im.convert("L"))
    assert pixels.min() < 10 and pixels.max() > 245


@pytest.mark.parametrize(
    "rows, words",
    [
        ([], "at least one"),
        ([("flat", torch.zeros(4, 8, 8))], r"\(N, C, H, W\)"),
        ([("two channels", torch.zeros(2, 2, 8, 8))], "C = 1 or 3"),
        ([("empty", torch.zeros(0, 1, 8, 8))], "non-empty"),
    ],
)
def test_gallery_bad_input_is_refused(tmp_path, rows, words):
    with pytest.raises(BiasgenError, match=words):
        plot_gallery(rows, tmp_path / "g.png")
    assert list(tmp_path.iterdir()) == []


def test_failed_save_leaves_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "fig.png"
    path.write_bytes(b"old figure")

    def broken_savefig(self, fname, **kwargs):
        fname.write(b"half a png")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError):
        plot_memorization(RECORDS, path)
    assert path.read_bytes() == b"old figure"
    assert list(tmp_path.iterdir()) == [path]
