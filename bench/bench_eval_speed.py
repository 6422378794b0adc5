"""The audit's evaluation with eager and with compiled networks, on the SAME trained models, one after the other.

    python bench/bench_eval_speed.py RUN --out /tmp/evalspeed                   # RUN: a finished default audit
    python bench/bench_eval_speed.py RUN --out /tmp/evalspeed --ways compiled,eager

RUN is read, never written: its ``run.json`` and ``models/`` are copied into ``OUT/<way>`` and each copy is
resumed (training finds every checkpoint done, so only the evaluation runs, with the preset's worker
processes). The ways: ``eager`` (``--compile off``) and ``compiled`` (``--compile on``; what ``auto`` does for
the default audit on a CPU). Point ``TORCHINDUCTOR_CACHE_DIR`` at an empty folder to time a machine's first
run (every worker compiles), or at a filled one for later runs.

For each way: wall and CPU seconds of the evaluation (this process and its workers), the verdict, p, tau_bias,
tau_data, tau_loss and tau_mem with their intervals, and the largest sample difference from the first way.
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

from biasgen.checkpoint import load_tensors
from biasgen.images.audit import ImageAudit
from biasgen.pipeline import run_experiment
from biasgen.runs import environment, read_json

WAYS = {"eager": "off", "compiled": "on"}  # way -> --compile


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def decisions(judged: dict) -> dict:
    """The verdict, p and the taus with their intervals (tau_loss: its 95% interval)."""
    tau = lambda name, ci="ci": None if not judged.get(name) else [judged[name]["step"], judged[name][ci]]
    return {"verdict": judged["verdict"], "p_value": judged["p_value"], "tau_bias": tau("tau_bias"),
            "tau_data": tau("tau_data"), "tau_loss": tau("tau_loss", "ci95"),
            "tau_mem": judged["tau_mem"].get("step"), "recommended_step": judged["recommended_step"]}


def evaluate_way(run: Path, out: Path, way: str) -> dict:
    """Evaluate the copied models of ``run`` in ``out / way``; timing and the judged taus."""
    folder = out / way
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    shutil.copy2(run / "run.json", folder / "run.json")
    shutil.copytree(run / "models", folder / "models")
    experiment = ImageAudit.from_settings(None, None, **{**read_json(run / "run.json")["config"], "compile": WAYS[way]})
    cpu0, wall0 = cpu_seconds(), time.time()
    summary = run_experiment(experiment, folder, resume=True, progress=False)
    return {"way": way, "evaluation_wall_s": summary["timing"]["evaluation_s_this_invocation"],
            "total_wall_s": round(time.time() - wall0, 1), "cpu_s": round(cpu_seconds() - cpu0, 1),
            **decisions(summary)}


def sample_difference(out: Path, ways: list[str]) -> dict:
    """Largest absolute difference of every way's stored samples from the first way's, over all checkpoints."""
    first = sorted((out / ways[0] / "samples").glob("*.safetensors"))
    result = {}
    for way in ways[1:]:
        diff = 0.0
        for path in first:
            a = load_tensors(path.with_suffix(""))[0]["samples"]
            b = load_tensors((out / way / "samples" / path.name).with_suffix(""))[0]["samples"]
            diff = max(diff, float((a - b).abs().max()))
        result[way] = diff
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished audit run folder (read only)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench_eval_speed"), help="where the copies go")
    parser.add_argument("--ways", default="eager,compiled", help=f"comma-separated, of {', '.join(WAYS)}")
    args = parser.parse_args()
    env = environment()
    print(f"machine: {env['platform']}, torch {env['torch']}, python {env['python']}")
    ways = args.ways.split(",")
    rows = [evaluate_way(args.run, args.out, way) for way in ways]
    print(f"\nlargest sample difference from {ways[0]}: {sample_difference(args.out, ways)}")
    print("\n| way | evaluation wall | CPU (user+sys) | verdict | p | tau_bias [68%] | tau_data [68%] | "
          "tau_loss [95%] | tau_mem | recommended |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['way']} | {r['evaluation_wall_s']:.0f} s | {r['cpu_s']:.0f} s | {r['verdict']} | "
              f"{r['p_value'] if r['p_value'] is None else round(r['p_value'], 3)} | {r['tau_bias']} | "
              f"{r['tau_data']} | {r['tau_loss']} | {r['tau_mem']} | {r['recommended_step']} |")
    (args.out / "bench_eval_speed.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
