"""Class-conditional twins and their evaluation under classifier-free guidance (docs/guidance.md).

``biasgen audit --conditional --guidance 0,1,3`` trains every twin on the images
*and* labels of its split (each label dropped with probability ``--label-dropout``,
so one network serves unconditional, conditional and guided sampling), then at
every checkpoint draws each model's samples once per guidance scale ``w``
(:func:`biasgen.guidance.guided_eps`), with the same per-sample noise and the same
label for both twins, and measures every sample-level metric per ``w``. Copies
and nearest neighbours are counted against the sample's own class
(:func:`nearest_in_class`). ``metrics.jsonl`` holds the metrics of every ``w``
under ``"guidance"`` and those of ``--use-guidance`` at the top level; the
judge runs once per ``w`` (:func:`judge_per_scale`).
"""
from __future__ import annotations

import torch

from ..config import check
from ..errors import BiasgenError
from ..guidance import check_scales, guided_eps
from ..losses import Labelled
from ..sampler import sample, x0_from_eps_model
from .metrics import nearest_neighbors

# the sample-level metrics, kept per guidance scale (everything else in a record does not depend on w)
PER_SCALE_KEYS = ("twin_distance", "twin_distance_sem", "twin_distance_pairs", "twin_distance_samples",
                  "same_split_distance", "same_split_distance_sem", "same_split_distance_pairs",
                  "nn_own_sim", "nn_other_sim", "nn_test_sim", "nn_own_l2", "nn_other_l2", "nn_test_l2",
                  "f_mem", "f_mem_ci", "copy_z")


def scale_key(w: float) -> str:
    """How a guidance scale names its entries in ``metrics.jsonl`` and ``summary.json``: ``3.0 -> '3'``."""
    return f"{w:g}"


def check_guidance(cfg) -> None:
    """The conditional settings of an :class:`~biasgen.images.audit.AuditConfig`: a clear error for each misuse."""
    if not cfg.conditional:
        for flag, value in (("--guidance", cfg.guidance), ("--guidance-start", cfg.guidance_start),
                            ("--use-guidance", cfg.use_guidance)):
            check(value in ((), None), f"{flag} needs class-conditional twins: add --conditional (the data must "
                                       f"carry class labels), or drop {flag}.")
        return
    scales = cfg.guidance_scales
    check_scales(scales)
    check(len(set(scales)) == len(scales), f"--guidance lists a scale twice ({', '.join(map(scale_key, scales))}); "
                                           "give each scale once.")
    check(0 <= cfg.label_dropout < 1, f"--label-dropout must be in [0, 1), got {cfg.label_dropout}.")
    check(cfg.label_dropout > 0 or set(scales) == {1.0},
          "--label-dropout 0 never trains the unconditional prediction that every scale but 1 needs; "
          "set --label-dropout 0.1 (the default), or sample only with --guidance 1.")
    check(cfg.use_scale in scales, f"--use-guidance {cfg.use_scale:g} is not among the evaluated scales "
                                   f"--guidance {','.join(map(scale_key, scales))}; add it there.")
    check(cfg.guidance_start is None or 1 <= cfg.guidance_start <= cfg.T,
          f"--guidance-start must be a diffusion step in 1..{cfg.T}, got {cfg.guidance_start}.")


def class_labels(labels: torch.Tensor | None, data: str) -> tuple[torch.Tensor, list[int]]:
    """``(labels in 0..C-1, the original label of each class)`` of a labelled data set; a clear error without labels."""
    if labels is None:
        raise BiasgenError(
            f"--conditional needs a class label per image, and --data {data} has none: digits and fashion-mnist "
            "carry labels; put a folder's images in one sub-folder per class, or save a .npz with an integer "
            "array 'labels' beside 'images'.")
    classes, inverse = torch.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise BiasgenError(f"--conditional needs at least 2 classes, but every image of --data {data} has label "
                           f"{int(classes[0])}; drop --conditional or use labelled data with several classes.")
    return inverse.long(), [int(c) for c in classes]


def sample_labels(n_samples: int, num_classes: int) -> torch.Tensor:
    """``(n_samples,)`` long: the label of sample ``j`` is ``j mod C`` (every class equally often, the same for
    every model)."""
    return torch.arange(n_samples) % num_classes


def nearest_in_class(samples: Labelled, reference: Labelled) -> dict:
    """:func:`~biasgen.images.metrics.nearest_neighbors` of each sample among the reference images of its own class.

    ``samples``: ``Labelled`` ``(N, C, H, W)`` images with ``(N,)`` labels; ``reference``: the same for a split or
    test set. Returns the same ``(N,)`` tensors (``index``, ``sim_index``: positions in ``reference``).
    """
    out: dict[str, torch.Tensor] = {}
    for c in samples.y.unique().tolist():
        rows, ref_rows = torch.nonzero(samples.y == c)[:, 0], torch.nonzero(reference.y == c)[:, 0]
        if len(ref_rows) < 2:
            raise BiasgenError(f"class {c} has {len(ref_rows)} image(s) in a reference set; counting copies within "
                               "a class needs at least 2: raise --n (and --n-test).")
        found = nearest_neighbors(samples.x[rows], reference.x[ref_rows])
        for key, value in found.items():
            value = ref_rows[value] if key in ("index", "sim_index") else value
            out.setdefault(key, torch.zeros(len(samples), dtype=value.dtype))[rows] = value
    return out


