"""The report a person reads: one self-contained HTML page per run folder.

    from biasgen.report import write_report
    write_report("runs/audit")           # -> runs/audit/report.html

or from the shell: ``biasgen report runs/audit``. The page is built from the
folder's files alone (``run.json``, ``summary.json``, ``metrics.jsonl``,
``fig_*.png``, ``samples/``). A run still going, or killed, gets a page marked
"in progress: k of C checkpoints"; a file that cannot be read is named on the
page instead of failing the report.

Top to bottom: the verdict and the recommended stopping step with their
evidence, the figures (main one first), the gallery, a per-checkpoint table of
the main metrics, then the data, config, seeds and versions.

The page needs no network: figures are embedded as base64 PNG, the style and
the small table-sorting script are inline and the only ones a
Content-Security-Policy allows. Every string from the run is HTML-escaped.

Run kinds differ only by their :class:`Kind` entry in ``KINDS`` (main figure,
captions, table columns, gallery, an extra section); an unknown kind gets a
generic page.
"""
from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Callable

from .checkpoint import load_tensors
from .errors import BiasgenError
from .runs import read_json, write_bytes
from .training import checkpoint_steps

REPORT_NAME = "report.html"


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
        return self.summary is not None and self.summary.get("complete", True) is not False

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
            f"{folder} holds no biasgen run (no run.json). Give the folder that `biasgen audit` or "
            "`biasgen hierarchy` wrote (its --out)."
        )
    meta = read_json(folder / "run.json")
    if not isinstance(meta, dict):
        raise BiasgenError(f"{folder / 'run.json'} is not a biasgen run description. Give another folder.")
    notes: list[str] = []
    summary = None
    if (folder / "summary.json").exists():
        try:
            summary = json.loads((folder / "summary.json").read_text())
        except (OSError, ValueError) as e:
            notes.append(f"summary.json could not be read ({e}).")
    records: dict[int, dict] = {}
    lines = []
    if (folder / "metrics.jsonl").exists():
        try:
            lines = (folder / "metrics.jsonl").read_text().splitlines()
        except OSError as e:
            notes.append(f"metrics.jsonl could not be read ({e}).")
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
            if record is not None:
                records[int(record["step"])] = record
        except (ValueError, TypeError, KeyError):
            notes.append(f"metrics.jsonl line {number} is not a metrics record; it was skipped.")
    return Run(
        folder=folder,
        kind=str(meta.get("kind", "unknown")),
        config=meta.get("config") if isinstance(meta.get("config"), dict) else {},
        environment=meta.get("environment") if isinstance(meta.get("environment"), dict) else {},
        summary=summary if isinstance(summary, dict) else None,
        records=[records[s] for s in sorted(records)],
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
    section: Callable[[Run], str] | None = None  # a kind-specific section with its own <h2> (e.g. a sweep's fits)


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
            "fig_kl_along_t.png": "KL from the exact denoiser BP_0 to the model along the noise level t/T, at tau_bias, "
                                  "at tau_loss and at the end, beside the KLs of the filtered denoisers BP_k.",
            "fig_loss_decomposition.png": "Frozen-noise cross-entropy split into l* (how well the model distils the "
                                          "exact denoiser) and l~ (its data-dependent excess), on training and test "
                                          "sequences.",
            "fig_nn.png": "Nearest-neighbour divergence D_NN of generated sequences, with the test and training "
                          "cross-entropy.",
            "fig_uturn.png": "U-turns: overlap of the model's reconstructions relative to the exact denoiser's, on "
                             "training versus test sequences, at tau_bias, tau_loss and the end.",
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
}
GENERIC = Kind(title="run", main_figure="", captions={}, columns=())

VERDICTS = {  # verdict -> (plain wording, tone)
    "biased-generalization-detected": ("Biased generalization detected", "bad"),
    "no-bias-detected": ("No biased generalization detected", "good"),
    "inconclusive": ("Inconclusive", "warn"),
}

