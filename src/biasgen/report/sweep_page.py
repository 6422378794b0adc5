"""The report page of a sweep over training-set sizes (``biasgen sweep``; see :mod:`biasgen.report`).

Built from the sweep folder's files alone: ``run.json`` (settings, versions),
``sweep.json`` (rows, fits, advice; written when the sweep ends) or, while the
sweep runs, ``sweep.jsonl`` (one row per finished size), and
``fig_phase_diagram.png``. Top to bottom: the advice for ``--target-n`` (or why
there is none), the phase diagram, one row per size with its taus (a step with
its interval, or a bound) and a link to that size's own ``report.html``, the
power laws with their exponent intervals, then the settings, seeds and versions.
Every string from the files is HTML-escaped; links are relative and only to a
size's own folder.
"""
from __future__ import annotations

import json
import re
from html import escape
from urllib.parse import quote

from .kinds import ReportView, Run, _dict, _summary
from .sections import TERMS, VERDICTS, _num, _value, figures_section

SWEEP_TAUS = ("tau_bias", "tau_data", "tau_loss", "tau_mem")
SWEEP_TERMS = {**{k: TERMS[k] for k in ("tau_bias", "tau_data", "tau_loss")},
               "tau_mem": "the memorization onset: the first checkpoint at which the share of generated samples that "
                          "copy a training example of their own split is clearly above zero (its 95% lower bound "
                          "exceeds the level set by --mem-level)"}
FOLDER = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # a size's run folder: one plain path component


def _rows(run: Run) -> list[dict]:
    """The per-size rows: ``sweep.json``'s when the sweep ended, else the finished sizes of ``sweep.jsonl``."""
    s = _summary(run)
    if isinstance(s.get("rows"), list):
        return [r for r in s["rows"] if isinstance(r, dict)]
    path = run.folder / "sweep.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # a half-written last line while the sweep writes it
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _tau_cell(tau, name: str) -> str:
    """One tau of one size: the step and its interval, or a bound (``≥ x``: not reached by the last checkpoint)."""
    t = _dict(tau)
    value = t.get("value")
    sort = f' data-v="{escape(_num(value))}"' if isinstance(value, (int, float)) else ""
    if t.get("bound") == "lower":
        return f"<td{sort}>≥ {escape(_num(value))} <small>(not reached)</small></td>"
    if t.get("bound") == "upper":
        return f"<td{sort}>≤ {escape(_num(value))} <small>(at the first checkpoint)</small></td>"
    ci = t.get("ci")
    label = "first sign → onset" if name == "tau_mem" else "68%"
    interval = (f" <small>[{escape(_num(ci[0]))}, {escape(_num(ci[1]))}] {label}</small>"
                if isinstance(ci, list) and len(ci) == 2 else "")
    return f"<td{sort}>{escape(_num(t.get('step')))}{interval}</td>"


def _share_cell(tau) -> str:
    """The memorized share at the onset (or at the last checkpoint when there is none) with its 95% interval."""
    t = _dict(tau)
    at, share, ci = (("onset", t.get("share_at_onset"), t.get("share_at_onset_ci")) if "share_at_onset" in t else
                     ("last checkpoint", t.get("share_last"), t.get("share_last_ci")))
    if not isinstance(share, (int, float)):
        return "<td>—</td>"
    interval = f" [{escape(_num(ci[0]))}, {escape(_num(ci[1]))}]" if isinstance(ci, list) and len(ci) == 2 else ""
    return f'<td data-v="{escape(_num(share))}">{escape(_num(share))}<small>{interval} at {at}</small></td>'


def _size_link(run: Run, row: dict) -> str:
    """A relative link to the size's own report.html, when its folder is a plain name inside the sweep folder."""
    folder = row.get("folder")
    if not isinstance(folder, str) or not FOLDER.fullmatch(folder) or not (run.folder / folder / "report.html").is_file():
        return "<td>—</td>"
    return f'<td><a href="{escape(quote(folder))}/report.html">{escape(folder)}</a></td>'


