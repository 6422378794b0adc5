"""How an image audit is shown on its report page (``ImageAudit.report_view``; see :mod:`biasgen.report`):
the figures' captions and the per-checkpoint table's columns."""
from __future__ import annotations

from ..report.kinds import Column, ReportView

VIEW = ReportView(
    title="twin-split audit",
    main_figure="fig_loss_twin.png",
    captions={
        "fig_loss_twin.png": "Test loss and twin distance over training, with tau_bias, tau_loss and the biased window.",
        "fig_score_similarity.png": "Score-level twin similarity on training inputs versus test inputs, per noise level.",
        "fig_memorization.png": "Memorized fraction and nearest-neighbour proximity of the samples to each split.",
        "fig_loss_bands.png": "Test-minus-train loss per noise band over training; the band where the gap "
                              "opens first is drawn bold.",
        "fig_guidance_curves.png": "Conditional twins: the contrast (twin minus control distance) and the memorized "
                                   "fraction (copies of the sample's own class in the model's split) over training, "
                                   "one line per guidance scale w.",
        "fig_guidance_taus.png": "Conditional twins: tau_data, tau_bias and tau_mem against the guidance scale w, "
                                 "with their intervals; hollow markers are bounds (not reached within the run).",
        "fig_gallery.png": "Twin samples from the same noise and their nearest training images in each twin's split, "
                           "at tau_bias and at the last checkpoint.",
    },
    columns=(
        Column("test_loss", "test loss", err="test_loss_sem"),
        Column("train_loss", "train loss"),
        Column("twin_distance", "twin distance", err="twin_distance_sem"),
        Column("same_split_distance", "same-split control", err="same_split_distance_sem"),
        Column("f_mem", "memorized fraction", err="f_mem_ci"),
        Column("copy_z", "copy z"),
        Column("nn_own_sim", "NN similarity, own split"),
        Column("nn_other_sim", "NN similarity, other split"),
        Column("nn_test_sim", "NN similarity, test"),
    ),
    gallery_figures=("fig_gallery.png",),
)
