"""report.html: content of a finished run, in-progress pages, escaping, and a real render in headless Chromium."""
import base64
import fcntl
import json
import os
import re
import select
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from biasgen.checkpoint import save_tensors
from biasgen.cli import main
from biasgen.images.audit import audit
from biasgen.report import write_report
from biasgen.report.sections import VERDICTS
from biasgen.sweep import sweep
from biasgen.sweep.fit import extrapolate, fit_power_law
from biasgen.training import checkpoint_steps


@pytest.fixture(scope="module")
def tiny_audit(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "tiny"
    audit(run, preset="tiny", progress=False)
    return run


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "sweep"
    sweep(out, preset="tiny", target_n=100, progress=False)
    return out


class Page(HTMLParser):
    """Tags and text of an HTML page: ``imgs`` (attribute dicts), ``links`` (hrefs), ``scripts`` (count), ``text``."""

    def __init__(self, html: str):
        super().__init__()
        self.imgs, self.links, self.scripts, self.chunks = [], [], 0, []
        self.feed(html)
        self.text = re.sub(r"\s+", " ", "".join(self.chunks))

    def handle_starttag(self, tag, attrs):
        self.imgs += [dict(attrs)] if tag == "img" else []
        self.links += [dict(attrs).get("href")] if tag == "a" else []
        self.scripts += tag == "script"

    def handle_data(self, data):
        self.chunks.append(data)


def headline(summary: dict) -> str:
    return f"{VERDICTS[summary['verdict']][0]}: stop training at step {summary['recommended_step']}."


def test_finished_audit_report_holds_verdict_step_and_every_figure(tiny_audit):
    path = write_report(tiny_audit)
    assert path == tiny_audit / "report.html"
    summary = json.loads((tiny_audit / "summary.json").read_text())
    page = Page(path.read_text())
    assert headline(summary) in page.text
    assert summary["reason"] in page.text and summary["recommendation"] in page.text
    assert "tau_bias is the checkpoint where the twins" in page.text  # said in plain words
    figures = sorted(tiny_audit.glob("fig_*.png"))
    assert {f.name for f in figures} >= {"fig_loss_twin.png", "fig_gallery.png"}
    embedded = [base64.b64decode(img["src"].removeprefix("data:image/png;base64,")) for img in page.imgs]
    assert embedded == [f.read_bytes() for f in sorted(figures, key=lambda f: (f.name != "fig_loss_twin.png", f.name == "fig_gallery.png", f.name))]
    assert all(img["src"].startswith("data:image/png;base64,") and len(img["alt"]) > 20 for img in page.imgs)
    for step in summary["checkpoints"]:  # the per-checkpoint table
        assert f'<td data-v="{step}">{step}</td>' in path.read_text()
    assert "sklearn bundled" in page.text and summary["environment"]["torch"] in page.text


def test_report_of_a_run_killed_mid_way_is_marked_in_progress(tiny_audit, tmp_path, capsys):
    run = tmp_path / "killed"
    run.mkdir()
    shutil.copy(tiny_audit / "run.json", run)
    (run / "models").mkdir()
    planned = len(checkpoint_steps(12, 3, 4))  # the tiny preset's steps, checkpoints, first_checkpoint
    assert main(["report", str(run)]) == 0  # nothing evaluated yet
    assert f"In progress: 0 of {planned} checkpoints evaluated" in Page((run / "report.html").read_text()).text
    first, second = (tiny_audit / "metrics.jsonl").read_text().splitlines()[:2]
    (run / "metrics.jsonl").write_text(first + "\n" + second[: len(second) // 2])  # a half-written second line
    capsys.readouterr()
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == str(run / "report.html")
    page = Page((run / "report.html").read_text())
    assert f"In progress: 1 of {planned} checkpoints evaluated (last: step 4)" in page.text
    assert "metrics.jsonl line 2 is cut off mid-record; it was skipped" in page.text
    assert "stop training at" not in page.text and page.imgs == []
    assert f"biasgen audit --resume --out {run}" in page.text


def test_report_command_refuses_a_folder_without_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no biasgen run" in capsys.readouterr().err
    assert not (tmp_path / "report.html").exists()


CRAFTED = "<script>alert(1)</script>"


def test_strings_from_the_run_are_escaped(tmp_path):
    run = tmp_path / "<script>alert(1)<" / "script><img src=x onerror=alert(2)>"  # the path holds CRAFTED
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"kind": "sweep<blink>", "config": {CRAFTED: CRAFTED, "steps": "<marquee>"},
                                              "environment": {"torch": CRAFTED}}))
    (run / "summary.json").write_text(json.dumps({
        "verdict": CRAFTED, "reason": CRAFTED, "recommended_step": CRAFTED, "recommendation": CRAFTED,
        "tau_bias": {"step": CRAFTED, "ci": [CRAFTED, 1]}, "evidence": {CRAFTED: [CRAFTED]}, CRAFTED: CRAFTED}))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 3, CRAFTED: 1.5, "note": CRAFTED}) + "\n")
    (run / f"fig_{CRAFTED.replace('/', '')}.png").write_bytes(b"\x89PNG")
    html = write_report(run).read_text()
    assert html.count("<script") == 1 and "<img src=x" not in html and "<blink>" not in html and "<marquee>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=alert(2)&gt;" in html  # the folder name, shown in the title
    page = Page(html)
    assert [img["alt"] for img in page.imgs] == ["Figure: <script>alert(1)<script>."]