TERMS = {  # plain meaning of each onset time, said where it first appears
    "tau_bias": "the checkpoint where the twins (the same network trained on disjoint splits of the data) agree "
                "most; after it they drift apart because each leans on its own training split",
    "tau_loss": "the checkpoint with the lowest test loss, where ordinary early stopping would stop",
    "tau_nn": "the checkpoint where generated sequences are closest to held-out data by the nearest-neighbour "
              "divergence D_NN",
    "tau_oracle": "the checkpoint where the model is closest to the exact (belief-propagation) denoiser",
    "tau_score": "per noise level t (t → step), the first checkpoint from which the twins' scores agree less on "
                 "training inputs than on test inputs (none: not yet)",
}

EVIDENCE = {  # summary key -> label, in display order; absent keys are skipped
    "p_bias_before_loss": "P(tau_bias < tau_loss)",
    "p_value": "P value",
    "window": "biased window [tau_bias, tau_loss]",
    "control": "control",
    "drift": "drift",
    "evidence": "evidence",
    "n_twin_pairs": "twin pairs",
    "n_control_pairs": "same-split control pairs",
    "recommendation_basis": "recommendation based on",
    "coarse_to_fine": "coarse-to-fine learning",
}
SHOWN_ELSEWHERE = {"verdict", "reason", "recommended_step", "recommendation", "tau_loss_open", "units", "checkpoints",
                   "complete", "data", "models", "config", "seeds", "environment", "sampler", "timing"}


# -- page sections -----------------------------------------------------------------------------

def _summary(run: Run) -> dict:
    return run.summary or {}


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _verdict(run: Run, kind: Kind) -> str:
    if not run.finished:
        k, c = len(run.records), run.planned_checkpoints
        last = f" (last: step {run.records[-1]['step']})" if run.records else ""
        return (f'<section class="verdict warn"><p class="headline">In progress: {k} of {c if c else "?"} checkpoints '
                f"evaluated{escape(last)}.</p><p>The verdict and the recommended stopping step appear here once the "
                "last checkpoint is evaluated. A run that was stopped continues with <code>biasgen "
                f"{escape(run.kind)} --resume --out {escape(str(run.folder))}</code>.</p></section>")
    s = _summary(run)
    label, tone = VERDICTS.get(s.get("verdict"), (str(s.get("verdict", "no verdict")), "warn"))
    step = s.get("recommended_step")
    stop = f": stop training at <strong>step {escape(str(step))}</strong>" if step is not None else ": no stopping step given"
    taus = sorted((name for name in s if name.startswith("tau_") and isinstance(s[name], dict)),
                  key=lambda name: list(TERMS).index(name) if name in TERMS else len(TERMS))
    parts = [f'<p class="headline"><strong>{escape(label)}</strong>{stop}.</p>']
    if s.get("recommendation"):
        parts.append(f"<p>{escape(str(s['recommendation']))}</p>")
    terms = [f"<b>{escape(name)}</b> is {escape(TERMS[name])}." for name in taus if name in TERMS]
    if "window" in s:
        terms.append("The <b>biased window</b> [tau_bias, tau_loss] is the stretch of training where the test loss "
                     "still improves while the models already favour their own training data.")
    if terms:
        parts.append(f"<p class=\"terms\">{' '.join(terms)}</p>")
    if s.get("reason"):
        parts.append(f"<p><b>Why:</b> {escape(str(s['reason']))}</p>")
    parts.append(_evidence(s, taus))
    return f'<section class="verdict {tone}">{"".join(parts)}</section>'


