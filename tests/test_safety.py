"""Nothing the user has is ever lost: every bad input gets one clear line, and no pre-existing byte changes.

Each case of the table builds a bad input in a fresh folder (most on a copy of one tiny audit run), runs
the command line, and checks the exit status, that stderr is one line without a traceback that says
what the case expects, and that the sha256 of every file that existed before is unchanged.
"""
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biasgen.cli import main
from biasgen.images.data import load_images
from biasgen.report import write_report
from biasgen.runs import LOCK_NAME, RunLock, read_jsonl, scan_jsonl, write_bytes

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("safety") / "run"
    assert main(["audit", "--preset", "tiny", "--out", str(run), "--quiet"]) == 0
    return run


def hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root`` (the lock file, rewritten by each writer, aside)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != LOCK_NAME}


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip()


def image_folder(folder: Path, n: int = 12) -> Path:
    """``n`` distinct 8x8 gray PNGs and two files that are not images (the user's own)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"img{i:02d}.png")
    (folder / "README.txt").write_text("my data")
    (folder / "labels.csv").write_text("file,label\n")
    return folder


class Payload:
    """A pickle that, if ever loaded, would create the file ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# -- the table: (name, build the case in tmp_path -> argv, what the error line must say) ----------

def audit_out_is_data(tmp, run):
    data = image_folder(tmp / "faces")
    return ["audit", "--preset", "tiny", "--data", data, "--out", data, "--force"]


def audit_out_inside_data(tmp, run):
    data = image_folder(tmp / "faces")
    return ["audit", "--preset", "tiny", "--data", data, "--out", data / "results", "--force"]


def audit_out_holds_config(tmp, run):
    (tmp / "mine").mkdir()
    (tmp / "mine" / "c.toml").write_text("steps = 12\n")
    return ["audit", "--preset", "tiny", "--config", tmp / "mine" / "c.toml", "--out", tmp / "mine", "--force"]


def monitor_out_is_checkpoints(tmp, run):
    return ["monitor", "--checkpoints", run / "models" / "model0", "--out", run / "models" / "model0", "--force"]


def monitor_out_holds_checkpoints(tmp, run):
    return ["monitor", "--checkpoints", run / "models" / "model0", "--out", run, "--force"]


def force_on_user_files(tmp, run):
    (tmp / "thesis").mkdir()
    (tmp / "thesis" / "thesis.tex").write_text("\\chapter{One}")
    (tmp / "thesis" / "results.csv").write_text("a,b\n1,2\n")
    return ["audit", "--preset", "tiny", "--out", tmp / "thesis", "--force"]


def force_on_symlinked_out(tmp, run):
    (tmp / "link").symlink_to(run, target_is_directory=True)
    return ["audit", "--preset", "tiny", "--out", tmp / "link", "--force"]


def toml_bool_steps(tmp, run):
    (tmp / "c.toml").write_text("steps = true\n")
    return ["audit", "--preset", "tiny", "--config", tmp / "c.toml", "--out", tmp / "out"]


def toml_string_steps(tmp, run):
    (tmp / "c.toml").write_text('steps = "12"\n')
    return ["audit", "--preset", "tiny", "--config", tmp / "c.toml", "--out", tmp / "out"]


def toml_empty_score_ts(tmp, run):
    (tmp / "c.toml").write_text("score_ts = []\n")
    return ["audit", "--preset", "tiny", "--config", tmp / "c.toml", "--out", tmp / "out"]


def flag_empty_score_ts(tmp, run):
    return ["audit", "--preset", "tiny", "--score-ts", "", "--out", tmp / "out"]


def first_checkpoint_past_steps(tmp, run):
    return ["audit", "--preset", "tiny", "--first-checkpoint", "50", "--steps", "12", "--out", tmp / "out"]


def config_is_a_folder(tmp, run):
    (tmp / "conf").mkdir()
    return ["audit", "--preset", "tiny", "--config", tmp / "conf", "--out", tmp / "out"]


def hold_lock(tmp, run):
    """Another process that holds the lock of ``run`` (killed by the test afterwards)."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from biasgen.runs import RunLock
        lock = RunLock({str(run)!r}); print("locked", flush=True); time.sleep(60)""")],
        stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(SRC)}, text=True)
    assert holder.stdout.readline().strip() == "locked"
    tmp.joinpath("holder").write_text(str(holder.pid))


