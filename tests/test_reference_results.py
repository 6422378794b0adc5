"""The tiny presets' metrics.jsonl agree with the stored reference files, on any x86 CPU and thread count.

float32 rounding depends on the machine: the SIMD width and the thread count change the order of the sums in
every matmul and convolution, so the trained weights differ by a few ulp (eps = 6e-8) after a few Adam steps,
and the ancestral sampler re-rounds and amplifies that difference through its 1000 network calls. A quantity is
therefore compared within a tolerance set by how it is computed, relative to its *scale* (the largest |value|
of that key in the reference file, so that a value near zero is not judged against itself):

- exact: steps, counts, time bins, and what is decided per sample (the memorized fraction and its interval,
  the copying z statistic, the hierarchy's generated sequences and everything counted on them): they move
  only if a sample sits within rounding of a threshold or a token boundary;
- ``LOSS`` 5e-5: losses and the hierarchy's exact likelihoods, forward passes on fixed noise, no sampler;
- ``SAMPLE_MEAN`` 3e-4: means over samples of the sampler (twin distance, nearest-neighbour similarities);
- ``SAMPLE_UNIT`` 8e-4: per-sample values and the SEMs made of them.

Measured (``ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2``, and ``=default``
/ ``SSE4_2`` / ``SSE41``, each with 1 and 2 threads, against this machine's AVX-512 references): the largest
scaled difference is 5e-6 for losses, 2.7e-5 for sample means, 1.7e-4 for per-sample values; the exact
quantities did not move. The tolerances are ten times the measured worst (five for per-sample values, held
under 1e-3) so that a change of 1 part in 1000 of any reported number still fails (the last two tests).
A deliberate change of a result must update the reference files in its own commit and say why.
"""
import fnmatch
import json
from collections import defaultdict
from pathlib import Path

import pytest

import biasgen.images.evaluation as evaluation_module
from biasgen.hierarchy.experiment import hierarchy
from biasgen.images.audit import audit

DATA = Path(__file__).parent / "data"
EXACT, LOSS, SAMPLE_MEAN, SAMPLE_UNIT = 0.0, 5e-5, 3e-4, 8e-4
TOLERANCES = (  # (key pattern, tolerance relative to the key's scale): the first match wins
    ("f_mem*", EXACT), ("copy_z", EXACT), ("*.t_lo", EXACT), ("*.t_hi", EXACT),
    ("gen_*", EXACT), ("uturn_*", EXACT), ("d_nn", EXACT),
    ("twin_distance_samples", SAMPLE_UNIT), ("twin_distance_sem", SAMPLE_UNIT), ("score_sim.*_sem", SAMPLE_UNIT),
    ("twin_distance*", SAMPLE_MEAN), ("nn_*", SAMPLE_MEAN), ("score_sim.*", SAMPLE_MEAN),
    ("*", LOSS),
)


def _tolerance(key: str) -> float:
    return next(tol for pattern, tol in TOLERANCES if fnmatch.fnmatchcase(key, pattern))


def _leaves(value, key: str, out: dict) -> dict:
    """``out[dotted key]``: the list of every scalar under ``key`` (lists flattened in order)."""
    if isinstance(value, dict):
        for k, v in value.items():
            _leaves(v, f"{key}.{k}" if key else str(k), out)
    elif isinstance(value, list):
        for v in value:
            _leaves(v, key, out)
    else:
        out[key].append(value)
    return out


def _mismatches(new: list[dict], ref: list[dict]) -> list[str]:
    """One line per key that differs between ``new`` and ``ref`` beyond its tolerance (or in structure)."""
    if len(new) != len(ref):
        return [f"{len(new)} records, the reference has {len(ref)}"]
    flat_new = [_leaves(r, "", defaultdict(list)) for r in new]
    flat_ref = [_leaves(r, "", defaultdict(list)) for r in ref]
    found = []
    for key in sorted(set().union(*flat_ref, *flat_new)):
        if any(len(n.get(key, [])) != len(r.get(key, [])) for n, r in zip(flat_new, flat_ref)):
            found.append(f"{key}: shapes differ")
            continue
        pairs = [(a, b) for n, r in zip(flat_new, flat_ref) for a, b in zip(n[key], r[key])]
        is_float = [isinstance(a, float) and isinstance(b, float) for a, b in pairs]
        floats = [pair for pair, f in zip(pairs, is_float) if f]
        if any(a != b for (a, b), f in zip(pairs, is_float) if not f):  # ints, strings, None: exact
            found.append(f"{key}: values differ")
        elif floats:
            scale = max(abs(b) for _, b in floats) or 1.0
            worst = max(abs(a - b) for a, b in floats) / scale
            if not worst <= _tolerance(key):  # also catches NaN
                found.append(f"{key}: largest difference {worst:.2e} of its scale (tolerance {_tolerance(key):.0e})")
    return found


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("kind", ["audit", "hierarchy"])
def test_tiny_preset_reproduces_the_reference_metrics(kind, tmp_path):
    run = audit if kind == "audit" else hierarchy
    run(tmp_path / kind, preset="tiny", progress=False)
    new, ref = _records(tmp_path / kind / "metrics.jsonl"), _records(DATA / f"reference_{kind}_tiny.jsonl")
    assert [r["step"] for r in new] == [r["step"] for r in ref]
    assert _mismatches(new, ref) == []


@pytest.mark.parametrize("kind", ["audit", "hierarchy"])
def test_the_comparison_rejects_one_part_in_a_thousand_of_any_number(kind):
    ref = _records(DATA / f"reference_{kind}_tiny.jsonl")
    keys = sorted(set().union(*(_leaves(r, "", defaultdict(list)) for r in ref)))
    assert _mismatches(ref, ref) == []
    for key in keys:
        changed = json.loads(json.dumps(ref))
        path = key.split(".")
        for record in changed:  # scale this key's numbers by 1.001 (an exact count: add one)
            parent = record
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = _perturbed(parent[path[-1]])
        if changed != ref:
            assert any(m.startswith(f"{key}:") for m in _mismatches(changed, ref)), key


def _perturbed(value):
    if isinstance(value, list):
        return [_perturbed(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return value + 1 if isinstance(value, int) else value * 1.001


def test_a_metric_changed_by_one_part_in_a_thousand_fails(tmp_path, monkeypatch):
    real = evaluation_module.twin_distance

    def twin_distance(*args, **kwargs):  # the one-line change: the twin distance 0.1% larger
        result = real(*args, **kwargs)
        return {**result, "median": result["median"] * 1.001}

    monkeypatch.setattr(evaluation_module, "twin_distance", twin_distance)
    audit(tmp_path / "audit", preset="tiny", progress=False)
    found = _mismatches(_records(tmp_path / "audit" / "metrics.jsonl"), _records(DATA / "reference_audit_tiny.jsonl"))
    assert [m.split(":")[0] for m in found] == ["twin_distance"], found