def _evidence(s: dict, taus: list[str]) -> str:
    units = _dict(s.get("units"))
    rows = []
    for name in taus:
        tau = s[name]
        if "step" not in tau:  # e.g. tau_score: one step (or None) per noise level
            steps = "; ".join(f"{escape(str(k))} → " + (f"step {escape(_num(v))}" if v is not None else "none")
                              for k, v in tau.items())
            rows.append(f"<tr><th scope=\"row\">{escape(name)}</th><td colspan=\"5\">{steps}</td></tr>")
            continue
        level = tau.get("ci_level", 0.68)
        over = units.get(name) or (f"{tau['n_units']} units ({tau.get('reduce', '')})" if "n_units" in tau else "")
        note = " (still falling at the last checkpoint: tau_loss is there or later)" if name == "tau_loss" and s.get("tau_loss_open") else ""
        rise = (f"{tau['rise']:.3g} ± {tau['rise_se']:.2g}" if isinstance(tau.get("rise"), (int, float))
                and isinstance(tau.get("rise_se"), (int, float)) else "—")
        rows.append(f"<tr><th scope=\"row\">{escape(name)}</th><td>step {escape(str(tau['step']))}{escape(note)}</td>"
                    f"<td>{_interval(tau.get('ci'), level)}</td><td>{_interval(tau.get('ci95'), 0.95)}</td>"
                    f"<td>{escape(rise)}</td><td>{escape(str(over))}</td></tr>")
    table = ("<table class=\"evidence\"><thead><tr><th>onset</th><th>checkpoint</th><th>interval</th>"
             "<th>95% interval</th><th>rise after minimum</th><th>bootstrap over</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
             if rows else "")
    facts = "".join(f"<dt>{escape(label)}</dt><dd>{_fact(s, key)}</dd>" for key, label in EVIDENCE.items() if key in s)
    return table + (f"<dl class=\"facts\">{facts}</dl>" if facts else "")


def _fact(s: dict, key: str) -> str:
    value = s[key]
    if key == "window":
        if not isinstance(value, list) or len(value) != 2:
            return "none" if value is None else _value(value)
        beyond = " and beyond (the test loss was still falling at the end)" if s.get("tau_loss_open") else ""
        return f"steps {escape(_num(value[0]))}–{escape(_num(value[1]))}{beyond}"
    return _value(value)


def _interval(ci, level: float) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return "—"
    return f"{round(100 * float(level))}%: {escape(_num(ci[0]))}–{escape(_num(ci[1]))}"


def _figure(path: Path, caption: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)} <span class=\"file\">({escape(path.name)})</span></figcaption></figure>")


def _caption(kind: Kind, path: Path) -> str:
    return kind.captions.get(path.name) or "Figure: " + path.stem.removeprefix("fig_").replace("_", " ") + "."


def _figures(run: Run, kind: Kind) -> str:
    shown = sorted((f for f in run.figures if f.name not in kind.gallery_figures), key=lambda f: f.name != kind.main_figure)
    if not shown:
        return "<p>The figures are drawn when the run finishes.</p>"
    return "".join(_figure(f, _caption(kind, f)) for f in shown)


def _gallery(run: Run, kind: Kind) -> str:
    figures = "".join(_figure(f, _caption(kind, f)) for f in run.figures if f.name in kind.gallery_figures)
    return figures + (kind.gallery(run) if kind.gallery else "")


