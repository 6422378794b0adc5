"""Grouped splits: images that belong together (one person, one patient, one photo session) never straddle two
training splits or a split and the test set.

    group = group_ids(names, groups_file="groups.csv")         # CSV rows: file name, group id
    group = group_ids(names, regex=r"^(\\w+)_")                # the first capture group of each file name
    splits = make_grouped_splits(x, group, n=64, k=2, n_test=128, seed=0)

A split fills with whole groups in one seeded permutation of the groups; the group that crosses a split's size
is cut to fit and its remaining images are left out of every set, so splits and the test set stay disjoint at
group level. Images are named by their path relative to the data folder, or by their index for named data sets
and arrays.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import torch

from ..errors import BiasgenError
from .data import Splits, find_exact_duplicates, make_splits


def image_names(names: list[str] | None, n_images: int) -> list[str]:
    """The images' file names, or their indices as strings when the data did not come from files."""
    return list(names) if names is not None else [str(i) for i in range(n_images)]


def read_groups_file(path: str | Path) -> dict[str, str]:
    """``{file name: group id}`` from a CSV of ``name,group`` rows (a first row ``file,group`` is a header)."""
    path = Path(path).expanduser()
    try:
        with open(path, newline="") as f:
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise BiasgenError(f"cannot read --groups {path} ({e}); pass a CSV file of 'file name,group id' rows.") from e
    if rows and [c.strip().lower() for c in rows[0]] == ["file", "group"]:
        rows = rows[1:]
    bad = next((i for i, row in enumerate(rows) if len(row) != 2), None)
    if bad is not None:
        raise BiasgenError(f"--groups {path}: row {bad + 1} has {len(rows[bad])} columns, not 2; each row is "
                           "'file name,group id'.")
    return {name.strip(): group.strip() for name, group in rows}


def group_ids(names: list[str], *, groups_file: str | Path | None = None, regex: str | None = None) -> list[str]:
    """One group id per image, from ``groups_file`` (see :func:`read_groups_file`) or ``regex`` (its first capture
    group, or the whole match, searched in each name)."""
    if (groups_file is None) == (regex is None):
        raise BiasgenError("pass one of --groups FILE or --group-by-regex PATTERN, not both.")
    if groups_file is not None:
        table = read_groups_file(groups_file)
        missing = [name for name in names if name not in table]
        if missing:
            raise BiasgenError(f"--groups {groups_file} names no group for {len(missing)} image(s), e.g. "
                               f"'{missing[0]}'; add a row for every image (file names relative to the data folder, "
                               "or indices for a named data set).")
        return [table[name] for name in names]
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise BiasgenError(f"--group-by-regex {regex!r} is not a valid regular expression ({e}).") from e
    ids = []
    for name in names:
        match = pattern.search(name)
        if match is None:
            raise BiasgenError(f"--group-by-regex {regex!r} does not match the image '{name}'; use a pattern that "
                               "matches every file name (its first capture group is the group id).")
        ids.append(match.group(1) if pattern.groups else match.group(0))
    return ids


def make_grouped_splits(images: torch.Tensor, group: list[str], n: int, k: int, n_test: int, seed: int) -> Splits:
    """``k`` training splits of ``n`` images and a test set of ``n_test`` images, disjoint at group level.

    ``images``: the pool ``(N, C, H, W)``; ``group``: one id per image. Groups are permuted with ``seed``; the test
    set fills first (so it does not change with n or K), then split 0, 1, ...; ``Splits.groups`` records counts.
    """
    members: dict[str, list[int]] = {}
    for i, g in enumerate(group):
        members.setdefault(g, []).append(i)
    largest = max(members, key=lambda g: len(members[g]))
    if len(members[largest]) > n:
        raise BiasgenError(f"group '{largest}' holds {len(members[largest])} images, more than a split's {n}; a group "
                           "must fit in one split: raise --n, or split that group in the groups file.")
    order = torch.randperm(len(members), generator=torch.Generator().manual_seed(int(seed))).tolist()
    names = list(members)
    targets = [n_test] + [n] * k
    sets: list[list[int]] = [[] for _ in targets]
    set_groups: list[set] = [set() for _ in targets]
    current = 0
    for j in order:
        if current == len(targets):
            break
        take = members[names[j]][: targets[current] - len(sets[current])]
        sets[current].extend(take)
        set_groups[current].add(names[j])
        if len(sets[current]) == targets[current]:
            current += 1
    if current < len(targets):
        raise BiasgenError(f"{len(members)} groups ({len(group)} images) cannot fill a test set of {n_test} and "
                           f"{k} splits of {n}; lower --n, --splits or the test size, or use more data.")
    test_index, *train_index = [torch.tensor(s, dtype=torch.long) for s in sets]
    splits = Splits([images[i] for i in train_index], images[test_index], train_index, test_index, int(seed))
    splits.duplicates = find_exact_duplicates(splits)
    splits.groups = {"n_groups": len(members), "test": len(set_groups[0]),
                     "per_split": [len(s) for s in set_groups[1:]]}
    return splits


def split_images(images, *, n: int, k: int, n_test: int, seed: int, groups_file: str | None = None,
                 regex: str | None = None) -> Splits:
    """The splits of an :class:`~biasgen.images.data.ImageData`: grouped when ``groups_file`` or ``regex`` is given
    (see :func:`group_ids`), else one permutation of the images (:func:`~biasgen.images.data.make_splits`)."""
    if groups_file is None and regex is None:
        return make_splits(images.images, n, k, n_test, seed)
    group = group_ids(image_names(images.names, len(images.images)), groups_file=groups_file, regex=regex)
    return make_grouped_splits(images.images, group, n, k, n_test, seed)
