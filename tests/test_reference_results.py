"""The tiny presets' metrics.jsonl equal the stored reference files (made before the one-pipeline refactor).

A change that moves any recorded number beyond float rounding makes this fail: a deliberate change of a
result must update the reference files in its own commit and say why.
"""
import json
import math
from pathlib import Path

import pytest

from biasgen.hierarchy.experiment import hierarchy
from biasgen.images.audit import audit

DATA = Path(__file__).parent / "data"


def _differences(a, b, key=""):
    """Yield ``(key, |a - b|)`` for every number of two JSON values; fail on any structural difference."""
    if isinstance(a, dict):
        assert set(a) == set(b), f"{key}: keys differ: {sorted(set(a) ^ set(b))}"
        for k in a:
            yield from _differences(a[k], b[k], f"{key}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{key}: lengths differ"
        for x, y in zip(a, b):
            yield from _differences(x, y, key)
    elif isinstance(a, (int, float)) and not isinstance(a, bool) and a is not None and b is not None:
        yield key, abs(a - b) / max(1.0, abs(a))
    else:
        assert a == b, f"{key}: {a!r} != {b!r}"


@pytest.mark.parametrize("kind", ["audit", "hierarchy"])
def test_tiny_preset_reproduces_the_reference_metrics(kind, tmp_path):
    run = audit if kind == "audit" else hierarchy
    run(tmp_path / kind, preset="tiny", progress=False)
    new = [json.loads(line) for line in (tmp_path / kind / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (DATA / f"reference_{kind}_tiny.jsonl").read_text().splitlines()]
    assert [r["step"] for r in new] == [r["step"] for r in ref]
    worst = max((d for r, s in zip(new, ref) for _, d in _differences(r, s)), default=0.0)
    assert math.isfinite(worst) and worst < 1e-5, f"largest relative difference {worst}"  # float rounding varies with the thread count