def labelled_reference(train: list[torch.Tensor], test: torch.Tensor, train_labels: list[torch.Tensor],
                       test_labels: torch.Tensor, members, n_samples: int, num_classes: int) -> dict:
    """The evaluation inputs of a conditional audit: labelled splits and test set, the labels of the samples, and
    the held-out reference of the data-copying test (test images' distances to their class in each model's split)."""
    train_l = [Labelled(x, y) for x, y in zip(train, train_labels)]
    test_l = Labelled(test, test_labels)
    heldout = test_l[:n_samples]
    return {"train_labelled": train_l, "test_labelled": test_l, "sample_labels": sample_labels(n_samples, num_classes),
            "heldout_l2": [nearest_in_class(heldout, train_l[split])["l2"] for split, _ in members]}


def guided_samples(models, w: float, ref: dict, cfg, seeds) -> torch.Tensor:
    """Each model's samples at guidance scale ``w``: ``(M, n_samples, C, H, W)``, the same noise and labels for all."""
    null = ref["num_classes"]
    return torch.stack([
        sample(x0_from_eps_model(guided_eps(m, w, null, cfg.guidance_start), ref["schedule"],
                                 clip=1.0 if cfg.scaling == "minus1to1" else None),
               ref["schedule"], tuple(ref["test"].shape[1:]), seeds.sample_seeds(cfg.n_samples), **cfg.sampler_settings,
               batch_size=cfg.eval_batch, device=cfg.device,
               labels=ref["sample_labels"])
        for m in models])


def evaluate_guided(models, members, ref: dict, cfg, seeds) -> tuple[dict, dict]:
    """Every image metric of one checkpoint of conditional models, the sample-level ones once per guidance scale.

    The losses use each image's own label; the score-level similarity the unconditional prediction (null label).
    Returns the record (``"guidance"``: scale -> sample-level metrics; the top level: those at ``--use-guidance``)
    and the tensors to keep: ``samples`` (at ``--use-guidance``), ``samples_w<w>`` at every other scale, ``labels``.
    """
    from .evaluation import loss_record, sample_record, score_record  # the image audit's evaluation parts

    labels = ([t.y for t in ref["train_labelled"]], ref["test_labelled"].y)
    record = loss_record(models, members, ref, cfg, seeds, labels=labels)
    keep, per_scale = {"labels": ref["sample_labels"]}, {}
    for w in cfg.guidance_scales:
        samples = guided_samples(models, w, ref, cfg, seeds)
        labelled = [Labelled(s, ref["sample_labels"]) for s in samples]
        per_scale[scale_key(w)] = sample_record(labelled, members, ref["train_labelled"], ref["test_labelled"],
                                                ref["heldout_l2"], cfg, seeds, nn=nearest_in_class)
        keep["samples" if w == cfg.use_scale else f"samples_w{scale_key(w)}"] = samples
    record.update(per_scale[scale_key(cfg.use_scale)], guidance=per_scale)
    record.update(score_record(models, members, ref["train"], ref["test"], ref["schedule"], cfg, seeds))
    return record, keep


def at_scale(records: list[dict], w: float) -> list[dict]:
    """The records as if the run had sampled only at scale ``w``: its sample-level metrics at the top level."""
    return [{**r, **r["guidance"][scale_key(w)]} for r in records]


def tau_text(tau: dict | None) -> str:
    """A tau of one scale in a few characters: its step, '>N' when not reached by step N, '-' when not measured."""
    if not tau:
        return "-"
    if tau.get("step") is not None:
        return str(tau["step"])
    return f">{tau['value']}" if tau.get("value") is not None else "-"


def terminal_lines(summary: dict) -> list[str]:
    """The per-scale lines of the terminal summary of a conditional audit (the rest is at ``--use-guidance``)."""
    block = summary["guidance"]
    lines = [f"guidance: the lines above are at w = {block['use_guidance']:g} (--use-guidance); per scale w:"]
    for w, judged in block["per_scale"].items():
        taus = ", ".join(f"{name} {tau_text(judged.get(name))}" for name in ("tau_data", "tau_bias", "tau_mem"))
        lines.append(f"  w = {w:>4}: {judged['verdict']}; {taus}; recommended step {judged['recommended_step']}")
    return lines


def judge_per_scale(experiment, records: list[dict], members) -> dict:
    """summary.json's ``"guidance"`` block: per scale the verdict, the taus (``tau_bias``, ``tau_loss``, ``tau_mem``
    and any other the judge locates) and the recommended step, judged on that scale's curves alone."""
    from ..pipeline import judge_records

    cfg = experiment.cfg
    per_scale = {}
    for w in cfg.guidance_scales:
        judged = judge_records(experiment, at_scale(records, w), members)
        per_scale[scale_key(w)] = {k: v for k, v in judged.items() if k.startswith("tau_") or k in (
            "verdict", "reason", "p_value", "p_value_end", "level", "recommended_step", "recommended_ci", "recommendation",
            "recommendation_basis", "window", "candidate_costs")}
    use = per_scale[scale_key(cfg.use_scale)]
    return {"scales": list(cfg.guidance_scales), "use_guidance": cfg.use_scale, "start": cfg.guidance_start,
            "label_dropout": cfg.label_dropout, "recommended_step": use["recommended_step"], "per_scale": per_scale}