def _scalar(value, reduce: str) -> float | None:
    """A number, or a flat list of numbers (per model or per pair) reduced to one; None otherwise."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list):
        xs = sorted(float(v) for v in value if isinstance(v, (int, float)) and not isinstance(v, bool))
        if not xs or len(xs) != len([v for v in value if v is not None]):
            return None
        return sum(xs) / len(xs) if reduce == "mean" else (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2
    return None


def _columns(run: Run, kind: Kind) -> list[Column]:
    present = [c for c in kind.columns if any(_scalar(r.get(c.key), c.reduce) is not None for r in run.records)]
    if present:
        return present
    keys = dict.fromkeys(k for r in run.records for k in r if k != "step" and not k.endswith(("_sem", "_ci")))
    return [Column(k, k.replace("_", " "), err=next((e for e in (k + "_sem", k + "_ci") if any(e in r for r in run.records)), None))
            for k in keys if any(_scalar(r.get(k), "mean") is not None for r in run.records)]


def _cell(record: dict, column: Column) -> str:
    v = _scalar(record.get(column.key), column.reduce)
    if v is None:
        return "<td>—</td>"
    err = record.get(column.err) if column.err else None
    if isinstance(err, (int, float)) and not isinstance(err, bool):
        extra = f" <small>± {err:.2g}</small>"
    elif isinstance(err, list) and len(err) == 2:
        extra = f" <small>[{escape(_num(err[0]))}, {escape(_num(err[1]))}]</small>"
    else:
        extra = ""
    return f'<td data-v="{v!r}">{escape(_num(v))}{extra}</td>'


def _table(run: Run, kind: Kind) -> str:
    if not run.records:
        return "<p>No checkpoint has been evaluated yet.</p>"
    columns = _columns(run, kind)
    s = _summary(run)
    marks = {}
    for name in (n for n in s if n.startswith("tau_")):
        step = _dict(s[name]).get("step")
        marks.setdefault(step, []).append(name)
    marks.setdefault(s.get("recommended_step"), []).append("recommended")
    head = "".join(f"<th scope=\"col\">{escape(c.label)}</th>" for c in columns)
    rows = []
    for r in run.records:
        mark = marks.get(r["step"], [])
        row_class = ' class="marked"' if mark else ""
        rows.append(f"<tr{row_class}><td data-v=\"{r['step']}\">{escape(str(r['step']))}</td>"
                    + "".join(_cell(r, c) for c in columns) + f"<td>{escape(', '.join(mark))}</td></tr>")
    reduced = [f"{c.label}: {c.reduce}" for c in columns if any(isinstance(r.get(c.key), list) for r in run.records)]
    note = f" Per-model or per-pair values are reduced to one number ({escape('; '.join(reduced))})." if reduced else ""
    return (f"<p>One row per evaluated checkpoint; ± is a standard error, [lo, hi] an interval.{note} "
            "With JavaScript, click a column header to sort.</p>"
            f"<div class=\"wide\"><table class=\"metrics sortable\"><thead><tr><th scope=\"col\">step</th>{head}"
            f"<th scope=\"col\">marks</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>")


def _settings(run: Run, kind: Kind) -> str:
    s = _summary(run)
    data = f"<h3>Data</h3>{_value(s['data'])}" if "data" in s else "<p>The data are described when the run finishes.</p>"
    config = "".join(f"<li><code>{escape(str(k))}</code> = {_value(v)}</li>" for k, v in run.config.items())
    blocks = [(title, s[key]) for key, title in (("models", "Models"), ("sampler", "Sampler"), ("seeds", "Seeds"))
              if key in s]
    blocks.append(("Versions", run.environment))
    if _dict(s.get("environment")) and s["environment"] != run.environment:
        blocks.append(("Versions of the last resume", s["environment"]))
    if "timing" in s:
        blocks.append(("Timing", s["timing"]))
    cards = "".join(f"<div><h3>{escape(title)}</h3>{_value(value)}</div>" for title, value in blocks)
    return f"{data}<div class=\"cards\">{cards}</div><h3>Config</h3><ul class=\"config\">{config}</ul>"


def _others(run: Run, kind: Kind) -> str:
    s = _summary(run)
    rest = {k: v for k, v in s.items() if k not in SHOWN_ELSEWHERE and k not in EVIDENCE
            and not (k.startswith("tau_") and isinstance(v, dict))}
    return f"<details><summary>Other results in summary.json</summary>{_value(rest)}</details>" if rest else ""


# -- rendering values ---------------------------------------------------------------------------

def _num(x) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _value(v, limit: int = 24) -> str:
    """Any JSON value as escaped HTML: scalars inline, lists of scalars joined, dicts and lists of dicts as tables."""
    if v is None or isinstance(v, (bool, int, float)):
        return escape(_num(v))
    if isinstance(v, str):
        return escape(v)
    if isinstance(v, dict):
        if not v:
            return "—"
        return "<table class=\"kv\">" + "".join(
            f"<tr><th scope=\"row\">{escape(str(k))}</th><td>{_value(x)}</td></tr>" for k, x in v.items()) + "</table>"
    if isinstance(v, list):
        if v and all(isinstance(x, dict) for x in v):
            keys = list(dict.fromkeys(k for x in v for k in x))
            head = "".join(f"<th scope=\"col\">{escape(str(k))}</th>" for k in keys)
            body = "".join("<tr>" + "".join(f"<td>{_value(x.get(k))}</td>" for k in keys) + "</tr>" for x in v[:limit])
            more = f"<p>… {len(v)} in all.</p>" if len(v) > limit else ""
            return f"<table class=\"kv\"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}"
        shown = ", ".join(_value(x) if not isinstance(x, list) else "[" + _value(x) + "]" for x in v[:limit])
        return shown + (f", … ({len(v)} in all)" if len(v) > limit else "") if v else "—"
    return escape(str(v))


# -- the page ------------------------------------------------------------------------------------

STYLE = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; color: #1b1b1b;
       max-width: 1060px; margin: 0 auto; padding: 1.2em 1.5em 3em; background: #fff; }
h1 { font-size: 1.5em; margin: .2em 0; } h2 { font-size: 1.2em; margin: 1.6em 0 .5em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; margin: 1.1em 0 .3em; }
.sub { color: #555; margin: 0 0 1em; }
.verdict { border-left: 6px solid #999; background: #f6f6f6; padding: .6em 1em; }
.verdict.bad { border-color: #c62828; background: #fdf0f0; } .verdict.good { border-color: #2e7d32; background: #f0f8f0; }
.verdict.warn { border-color: #b26a00; background: #fdf6ea; }
.headline { font-size: 1.25em; margin: .2em 0 .5em; }
.notes { border: 1px solid #b26a00; padding: .4em 1em; }
table { border-collapse: collapse; font-size: .9em; margin: .4em 0; }
th, td { border: 1px solid #d0d0d0; padding: .25em .5em; text-align: left; vertical-align: top; }
thead th { background: #eee; }
table.metrics td { text-align: right; white-space: nowrap; } table.metrics td:last-child { text-align: left; }
table.metrics tr.marked td { background: #fff3d6; font-weight: 600; }
table.sortable th { cursor: pointer; }
.wide { overflow-x: auto; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: .2em 1em; margin: .6em 0; }
dl.facts dt { font-weight: 600; } dl.facts dd { margin: 0; }
figure { margin: 1em 0; break-inside: avoid; }
figure img { max-width: 100%; height: auto; display: block; border: 1px solid #eee; }
figcaption { color: #333; font-size: .9em; } .file { color: #777; }
.cards { display: flex; flex-wrap: wrap; gap: 0 2.5em; align-items: flex-start; }
ul.config { columns: 3 16em; padding-left: 1.2em; font-size: .9em; }
code { font-size: .92em; }
td.seq { font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: nowrap; letter-spacing: 0; }
td.seq span { display: inline-block; width: 1.1em; text-align: center; print-color-adjust: exact;
              -webkit-print-color-adjust: exact; }
.s0 { background: #9ecae1; } .s1 { background: #fdae6b; } .s2 { background: #a1d99b; } .s3 { background: #fc9fb5; }
.s4 { background: #cbc9e2; } .s5 { background: #fdd0a2; } .s6 { background: #c7e9c0; } .s7 { background: #d9d9d9; }
.s8 { background: #f2d0e9; } .s9 { background: #c6dbef; } .s10 { background: #e5f5b0; } .s11 { background: #fee391; }
@page { size: A4; margin: 14mm 12mm; }
@media print {
  body { font-size: 9.5pt; max-width: none; padding: 0; }
  h2 { break-after: avoid; } table, .verdict, dl.facts { break-inside: avoid; }
  table.metrics { font-size: 7.5pt; } th, td { padding: 1px 3px; }
  .wide { overflow: visible; } figure img { max-height: 230mm; width: auto; }
}
"""

