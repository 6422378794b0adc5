"""The ``biasgen`` command line.

    biasgen audit                         # twin-split audit of the bundled digits (default preset)
    biasgen audit --preset fashion-mnist --out runs/fm
    biasgen audit --data ./faces --resolution 32 --grayscale --n 1024 --splits 4
    biasgen hierarchy --preset cpu        # twins on the hierarchical data model
    biasgen report runs/audit             # (re)build runs/audit/report.html from the run folder
    biasgen monitor --checkpoints ddpm-run --train ./train --heldout ./val   # one run's saved checkpoints
    biasgen sweep --sizes 16,32,64,128    # one audit per training-set size: the phase diagram

Every twin experiment (a :class:`biasgen.pipeline.TwinExperiment`) is a
subcommand; every setting of its config is also a flag (``biasgen audit
--help``); values resolve as: defaults < ``--preset`` < ``--config FILE.toml`` < flags.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .images import monitor_command
from .config import add_config_flags, build_config, flags_given
from .errors import BiasgenError, run_command
from .experiments import experiments
from .pipeline import TwinExperiment, run_experiment, terminal_summary


def build_parser(table: dict[str, type[TwinExperiment]]) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="biasgen", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"biasgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, exp in table.items():
        p = sub.add_parser(name, help=exp.help, description=exp.help)
        p.add_argument("--preset", default=exp.default_preset,
                       help=f"one of: {', '.join(exp.presets)} (default: {exp.default_preset})")
        p.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (flat key = value)")
        p.add_argument("--out", default=exp.default_out, help=f"run folder (default: {exp.default_out})")
        p.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
        p.add_argument("--force", action="store_true", help="delete the biasgen run in --out and start over "
                       "(never a folder biasgen did not write; docs/safety.md)")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        add_config_flags(p, exp.config_class)
    for name, (add_arguments, _, help_text) in TOOLS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    sub.add_parser("sweep", add_help=False, help="one twin experiment per training-set size: the phase diagram "
                   "and how long a data set of size N can be trained (biasgen sweep --help)")
    return parser


# -- subcommands that work on run folders ---------------------------------------------------------

def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (the --out of a run)")


def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    print(write_report(args.run_dir))
    return 0


def _judge_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (the --out of a run)")
    p.add_argument("--write", action="store_true", help="also rewrite the verdict part of summary.json and report.html")
    p.add_argument("--json", action="store_true", help="print the whole judgement as JSON")


def _judge(args: argparse.Namespace) -> int:
    import json

    from .pipeline import rejudge

    judged, lines = rejudge(args.run_dir, experiments(), write=args.write)
    if args.json:
        print(json.dumps(judged, indent=2))
    else:
        print("\n".join([f"{judged['verdict']}: {judged['reason']}",
                         f"recommended stopping step: {judged['recommended_step']} — {judged['recommendation']}",
                         *lines]))
    return 0


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the folder of a biasgen finetune run (its --out)")
    p.add_argument("--model", type=int, default=0, help="which model (0 = split 0, first seed; default 0)")
    p.add_argument("--step", type=int, required=True, help="the checkpoint's step (one of models/model*/step_*)")
    p.add_argument("--out", required=True, help="a DDPMPipeline folder (diffusers base), else a checkpoint stem")


def _export(args: argparse.Namespace) -> int:
    from .images.finetune import export_merged

    print(export_merged(args.run_dir, model=args.model, step=args.step, out=args.out))
    return 0


TOOLS = {  # name -> (add its arguments, run it (returns the exit code), help)
    "report": (_report_arguments, _report, "(re)build report.html, the page a person reads, from a run folder"),
    "judge": (_judge_arguments, _judge, "re-judge a run from its metrics.jsonl alone (no models needed)"),
    "export-merged": (_export_arguments, _export, "write a fine-tune's checkpoint with its adapters merged into the "
                      "base: a diffusers DDPMPipeline folder, or a biasgen checkpoint that --base accepts"),
    "monitor": (monitor_command.add_arguments, monitor_command.main, monitor_command.HELP),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["sweep"]:  # its flags depend on --kind: parsed by biasgen.sweep
        from .sweep import main as sweep_main

        return sweep_main(argv[1:])
    table = experiments()
    args = build_parser(table).parse_args(argv)
    if args.command in TOOLS:
        return run_command(args.command, lambda: TOOLS[args.command][1](args))
    exp_class = table[args.command]

    def run() -> int:
        if args.resume and args.force:
            raise BiasgenError("--resume and --force contradict each other: pick one.")
        cfg = build_config(exp_class.config_class, exp_class.presets, args.preset, args.config,
                           flags_given(args, exp_class.config_class))
        experiment = exp_class(cfg)
        summary = run_experiment(experiment, Path(args.out), resume=args.resume, force=args.force,
                                 progress=not args.quiet, inputs=(args.config,) if args.config else ())
        print(terminal_summary(experiment, summary, Path(args.out)))
        return 0

    return run_command(args.command, run, out=args.out)

if __name__ == "__main__":
    sys.exit(main())