def resume_in_use(tmp, run):
    hold_lock(tmp, run)
    return ["audit", "--preset", "tiny", "--out", run, "--resume"]


def judge_write_in_use(tmp, run):
    hold_lock(tmp, run)
    return ["judge", run, "--write"]


def metrics_binary_garbage_judge(tmp, run):
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00garbage\n")
    return ["judge", run]


def metrics_binary_garbage_resume(tmp, run):
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b"\xff\xfe\x00garbage\n")
    return ["audit", "--preset", "tiny", "--out", run, "--resume", "--quiet"]


def metrics_cut_mid_line(tmp, run):
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[:-200])  # the third record loses its end
    return ["judge", run]


def metrics_stray_line(tmp, run):
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"note": "added by hand"}\n')
    return ["judge", run]


def metrics_twice_written(tmp, run):
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text + text.splitlines(keepends=True)[-1])
    return ["audit", "--preset", "tiny", "--out", run, "--resume", "--quiet"]


def summary_garbage_judge_write(tmp, run):
    (run / "summary.json").write_bytes(b"\x89PNG\x00\xff not json")
    return ["judge", run, "--write"]


def run_json_is_a_list(tmp, run):
    (run / "run.json").write_text("[1, 2]")
    return ["judge", run]


def run_json_without_config(tmp, run):
    (run / "run.json").write_text('{"kind": "audit"}')
    return ["audit", "--preset", "tiny", "--out", run, "--resume"]


def run_json_garbage_report(tmp, run):
    (run / "run.json").write_bytes(b"\x00\xff\xfe")
    return ["report", run]


def grammar_raw_pickle(tmp, run):
    (tmp / "M.pt").write_bytes(pickle.dumps(Payload(tmp / "PWNED")))
    return ["hierarchy", "--preset", "tiny", "--grammar-file", tmp / "M.pt", "--out", tmp / "out"]


def grammar_object_array(tmp, run):
    np.save(tmp / "M.npy", np.array([Payload(tmp / "PWNED")], dtype=object), allow_pickle=True)
    return ["hierarchy", "--preset", "tiny", "--grammar-file", tmp / "M.npy", "--out", tmp / "out"]


def grammar_string_array(tmp, run):
    np.save(tmp / "M.npy", np.array(["a", "b", "c"]))
    return ["hierarchy", "--preset", "tiny", "--grammar-file", tmp / "M.npy", "--out", tmp / "out"]


def monitor_corrupt_checkpoint(tmp, run):
    weights = sorted((run / "models" / "model0").glob("*.safetensors"))[-1]
    weights.write_bytes(weights.read_bytes()[:-100])
    return ["monitor", "--checkpoints", run / "models" / "model0", "--out", tmp / "mon"]


