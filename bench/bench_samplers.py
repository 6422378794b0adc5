"""Which sampler gives the paper's answer? Re-evaluate a finished image audit with several samplers.

    python bench/bench_samplers.py RUN --out /tmp/samplers
    python bench/bench_samplers.py RUN --out /tmp/samplers --n-samples 64 --samplers ddpm-100,ddim-100 --checkpoints 65,96,142

RUN is a finished ``biasgen audit`` folder (``run.json`` and ``models/model*/step_*.safetensors``);
nothing is written into it. Every checkpoint is evaluated with every sampler of ``SAMPLERS`` by
``biasgen.images.evaluation.evaluate_checkpoint`` (the audit's own evaluation, with only the sampler
settings and ``n_samples`` changed), timed, and appended to ``OUT/records.jsonl``, so a killed
bench continues where it stopped. The reference is the paper's sampler, DDPM with all T = 1000
steps; ``--reference-checkpoints`` restricts it (the costly one) to a subset of checkpoints.

Printed (and written to ``OUT/tables.md``): per sampler, tau_bias with its 68% interval, its
distance in checkpoints from the reference's, the largest twin-curve difference in units of the
two curves' SEMs, the verdict, and the evaluation wall time; then the twin distance, f_mem and
copy z of every checkpoint. A sampler agrees with the reference when its tau_bias is within one
checkpoint of the reference's and its curve lies within the intervals of the reference's at every
checkpoint both have (``|D - D_ref| <= SEM + SEM_ref``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

import torch

from biasgen.config import build_config
from biasgen.errors import BiasgenError
from biasgen.images.audit import AuditConfig, ImageAudit, evaluate_checkpoint
from biasgen.pipeline import judge_records
from biasgen.runs import append_jsonl, environment, read_json, read_jsonl, write_bytes
from biasgen.sampler import sample, x0_from_eps_model
from biasgen.training import checkpoint_stem, checkpoint_steps
from biasgen.twins import load_model, make_members

REFERENCE = "ddpm-1000"
SAMPLERS = [  # (method, steps, eta), in the order they run; DDIM with eta = 1 is the ancestral sampler on the same steps
    ("ddim", 50, 0.0), ("ddpm", 50, 0.0), ("ddim", 100, 0.0), ("ddpm", 100, 0.0), ("ddim", 250, 0.0), ("ddpm", 250, 0.0),
    ("ddpm", None, 0.0),
    ("ddim", 50, 1.0), ("ddim", 100, 1.0),
]
KEPT = ("twin_distance", "twin_distance_sem", "twin_distance_pairs", "twin_distance_samples", "f_mem", "f_mem_ci",
        "copy_z", "test_loss_units")


def sampler_config(cfg: AuditConfig, method: str, steps: int | None, eta: float) -> AuditConfig:
    """The run's config with another sampler, and a minimal score-level similarity (not reported, not
    sampler-dependent: it would otherwise be most of the fixed cost of each evaluation)."""
    return dataclasses.replace(cfg, sampler=method, sample_steps=steps, eta=eta, hold_above=0, hold_every=1,
                               score_ts=cfg.score_ts[:1], n_score_inputs=8)


def run_bench(run: Path, out: Path, configs: list[AuditConfig], steps: list[int], reference_steps: list[int]) -> None:
    """Evaluate every (sampler, checkpoint) not yet in ``out/records.jsonl``, sampler by sampler in ``configs`` order."""
    base = configs[0]
    experiment = ImageAudit(base)
    data = experiment.load()
    members = make_members(base.splits, base.seeds_per_split)
    model_class, model_kwargs = experiment.network(data)
    ref = experiment.reference(data, members)
    records = out / "records.jsonl"
    done = {(r["sampler"], r["step"]) for r in read_jsonl(records)}
    for cfg in configs:
        name = cfg.sampler_name
        for step in reference_steps if name == REFERENCE else steps:
            if (name, step) in done:
                continue
            models = [load_model(model_class, model_kwargs, checkpoint_stem(run / "models" / f"model{m}", step),
                                 base.device) for m in range(len(members))]
            start = time.perf_counter()
            with torch.no_grad():
                record, _ = evaluate_checkpoint(models, members, ref, cfg, experiment.seeds)
            wall = time.perf_counter() - start
            append_jsonl(records, {"sampler": name, "step": step, "calls": cfg.sample_step_count, "wall_s": wall,
                                   "load_avg_1min": os.getloadavg()[0], **{k: record[k] for k in KEPT}})
            print(f"{name:>14} step {step:>5}: twin D {record['twin_distance']:.4f}, f_mem {record['f_mem']:.2f}, "
                  f"copy z {record['copy_z']:.1f}, {wall:.1f} s", flush=True)


def time_sampling(run: Path, configs: list[AuditConfig], repeats: int = 2) -> str:
    """Seconds to draw ``n_samples`` from one model (model 0, last checkpoint) with each sampler, interleaved,
    best of ``repeats``: a markdown table. Only the sampler runs, none of the metrics."""
    base = configs[0]
    experiment = ImageAudit(base)
    data = experiment.load()
    shape = tuple(data.test.shape[1:])
    model = load_model(*experiment.network(data), checkpoint_stem(run / "models" / "model0", base.steps), base.device)
    schedule = experiment.schedule()
    seeds = experiment.seeds.sample_seeds(base.n_samples)
    best = {c.sampler_name: float("inf") for c in configs}
    for _ in range(repeats):
        for cfg in configs:
            start = time.perf_counter()
            sample(x0_from_eps_model(model, schedule, clip=1.0 if cfg.scaling == "minus1to1" else None), schedule,
                   shape, seeds, **cfg.sampler_settings, batch_size=cfg.eval_batch)
            best[cfg.sampler_name] = min(best[cfg.sampler_name], time.perf_counter() - start)
    lines = [f"| sampler | calls/sample | s for {base.n_samples} samples, one model | s per call |", "|---|---|---|---|"]
    for cfg in configs:
        t = best[cfg.sampler_name]
        lines.append(f"| {cfg.sampler_name} | {cfg.sample_step_count} | {t:.2f} | {t / cfg.sample_step_count:.4f} |")
    return "\n".join(lines)


def tables(out: Path, cfg: AuditConfig, cfg_stored: AuditConfig, stored: list[dict]) -> str:
    """The markdown tables of every sampler found in ``out/records.jsonl``, beside the run's own ``stored`` records."""
    by = {}
    for r in read_jsonl(out / "records.jsonl"):
        by.setdefault(r["sampler"], {})[r["step"]] = r
    if REFERENCE not in by:
        raise BiasgenError(f"No {REFERENCE} records in {out}; run the bench first.")
    all_steps = checkpoint_steps(cfg.steps, cfg.checkpoints, cfg.first_checkpoint)
    experiment, members = ImageAudit(cfg), make_members(cfg.splits, cfg.seeds_per_split)

    def locate(recs: dict, steps: list[int]) -> dict:
        judged = judge_records(experiment, [recs[s] for s in steps], members)  # the audit's own judge
        return {"bias": judged["tau_bias"], "verdict": judged["verdict"]}

    stored_name, stored_n = cfg_stored.sampler_name, cfg_stored.n_samples
    ref = by[REFERENCE]
    ref_steps = sorted(ref)
    ref_tau = locate(ref, ref_steps)["bias"]
    order = sorted(by, key=lambda n: (next(iter(by[n].values()))["calls"], n))
    lines = [f"Reference: {REFERENCE} at checkpoints {ref_steps}; tau_bias {ref_tau['step']} "
             f"(68% CI {ref_tau['ci']}). Samples per model: {len(ref[ref_steps[0]]['twin_distance_samples'])}.", "",
             "| sampler | calls/sample | checkpoints | tau_bias (68% CI) | Δ checkpoints vs ref "
             "| max abs(D - D_ref) / (SEM + SEM_ref) | verdict | agrees | evaluation s per checkpoint (mean) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in order:
        recs = by[name]
        steps = sorted(recs)
        tau = locate(recs, steps)
        shift = abs(all_steps.index(tau["bias"]["step"]) - all_steps.index(ref_tau["step"]))
        common = [s for s in steps if s in ref]
        dev = max(abs(recs[s]["twin_distance"] - ref[s]["twin_distance"])
                  / (recs[s]["twin_distance_sem"] + ref[s]["twin_distance_sem"]) for s in common)
        wall = sum(recs[s]["wall_s"] for s in steps) / len(steps)
        full = steps == all_steps
        agrees = "reference" if name == REFERENCE else ("yes" if shift <= 1 and dev <= 1 else "no")
        if not full and agrees != "reference":
            agrees += f" (on {len(steps)} checkpoints)"
        span = "all" if full else f"{len(steps)}: {steps[0]}..{steps[-1]}"
        lines.append(f"| {name} | {recs[steps[0]]['calls']} | {span} | {tau['bias']['step']} {tau['bias']['ci']} | "
                     f"{shift} | {dev:.2f} | {tau['verdict'] if full else '(subset)'} | {agrees} | {wall:.1f} |")
    for key, fmt, label in (("twin_distance", "{:.4f}", "twin distance (median over pairs ± SEM)"),
                            ("f_mem", "{:.3f}", "f_mem"), ("copy_z", "{:.1f}", "copy z")):
        lines += ["", f"{label}:", "", "| step | " + " | ".join(order) + f" | stored run ({stored_name}, {stored_n} samples) |",
                  "|---" * (len(order) + 2) + "|"]
        for s in all_steps:
            cells = []
            for name in order:
                r = by[name].get(s)
                cell = "" if r is None else fmt.format(r[key])
                if r is not None and key == "twin_distance":
                    cell += f" ± {r['twin_distance_sem']:.4f}"
                cells.append(cell)
            old = next((o for o in stored if o["step"] == s), None)
            lines.append(f"| {s} | " + " | ".join(cells) + f" | {'' if old is None else fmt.format(old[key])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished biasgen audit folder (read only)")
    parser.add_argument("--out", type=Path, required=True, help="folder for records.jsonl and tables.md")
    parser.add_argument("--n-samples", type=int, default=None, help="samples per model (default: the run's)")
    parser.add_argument("--samplers", default=None, help="comma-separated names, e.g. ddpm-1000,ddim-50 (default: all)")
    parser.add_argument("--reference-checkpoints", default=None, help="steps evaluated with ddpm-1000 (default: all)")
    parser.add_argument("--checkpoints", default=None, help="steps evaluated with the other samplers (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--tables-only", action="store_true", help="only print the tables of the records so far")
    parser.add_argument("--time-sampling", action="store_true",
                        help="instead, time the samplers alone on one model (interleaved, best of 2)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = read_json(args.run / "run.json")["config"]
    config = {k: v for k, v in config.items() if k in {f.name for f in dataclasses.fields(AuditConfig)}}
    stored_cfg = build_config(AuditConfig, {}, None, None, config)
    cfg = dataclasses.replace(stored_cfg, n_samples=args.n_samples or stored_cfg.n_samples)
    configs = [sampler_config(cfg, *s) for s in SAMPLERS]
    if args.samplers:
        wanted = args.samplers.split(",")
        unknown = sorted(set(wanted) - {c.sampler_name for c in configs})
        if unknown:
            raise BiasgenError(f"Unknown sampler(s) {unknown}; choose from {[c.sampler_name for c in configs]}.")
        configs = sorted((c for c in configs if c.sampler_name in wanted), key=lambda c: wanted.index(c.sampler_name))
    steps = checkpoint_steps(cfg.steps, cfg.checkpoints, cfg.first_checkpoint)
    chosen = {name: [int(s) for s in value.split(",")] if value else steps
              for name, value in (("reference", args.reference_checkpoints), ("other", args.checkpoints))}
    if not set(chosen["reference"]) | set(chosen["other"]) <= set(steps):
        raise BiasgenError(f"--reference-checkpoints and --checkpoints must be checkpoints of the run: {steps}.")
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"machine: {env['platform']}, torch {env['torch']}, {os.cpu_count()} CPU cores, "
          f"{args.threads} torch thread(s), load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.time_sampling:
        print(time_sampling(args.run, configs))
        return
    if not args.tables_only:
        run_bench(args.run, args.out, configs, chosen["other"], chosen["reference"])
    text = tables(args.out, cfg, stored_cfg, read_jsonl(args.run / "metrics.jsonl"))
    write_bytes(args.out / "tables.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
