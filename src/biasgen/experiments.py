"""The twin experiments biasgen offers, by name (the CLI's subcommands, ``biasgen judge`` and ``biasgen sweep``)."""
from __future__ import annotations


def experiments() -> dict:
    """``{kind: TwinExperiment subclass}`` of the built-in experiments (imported on first use)."""
    from .hierarchy.experiment import HierarchyExperiment
    from .images.audit import ImageAudit
    from .images.finetune import ImageFinetune

    return {e.kind: e for e in (ImageAudit, ImageFinetune, HierarchyExperiment)}
