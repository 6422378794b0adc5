"""The per-image leak list of a fine-tune: which private training images the models start to copy, and when.

A generated sample is a *near-copy* of the training image nearest to it when its L2 distance to that image is
below a third of its distance to the second-nearest image of the same split (d1/d2 < 1/3, the rule of the
memorized fraction f_mem; Yoon et al. 2023, Gu et al. 2023; docs/method.md §3). An image *leaks* at the first
checkpoint at which a sample of a model trained on it is its near-copy.

    record.update(near_copies(samples, members, train_sets))     # per checkpoint, into metrics.jsonl
    leaks = leak_list(records, members, train_names)             # per image: first leak step, closest sample
    write_leaks_csv(run / "leaks.csv", leaks)
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from ..checkpoint import load_tensors
from ..runs import write_bytes
from .metrics import nearest_neighbors

COPY_RATIO = 1 / 3  # d1/d2 below this: a near-copy (as f_mem)


def near_copies(samples: torch.Tensor, members, train_sets) -> dict:
    """One checkpoint's near-copies and closest distances.

    ``samples``: ``(M, n_samples, C, H, W)``, model ``m`` trained on split ``members[m][0]`` of ``train_sets``.
    Returns ``near_copies``: ``[model, sample, image index in its split, d1]`` per near-copy, and ``closest_l2``:
    per split, the smallest L2 distance from any sample of a model trained on it to each of its images.
    """
    copies, closest = [], [torch.full((len(x),), float("inf")) for x in train_sets]
    for m, (split, _) in enumerate(members):
        flat_s, flat_t = samples[m].flatten(1).double(), train_sets[split].flatten(1).double()
        closest[split] = torch.minimum(closest[split], torch.cdist(flat_s, flat_t).min(0).values.float())
        nn = nearest_neighbors(samples[m], train_sets[split])
        hits = torch.nonzero(nn["l2"] < COPY_RATIO * nn["l2_second"]).flatten().tolist()
        copies += [[m, s, int(nn["index"][s]), round(float(nn["l2"][s]), 6)] for s in hits]
    return {"near_copies": copies, "closest_l2": [[round(float(v), 6) for v in c] for c in closest]}


def leak_list(records: list[dict], members, train_names: list[list[str]]) -> list[dict]:
    """Every private training image, leaked ones first (by first leak step): ``split``, ``index`` (in its split),
    ``name`` (file name or pool index), ``first_leak_step`` (None: never copied), the ``model`` and ``sample``
    of that first near-copy, and ``closest_l2`` / ``closest_step``: the closest any sample came to it, and when."""
    leaks = {(split, i): {"split": split, "index": i, "name": name, "first_leak_step": None, "model": None,
                          "sample": None, "closest_l2": float("inf"), "closest_step": None}
             for split, names in enumerate(train_names) for i, name in enumerate(names)}
    for r in sorted(records, key=lambda r: r["step"]):
        for m, s, i, _ in r["near_copies"]:
            entry = leaks[(members[m][0], i)]
            if entry["first_leak_step"] is None:
                entry.update(first_leak_step=r["step"], model=m, sample=s)
        for split, distances in enumerate(r["closest_l2"]):
            for i, d in enumerate(distances):
                if d < leaks[(split, i)]["closest_l2"]:
                    leaks[(split, i)].update(closest_l2=d, closest_step=r["step"])
    never = float("inf")
    return sorted(leaks.values(), key=lambda e: (never if e["first_leak_step"] is None else e["first_leak_step"],
                                                 e["split"], e["index"]))


def write_leaks_csv(path: Path, leaks: list[dict]) -> None:
    """``leaks.csv``: one row per private training image (see :func:`leak_list`); empty cells where it never leaked."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    keys = ("split", "index", "name", "first_leak_step", "model", "sample", "closest_l2", "closest_step")
    writer.writerow(keys)
    writer.writerows([["" if e[k] is None else e[k] for k in keys] for e in leaks])
    write_bytes(path, out.getvalue().encode())


def leak_rows(run: Path, leaks: list[dict], train_sets, n: int = 10) -> list[tuple[str, torch.Tensor]]:
    """Gallery rows of the first ``n`` images to leak: the private images, and the near-copies at their leak step."""
    first = [e for e in leaks if e["first_leak_step"] is not None][:n]
    if not first:
        return []
    copies = [load_tensors(run / "samples" / f"step_{e['first_leak_step']:07d}")[0]["samples"][e["model"], e["sample"]]
              for e in first]
    steps = ", ".join(str(e["first_leak_step"]) for e in first)
    return [("first private images to leak", torch.stack([train_sets[e["split"]][e["index"]] for e in first])),
            (f"their near-copies, at steps {steps}", torch.stack(copies))]
