"""tau_mem, the memorization onset: when generated samples start to copy training examples (docs/method.md §11).

    series = experiment.memorized_share(records)   # per checkpoint {"step", "share", "ci", "key"}: the share of copies
    tau_mem = memorization_onset(series, level=0.0)

Each experiment says what a copy is (images: ``f_mem``, the d1/d2 < 1/3 rule; sequences:
``TwinExperiment.memorized_share`` of the hierarchy) and gives the share per checkpoint with
a 95% interval; this module turns that series into the onset, the same for every kind of data.
"""
from __future__ import annotations

import math

MEM_Z = 1.959964  # the memorized share's intervals are 95% (bootstrap on images, Wilson on sequences)


def wilson(k: int, n: int, z: float = MEM_Z) -> list[float]:
    """Wilson score interval of a binomial proportion ``k / n``."""
    p, z2 = k / n, z * z
    centre, half = (p + z2 / (2 * n)) / (1 + z2 / n), z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def memorization_onset(series: list[dict], level: float = 0.0) -> dict:
    """tau_mem: the first checkpoint from which the 95% lower bound of the memorized share stays above ``level``.

    ``series``: per checkpoint ``{"step", "share", "ci": [lo, hi]}``, in step order. The bound must
    hold at that checkpoint and every later one: memorization persists, while a few near-copies at
    one checkpoint that are gone at the next are not its onset. ``ci`` of the result runs from the
    first checkpoint whose share itself exceeds ``level`` (the first sign) to tau_mem; with no such
    checkpoint tau_mem is a lower bound (after the last step), and an onset at the first checkpoint
    an upper bound.
    """
    steps = [s["step"] for s in series]
    above = [s["ci"][0] > level for s in series]
    start = next((i for i in range(len(series)) if all(above[i:])), None)
    onset = series[start] if start is not None else None
    if onset is None:
        return {"step": None, "ci": None, "located": False, "bound": "lower", "value": steps[-1], "level": level,
                "share_last": series[-1]["share"], "share_last_ci": series[-1]["ci"]}
    first = next(s["step"] for s in series if s["share"] > level)
    bound = "upper" if onset["step"] == steps[0] else None
    return {"step": onset["step"] if bound is None else None, "ci": [first, onset["step"]], "located": bound is None,
            "bound": bound, "value": onset["step"], "level": level, "share_at_onset": onset["share"],
            "share_at_onset_ci": onset["ci"]}