def test_hierarchy_report_renders_generated_sequences_as_symbols(tmp_path):
    run = tmp_path / "h"
    config = {"q": 4, "depth": 3, "steps": 20, "checkpoints": 2, "first_checkpoint": 10}
    (run / "samples").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"kind": "hierarchy", "config": config, "environment": {}}))
    records = [{"step": s, "skl_test_pairs": [1.0, 2.0, 10.0 + s], "test_l": [3.0, 5.0], "skl_control_pairs": []}
               for s in (10, 20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run / "summary.json").write_text(json.dumps({
        "verdict": "inconclusive", "recommended_step": 20, "tau_bias": {"step": 10, "ci": [10, 20]},
        "models": [{"model": 0, "block": 0}, {"model": 1, "block": 0}, {"model": 2, "block": 1}]}))
    samples = torch.tensor([[[0, 1, 2, 3, 3, 2, 1, 0]], [[1] * 8], [[3, 3, 0, 0, 1, 1, 2, 2]]])  # (M=3, n=1, L=8)
    for step in (10, 20):
        save_tensors(run / "samples" / f"step_{step:07d}", {"samples": samples}, {"step": step})
    html = write_report(run).read_text()
    page = Page(html)
    assert "tau_bias (step 10): model A = 0 (split 0), model B = 2 (split 1)" in page.text  # twins: different blocks
    rows = page.text.replace(" ", "")
    assert "A#0abcddcba" in rows and "B#0ddaabbcc" in rows
    assert 'data-v="2.0">2<' in html and 'data-v="4.0">4<' in html  # median over pairs, mean over models
    assert "same-block control" not in page.text  # an empty metric gets no column
    assert "Inconclusive: stop training at step 20." in page.text


# -- the page of a sweep over training-set sizes --------------------------------------------------

def test_sweep_report_holds_advice_sizes_fits_and_links(tiny_sweep, capsys):
    result = json.loads((tiny_sweep / "sweep.json").read_text())
    written = (tiny_sweep / "report.html").read_text()  # biasgen sweep wrote it
    (tiny_sweep / "report.html").unlink()
    assert main(["report", str(tiny_sweep)]) == 0  # biasgen report rebuilds it, identical
    assert capsys.readouterr().out.strip() == str(tiny_sweep / "report.html")
    html = (tiny_sweep / "report.html").read_text()
    assert html == written
    page = Page(html)
    assert f"No advice for N = 100: {result['target']['refused']}" in page.text  # the tiny preset fits too little
    assert [base64.b64decode(i["src"].removeprefix("data:image/png;base64,")) for i in page.imgs] == [
        (tiny_sweep / "fig_phase_diagram.png").read_bytes()]
    assert page.links == [f"{r['folder']}/report.html" for r in result["rows"]]
    assert all((tiny_sweep / link).is_file() for link in page.links)
    for r in result["rows"]:
        cells = ["—" if r[name] is None else  # tau_data: the tiny sweep has no same-split controls
                 f"≥ {r[name]['value']} (not reached)" if r[name]["bound"] == "lower" else
                 f"≤ {r[name]['value']} (at the first checkpoint)" if r[name]["bound"] == "upper" else
                 f"{r[name]['step']} [{r[name]['ci'][0]}, {r[name]['ci'][1]}] "
                 + ("first sign → onset" if name == "tau_mem" else "68%")
                 for name in ("tau_bias", "tau_data", "tau_loss", "tau_mem")]
        row = f"{r['n']}{r['steps']}" + "".join(cells)
        assert row.replace(" ", "") in page.text.replace(" ", ""), row  # table cells, spaces dropped
    for name, fit in result["fits"].items():
        shown = f"{name} no fit: {fit['reason']}" if not fit["fit"] else f"{name} {fit['prefactor']:.4g} · n"
        assert shown.replace(" ", "") in page.text.replace(" ", "")
    assert result["environment"]["torch"] in page.text and "steps_per_image" in page.text


def _synthetic_sweep(folder, rows, target_n=2000, config=None):
    """A finished sweep folder from hand-made rows (fits and advice by the sweep's own functions)."""
    folder.mkdir(parents=True)
    taus = ("tau_bias", "tau_loss", "tau_mem")
    fits = {t: fit_power_law([r["n"] for r in rows], [r[t]["value"] for r in rows], [r[t]["bound"] or "value" for r in rows])
            for t in taus}
    target = extrapolate(fits, [r["n"] for r in rows], target_n, max_ci_width=3.0)
    config = config or {"experiment": "audit", "sizes": [r["n"] for r in rows], "settings": {"seed": 7}}
    (folder / "run.json").write_text(json.dumps({"kind": "sweep", "config": config, "environment": {"torch": "x"}}))
    (folder / "sweep.json").write_text(json.dumps({"kind": "sweep", "rows": rows, "fits": fits, "target": target,
                                                   "complete": True, "definitions": {"fit": "Tobit"}}))
    return target


def _row(n, bias, loss, mem, folder=None):
    tau = lambda v, bound=None: {"step": None if bound else v, "ci": None if bound else [v // 2, v], "located": not bound,
                                 "bound": bound, "value": v}
    return {"n": n, "steps": 25 * n, "folder": folder or f"n{n:06d}", "verdict": "biased-generalization-detected",
            "reason": "why", "tau_bias": tau(bias), "tau_loss": tau(*loss), "tau_mem": tau(*mem)}


def test_sweep_report_shows_the_advice_bounds_and_exponent_intervals(tmp_path):
    rows = [_row(16, 100, (100,), (252,)), _row(32, 110, (194,), (602,)), _row(64, 151, (415,), (1600,)),
            _row(128, 141, (992,), (3200, "lower"))]
    target = _synthetic_sweep(tmp_path / "s", rows)
    (tmp_path / "s" / "n000016").mkdir()
    (tmp_path / "s" / "n000016" / "report.html").write_text("size page")
    page = Page(write_report(tmp_path / "s").read_text())
    assert f"Advice for N = 2000: stop training at or before step {target['recommended_step']}." in page.text
    assert target["recommendation"] in page.text
    cells = page.text.replace(" ", "")
    # rows written before tau_data was part of a sweep show it as "—"
    assert "1283200141[70,141]68%—992[496,992]68%≥3200(notreached)" in cells
    assert "32800110[55,110]68%—194[97,194]68%602[301,602]firstsign→onset" in cells
    assert page.links == ["n000016/report.html"]  # only sizes whose page exists are linked
    mem = json.loads((tmp_path / "s" / "sweep.json").read_text())["fits"]["tau_mem"]
    lo, hi = (f"{v:.4g}" if v is not None else "unbounded" for v in mem["exponent_ci"])
    assert f"{mem['exponent']:.4g} [{lo}, {hi}]" in page.text and "3 located, 1 lower and 0 upper bound(s)" in page.text
    assert "Seedsseed7" in cells  # the seeds card


def test_sweep_report_of_a_sweep_still_running(tiny_sweep, tmp_path):
    run = tmp_path / "running"
    run.mkdir()
    shutil.copy(tiny_sweep / "run.json", run)
    first, second = (tiny_sweep / "sweep.jsonl").read_text().splitlines()[:2]
    (run / "sweep.jsonl").write_text(first + "\n" + second[: len(second) // 2])  # the second row half-written
    page = Page(write_report(run).read_text())
    assert "In progress: 1 of 3 sizes finished (last: n = 8)." in page.text
    assert f"biasgen sweep --resume --out {run}" in page.text and page.imgs == []
    assert "The power laws are fitted when the last size is finished." in page.text


def test_sweep_report_escapes_every_string(tmp_path):
    rows = [_row(16, 100, (100,), (252,), folder="javascript:alert(1)"), _row(32, 110, (194,), (602,), folder=CRAFTED),
            _row(64, 151, (415,), (1600,), folder="../../etc")]
    rows[0]["verdict"] = rows[1]["reason"] = CRAFTED
    config = {"experiment": CRAFTED, "sizes": [CRAFTED], "settings": {CRAFTED: CRAFTED, "grammar_seed": CRAFTED}}
    _synthetic_sweep(tmp_path / "s", rows, config=config)
    data = json.loads((tmp_path / "s" / "sweep.json").read_text())
    data["target"]["recommendation"] = data["target"]["statement"] = data["fits"]["tau_loss"]["reason"] = CRAFTED
    data["target"]["recommended_step"] = data["rows"][1]["n"] = CRAFTED
    data["fits"]["tau_loss"]["fit"] = False
    data["definitions"] = {CRAFTED: CRAFTED}
    (tmp_path / "s" / "sweep.json").write_text(json.dumps(data))
    for folder in ("javascript:alert(1)", "../../etc"):
        (tmp_path / "s" / folder).mkdir(parents=True, exist_ok=True)
        (tmp_path / "s" / folder / "report.html").write_text("")
    html = write_report(tmp_path / "s").read_text()
    assert html.count("<script") == 1 and "<script>alert" not in html and "href=\"javascript" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert Page(html).links == []  # neither a URL scheme nor a path outside the sweep folder is linked


# -- headless Chromium over the DevTools protocol (messages on a pipe, no extra package) --------

class Chromium:
    """A headless Chromium driven through ``--remote-debugging-pipe`` (JSON messages ending in NUL)."""

    def __init__(self, profile: Path):
        to_browser, self.writer = os.pipe()
        self.reader, from_browser = os.pipe()
        # the browser reads fd 3 and writes fd 4: hand it our ends from numbers that cannot clash with 3 and 4
        to_browser, from_browser = (self._above_4(fd) for fd in (to_browser, from_browser))
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser} 4>&{from_browser} {to_browser}<&- {from_browser}>&-',
             "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "about:blank"],
            pass_fds=(to_browser, from_browser), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self.buffer, self.next_id, self.events = b"", 0, []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=self.session)

    @staticmethod
    def _above_4(fd: int) -> int:
        moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return moved

    def _receive(self, done, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                message = json.loads(raw)
                if done(message):
                    return message
                self.events.append(message)
            if not select.select([self.reader], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.reader, 1 << 20)
            if not chunk:
                raise EOFError("Chromium closed the pipe")
            self.buffer += chunk

    def call(self, method: str, session: str | None = None, **params) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params} | ({"sessionId": session} if session else {})
        os.write(self.writer, json.dumps(message).encode() + b"\0")
        answer = self._receive(lambda m: m.get("id") == message["id"])
        assert "error" not in answer, answer
        return answer["result"]

    def page(self, method: str, **params) -> dict:
        return self.call(method, session=self.session, **params)

    def load(self, url: str) -> list[dict]:
        """Open ``url`` and wait for its load event; returns the events it raised."""
        self.events = []
        self.page("Page.navigate", url=url)
        self._receive(lambda m: m.get("method") == "Page.loadEventFired")
        self.page("Runtime.evaluate", expression="0")  # let messages logged during load arrive
        return self.events

    def js(self, expression: str):
        return self.page("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        try:
            self.call("Browser.close")
            self.proc.wait(timeout=10)
        except (OSError, EOFError, TimeoutError, subprocess.TimeoutExpired):
            self.proc.kill()
        os.close(self.writer)
        os.close(self.reader)


def problems(events: list[dict]) -> list[str]:
    """Console errors, uncaught exceptions, error log entries, and requests that leave the page's own file."""
    found = []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown" or (method == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert")):
            found.append(f"{method}: {json.dumps(p)[:300]}")
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            found.append(f"log: {p['entry']['text']}")
        elif method == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("file:", "data:")):
            found.append(f"request: {p['request']['url']}")
    return found


