"""Reading a run folder for the report, and what differs between kinds of run (see :mod:`biasgen.report`).

A kind is one :class:`Kind` entry in ``KINDS``: main figure, captions, table
columns, gallery, the file of its results. An unknown kind gets ``GENERIC``; a sweep's page
has its own sections (:mod:`biasgen.report.sweep_page`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Callable

from ..checkpoint import load_tensors
from ..errors import BiasgenError
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
    records: list[dict]  # metrics.jsonl, one record per evaluated checkpoint, by step
    figures: list[Path]  # fig_*.png, sorted by name
    notes: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        """The run wrote its results: a complete summary and, for a twin run, its metrics."""
        has_metrics = bool(self.records) or KINDS.get(self.kind, GENERIC).summary_file != "summary.json"
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
    summary_file = KINDS.get(str(meta.get("kind")), GENERIC).summary_file
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

    key: str  # the metrics.jsonl key
    label: str
    err: str | None = None  # key of its standard error (a number) or interval ([lo, hi])
    reduce: str = "mean"  # how a per-unit list (per model, per twin pair) becomes one number: mean or median


@dataclass(frozen=True)
class Kind:
    """How one kind of run ("audit", "hierarchy", ...) is shown."""

    title: str
    main_figure: str
    captions: dict  # figure file name -> caption (also its alt text)
    columns: tuple  # of Column; metrics absent from the run are left out
    gallery_figures: tuple = ()  # figures shown in the gallery section, not among the others
    gallery: Callable[[Run], str] | None = None  # HTML of a gallery built from samples/
    summary_file: str = "summary.json"  # the run's results (a sweep's: sweep.json)


def _summary(run: Run) -> dict:
    return run.summary or {}


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _sequence_gallery(run: Run, n_rows: int = 6) -> str:
    """Generated sequences of two twins from the same noise, as rows of symbols.

    Reads ``samples/step_*.safetensors`` holding ``samples``, a LongTensor
    ``(M, n, L)`` of M models' n sequences of length L, at tau_bias and at the
    last stored checkpoint. Training sequences are not in the run folder, so
    their nearest neighbours cannot be shown.
    """
    by_step = {int(f.stem[5:]): f for f in (run.folder / "samples").glob("step_*.safetensors") if f.stem[5:].isdigit()}
    if not by_step:
        return ""
    tau = _dict(_summary(run).get("tau_bias")).get("step")
    steps = sorted({s for s in (tau, max(by_step)) if s in by_step})
    models = [_dict(m) for m in _summary(run).get("models") or []]
    split = lambda m: models[m].get("split", models[m].get("block", m)) if m < len(models) else m
    blocks = []
    for step in steps:
        x = load_tensors(by_step[step].with_suffix(""))[0].get("samples")
        if x is None or x.dim() != 3 or x.is_floating_point() or x.shape[0] < 2:
            continue
        a = 0
        b = next((m for m in range(1, x.shape[0]) if split(m) != split(a)), 1)
        rows = []
        for j in range(min(n_rows, x.shape[1])):
            for name, m in (("A", a), ("B", b)):
                cells = "".join(f'<span class="s{t % 12}">{escape(_symbol(t))}</span>' for t in x[m, j].tolist())
                rows.append(f'<tr><th scope="row">{name} #{j}</th><td class="seq">{cells}</td></tr>')
        label = "tau_bias" if step == tau else "last checkpoint"
        blocks.append(f"<h3>{escape(label)} (step {step}): model A = {a} (split {escape(str(split(a)))}), "
                      f"model B = {b} (split {escape(str(split(b)))})</h3><table class=\"seqs\">{''.join(rows)}</table>")
    if not blocks:
        return ""
    return ("<p>Sequences generated by twins A and B from the same noise; each letter is one symbol of the "
            "grammar's alphabet, so matching columns show where the twins agree. The training sequences are not "
            "stored in the run folder, so their nearest neighbours are not shown here.</p>" + "".join(blocks))


def _symbol(token: int) -> str:
    return "abcdefghijklmnopqrstuvwxyz"[token] if 0 <= token < 26 else f"[{token}]"


KINDS = {
    "audit": Kind(
        title="twin-split audit",
        main_figure="fig_loss_twin.png",
        captions={
            "fig_loss_twin.png": "Test loss and twin distance over training, with tau_bias, tau_loss and the biased window.",
            "fig_score_similarity.png": "Score-level twin similarity on training inputs versus test inputs, per noise level.",
            "fig_memorization.png": "Memorized fraction and nearest-neighbour proximity of the samples to each split.",
            "fig_loss_bands.png": "Test-minus-train loss per noise band over training; the band where the gap "
                                  "opens first is drawn bold.",
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
    ),
    "hierarchy": Kind(
        title="hierarchical-data twins",
        main_figure="fig_kl.png",
        captions={
            "fig_kl.png": "Left: twin disagreement (symmetric KL) on test and training inputs, and between same-block "
                          "controls. Right: KL from the exact k-filtered (belief-propagation) denoisers BP_k to the "
                          "model. Dashed lines: the onset times.",
            "fig_kl_along_t.png": "KL from each exact k-filtered denoiser BP_k to the model along the noise level t/T, "
                                  "on test inputs (top) and on the model's own training inputs (bottom), at tau_bias, "
                                  "tau_loss and the last checkpoint; dotted: KL(BP_0 || BP_k).",
            "fig_loss_decomposition.png": "Frozen-noise cross-entropy split into l* (how well the model distils the "
                                          "exact denoiser) and l~ (its data-dependent excess), on training and test "
                                          "sequences, averaged over t (top) and at one noise level (bottom).",
            "fig_nn.png": "Nearest-neighbour divergence D_NN of generated sequences, with the test and training "
                          "cross-entropy.",
            "fig_nn_histograms.png": "Hamming distance of generated sequences to their nearest training sequence, "
                                     "beside that of test sequences, at a few checkpoints.",
            "fig_uturn.png": "U-turns: overlap of the model's reconstructions relative to the exact denoiser's "
                             "(mean over sequences and standard error), on training versus test sequences, at "
                             "tau_bias, tau_loss and the end.",
            "fig_uturn_random.png": "U-turns of uniformly random sequences over training, beside those of the exact "
                                    "denoisers BP_k and of the empirical denoisers of the training splits.",
        },
        columns=(
            Column("skl_test_pairs", "twin sym. KL, test inputs", reduce="median"),
            Column("skl_train_pairs", "twin sym. KL, training inputs", reduce="median"),
            Column("skl_control_pairs", "same-block control", reduce="median"),
            Column("test_l", "test cross-entropy"),
            Column("train_l", "train cross-entropy"),
            Column("d_nn", "D_NN", reduce="median"),
            Column("gen_copy_share", "copy share"),
            Column("gen_grammatical", "grammatical share"),
        ),
        gallery=_sequence_gallery,
    ),
    "sweep": Kind(  # its page has its own sections (biasgen.report.sweep_page)
        title="training-set-size sweep",
        main_figure="fig_phase_diagram.png",
        captions={
            "fig_phase_diagram.png": "Phase diagram: training step against training-set size (both logarithmic). "
                                     "tau_bias, tau_loss and tau_mem per size with their intervals; arrows: not "
                                     "reached within the run; lines: fitted power laws, dashed where extrapolated; "
                                     "open markers: predictions at the target size. Shaded: generalization, biased "
                                     "generalization, memorization; hatched: beyond each size's training budget.",
        },
        columns=(),
        summary_file="sweep.json",
    ),
}
GENERIC = Kind(title="run", main_figure="", captions={}, columns=())
