"""How many samples does an audit need, and what does a cheaper sampler cost in fidelity?

    python bench/bench_sample_count.py RUN --out /tmp/counts                       # ddpm-1000 and ddpm-50, 128 samples
    python bench/bench_sample_count.py RUN --out /tmp/counts --counts 128,64,48,32 --threads 2

RUN is a finished ``biasgen audit`` folder (read only). Every checkpoint's models draw ``max(--counts)``
samples from shared noise with each sampler of ``--samplers`` (the audit's own ``sample`` call and sample
seeds; seeds are prefix-stable, so the first ``n`` samples are exactly what a run with ``--n-samples n``
draws). The samples go to ``OUT/{sampler}-{step}.safetensors``; a killed bench continues where it stopped.

Then, for every sampler and every ``n`` of ``--counts``, the first ``n`` samples give the twin and control
curves, judged by the audit's own judge (``biasgen.pipeline.judge_records``, test losses from the run),
and ``f_mem`` at the last checkpoint. Each curve is compared with the reference (the first sampler at the
largest count): ``max |D - D_ref| / (SEM + SEM_ref)`` over checkpoints, SEMs over twin pairs. Prefixes of
the reference's own samples are nested in it, so their deviations show the cost of fewer samples, not
the spread of two independent draws.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from biasgen.checkpoint import load_tensors, save_tensors
from biasgen.images.audit import ImageAudit
from biasgen.images.monitor_command import member_experiment
from biasgen.images.evaluation import proximity
from biasgen.images.metrics import twin_distance
from biasgen.pipeline import Data, judge_records
from biasgen.runs import environment, read_json, read_jsonl, write_bytes
from biasgen.sampler import sample, x0_from_eps_model
from biasgen.training import checkpoint_stem
from biasgen.twins import load_model, make_members, model_pairs


def parse_sampler(name: str) -> tuple[str, int, str, bool]:
    """``'ddpm-50'`` -> ``('ddpm', 50, 'uniform', False)``: the method, its steps (T of them: every step), their
    spacing (``'ddpm-250-quadratic'``) and whether the samples use other seeds (``'ddpm-1000/alt'``: the next
    seeds after the counted ones, an independent replicate that measures the spread of two draws)."""
    name, alt = name.removesuffix("/alt"), name.endswith("/alt")
    method, steps, *spacing = name.split("-")
    return method, int(steps), (spacing or ["uniform"])[0], alt


def draw(run: Path, out: Path, experiment: ImageAudit, data: Data, members, samplers: list[str], n: int) -> None:
    """Samples ``(M, n, C, H, W)`` of every checkpoint with every sampler, one file each, skipping existing ones."""
    cfg = experiment.cfg
    model_class, model_kwargs = experiment.network(data)
    schedule, shape = experiment.schedule(), tuple(data.test.shape[1:])
    clip = 1.0 if cfg.scaling == "minus1to1" else None
    for name in sorted(samplers, key=lambda s: parse_sampler(s)[1]):  # the cheap ones first
        method, steps, spacing, alt = parse_sampler(name)
        seeds = experiment.seeds.sample_seeds(2 * n)[n:] if alt else experiment.seeds.sample_seeds(n)
        for r in read_jsonl(run / "metrics.jsonl"):
            stem = out / f"{name.replace('/', '-')}-{r['step']}"
            if stem.with_suffix(".safetensors").exists() and stem.with_suffix(".json").exists():
                continue
            start = time.perf_counter()
            models = [load_model(model_class, model_kwargs, checkpoint_stem(run / "models" / f"model{m}", r["step"]),
                                 cfg.device) for m in range(len(members))]
            x = torch.stack([sample(x0_from_eps_model(model, schedule, clip=clip), schedule, shape, seeds,
                                    method=method, steps=steps, spacing=spacing, batch_size=cfg.eval_batch)
                             for model in models])
            save_tensors(stem, {"samples": x}, {"sampler": name, "step": r["step"], "n_samples": n})
            print(f"{name} step {r['step']}: {time.perf_counter() - start:.1f} s", flush=True)


def curves(experiment: ImageAudit, records: list[dict], samples: list[torch.Tensor], n: int, members, reference) -> dict:
    """The first ``n`` of ``samples`` (one ``(M, N, C, H, W)`` per record) in place of the run's samples: the
    judged verdict (the audit's own judge, with tau_mem from the audit's own :func:`proximity` at every
    checkpoint), and per checkpoint the twin distance and the twin-minus-control contrast with their SEMs."""
    twins, controls = model_pairs(members)
    new, twin, contrast = [], [], []
    for r, x in zip(records, samples):
        tw = twin_distance(list(x[:, :n]), twins)
        twin.append((tw["mean"], tw["sem"]))
        rec = {**r, "twin_distance": tw["median"], "twin_distance_sem": tw["sem"], "twin_distance_pairs": tw["per_pair"]}
        if controls:  # one seed per split has none
            co = twin_distance(list(x[:, :n]), controls)
            rec["same_split_distance_pairs"] = co["per_pair"]
            contrast.append((tw["mean"] - co["mean"], tw["sem"] + co["sem"]))
        near = proximity(x[:, :n], members, reference["train"], reference["test"], reference["heldout_l2"],
                         experiment.cfg, experiment.seeds)
        new.append({**rec, **{k: near[k] for k in ("f_mem", "f_mem_ci", "nn_own_sim", "nn_other_sim", "copy_z")}})
    return {"judged": judge_records(experiment, new, members), "twin": twin, "contrast": contrast,
            "f_mem": {"value": new[-1]["f_mem"], "ci": new[-1]["f_mem_ci"]}}


def deviation(curve: list[tuple[float, float]], ref: list[tuple[float, float]]) -> tuple[float, int]:
    """``max |D - D_ref| / (SEM + SEM_ref)`` over checkpoints, and the index where it is reached."""
    devs = [abs(d - rd) / (e + re) for (d, e), (rd, re) in zip(curve, ref)]
    worst = max(range(len(devs)), key=devs.__getitem__)
    return devs[worst], worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished biasgen audit folder (read only)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the samples and table.md")
    parser.add_argument("--samplers", default="ddpm-1000,ddpm-50", help="the reference first, e.g. ddpm-1000,ddpm-50")
    parser.add_argument("--counts", default="128,64,48,32", help="samples per model to judge (the largest is drawn)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    experiment = member_experiment({"config": read_json(args.run / "run.json")["config"]})
    cfg = experiment.cfg
    data, members = experiment.load(), make_members(cfg.splits, cfg.seeds_per_split)
    samplers, counts = args.samplers.split(","), sorted({int(c) for c in args.counts.split(",")}, reverse=True)
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"machine: {env['platform']}, torch {env['torch']}, {os.cpu_count()} CPU cores, {args.threads} torch "
          f"thread(s), load average {os.getloadavg()[0]:.1f}", flush=True)
    draw(args.run, args.out, experiment, data, members, samplers, counts[0])

    records = read_jsonl(args.run / "metrics.jsonl")
    reference = experiment.reference(data, members)
    samples = {name: [load_tensors(args.out / f"{name.replace('/', '-')}-{r['step']}")[0]["samples"] for r in records] for name in samplers}
    results = {(name, n): curves(experiment, records, samples[name], n, members, reference)
               for name in samplers for n in counts}
    ref = results[samplers[0], counts[0]]
    last = records[-1]["step"]
    tau = lambda t: "—" if not t or t.get("step") is None else f"{t['step']} {t.get('ci')}"
    lines = [f"Reference: {samplers[0]}, {counts[0]} samples per model.", "",
             "| sampler | samples per model | verdict | p at the loss minimum | placebo | tau_bias (68% CI) | "
             "tau_data (68% CI) | tau_mem | max twin-D deviation, SEMs (step) | max contrast deviation, SEMs (step) | "
             f"twin D, step {last} | f_mem, step {last} (95% CI) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, n), c in results.items():
        j, fm = c["judged"], c["f_mem"]
        placebo = j.get("negative_controls", {}).get("placebo_contrast", {}).get("verdict", "")
        dev, at = deviation(c["twin"], ref["twin"])
        cdev = "—" if not c["contrast"] else "{:.2f} ({})".format(*(lambda d, i: (d, records[i]["step"]))(
            *deviation(c["contrast"], ref["contrast"])))
        p = j.get("p_value")
        lines.append(f"| {name} | {n} | {j['verdict']} | {'—' if p is None else f'{p:.3f}'} | {placebo} | "
                     f"{tau(j['tau_bias'])} | {tau(j.get('tau_data'))} | {tau(j.get('tau_mem'))} | "
                     f"{dev:.2f} ({records[at]['step']}) | {cdev} | {c['twin'][-1][0]:.4f} ± {c['twin'][-1][1]:.4f} | "
                     f"{fm['value']:.3f} ({fm['ci'][0]:.3f}..{fm['ci'][1]:.3f}) |")
    text = "\n".join(lines)
    write_bytes(args.out / "table.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
