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

The sections, and what differs between kinds of run, live in
:mod:`biasgen.report.sections` and :mod:`biasgen.report.kinds`; a sweep's page
(per-size table, fits, advice) in :mod:`biasgen.report.sweep_page`.
"""
from __future__ import annotations

import base64
import hashlib
import shlex
from html import escape
from pathlib import Path
from typing import Callable

from .kinds import ReportView, Run, read_run, view_of
from .sections import (figures_section, gallery_section, others_section, settings_section, table_section,
                              verdict_section)
from .sweep_page import SWEEP_PAGE
from ..runs import write_bytes

REPORT_NAME = "report.html"


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


def _guarded(draw: Callable[[Run, ReportView], str], run: Run, view: ReportView) -> str:
    """A section's HTML, or a note when the folder's files do not fit it (a report must never fail)."""
    try:
        return draw(run, view)
    except Exception as e:  # noqa: BLE001 - a malformed or half-written file must not break the whole page
        return f"<p class=\"notes\">This section could not be drawn from the run's files: {escape(repr(e))}</p>"


TWIN_PAGE = (  # (title, section) top to bottom; an empty title: the section has none
    ("Verdict", verdict_section),
    ("Figures", figures_section),
    ("Gallery", gallery_section),
    ("Per-checkpoint metrics", table_section),
    ("Data, config, seeds and versions", settings_section),
    ("", others_section),
)
PAGES = {"sweep": SWEEP_PAGE}  # kinds of run whose page is not a twin run's


def render(run: Run) -> str:
    """The whole page for ``run`` as one HTML string."""
    view = view_of(run.kind)
    body = []
    page = PAGES.get(run.kind) or (TWIN_PAGE[0], *view.sections, *TWIN_PAGE[1:])  # the kind's own after the verdict
    for title, draw in page:
        html = _guarded(draw, run, view)
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
        f"<h1>biasgen {escape(view.title)} report: {name}</h1>"
        f"<p class=\"sub\">Run folder <code>{name}</code> · kind <code>{escape(run.kind)}</code> · {state} · "
        f"rebuild with <code>biasgen report {escape(shlex.quote(run.folder.resolve().name))}</code></p>"
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