SCRIPT = """
for (const table of document.querySelectorAll("table.sortable")) {
  const heads = [...table.tHead.rows[0].cells], body = table.tBodies[0];
  heads.forEach((th, i) => {
    const sort = () => {
      const up = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach(h => h.removeAttribute("aria-sort"));
      th.setAttribute("aria-sort", up ? "ascending" : "descending");
      const key = row => { const v = parseFloat(row.cells[i].dataset.v); return isNaN(v) ? -Infinity : v; };
      [...body.rows].sort((a, b) => ((key(a) > key(b)) - (key(a) < key(b))) * (up ? 1 : -1)).forEach(r => body.append(r));
    };
    th.tabIndex = 0;
    th.addEventListener("click", sort);
    th.addEventListener("keydown", e => { if (e.key === "Enter") sort(); });
  });
}
"""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Nothing outside the page may load: images only as data: URLs, and only this style and this script.
CSP = f"default-src 'none'; img-src data:; style-src {_sha256(STYLE)}; script-src {_sha256(SCRIPT)}"


def _guarded(draw: Callable[[Run, Kind], str], run: Run, kind: Kind) -> str:
    """A section's HTML, or a note when the folder's files do not fit it (a report must never fail)."""
    try:
        return draw(run, kind)
    except Exception as e:  # noqa: BLE001 - a malformed or half-written file must not break the whole page
        return f"<p class=\"notes\">This section could not be drawn from the run's files: {escape(repr(e))}</p>"


