"""How a fine-tune is shown on its report page (``ImageFinetune.report_view``): the audit's view plus the leaks."""
from __future__ import annotations

import dataclasses

from .report_view import VIEW as AUDIT_VIEW

VIEW = dataclasses.replace(
    AUDIT_VIEW,
    title="twin fine-tunes",
    captions={**AUDIT_VIEW.captions,
              "fig_leaks.png": "The first private training images to leak (a sample is their near-copy, d1/d2 < 1/3) "
                               "and those near-copies, at the checkpoint where each first appeared."},
    gallery_figures=(*AUDIT_VIEW.gallery_figures, "fig_leaks.png"),
)