@pytest.fixture
def chromium(tmp_path):
    if shutil.which("chromium") is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs it (apt-get install -y chromium).")
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    browser = Chromium(tmp_path / "profile")
    yield browser
    browser.close()


def test_report_renders_in_headless_chromium(tiny_audit, chromium, tmp_path):
    # the checker catches what it must catch: a console error and a request to the network
    bad = tmp_path / "bad.html"
    bad.write_text('<img src="http://127.0.0.1:9/x.png"><script>console.error("boom")</script>')
    found = problems(chromium.load(bad.as_uri()))
    assert any("boom" in f for f in found) and any(f.startswith("request: http://127.0.0.1:9/") for f in found)

    path = write_report(tiny_audit)
    summary = json.loads((tiny_audit / "summary.json").read_text())
    assert problems(chromium.load(path.as_uri())) == []
    assert chromium.js("document.querySelector('.headline').textContent") == headline(summary)
    images = chromium.js("[...document.images].map(i => [i.alt, i.naturalWidth, i.closest('figure').textContent])")
    assert len(images) == len(list(tiny_audit.glob("fig_*.png")))
    assert all(alt and width > 100 and alt in caption for alt, width, caption in images)
    for name in (f.name for f in tiny_audit.glob("fig_*.png")):
        assert chromium.js(f"document.body.textContent.includes({json.dumps(name)})")
    # the table sorts on a click (and only the page's own script ran)
    chromium.js("document.querySelector('table.metrics th').click(); document.querySelector('table.metrics th').click()")
    steps = chromium.js("[...document.querySelectorAll('table.metrics tbody tr')].map(r => +r.cells[0].textContent)")
    assert steps == sorted(summary["checkpoints"], reverse=True)
    assert chromium.js("document.scripts.length") == 1

    chromium.page("Emulation.setDeviceMetricsOverride", width=1200, height=900, deviceScaleFactor=1, mobile=False)
    shot = base64.b64decode(chromium.page("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
    (tmp_path / "report.png").write_bytes(shot)
    assert shot.startswith(b"\x89PNG") and len(shot) > 50_000
    pdf = base64.b64decode(chromium.page("Page.printToPDF", paperWidth=8.27, paperHeight=11.69,
                                         preferCSSPageSize=True)["data"])  # A4
    (tmp_path / "report.pdf").write_bytes(pdf)
    assert pdf.startswith(b"%PDF") and 2 <= len(re.findall(rb"/Type\s*/Page\b", pdf)) <= 12


def test_sweep_report_renders_in_headless_chromium(tiny_sweep, chromium):
    path = write_report(tiny_sweep)
    assert problems(chromium.load(path.as_uri())) == []
    assert chromium.js("document.querySelector('.headline').textContent").startswith("No advice for N = 100")
    assert chromium.js("[...document.images].map(i => i.naturalWidth)")[0] > 300  # the phase diagram
    chromium.js("document.querySelector('table.metrics th').click(); document.querySelector('table.metrics th').click()")
    sizes = chromium.js("[...document.querySelectorAll('table.metrics tbody tr')].map(r => +r.cells[0].textContent)")
    assert sizes == [16, 12, 8]
    links = chromium.js("[...document.links].map(a => a.href)")
    assert links == [(tiny_sweep / f"n{n:06d}" / "report.html").as_uri() for n in (16, 12, 8)]
    assert problems(chromium.load(links[0])) == []  # a size's own page opens from the link
