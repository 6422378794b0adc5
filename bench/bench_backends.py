"""Wall time of one audit on the local backend and on a local Ray instance, side by side in one run.

    python bench/bench_backends.py                   # the default audit, both backends (about 10 minutes on 2 cores)
    python bench/bench_backends.py --preset tiny     # a quick check of the script
    python bench/bench_backends.py --steps 300       # any other flag goes to both audits

Each backend runs ``biasgen audit --quiet --backend B`` as its own process (the
wall time includes starting Python, and for Ray starting the Ray instance), in
a fresh folder. Prints a markdown table for BENCHMARKS.md with the machine and
its load, and the largest difference between the two runs' ``metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from biasgen.runs import environment, read_jsonl


def numbers(value) -> list[float]:
    """Every number in a JSON value, in order."""
    if isinstance(value, dict):
        return [x for v in value.values() for x in numbers(v)]
    if isinstance(value, list):
        return [x for v in value for x in numbers(v)]
    return [float(value)] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def run_audit(preset: str, flags: list[str], backend: str, out: Path) -> dict:
    """Run one audit in its own process; its wall time and the time split of its summary."""
    command = [sys.executable, "-m", "biasgen", "audit", "--preset", preset, *flags, "--quiet", "--backend", backend,
               "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    timing = json.loads((out / "summary.json").read_text())["timing"]
    return {"wall": wall, "training": timing["training_s_this_invocation"],
            "evaluation": timing["evaluation_s_this_invocation"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--order", default="local,ray", help="which backend runs first (the load of a shared machine drifts)")
    args, flags = parser.parse_known_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        results = {b: run_audit(args.preset, flags, b, Path(tmp) / b) for b in args.order.split(",")}
        a, b = (numbers(read_jsonl(Path(tmp) / name / "metrics.jsonl")) for name in ("local", "ray"))
    assert len(a) == len(b), "the two runs wrote different metrics"
    max_diff = max(abs(x - y) / max(1.0, abs(x)) for x, y in zip(a, b))
    env = environment()
    print(f"Command: `python bench/bench_backends.py {' '.join(['--preset', args.preset, '--order', args.order, *flags])}`. Machine: {os.cpu_count()} CPU cores, "
          f"{env['platform']}, Python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}. "
          f"Load average (1 min) before: {load_before:.1f}, after: {os.getloadavg()[0]:.1f}.\n")
    print("| backend | wall (s) | training (s) | evaluation (s) | wall vs local |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['wall']:.0f} | {r['training']:.0f} | {r['evaluation']:.0f} | "
              f"{r['wall'] / results['local']['wall']:.2f}x |")
    print(f"\nLargest difference between the two metrics.jsonl: {max_diff:.1e} (relative, over {len(a)} numbers).")


if __name__ == "__main__":
    main()