def advice_section(run: Run, view: ReportView) -> str:
    """The advice for ``--target-n`` (or why there is none), or how far a running sweep has come."""
    sizes = _dict(run.config).get("sizes")
    planned = len(sizes) if isinstance(sizes, list) else "?"
    terms = "".join(f"<b>{escape(name)}</b> is {escape(text)}. " for name, text in SWEEP_TERMS.items())
    terms = (f'<p class="terms">{terms}A tau not reached by a size\'s last checkpoint is a lower bound, shown as '
             "≥ that step; a minimum at the first checkpoint is an upper bound (≤).</p>")
    if not run.finished:
        done = [r.get("n") for r in _rows(run)]
        last = f" (last: n = {escape(_num(done[-1]))})" if done else ""
        return (f'<section class="verdict warn"><p class="headline">In progress: {len(done)} of {escape(str(planned))} '
                f"sizes finished{last}.</p><p>The fits, the advice and the phase diagram appear here when the last "
                "size is finished. A stopped sweep continues with <code>biasgen sweep --resume --out "
                f"{escape(str(run.folder))}</code>.</p>{terms}</section>")
    target = _summary(run).get("target")
    if not isinstance(target, dict):
        return ('<section class="verdict"><p class="headline">No advice asked for (no <code>--target-n</code>).</p>'
                "<p>For the stopping step at your training-set size N, run <code>biasgen sweep --resume --out "
                f"{escape(str(run.folder))} --target-n N</code>: nothing is recomputed.</p>{terms}</section>")
    n = escape(_num(target.get("target_n")))
    step = target.get("recommended_step")
    if step is not None:
        tone, headline = "good", f"Advice for N = {n}: stop training at or before <strong>step {escape(_num(step))}</strong>."
    else:
        tone, headline = "warn", f"No advice for N = {n}: {escape(str(target.get('refused')))}"
    rows = []
    for name in SWEEP_TAUS:
        t = _dict(_dict(target.get("taus")).get(name))
        if not t:
            continue
        if t.get("refused"):
            rows.append(f'<tr><th scope="row">{escape(name)}</th><td colspan="2">not extrapolated: '
                        f"{escape(str(t['refused']))}</td></tr>")
            continue
        lo, hi = (t.get("interval") or [None, None])[:2]
        rows.append(f'<tr><th scope="row">{escape(name)}</th><td>{escape(_num(t.get("step")))}</td>'
                    f"<td>{escape(_num(lo))}–{escape(_num(hi))}</td></tr>")
    table = ('<table class="evidence"><thead><tr><th>at N</th><th>median prediction (step)</th>'
             f"<th>95% prediction interval</th></tr></thead><tbody>{''.join(rows)}</tbody></table>" if rows else "")
    why = target.get("recommendation") if step is not None else target.get("statement")  # the former holds the latter
    why = f"<p>{escape(str(why))}</p>" if why else ""
    return f'<section class="verdict {tone}"><p class="headline">{headline}</p>{why}{table}{terms}</section>'



def sizes_section(run: Run, view: ReportView) -> str:
    """One row per size: its budget, its three taus, the memorized share, its verdict and a link to its report."""
    rows = _rows(run)
    if not rows:
        return "<p>No size has finished yet.</p>"
    body = []
    for r in rows:
        verdict = r.get("verdict")
        wording = VERDICTS.get(verdict, (str(verdict), ""))[0]
        body.append(f'<tr><td data-v="{escape(_num(r.get("n")))}">{escape(_num(r.get("n")))}</td>'
                    f'<td data-v="{escape(_num(r.get("steps")))}">{escape(_num(r.get("steps")))}</td>'
                    + "".join(_tau_cell(r.get(name), name) for name in SWEEP_TAUS) + _share_cell(r.get("tau_mem"))
                    + f'<td title="{escape(str(r.get("reason", "")))}">{escape(wording)}</td>' + _size_link(run, r) + "</tr>")
    rule = _dict(_summary(run).get("definitions")).get("memorized share")
    rule = f" Memorized share: {escape(str(rule))}." if rule else ""
    return ("<p>n: training examples per model; steps: its training budget. tau_bias, tau_data and tau_loss with their 68% "
            "bootstrap interval, tau_mem with its first sign → onset interval; ≥ x: not reached within the run (a "
            f"lower bound).{rule} Each size is an ordinary run: its own page has the evidence. With JavaScript, "
            "click a column header to sort.</p>"
            '<div class="wide"><table class="metrics sortable"><thead><tr><th scope="col">n</th>'
            '<th scope="col">steps</th><th scope="col">tau_bias</th><th scope="col">tau_data</th><th scope="col">tau_loss</th>'
            '<th scope="col">tau_mem</th><th scope="col">memorized share</th><th scope="col">verdict</th>'
            f'<th scope="col">report</th></tr></thead><tbody>{"".join(body)}</tbody></table></div>')