CASES = {  # name -> (build, exit status, patterns the error line must match)
    "audit --out is --data": (audit_out_is_data, 2, [r"--out .*faces is the input .*faces"]),
    "audit --out inside --data": (audit_out_inside_data, 2, [r"lies inside the input"]),
    "audit --out holds --config": (audit_out_holds_config, 2, [r"contains the input .*c\.toml"]),
    "monitor --out is --checkpoints": (monitor_out_is_checkpoints, 2, [r"is the input .*model0"]),
    "monitor --out holds --checkpoints": (monitor_out_holds_checkpoints, 2, [r"contains the input .*model0"]),
    "--force on the user's files": (force_on_user_files, 2, [r"holds no biasgen run \(results\.csv, thesis\.tex\)",
                                                             "even with --force"]),
    "--force on a symlinked --out": (force_on_symlinked_out, 2, [r"symbolic link.*does not delete through links"]),
    "TOML steps = true": (toml_bool_steps, 2, [r"Bad value True for 'steps': a bool is not a number"]),
    "TOML steps = \"12\"": (toml_string_steps, 2, [r"'steps': write a number without quotes"]),
    "TOML score_ts = []": (toml_empty_score_ts, 2, [r"--score-ts needs at least one"]),
    "--score-ts ''": (flag_empty_score_ts, 2, [r"--score-ts needs at least one"]),
    "--first-checkpoint past --steps": (first_checkpoint_past_steps, 2, [r"--first-checkpoint 50 lies past"]),
    "--config is a folder": (config_is_a_folder, 2, [r"--config .*conf is a folder"]),
    "a second writer": (resume_in_use, 2, [r"is in use by pid \d+ on host .*command"]),
    "judge --write during a run": (judge_write_in_use, 2, [r"is in use by pid \d+"]),
    "binary metrics.jsonl (judge)": (metrics_binary_garbage_judge, 2, [r"metrics\.jsonl line 4 holds bytes that are "
                                                                       "not text", "do not use --force"]),
    "binary metrics.jsonl (--resume)": (metrics_binary_garbage_resume, 2, [r"metrics\.jsonl line 4 holds bytes"]),
    "metrics.jsonl cut mid-line": (metrics_cut_mid_line, 2, [r"metrics\.jsonl line 3 is cut off mid-record",
                                                             "remove that line", "do not use --force"]),
    "stray line in metrics.jsonl": (metrics_stray_line, 2, [r"line 4 is not a record with 'step'"]),
    "a step written twice": (metrics_twice_written, 2, [r"line 4 repeats step 12 of line 3"]),
    "binary summary.json (judge --write)": (summary_garbage_judge_write, 2, [r"summary\.json line 1 holds bytes"]),
    "run.json is a list": (run_json_is_a_list, 2, [r"run\.json is not the JSON object biasgen wrote \(it holds a list"]),
    "run.json lacks config": (run_json_without_config, 2, [r"run\.json .*lacks 'config'"]),
    "binary run.json (report)": (run_json_garbage_report, 2, [r"run\.json line 1 holds bytes that are not text"]),
    "grammar file: raw pickle": (grammar_raw_pickle, 2, [r"never pickled objects"]),
    "grammar file: object array": (grammar_object_array, 2, [r"never pickled objects"]),
    "grammar file: string array": (grammar_string_array, 2, [r"Cannot read the grammar tensor"]),
    "monitor: a damaged input checkpoint": (monitor_corrupt_checkpoint, 2, [r"not a whole safetensors file",
                                                                            "Nothing was written"]),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_gets_one_line_and_loses_nothing(name, tiny_run, tmp_path, capsys):
    build, status, patterns = CASES[name]
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    argv = build(tmp_path, run)
    before = hashes(tmp_path)
    try:
        code, err = run_cli(argv, capsys)
    finally:
        if (tmp_path / "holder").exists():
            os.kill(int((tmp_path / "holder").read_text()), 9)
    assert code == status, err
    assert err.count("\n") == 0 and "Traceback" not in err and err.startswith("biasgen "), err
    for pattern in patterns:
        assert re.search(pattern, err), (pattern, err)
    after = hashes(tmp_path)
    assert {k: after.get(k) for k in before} == before  # every pre-existing byte unchanged
    assert not (tmp_path / "PWNED").exists()  # no pickle ever ran
    assert not (tmp_path / "out").exists() and not (tmp_path / "mon").exists()  # nothing half-written


# -- correct handling ---------------------------------------------------------------------------

def test_sixteen_bit_palette_and_alpha_images_are_read_faithfully(tmp_path):
    folder = tmp_path / "scans"
    folder.mkdir()
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 65536, (6, 8, 8)).astype(np.uint16)
    for i, a in enumerate(raw):
        Image.fromarray(a).save(folder / f"{i}.png")
    x = load_images(str(folder)).images
    assert x.shape == (6, 1, 8, 8) and len({tuple(im.flatten().tolist()) for im in x}) == 6
    torch.testing.assert_close(x[:, 0], torch.from_numpy(raw.astype(np.float32) / 65535))  # scaled by 65535
    pal = Image.new("P", (8, 8))
    pal.putpalette([0, 0, 0, 255, 0, 0])
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "p.png")
    gray_alpha = Image.fromarray(np.stack([np.zeros((8, 8), np.uint8), np.full((8, 8), 64, np.uint8)], -1), "LA")
    gray_alpha.save(tmp_path / "la.png")
    for name in ("p.png", "la.png"):
        (tmp_path / "mixed").mkdir(exist_ok=True)
        shutil.copy(tmp_path / name, tmp_path / "mixed" / name)
    y = load_images(str(tmp_path / "mixed")).images  # la.png (black at 25% opacity on white), p.png (red pixel)
    torch.testing.assert_close(y[0, :, 0, 0], torch.full((3,), 1 - 64 / 255))
    assert y[1, :, 0, 0].tolist() == [1.0, 0.0, 0.0] and y[1, :, 1, 1].tolist() == [0.0, 0.0, 0.0]


