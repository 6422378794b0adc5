"""The ``biasgen`` command line.

    biasgen audit                         # twin-split audit of the bundled digits (default preset)
    biasgen audit --preset fashion-mnist --out runs/fm
    biasgen audit --data ./faces --resolution 32 --grayscale --n 1024 --splits 4
    biasgen hierarchy --preset cpu        # twins on the hierarchical data model
    biasgen report runs/audit             # (re)build runs/audit/report.html from the run folder

Every setting of a subcommand's config is also a flag (``biasgen audit --help``);
values resolve as: defaults < ``--preset`` < ``--config FILE.toml`` < flags.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import add_config_flags, build_config, flags_given
from .errors import BiasgenError


def _subcommands():
    """name -> (config class, presets, default preset, run function, default out, help)."""
    from .images import audit
    from .hierarchy import experiment

    return {
        "audit": (audit.AuditConfig, audit.PRESETS, "default", audit.run_audit, audit.human_summary, "runs/audit",
                  "twin-split audit of an image data set: when does training start favouring the training data?"),
        "hierarchy": (experiment.HierarchyConfig, experiment.PRESETS, "cpu", experiment.run_hierarchy,
                      experiment.human_summary, "runs/hierarchy",
                      "twins on the hierarchical data model, with exact (belief-propagation) ground truth"),
    }


def build_parser(table) -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="biasgen", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"biasgen {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, presets, default_preset, _, _, default_out, help_text) in table.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--preset", default=default_preset, help=f"one of: {', '.join(presets)} (default: {default_preset})")
        p.add_argument("--config", metavar="FILE.toml", help="TOML file of settings (flat key = value)")
        p.add_argument("--out", default=default_out, help=f"run folder (default: {default_out})")
        p.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
        p.add_argument("--force", action="store_true", help="delete whatever is in --out and start over")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        add_config_flags(p, cls)
    report = sub.add_parser("report", help="(re)build report.html, the page a person reads, from a run folder",
                            description="(re)build report.html, the page a person reads, from a run folder")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the run folder (the --out of a run)")
    return parser


def _report(run_dir: str) -> int:
    from .report import write_report

    try:
        path = write_report(run_dir)
    except BiasgenError as e:
        print(f"biasgen report: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    table = _subcommands()
    args = build_parser(table).parse_args(argv)
    if args.command == "report":
        return _report(args.run_dir)
    cls, presets, _, run, summarize, _, _ = table[args.command]
    try:
        if args.resume and args.force:
            raise BiasgenError("--resume and --force contradict each other: pick one.")
        cfg = build_config(cls, presets, args.preset, args.config, flags_given(args, cls))
        summary = run(cfg, Path(args.out), resume=args.resume, force=args.force, progress=not args.quiet)
    except BiasgenError as e:
        print(f"biasgen {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nbiasgen {args.command}: interrupted; continue with --resume --out {args.out}", file=sys.stderr)
        return 130
    print(summarize(summary, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