def fits_section(run: Run, view: ReportView) -> str:
    """The power law ``tau = c * n**a`` of each tau with the 95% interval of its exponent, or why there is none."""
    fits = _dict(_summary(run).get("fits"))
    if not fits:
        return "<p>The power laws are fitted when the last size is finished.</p>"
    rows = []
    for name in SWEEP_TAUS:
        f = _dict(fits.get(name))
        if not f.get("fit"):
            rows.append(f'<tr><th scope="row">{escape(name)}</th><td colspan="4">no fit: '
                        f"{escape(str(f.get('reason', 'not fitted')))}</td></tr>")
            continue
        ci = f.get("exponent_ci") or [None, None]
        lo, hi = ("unbounded" if v is None else _num(v) for v in ci[:2])
        counts = (f"{_num(f.get('n_located'))} located, {_num(f.get('n_lower_bounds'))} lower and "
                  f"{_num(f.get('n_upper_bounds'))} upper bound(s)")
        rows.append(f'<tr><th scope="row">{escape(name)}</th><td>{escape(_num(f.get("prefactor")))} · '
                    f"n<sup>{escape(_num(f.get('exponent')))}</sup></td><td>{escape(_num(f.get('exponent')))} "
                    f"[{escape(lo)}, {escape(hi)}]</td><td>{escape(_num(f.get('sigma')))}</td>"
                    f"<td>{escape(counts)}</td></tr>")
    return ("<p>For each tau, <code>log tau = log c + a log n + σ z</code> fitted by maximum likelihood over the sizes, "
            "bounds kept as censored values (a tau not reached counts as “later than”, not as a number); the 95% "
            "interval of the exponent a is a profile-likelihood interval (docs/sweep.md).</p>"
            '<table class="evidence"><thead><tr><th>tau</th><th>fit</th><th>exponent a [95% interval]</th>'
            f"<th>σ (scatter of log tau)</th><th>sizes</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def settings_section(run: Run, view: ReportView) -> str:
    """The sweep's settings, the experiment's settings and seeds, the versions and the timing."""
    config = _dict(run.config)
    experiment = _dict(config.get("settings"))
    sweep = {k: v for k, v in config.items() if k != "settings"}
    seeds = {k: v for k, v in experiment.items() if k == "seed" or k.endswith("_seed")}
    s = _summary(run)
    blocks = [("Sweep", sweep), ("Seeds", seeds), ("Versions", run.environment)]
    if _dict(s.get("environment")) and s["environment"] != run.environment:
        blocks.append(("Versions of the last invocation", s["environment"]))
    if "timing" in s:
        blocks.append(("Timing", s["timing"]))
    cards = "".join(f"<div><h3>{escape(title)}</h3>{_value(value)}</div>" for title, value in blocks)
    items = "".join(f"<li><code>{escape(str(k))}</code> = {_value(v)}</li>" for k, v in experiment.items())
    return (f'<p>The data of each size are described on its own page.</p><div class="cards">{cards}</div>'
            f'<h3>Experiment settings (every size)</h3><ul class="config">{items}</ul>')


def definitions_section(run: Run, view: ReportView) -> str:
    definitions = _dict(_summary(run).get("definitions"))
    return f"<details><summary>Definitions (sweep.json)</summary>{_value(definitions)}</details>" if definitions else ""


SWEEP_PAGE = (
    ("Advice", advice_section),
    ("Phase diagram", figures_section),
    ("Per-size results", sizes_section),
    ("Power laws across sizes", fits_section),
    ("Config, seeds and versions", settings_section),
    ("", definitions_section),
)
