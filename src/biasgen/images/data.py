"""Image data for the twin-split audit: loading, scaling, splits (docs/method.md §2); file readers in ``loaders``.

    data = load_images("digits")                              # (1797, 1, 8, 8) in [0, 1]
    data = load_images("fashion-mnist", resolution=16)        # IDX files, resized to 16x16
    data = load_images("~/celeba/img_align_celeba", resolution=32, grayscale=True)
    x, mean = scale_images(data.images, "minus1to1")          # what the network sees
    splits = make_splits(x, n=256, k=2, n_test=512, seed=0)   # K disjoint splits + test set
    record = describe(data, splits)                           # JSON for summary.json

Sources: ``digits`` (scikit-learn's bundled 8x8 digits), ``fashion-mnist``
(IDX files), ``cifar10`` (the python-pickle batches, read by a restricted
unpickler that cannot run code), or a path: a folder of PNG/JPEG/TIFF images
(searched recursively, sorted, hidden files skipped) or a ``.npz``/``.npy`` array.

Every loader returns float32 images ``(N, C, H, W)`` in ``[0, 1]``. Optional
preprocessing, in this order: luminance (``grayscale``), centre crop to a square
(``center_crop``), antialiased bilinear resize to ``resolution x resolution``.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BiasgenError
from .loaders import folder_labels, load_array, load_cifar10, load_digits, load_fashion_mnist, load_folder, preprocess

NAMED_DATA = ("digits", "fashion-mnist", "cifar10")
SCALE_MODES = ("minus1to1", "center")
MAX_DUPLICATE_EXAMPLES = 5


@dataclass
class ImageData:
    """A loaded image set, before scaling.

    images: ``(N, C, H, W)`` float32 in ``[0, 1]``; labels: ``(N,)`` long or None.
    """

    images: torch.Tensor
    name: str  # 'digits', 'fashion-mnist', 'cifar10', 'folder' or 'array'
    source: str  # the file or folder read, or 'sklearn bundled'
    labels: torch.Tensor | None = None  # a folder's labels: its sub-folders in sorted order, when every image is in one
    preprocessing: dict = field(default_factory=dict)  # resolution, grayscale, center_crop, limit
    names: list[str] | None = None  # file paths relative to the folder, for a folder of images


@dataclass
class Splits:
    """K pairwise-disjoint training splits and a test set drawn from one seeded permutation.

    train: K tensors ``(n, C, H, W)``; test: ``(n_test, C, H, W)``;
    train_index / test_index: the matching ``(n,)`` / ``(n_test,)`` indices into the pool.
    """

    train: list[torch.Tensor]
    test: torch.Tensor
    train_index: list[torch.Tensor]
    test_index: torch.Tensor
    seed: int
    duplicates: dict = field(default_factory=dict)  # see find_exact_duplicates
    train_labels: list[torch.Tensor] | None = None  # class splits (make_class_splits): (n,) labels per split
    test_labels: torch.Tensor | None = None  # and (n_test,)
    groups: dict | None = None  # grouped splits: group counts (see biasgen.images.groups)


# -- loading -------------------------------------------------------------------


def load_images(
    data: str,
    *,
    data_dir: str | None = None,  # folder holding the fashion-mnist or cifar10 files
    resolution: int | None = None,  # side R of the square output; None keeps the native size
    grayscale: bool = False,  # convert RGB to luminance (1 channel)
    center_crop: bool = True,  # crop to a centred square before resizing (only with resolution)
    limit: int | None = None,  # keep the first `limit` images (after sorting)
) -> ImageData:
    """Load ``data`` (a name in NAMED_DATA or a path) as ``(N, C, H, W)`` float32 in [0, 1]."""
    if resolution is not None and resolution < 1:
        raise BiasgenError(f"--resolution must be a positive number of pixels, got {resolution}.")
    if limit is not None and limit < 1:
        raise BiasgenError(f"--limit must be at least 1, got {limit}; leave it out to use all images.")
    options = dict(resolution=resolution, grayscale=grayscale, center_crop=center_crop)
    data, names = str(data), None
    if data in NAMED_DATA:
        name = data
        x, labels, source = {"digits": load_digits, "fashion-mnist": load_fashion_mnist,
                             "cifar10": load_cifar10}[data](data_dir)
        x, labels = x[:limit], None if labels is None else labels[:limit]
        x = preprocess(x, **options)
    else:
        path = Path(data).expanduser()
        if not path.exists():
            raise BiasgenError(
                f"--data '{data}' is neither a known data set ({', '.join(NAMED_DATA)}) nor an existing "
                "file or folder; pick one of those names, or give the path of a folder of PNG/JPEG "
                "images or of a .npz/.npy file.")
        if path.is_dir():
            name, source = "folder", str(path)
            x, names = load_folder(path, limit, **options)
            labels = folder_labels(path, limit)
        elif path.suffix.lower() in (".npz", ".npy"):
            name, source = "array", str(path)
            x, labels = load_array(path)
            x, labels = x[:limit], None if labels is None else labels[:limit]
            x = preprocess(x, **options)
        else:
            raise BiasgenError(
                f"cannot read '{path}': --data takes a folder of PNG/JPEG/TIFF images or a .npz/.npy file; "
                "put single images in a folder and pass the folder.")
    return ImageData(x.contiguous(), name, source, labels, dict(options, limit=limit), names)


def keep_classes(images: ImageData, classes: tuple[int, ...]) -> ImageData:
    """``images`` restricted to the labels ``classes`` (all of them when empty); file names follow."""
    if not classes:
        return images
    if images.labels is None:
        raise BiasgenError(f"--classes needs a labelled data set (digits, fashion-mnist, cifar10, a .npz with labels); "
                           f"{images.source} has no labels.")
    keep = torch.isin(images.labels, torch.tensor(classes))
    names = images.names or [str(i) for i in range(len(images.images))]
    return dataclasses.replace(images, images=images.images[keep], labels=images.labels[keep],
                               names=[n for n, k in zip(names, keep.tolist()) if k],
                               preprocessing=dict(images.preprocessing, classes=list(classes)))


def scale_images(x01: torch.Tensor, mode: str = "minus1to1",
                 reference: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Map ``(N, C, H, W)`` images in [0, 1] to the network's input range.

    ``'minus1to1'``: ``2x - 1``; the returned mean is None.
    ``'center'``: subtract the mean image ``(C, H, W)`` of ``reference`` (default: ``x01`` itself), as the
    paper does for CelebA; pass the training images as ``reference`` and record the returned mean.
    Invert with :func:`unscale_images`.
    """
    if mode == "minus1to1":
        return 2.0 * x01 - 1.0, None
    if mode == "center":
        mean = (x01 if reference is None else reference).mean(0)
        return x01 - mean, mean
    raise BiasgenError(f"unknown scaling '{mode}'; choose one of {', '.join(SCALE_MODES)}.")


