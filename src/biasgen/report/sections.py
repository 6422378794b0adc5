"""What the report shows, section by section, and how it reads a run folder (see :mod:`biasgen.report`).

What differs between kinds of run is in :mod:`biasgen.report.kinds`. Every
string from the run is HTML-escaped here.
"""
from __future__ import annotations

import base64
from html import escape
from pathlib import Path

from .kinds import Column, ReportView, Run, _dict, _summary


VERDICTS = {  # verdict -> (plain wording, tone)
    "biased-generalization-detected": ("Biased generalization detected", "bad"),
    "overfitting": ("Overfitting, not biased generalization: the twins drift apart only after the test-loss minimum",
                    "warn"),
    "no-bias-detected": ("No biased generalization detected", "good"),
    "inconclusive": ("Inconclusive", "warn"),
}

TERMS = {  # plain meaning of each onset time, said where it first appears
    "tau_bias": "the checkpoint where the twins (the same network trained on disjoint splits of the data) agree "
                "most; after it they drift apart because each leans on its own training split",
    "tau_data": "the last checkpoint before the twins start drifting apart more than same-split control pairs (two "
                "seeds on the same data) do: the onset of the part of the divergence that is due to the data",
    "tau_loss": "the checkpoint with the lowest test loss, where ordinary early stopping would stop",
    "tau_mem": "the first checkpoint at which generated samples clearly copy training examples (the 95% lower bound "
               "of the share of copies is above zero): memorization proper",
    "tau_nn": "the checkpoint where generated sequences are closest to held-out data by the nearest-neighbour "
              "divergence D_NN",
    "tau_oracle": "the checkpoint where the model is closest to the exact (belief-propagation) denoiser",
    "tau_score": "per noise level t (t → step), the first checkpoint from which the twins' scores agree less on "
                 "training inputs than on test inputs (none: not yet)",
}

EVIDENCE = {  # summary key -> label, in display order; absent keys are skipped
    "p_value": "P value of a rise by the test-loss minimum (largest over its 95% interval)",
    "tested_until": "decisive test taken at step",
    "p_value_at_tau_loss": "P value at tau_loss itself",
    "p_value_end": "P value of a rise by the end of training",
    "candidate_costs": "test loss at each candidate stopping step",
    "p_bias_before_loss": "P(tau_bias < tau_loss)",
    "window": "biased window [tau_bias, tau_loss]",
    "control": "control",
    "drift": "rise by the decisive step",
    "drift_end": "rise by the end of training",
    "evidence": "evidence",
    "n_twin_pairs": "twin pairs",
    "n_control_pairs": "same-split control pairs",
    "recommendation_basis": "recommendation based on",
    "coarse_to_fine": "coarse-to-fine learning",
}
SHOWN_ELSEWHERE = {"verdict", "reason", "recommended_step", "recommended_ci", "recommendation", "tau_loss_open", "units",
                   "checkpoints",
                   "complete", "data", "models", "config", "seeds", "environment", "sampler", "timing"}


# -- page sections -----------------------------------------------------------------------------

def verdict_section(run: Run, view: ReportView) -> str:
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
        if "located" in tau:  # tau_mem: an onset with its first sign, or a bound
            where = (f"step {_num(tau['step'])}" if tau["located"] else
                     f"not reached (after step {_num(tau['value'])})" if tau["bound"] == "lower" else
                     f"at or before step {_num(tau['value'])}")
            first = f"first copies at step {_num(tau['ci'][0])}" if tau.get("ci") else "no copies"
            rows.append(f"<tr><th scope=\"row\">{escape(name)}</th><td>{escape(where)}</td>"
                        f"<td colspan=\"4\">{escape(first)}</td></tr>")
            continue
        level = tau.get("ci_level", 0.68)
        over = units.get(name) or (f"{tau['n_units']} units ({tau.get('reduce', '')})" if "n_units" in tau else "")
        note = (" (still falling at the last checkpoint: tau_loss is there or later)"
                if name == "tau_loss" and s.get("tau_loss_open") else
                " (not meaningful: the models start from one set of weights, so the twins agree most at the start)"
                if name == "tau_bias" and s.get("shared_start") else "")
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


def _caption(view: ReportView, path: Path) -> str:
    return view.captions.get(path.name) or "Figure: " + path.stem.removeprefix("fig_").replace("_", " ") + "."


def figures_section(run: Run, view: ReportView) -> str:
    shown = sorted((f for f in run.figures if f.name not in view.gallery_figures), key=lambda f: f.name != view.main_figure)
    if not shown:
        return "<p>The figures are drawn when the run finishes.</p>"
    return "".join(_figure(f, _caption(view, f)) for f in shown)


def gallery_section(run: Run, view: ReportView) -> str:
    figures = "".join(_figure(f, _caption(view, f)) for f in run.figures if f.name in view.gallery_figures)
    return figures + (view.gallery(run) if view.gallery else "")


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


def _columns(run: Run, view: ReportView) -> list[Column]:
    present = [c for c in view.columns if any(_scalar(r.get(c.key), c.reduce) is not None for r in run.records)]
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


def table_section(run: Run, view: ReportView) -> str:
    if not run.records:
        return "<p>No checkpoint has been evaluated yet.</p>"
    columns = _columns(run, view)
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


def settings_section(run: Run, view: ReportView) -> str:
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


def others_section(run: Run, view: ReportView) -> str:
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
