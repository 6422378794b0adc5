"""Reading a run folder for the report, and what differs between kinds of run (see :mod:`biasgen.report`).

How a kind of run is shown is a :class:`ReportView`: main figure, captions,
table columns, gallery, the file of its results. Each twin experiment carries
its own (``TwinExperiment.report_view``), found through
:func:`biasgen.experiments.experiments`; a sweep's view is ``SWEEP`` (its page
has its own sections, :mod:`biasgen.report.sweep_page`); any other kind gets a
generic view.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import BiasgenError
from ..records import MetricRecord
from ..runs import STEP, read_json, scan_jsonl
from ..training import checkpoint_steps


# -- reading a run folder leniently -----------------------------------------------------------

@dataclass
class Run:
    """What a run folder holds; ``notes`` names the files that could not be read."""

    folder: Path
    kind: str
    config: dict
    environment: dict
    summary: dict | None
    records: list[MetricRecord]  # metrics.jsonl, one record per evaluated checkpoint, by step
    figures: list[Path]  # fig_*.png, sorted by name
    notes: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """The run wrote its results: a complete summary and, for a twin run, its metrics."""
        has_metrics = bool(self.records) or view_of(self.kind).summary_file != "summary.json"
        return self.summary is not None and self.summary.get("complete", True) is not False and has_metrics

    @property
    def planned_checkpoints(self) -> int | None:
        """C, the number of checkpoints the config asks for (None if the config does not say)."""
        c = self.config
        try:
            return len(checkpoint_steps(int(c["steps"]), int(c["checkpoints"]), int(c.get("first_checkpoint", 1))))
        except (KeyError, TypeError, ValueError, BiasgenError):
            return None


def read_run(folder: Path | str) -> Run:
    """Read a run folder; BiasgenError only when it holds no biasgen run (no readable ``run.json``)."""
    folder = Path(folder)
    if not (folder / "run.json").is_file():
        raise BiasgenError(
            f"{folder} holds no biasgen run (no run.json). Give the folder that `biasgen audit`, "
            "`biasgen hierarchy` or `biasgen sweep` wrote (its --out)."
        )
    meta = read_json(folder / "run.json")
    notes: list[str] = []
    summary = None
    summary_file = view_of(str(meta.get("kind"))).summary_file
    if (folder / summary_file).exists():
        try:
            summary = read_json(folder / summary_file, fix="")
        except BiasgenError as e:
            notes.append(f"{e} It was left out.")
    records, problems = scan_jsonl(folder / "metrics.jsonl", STEP)
    notes += [f"{folder / 'metrics.jsonl'} line {number} {problem}; it was skipped." for number, problem in problems]
    if summary is not None and not records and (folder / "metrics.jsonl").exists():
        notes.append("metrics.jsonl holds no records although summary.json exists: the file was emptied or replaced.")
    return Run(
        folder=folder,
        kind=str(meta.get("kind", "unknown")),
        config=meta.get("config") if isinstance(meta.get("config"), dict) else {},
        environment=meta.get("environment") if isinstance(meta.get("environment"), dict) else {},
        summary=summary if isinstance(summary, dict) else None,
        records=sorted(records, key=lambda r: r["step"]),
        figures=sorted(folder.glob("fig_*.png")),
        notes=notes,
    )


# -- what differs between kinds of run --------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """One metric of the per-checkpoint table."""

    key: str  # the metrics.jsonl key (a key of biasgen.records.MetricRecord)
    label: str
    err: str | None = None  # record key of its standard error (a number) or interval ([lo, hi])
    reduce: str = "mean"  # how a per-unit list (per model, per twin pair) becomes one number: mean or median


@dataclass(frozen=True)
class ReportView:
    """How one kind of run is shown on its report page.

    Without ``columns`` the table shows every numeric metric of ``metrics.jsonl``; a figure without a caption
    is named after its file.
    """

    title: str  # "twin-split audit", ...: the page's heading
    main_figure: str = ""  # the figure shown first
    captions: dict = field(default_factory=dict)  # figure file name -> caption (also its alt text)
    columns: tuple = ()  # of Column; metrics absent from the run are left out
    gallery_figures: tuple = ()  # figures shown in the gallery section, not among the others
    gallery: Callable[[Run], str] | None = None  # HTML of a gallery built from samples/
    sections: tuple = ()  # of (title, draw(run, view) -> HTML): the kind's own sections, after the verdict
    summary_file: str = "summary.json"  # the run's results (a sweep's: sweep.json)


def _summary(run: Run) -> dict:
    return run.summary or {}


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


SWEEP = ReportView(  # its page has its own sections (biasgen.report.sweep_page)
    title="training-set-size sweep",
    main_figure="fig_phase_diagram.png",
    captions={
        "fig_phase_diagram.png": "Phase diagram: training step against training-set size (both logarithmic). "
                                 "tau_bias, tau_loss and tau_mem per size with their intervals; arrows: not "
                                 "reached within the run; lines: fitted power laws, dashed where extrapolated; "
                                 "open markers: predictions at the target size. Shaded: generalization, biased "
                                 "generalization, memorization; hatched: beyond each size's training budget.",
    },
    summary_file="sweep.json",
)


def view_of(kind: str) -> ReportView:
    """The view of a run of ``kind``: a sweep's, its experiment's ``report_view``, or a generic one titled ``kind``
    (every numeric metric, figures named after their files) for an experiment without a view or a kind unknown here."""
    if kind == "sweep":
        return SWEEP
    from ..experiments import experiments  # on first use: the experiments import the report

    experiment = experiments().get(kind)
    return getattr(experiment, "report_view", None) or ReportView(title=kind)
