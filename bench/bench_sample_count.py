"""How many samples does an audit need, and what does a cheaper sampler cost in fidelity?

    python bench/bench_sample_count.py RUN --out /tmp/counts                       # ddpm-1000 and ddpm-50, 128 samples
    python bench/bench_sample_count.py RUN --out /tmp/counts --counts 128,64,48,32 --threads 2
    python bench/bench_sample_count.py RUN --out cnt --counts 96,48 \
        --samplers ddpm-1000,ddpm-250-quadratic,ddpm-1000/alt,ddpm-250-quadratic/alt   # docs/samplers.md

RUN is a finished ``biasgen audit`` folder (read only). Every checkpoint's models draw ``max(--counts)``
samples from shared noise with each sampler of ``--samplers`` (the audit's own ``sample`` call and sample
seeds; seeds are prefix-stable, so the first ``n`` samples are exactly what a run with ``--n-samples n``
draws). A sampler is ``METHOD-STEPS[-SPACING][-holdABOVExEVERY]``; ``/alt`` draws it on the next ``max(--counts)`` seeds, an
independent draw. The samples go to ``OUT/{sampler}-{step}.safetensors``; a killed bench continues where it
stopped, and several invocations with different ``--samplers`` may share one ``--out``.

Three tables go to ``OUT/table.md``:

- for every sampler and every ``n`` of ``--counts``, the first ``n`` samples judged by the audit's own judge
  (``biasgen.pipeline.judge_records``, test losses from the run; tau_mem from f_mem at every checkpoint),
  and each curve's distance from the reference (the first sampler at the largest count):
  ``max |D - D_ref| / (SEM + SEM_ref)`` over checkpoints, SEMs over twin pairs, for the twin distance and the
  twin-minus-control contrast. Prefixes of the reference's own samples are nested in it, so their deviations
  show the cost of fewer samples, not the spread of two independent draws; a ``/alt`` row shows that spread;
- replicates: the drawn samples cut into disjoint sets of ``n``, each judged alone (how much the decision
  moves from one draw to the next);
- paired by sample seed: the mean difference of each sampler from the reference per checkpoint, over seeds
  that share ``x_T``, with its standard error (the sampler's systematic effect).
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
from biasgen.runs import check_out, environment, read_json, read_jsonl, write_bytes
from biasgen.sampler import network_call_count, sample, x0_from_eps_model
from biasgen.training import checkpoint_stem
from biasgen.twins import load_model, make_members, model_pairs


def parse_sampler(name: str) -> tuple[dict, bool]:
    """``'ddpm-50'`` -> ``({'method': 'ddpm', 'steps': 50, 'spacing': 'uniform', 'hold_above': 0, 'hold_every': 1},
    False)``: the settings of :func:`biasgen.sampler.sample` (steps: T of them is every step; ``-quadratic``: their
    spacing; ``-hold300x4``: the network called on every 4th step above step 300, its prediction held in between)
    and whether the samples use other seeds (``'ddpm-1000/alt'``: the next seeds after the counted ones, an
    independent replicate that measures the spread of two draws)."""
    name, alt = name.removesuffix("/alt"), name.endswith("/alt")
    method, steps, *rest = name.split("-")
    settings = dict(method=method, steps=int(steps), spacing="uniform", hold_above=0, hold_every=1)
    for part in rest:
        if part.startswith("hold"):
            above, every = part.removeprefix("hold").split("x")
            settings.update(hold_above=int(above), hold_every=int(every))
        else:
            settings["spacing"] = part
    return settings, alt


def draw(run: Path, out: Path, experiment: ImageAudit, data: Data, members, samplers: list[str], n: int) -> None:
    """Samples ``(M, n, C, H, W)`` of every checkpoint with every sampler, one file each, skipping existing ones."""
    cfg = experiment.cfg
    model_class, model_kwargs = experiment.network(data)
    schedule, shape = experiment.schedule(), tuple(data.test.shape[1:])
    clip = 1.0 if cfg.scaling == "minus1to1" else None
    calls = lambda name: network_call_count(cfg.T, **{k: v for k, v in parse_sampler(name)[0].items() if k != "method"})
    for name in sorted(samplers, key=calls):  # the cheap ones first
        settings, alt = parse_sampler(name)
        seeds = experiment.seeds.sample_seeds(2 * n)[n:] if alt else experiment.seeds.sample_seeds(n)
        for r in read_jsonl(run / "metrics.jsonl"):
            stem = out / f"{name.replace('/', '-')}-{r['step']}"
            if stem.with_suffix(".safetensors").exists() and stem.with_suffix(".json").exists():
                continue
            start = time.perf_counter()
            models = [load_model(model_class, model_kwargs, checkpoint_stem(run / "models" / f"model{m}", r["step"]),
                                 cfg.device) for m in range(len(members))]
            x = torch.stack([sample(x0_from_eps_model(model, schedule, clip=clip), schedule, shape, seeds,
                                    **settings, batch_size=cfg.eval_batch)
                             for model in models])
            save_tensors(stem, {"samples": x}, {"sampler": name, "step": r["step"], "n_samples": n})
            print(f"{name} step {r['step']}: {time.perf_counter() - start:.1f} s", flush=True)


def curves(experiment: ImageAudit, records: list[dict], samples: list[torch.Tensor], part: slice, members,
           reference) -> dict:
    """The samples ``part`` of ``samples`` (one ``(M, N, C, H, W)`` per record) in place of the run's: the
    judged verdict (the audit's own judge, with tau_mem from the audit's own :func:`proximity` at every
    checkpoint), and per checkpoint the twin distance and the twin-minus-control contrast with their SEMs."""
    twins, controls = model_pairs(members)
    new, twin, contrast = [], [], []
    for r, x in zip(records, samples):
        x = x[:, part]
        tw = twin_distance(list(x), twins)
        twin.append((tw["mean"], tw["sem"]))
        rec = {**r, "twin_distance": tw["median"], "twin_distance_sem": tw["sem"], "twin_distance_pairs": tw["per_pair"]}
        if controls:  # one seed per split has none
            co = twin_distance(list(x), controls)
            rec["same_split_distance_pairs"] = co["per_pair"]
            contrast.append((tw["mean"] - co["mean"], tw["sem"] + co["sem"]))
        near = proximity(x, members, reference["train"], reference["test"], reference["heldout_l2"],
                         experiment.cfg, experiment.seeds)
        new.append({**rec, **{k: near[k] for k in ("f_mem", "f_mem_ci", "nn_own_sim", "nn_other_sim", "copy_z")}})
    return {"judged": judge_records(experiment, new, members), "twin": twin, "contrast": contrast,
            "f_mem": {"value": new[-1]["f_mem"], "ci": new[-1]["f_mem_ci"]}}


def deviation(curve: list[tuple[float, float]], ref: list[tuple[float, float]]) -> tuple[float, int]:
    """``max |D - D_ref| / (SEM + SEM_ref)`` over checkpoints, and the index where it is reached."""
    devs = [abs(d - rd) / (e + re) for (d, e), (rd, re) in zip(curve, ref)]
    worst = max(range(len(devs)), key=devs.__getitem__)
    return devs[worst], worst


def replicate_table(experiment: ImageAudit, records: list[dict], samples: dict, counts: list[int], members,
                    reference) -> list[str]:
    """Independent draws of one sampler: its drawn samples cut into disjoint sets of ``n`` (and those of its
    ``/alt`` seeds), each judged on its own. Lines of a markdown table: how the decision varies between draws."""
    lines = ["", "Replicates: disjoint sets of samples (other sample seeds) of each sampler, each judged on its own.", "",
             "| sampler | samples per model | draws | verdicts | p at the loss minimum | placebo verdicts | tau_bias | "
             "tau_data | f_mem at the last checkpoint |", "|---|---|---|---|---|---|---|---|---|"]
    step = lambda t: "—" if not t or t.get("step") is None else str(t["step"])
    for base in dict.fromkeys(name.removesuffix("/alt") for name in samples):
        for n in counts:
            draws = [curves(experiment, records, samples[name], slice(k * n, (k + 1) * n), members, reference)
                     for name in samples if name.removesuffix("/alt") == base
                     for k in range(samples[name][0].shape[1] // n)]
            if len(draws) < 2:
                continue
            judged = [d["judged"] for d in draws]
            verdicts = [j["verdict"] for j in judged]
            tally = ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts))
            placebo = [j.get("negative_controls", {}).get("placebo_contrast", {}).get("verdict", "—") for j in judged]
            placebo = ", ".join(f"{placebo.count(v)} {v}" for v in dict.fromkeys(placebo))
            fmem = ", ".join(f"{d['f_mem']['value']:.3f}" for d in draws)
            p = ", ".join("—" if j.get("p_value") is None else f"{j['p_value']:.3f}" for j in judged)
            lines.append(f"| {base} | {n} | {len(draws)} | {tally} | {p} | {placebo} | "
                         f"{', '.join(step(j['tau_bias']) for j in judged)} | "
                         f"{', '.join(step(j.get('tau_data')) for j in judged)} | "
                         f"{fmem} |")
    return lines


FAR = 0.05  # a sample this far (cosine distance) from the reference's sample of its seed landed on another image


def paired_table(records: list[dict], samples: dict, reference: str, members, n_at: int) -> list[str]:
    """The systematic effect of each sampler on the twin distance and on the twin-minus-control contrast: per
    checkpoint, the mean over sample seeds of (sampler - reference) for samples drawn from the same seeds (the
    same ``x_T``; a ``/alt`` sampler is paired with the reference's ``/alt``), ± its standard error, beside the
    sampling noise of the reference's own value with ``n_at`` samples (its per-seed SD / sqrt(n_at)); and how far
    each sample lies from the reference's sample of the same model and seed (cosine distance, as the twin
    distance measures it: mean / largest over models and seeds / how many lie above ``FAR``; near 0 only for a
    sampler on the same noise)."""
    twins, controls = model_pairs(members)

    def per_seed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (N,) twin D and contrast per seed
        tw = torch.tensor(twin_distance(list(x), twins)["per_sample"])
        co = torch.tensor(twin_distance(list(x), controls)["per_sample"]) if controls else torch.zeros_like(tw)
        return tw, tw - co

    lines = ["", f"Paired by sample seed against {reference}: mean (sampler - reference) ± SE over seeds; 'own "
             f"sample': distance to the reference's sample of the same model and seed, mean / largest / how many of "
             f"all above {FAR}; "
             f"'noise {n_at}': the reference's own sampling SE with {n_at} samples.", ""]
    others = [name for name in samples if name.removesuffix("/alt") != reference]
    bases = list(dict.fromkeys(name.removesuffix("/alt") for name in others))
    lines += ["| step | " + " | ".join(f"{b}: twin D | {b}: contrast | {b}: own sample" for b in bases)
              + f" | noise {n_at}: twin D | noise {n_at}: contrast |", "|---|" + "---|---|---|" * len(bases) + "---|---|"]
    for i, r in enumerate(records):
        cells, noise = [], None
        for base in bases:
            diffs_t, diffs_c, ref_t, ref_c, own = [], [], [], [], []
            for alt in ("", "/alt"):
                if base + alt in samples and reference + alt in samples:
                    x, ref = samples[base + alt][i], samples[reference + alt][i]
                    t, c = per_seed(x)
                    rt, rc = per_seed(ref)
                    diffs_t.append(t - rt), diffs_c.append(c - rc), ref_t.append(rt), ref_c.append(rc)
                    own += [torch.tensor(twin_distance([x[m], ref[m]], [(0, 1)])["per_sample"]) for m in range(len(x))]
            dt, dc, own = torch.cat(diffs_t), torch.cat(diffs_c), torch.cat(own)
            se = lambda d: float(d.std()) / len(d) ** 0.5
            cells += [f"{float(dt.mean()):+.4f} ± {se(dt):.4f}", f"{float(dc.mean()):+.4f} ± {se(dc):.4f}",
                      f"{float(own.mean()):.4f} / {float(own.max()):.3f} / {int((own > FAR).sum())} of {len(own)}"]
            noise = noise or (float(torch.cat(ref_t).std()) / n_at**0.5, float(torch.cat(ref_c).std()) / n_at**0.5)
        lines.append(f"| {r['step']} | " + " | ".join(cells) + f" | {noise[0]:.4f} | {noise[1]:.4f} |")
    return lines


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
    check_out(args.out, [args.run])  # never inside (or around) the audit it reads
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    print(f"machine: {env['platform']}, torch {env['torch']}, {os.cpu_count()} CPU cores, {args.threads} torch "
          f"thread(s), load average {os.getloadavg()[0]:.1f}", flush=True)
    draw(args.run, args.out, experiment, data, members, samplers, counts[0])

    records = read_jsonl(args.run / "metrics.jsonl")
    reference = experiment.reference(data, members)
    samples = {name: [load_tensors(args.out / f"{name.replace('/', '-')}-{r['step']}")[0]["samples"] for r in records] for name in samplers}
    results = {(name, n): curves(experiment, records, samples[name], slice(0, n), members, reference)
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
    lines += replicate_table(experiment, records, samples, counts, members, reference)
    if len({name.removesuffix("/alt") for name in samplers}) > 1:
        lines += paired_table(records, samples, samplers[0], members, counts[-1])
    text = "\n".join(lines)
    write_bytes(args.out / "table.md", text.encode())
    print(text)


if __name__ == "__main__":
    main()