def render(run: Run) -> str:
    """The whole page for ``run`` as one HTML string."""
    kind = KINDS.get(run.kind, GENERIC)
    sections = [
        ("Verdict", _verdict),
        ("Figures", _figures),
        ("Gallery", _gallery),
        ("", lambda r, k: k.section(r) if k.section else ""),  # e.g. a sweep's phase diagram and fits
        ("Per-checkpoint metrics", _table),
        ("Data, config, seeds and versions", _settings),
        ("", _others),
    ]
    body = []
    for title, draw in sections:
        html = _guarded(draw, run, kind)
        if html:
            body.append(f"<section><h2>{title}</h2>{html}</section>" if title else html)
    notes = "".join(f"<li>{escape(n)}</li>" for n in run.notes)
    name = escape(run.folder.resolve().name)
    state = "finished" if run.finished else "in progress"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>biasgen {escape(run.kind)} report: {name}</title><style>{STYLE}</style></head><body>"
        f"<h1>biasgen {escape(kind.title if kind is not GENERIC else run.kind)} report: {name}</h1>"
        f"<p class=\"sub\">Run folder <code>{name}</code> · kind <code>{escape(run.kind)}</code> · {state} · "
        f"rebuild with <code>biasgen report {name}</code></p>"
        + (f"<ul class=\"notes\">{notes}</ul>" if notes else "")
        + "".join(body)
        + f"<script>{SCRIPT}</script></body></html>\n"
    )


def write_report(run_dir: Path | str) -> Path:
    """Write ``report.html`` into the run folder ``run_dir`` from its files alone; returns its path.

    Cheap (reads a few small files, base64-encodes the figures) and safe to
    call at any moment of a run: a partial folder gives an "in progress" page.
    BiasgenError only when ``run_dir`` holds no biasgen run.
    """
    run = read_run(run_dir)
    path = run.folder / REPORT_NAME
    write_bytes(path, render(run).encode("utf-8"))
    return path