def unscale_images(x: torch.Tensor, mode: str = "minus1to1", mean: torch.Tensor | None = None) -> torch.Tensor:
    """Exact inverse of :func:`scale_images` (clamp to [0, 1] yourself for display)."""
    if mode == "minus1to1":
        return (x + 1.0) / 2.0
    if mode == "center":
        if mean is None:
            raise BiasgenError("unscaling 'center' images needs the mean image that scale_images returned.")
        return x + mean
    raise BiasgenError(f"unknown scaling '{mode}'; choose one of {', '.join(SCALE_MODES)}.")


# -- splits -------------------------------------------------------------------------------


def make_splits(images: torch.Tensor, n: int, k: int, n_test: int, seed: int) -> Splits:
    """Permute the pool ``(N, C, H, W)`` once with ``seed``; split i is block ``[i*n, (i+1)*n)``.

    The test set is the last ``n_test`` items of the permutation, so it does not change with n or K.
    """
    total = len(images)
    if k < 2:
        raise BiasgenError(f"the twin audit needs at least 2 splits, got K={k}; pass --splits 2 or more.")
    if n < 1:
        raise BiasgenError(f"the split size must be at least 1, got n={n}; pass --n 1 or more.")
    if n_test < 1:
        raise BiasgenError(f"the test set must hold at least 1 image, got {n_test}; raise the test size.")
    if n * k + n_test > total:
        raise BiasgenError(
            f"n*K + test = {n}*{k} + {n_test} = {n * k + n_test} images are needed but the data holds only "
            f"{total}; reduce --n (at most {max(0, (total - n_test) // k)} with K={k} and this test size), "
            "--splits or the test size, or use more data.")
    perm = torch.randperm(total, generator=torch.Generator().manual_seed(int(seed)))
    train_index = [perm[i * n:(i + 1) * n] for i in range(k)]
    test_index = perm[total - n_test:]
    splits = Splits([images[i] for i in train_index], images[test_index], train_index, test_index, int(seed))
    splits.duplicates = find_exact_duplicates(splits)
    return splits


