"""The single-run monitor next to the twin audit: when each signal fires relative to tau_bias and tau_loss.

    biasgen audit --out runs/digits                                             # the default audit
    biasgen monitor --checkpoints runs/digits/models/model0 --out runs/mon0 \\
        --sampler ddpm --sample-steps none --n-samples 48                        # the audit's sampler and sample count
    python bench/bench_monitor_vs_twins.py runs/digits runs/mon0 [runs/mon2 ...]

Prints markdown for docs/your-model.md: per checkpoint, the twin signals of the audit and the
monitor signals of the first monitor folder; then, for every monitor folder, the first step
each signal fires. A signal "fires from" the first checkpoint from which it holds at every later
checkpoint. The gap between validation and training loss opens by the audit's own rule
(:func:`biasgen.images.evaluation.loss_bands`), overall, in the band where it opens first, and in the
first-opening band whose gap ends material (at least 10% of the final validation loss); closeness is the mean over samples of the distance to
the nearest training image minus that to the nearest held-out image (size-matched sets, the
monitor's), with a paired 95% CI, recomputed from the monitor's stored samples.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from biasgen.checkpoint import load_tensors
from biasgen.images.monitor_command import member_experiment
from biasgen.images.evaluation import loss_bands
from biasgen.images.metrics import nearest_neighbors
from biasgen.images.monitor import reference_sets
from biasgen.runs import read_json, read_jsonl

MATERIAL = 0.1  # a band's gap is material when it ends at least this share of the final validation loss


def closeness(monitor_dir: Path, records: list[dict]) -> list[tuple[float, float, float]]:
    """Per record: mean of d(sample, train) - d(sample, held-out) and its paired 95% CI (negative: closer to train)."""
    run = read_json(monitor_dir / "run.json")
    audit = run["config"]["meta"]["audit"]
    data = member_experiment(audit).load()
    train, heldout = data.train[audit["split"]], data.test
    ref_train, ref_heldout = reference_sets(train, heldout, run["seeds"])
    out = []
    for r in records:
        samples = load_tensors(monitor_dir / "samples" / f"step_{r['step']:07d}")[0]["samples"]
        d_train, d_heldout = nearest_neighbors(samples, ref_train)["l2"], nearest_neighbors(samples, ref_heldout)["l2"]
        if abs(float(d_heldout.mean()) - r["nn_heldout_l2"]) > 1e-4:
            raise SystemExit(f"{monitor_dir}: the reconstructed held-out reference does not match the monitor's.")
        d = (d_train - d_heldout).double()
        half = 1.96 * float(d.std()) / len(d) ** 0.5
        out.append((float(d.mean()), float(d.mean()) - half, float(d.mean()) + half))
    return out


def gap_opening(records: list[dict]) -> dict:
    """The audit's rule for where the validation-minus-training gap opens: overall and per band of t."""
    def as_audit(r, val, train, t_lo, t_hi):
        return {"step": r["step"], "test_loss_by_t": {"mean": val, "t_lo": t_lo, "t_hi": t_hi},
                "train_loss_by_t": {"mean": train}}
    overall = loss_bands([as_audit(r, [r["val_loss"]], [r["train_loss"]], [1], [1000]) for r in records], 200, 0)
    g = [r["gap_by_t"] for r in records]
    bands = loss_bands([as_audit(r, x["val"], x["train"], x["t_lo"], x["t_hi"]) for r, x in zip(records, g)], 200, 0)
    material = [(step, b) for b, (step, x) in enumerate(zip(bands["gap_opens"], g[-1]["gap"]))
                if step is not None and x is not None and x >= MATERIAL * records[-1]["val_loss"]]
    return {"overall": overall["gap_opens"][0], "band": bands["first_band"], "bands": bands["bands"],
            "opens": bands["gap_opens"], "material": min(material)[1] if material else None,
            "band_opens": bands["gap_opens"][bands["first_band"]] if bands["first_band"] is not None else None}


def fires_from(steps: list[int], holds: list[bool]) -> int | None:
    """The first step from which ``holds`` is true at every later checkpoint (None: not at the last one)."""
    first = None
    for step, h in zip(steps, holds):
        first = (first or step) if h else None
    return first