def test_thirty_two_bit_integer_images_are_refused(tmp_path):
    (tmp_path / "d").mkdir()
    Image.fromarray(np.full((8, 8), 70000, np.int32)).save(tmp_path / "d" / "a.tif")
    with pytest.raises(Exception, match="no fixed full scale"):
        load_images(str(tmp_path / "d"))


def test_force_replaces_a_biasgen_run_and_an_empty_folder(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert run_cli(["audit", "--preset", "tiny", "--steps", "4", "--checkpoints", "1", "--out", tmp_path / "empty",
                    "--force", "--quiet"], capsys)[0] == 0
    first = json.loads((tmp_path / "empty" / "run.json").read_text())
    assert run_cli(["audit", "--preset", "tiny", "--steps", "5", "--checkpoints", "1", "--out", tmp_path / "empty",
                    "--force", "--quiet"], capsys)[0] == 0
    assert json.loads((tmp_path / "empty" / "run.json").read_text())["config"]["steps"] == 5 != first["config"]["steps"]
    assert [r["step"] for r in read_jsonl(tmp_path / "empty" / "metrics.jsonl")] == [5]


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
    (tmp_path / LOCK_NAME).write_text("pid 999999 on host elsewhere (command: biasgen audit)\n")
    with RunLock(tmp_path):  # the kernel released the dead holder's lock: taken over
        with pytest.raises(Exception, match="in use by pid"):
            RunLock(tmp_path)
    RunLock(tmp_path).release()  # released on exit


def test_report_reads_damaged_files_leniently_and_says_what_it_skipped(tiny_run, tmp_path):
    run = tmp_path / "my run"
    shutil.copytree(tiny_run, run)
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"note": 1}\n\xff\xfe\n')
    page = write_report(run).read_text()
    assert "line 4 is not a record with &#x27;step&#x27;; it was skipped" in page
    assert "line 5 holds bytes that are not text" in page
    assert "biasgen report &#x27;my run&#x27;" in page  # the rebuild command is shell-quoted
    records, problems = scan_jsonl(run / "metrics.jsonl", ("step",))
    assert len(records) == 3 and [n for n, _ in problems] == [4, 5]
    (run / "metrics.jsonl").write_text("")  # emptied: a summary without metrics is not a finished run
    page = write_report(run).read_text()
    assert " · in progress · " in page and " · finished · " not in page and "emptied or replaced" in page


@pytest.mark.parametrize("code, fix", [(errno.ENOSPC, "the disk is full: free some space, then continue with "
                                                      "--resume"),
                                       (errno.EROFS, "read-only: choose a folder you can write"),
                                       (errno.EACCES, "permission denied")])
def test_os_errors_are_one_line_and_leave_nothing_half_written(code, fix, tiny_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = hashes(tmp_path)

    def failing_replace(src, dst):
        raise OSError(code, os.strerror(code), str(dst))

    monkeypatch.setattr("biasgen.runs.os.replace", failing_replace)
    for argv in (["report", run], ["judge", run, "--write"]):
        status, err = run_cli(argv, capsys)
        assert status == 2 and err.count("\n") == 0 and "Traceback" not in err, err
        assert f"cannot use {run / 'report.html'}" in err or f"cannot use {run / 'summary.json'}" in err, err
        assert fix in err
    assert hashes(tmp_path) == before and not list(run.glob(".*.tmp"))  # the temporary files were removed
    with pytest.raises(OSError):
        write_bytes(run / "new.json", b"{}")
    assert not (run / "new.json").exists() and not list(run.glob(".*.tmp"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_is_one_line(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    for p in [run, *run.rglob("*")]:
        if p.is_dir():
            p.chmod(0o555)
    try:
        for argv in (["report", run], ["judge", run, "--write"],
                     ["audit", "--preset", "tiny", "--out", run / "inside", "--quiet"]):
            status, err = run_cli(argv, capsys)
            assert status == 2 and err.count("\n") == 0 and "permission denied" in err, err
    finally:
        for p in [run, *run.rglob("*")]:
            if p.is_dir():
                p.chmod(0o755)