def make_class_splits(images: torch.Tensor, labels: torch.Tensor, n: int, k: int, n_test: int, seed: int) -> Splits:
    """Class-balanced splits: like :func:`make_splits`, but every split holds the same number of images of each
    class (the classes' shares of the pool, rounded by largest remainder), and so does the test set's first ``n``.

    ``labels``: ``(N,)`` long in ``0..C-1``. Each class's images are taken in the order of the one seeded
    permutation, so no image (and no label) is in two sets. Every class needs at least 2 images per split
    (the second-nearest distance of f_mem).
    """
    if n * k + n_test > len(images):
        return make_splits(images, n, k, n_test, seed)  # its error names the fix
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(int(seed)))
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    per_split, per_test = _largest_remainder(counts, n), _largest_remainder(counts, n_test)
    short = [c for c in range(len(counts)) if per_split[c] < 2]
    if short:
        raise BiasgenError(
            f"class {short[0]} would have {per_split[short[0]]} image(s) in each split of n={n} ({len(counts)} classes, "
            f"{int(counts[short[0]])} images of that class); every class needs at least 2 per split: raise --n to at "
            f"least {int(2 * counts.sum() / counts[short[0]]) + 1}, or leave out the rare classes.")
    short = [c for c in range(len(counts)) if per_test[c] < 2]
    if short:
        raise BiasgenError(
            f"class {short[0]} would have {per_test[short[0]]} image(s) in the test set of {n_test}; every class needs "
            f"at least 2 there (copies are counted within a class): raise --n-test to at least "
            f"{int(2 * counts.sum() / counts[short[0]]) + 1}.")
    rank = torch.empty_like(perm)
    rank[perm] = torch.arange(len(perm))
    train, head, tail = [[] for _ in range(k)], [], []
    for c in range(len(counts)):
        members = perm[labels[perm] == c]  # class c in permutation order
        if k * per_split[c] + per_test[c] > len(members):
            raise BiasgenError(
                f"class {c} has {len(members)} images, fewer than the {k * per_split[c] + per_test[c]} that {k} "
                f"class-balanced splits of n={n} and a test set of {n_test} take from it; reduce --n or --n-test.")
        for i in range(k):
            train[i].append(members[i * per_split[c]:(i + 1) * per_split[c]])
        test_c = members[len(members) - per_test[c]:]
        head.append(test_c[:per_split[c]])
        tail.append(test_c[per_split[c]:])
    train_index = [_in_order(parts, rank) for parts in train]
    test_index = torch.cat([_in_order(head, rank), _in_order(tail, rank)])  # the first n: balanced like a split
    splits = Splits([images[i] for i in train_index], images[test_index], train_index, test_index, int(seed),
                    train_labels=[labels[i] for i in train_index], test_labels=labels[test_index])
    splits.duplicates = find_exact_duplicates(splits)
    return splits


def _in_order(parts: list[torch.Tensor], rank: torch.Tensor) -> torch.Tensor:
    """The pool indices of ``parts`` joined, in the order of the permutation (``rank[i]``: position of image i)."""
    index = torch.cat(parts)
    return index[rank[index].argsort()]


def _largest_remainder(counts: torch.Tensor, total: int) -> list[int]:
    """``total`` shared among classes in proportion to ``counts`` (Hamilton's largest-remainder rounding)."""
    quota = counts.double() * total / counts.sum()
    share = quota.floor().long()
    extra = (quota - share).argsort(descending=True)[: total - int(share.sum())]
    share[extra] += 1
    return share.tolist()


def find_exact_duplicates(splits: Splits) -> dict:
    """Byte-identical images across splits and between splits and the test set (a report, not an error).

    Counts are numbers of image pairs of each kind: ``split_split`` (two different splits),
    ``split_test``, ``within_split`` and ``within_test``. ``examples`` gives up to
    MAX_DUPLICATE_EXAMPLES pairs per kind as ``[[set, pool_index], [set, pool_index]]`` with set
    ``"split i"`` or ``"test"``.
    """
    sets = [(f"split {i}", x, idx) for i, (x, idx) in enumerate(zip(splits.train, splits.train_index))]
    sets.append(("test", splits.test, splits.test_index))
    groups = defaultdict(list)  # image hash -> [(set, pool index), ...]
    for name, x, idx in sets:
        for row, i in zip(x.reshape(len(x), -1).contiguous().numpy(), idx.tolist()):
            groups[hashlib.sha1(row.tobytes()).digest()].append((name, i))
    kinds = ("split_split", "split_test", "within_split", "within_test")
    counts, examples = dict.fromkeys(kinds, 0), {kind: [] for kind in kinds}
    for members in groups.values():
        by_set = defaultdict(list)  # set -> pool indices holding this image
        for name, i in members:
            by_set[name].append(i)
        names = list(by_set)
        for a, name_a in enumerate(names):
            for name_b in names[a:]:
                ia, ib = by_set[name_a], by_set[name_b]
                count = len(ia) * (len(ia) - 1) // 2 if name_a == name_b else len(ia) * len(ib)
                if count == 0:
                    continue
                kind = _pair_kind(name_a, name_b)
                counts[kind] += count
                if len(examples[kind]) < MAX_DUPLICATE_EXAMPLES:
                    examples[kind].append([[name_a, ia[0]], [name_b, ib[1 if name_a == name_b else 0]]])
    n_images = sum(len(members) for members in groups.values())
    return dict(counts, n_images=n_images, n_unique=len(groups), examples=examples)


def _pair_kind(a: str, b: str) -> str:
    if a == "test" and b == "test":
        return "within_test"
    if "test" in (a, b):
        return "split_test"
    return "within_split" if a == b else "split_split"


def describe(data: ImageData, splits: Splits) -> dict:
    """JSON-serialisable record of the data and its splits, for summary.json."""
    return dict(
        name=data.name,
        source=data.source,
        n_images=len(data.images),
        shape=list(data.images.shape[1:]),
        preprocessing=data.preprocessing,
        n=len(splits.train[0]),
        k=len(splits.train),
        n_test=len(splits.test),
        seed=splits.seed,
        duplicates=splits.duplicates,
        **({} if splits.train_labels is None else
           {"class_counts_per_split": torch.bincount(splits.train_labels[0]).tolist(),
            "class_counts_test": torch.bincount(splits.test_labels).tolist()}),
        **({"groups": splits.groups} if splits.groups else {}),
    )