def monitor_signals(monitor_dir: Path) -> dict:
    records = sorted(read_jsonl(monitor_dir / "metrics.jsonl"), key=lambda r: r["step"])
    steps = [r["step"] for r in records]
    close = closeness(monitor_dir, records)
    gap = gap_opening(records)
    fired = {
        "validation-loss minimum (the flag's last raise)": min(records, key=lambda r: r["val_loss"])["step"],
        "val - train gap opens, all t": gap["overall"],
        "val - train gap opens, in the band where it opens first": gap["band_opens"] and
        f"{gap['band_opens']} (t {gap['bands'][gap['band']][0]}..{gap['bands'][gap['band']][1]})",
        "val - train gap opens, first band whose gap ends material (>= 10% of the val loss)":
        None if gap["material"] is None else
        f"{gap['opens'][gap['material']]} (t {gap['bands'][gap['material']][0]}..{gap['bands'][gap['material']][1]})",
        "samples nearer training than held-out images (95% CI < 0)": fires_from(steps, [hi < 0 for _, _, hi in close]),
        "copy z < 0 (point estimate)": fires_from(steps, [r["copy_z"] < 0 for r in records]),
        "flag closer_to_train (copy z < -2)": fires_from(steps, [r["flags"]["closer_to_train"] for r in records]),
        "flag copies (f_mem 95% CI > 0)": fires_from(steps, [r["flags"]["copies"] for r in records]),
    }
    return {"records": records, "closeness": close, "gap": gap, "fired": fired}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("audit", type=Path, help="the audit's run folder")
    parser.add_argument("monitors", type=Path, nargs="+", help="monitor run folders of the audit's models")
    args = parser.parse_args()
    summary = read_json(args.audit / "summary.json")
    tb, tl = summary["tau_bias"], summary["tau_loss"]
    curves = summary["curves"]
    twin = {s: (curves["twin"][i], curves["control"][i], curves["contrast"][i]) for i, s in enumerate(curves["steps"])}
    signals = {d: monitor_signals(d) for d in args.monitors}

    first = signals[args.monitors[0]]
    band, material = first["gap"]["band"], first["gap"]["material"]
    bands = first["gap"]["bands"]
    model = read_json(args.monitors[0] / "run.json")["config"]["meta"]["audit"]
    print(f"Twin signals of {args.audit} (4-model means) and monitor signals of split {model['split']} "
          f"(seed {model['split_seed']}), {args.monitors[0]}:\n")
    print(f"| step | | twin dist. | control | contrast | val loss ± sem | val − train | gap t {bands[band][0]}..{bands[band][1]} "
          f"| gap t {bands[material][0]}..{bands[material][1]} | d_train − d_heldout [95% CI] | copy z | f_mem [95% CI] "
          "| flags |")
    print("|" + "---|" * 13)
    for r, (m, lo, hi) in zip(first["records"], first["closeness"]):
        s = r["step"]
        mark = " ".join(name for name, t in (("tau_bias", tb["step"]), ("tau_loss", tl["step"])) if t == s)
        flags = ", ".join(k for k in ("val_loss_minimum", "closer_to_train", "copies") if r["flags"][k]) or "—"
        gaps = r["gap_by_t"]["gap"]
        w, c, x = twin[s]
        print(f"| {s} | {mark} | {w:.3f} | {c:.3f} | {x:+.3f} | {r['val_loss']:.4f} ± {r['val_loss_sem']:.4f} "
              f"| {r['val_loss'] - r['train_loss']:+.4f} | {gaps[band]:+.3f} | {gaps[material]:+.3f} | {m:+.3f} [{lo:+.3f}, {hi:+.3f}] "
              f"| {r['copy_z']:+.2f} | {r['f_mem']:.3f} [{r['f_mem_ci'][0]:.3f}, {r['f_mem_ci'][1]:.3f}] | {flags} |")

    names = [f"split {read_json(d / 'run.json')['config']['meta']['audit']['split']}, "
             f"seed {read_json(d / 'run.json')['config']['meta']['audit']['split_seed']}" for d in args.monitors]
    print(f"\nFirst step each signal fires (and holds to the end); tau_bias = {tb['step']} (68% CI {tb['ci'][0]}..{tb['ci'][1]}), "
          f"tau_loss = {tl['step']} (68% CI {tl['ci'][0]}..{tl['ci'][1]}):\n")
    print("| signal | " + " | ".join(names) + " |")
    print("|" + "---|" * (len(names) + 1))
    print("| twin audit: tau_bias (twin − control contrast) | " + " | ".join([str(tb["step"])] * len(names)) + " |")
    print("| twin audit: tau_loss (test loss, 4 models) | " + " | ".join([str(tl["step"])] * len(names)) + " |")
    for key in first["fired"]:
        row = [signals[d]["fired"][key] for d in args.monitors]
        print(f"| monitor: {key} | " + " | ".join("never" if v is None else str(v) for v in row) + " |")
    for d in args.monitors:
        g = signals[d]["gap"]
        print(f"\n{d}: the gap opens per band (audit rule): "
              + ", ".join(f"t {lo}..{hi}: {'never' if s is None else s}" for (lo, hi), s in zip(g["bands"], g["opens"])))
    print(f"\ntorch {torch.__version__}")


if __name__ == "__main__":
    main()
