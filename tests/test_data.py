"""Data layer: loaders, preprocessing, scaling, splits and duplicate reports (docs/method.md §2)."""
import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from biasgen.images.data import Splits, describe, find_exact_duplicates, load_images, make_splits, scale_images, unscale_images
from biasgen.images.loaders import FASHION_MNIST_DIR, resize_images, to_grayscale
from biasgen.errors import BiasgenError

rng = np.random.default_rng(0)


# -- helpers that write tiny data sets -------------------------------------------------------------


def write_idx(path: Path, arr: np.ndarray, gz: bool):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    (gzip.open if gz else open)(path, "wb").write(header + arr.astype(np.uint8).tobytes())


def write_fashion(folder: Path, gz_train: bool = True, gz_test: bool = False):
    train = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    sfx = lambda gz: ".gz" if gz else ""  # noqa: E731
    write_idx(folder / f"train-images-idx3-ubyte{sfx(gz_train)}", train, gz_train)
    write_idx(folder / f"t10k-images-idx3-ubyte{sfx(gz_test)}", test, gz_test)
    write_idx(folder / "train-labels-idx1-ubyte", np.arange(5) % 10, False)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.arange(3) + 7, True)
    return np.concatenate([train, test])


def write_cifar(folder: Path, m: int = 4):
    folder.mkdir(parents=True)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (m, 3072), dtype=np.uint8)
        labels = list(rng.integers(0, 10, m))
        batch = {b"batch_label": name.encode(), b"labels": [int(y) for y in labels], b"data": data,
                 b"filenames": [b"x.png"] * m}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches.append((data, labels))
    return batches


def write_png(path: Path, arr: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# -- named data sets ----------------------------------------------------------------


def test_digits_bundled():
    d = load_images("digits")
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == torch.float32
    assert d.images.min() == 0 and d.images.max() == 1
    assert d.labels.shape == (1797,) and d.labels[:3].tolist() == [0, 1, 2]
    assert d.name == "digits" and d.source == "sklearn bundled"
    small = load_images("digits", resolution=16, limit=10)
    assert small.images.shape == (10, 1, 16, 16) and small.labels.shape == (10,)


def test_fashion_mnist_idx_gz_and_plain(tmp_path):
    raw = write_fashion(tmp_path)
    d = load_images("fashion-mnist", data_dir=str(tmp_path))
    assert d.images.shape == (8, 1, 28, 28)
    torch.testing.assert_close(d.images[:, 0], torch.from_numpy(raw).float() / 255)  # train first, then t10k
    assert d.labels.tolist() == [0, 1, 2, 3, 4, 7, 8, 9]
    d = load_images("fashion-mnist", data_dir=str(tmp_path), resolution=14, limit=6)
    assert d.images.shape == (6, 1, 14, 14) and d.labels.shape == (6,)


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(BiasgenError, match="apt-get install dataset-fashion-mnist") as e:
        load_images("fashion-mnist", data_dir=str(tmp_path))
    assert "--data-dir" in str(e.value)


def test_fashion_mnist_bad_magic_and_truncated(tmp_path):
    write_fashion(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x0d\x03" + b"\x00" * 20)
    with pytest.raises(BiasgenError, match="t10k-images-idx3-ubyte.*magic.*replace"):
        load_images("fashion-mnist", data_dir=str(tmp_path))
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28)), False)
    with open(tmp_path / "t10k-images-idx3-ubyte", "r+b") as f:
        f.truncate(100)
    with pytest.raises(BiasgenError, match="truncated"):
        load_images("fashion-mnist", data_dir=str(tmp_path))


def test_cifar10_batches(tmp_path):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    d = load_images("cifar10", data_dir=str(tmp_path))  # the parent folder works too
    assert d.images.shape == (24, 3, 32, 32) and d.name == "cifar10"
    first = torch.from_numpy(batches[0][0][0].reshape(3, 32, 32)).float() / 255
    torch.testing.assert_close(d.images[0], first)
    assert d.labels.tolist() == [y for _, ys in batches for y in ys]
    gray = load_images("cifar10", data_dir=str(tmp_path / "cifar-10-batches-py"), grayscale=True, resolution=8)
    assert gray.images.shape == (24, 1, 8, 8)


def test_cifar10_needs_data_dir(tmp_path):
    with pytest.raises(BiasgenError, match="--data-dir"):
        load_images("cifar10")
    with pytest.raises(BiasgenError, match="test_batch.*--data-dir"):
        write_cifar(tmp_path / "c")
        (tmp_path / "c" / "test_batch").unlink()
        load_images("cifar10", data_dir=str(tmp_path / "c"))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_cifar10_malicious_pickle_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar(folder)
    marker = tmp_path / "pwned"
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": _Evil(marker)}, protocol=2))
    with pytest.raises(BiasgenError, match="data_batch_3.*refused.*system"):
        load_images("cifar10", data_dir=str(tmp_path))
    assert not marker.exists()
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(BiasgenError, match="data_batch_3.*replace"):
        load_images("cifar10", data_dir=str(tmp_path))


# -- folders ------------------------------------------------------------------------------------


def test_folder_recursive_sorted_mixed_modes(tmp_path):
    a = np.stack(np.meshgrid(np.arange(6) * 40, np.arange(6) * 30, indexing="ij") + (np.full((6, 6), 90),), -1)
    a = a.astype(np.uint8)  # smooth, so the JPEG copy stays close
    b = rng.integers(0, 256, (6, 6), dtype=np.uint8)
    write_png(tmp_path / "b" / "z.png", a)  # sorted by path: a.png, b/z.png, c.jpg
    write_png(tmp_path / "a.png", b)
    Image.fromarray(a).save(tmp_path / "c.jpg", quality=95)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "._a.png").write_bytes(b"macOS metadata")  # hidden files are skipped
    d = load_images(str(tmp_path))
    assert d.name == "folder" and d.labels is None and d.images.shape == (3, 3, 6, 6)
    torch.testing.assert_close(d.images[0], torch.from_numpy(b).float().div(255).expand(3, 6, 6))  # gray -> 3 equal channels
    torch.testing.assert_close(d.images[1], torch.from_numpy(a).float().div(255).permute(2, 0, 1))
    assert (d.images[2] - d.images[1]).abs().mean() < 0.1  # the JPEG copy, lossy
    g = load_images(str(tmp_path), grayscale=True, limit=2)
    assert g.images.shape == (2, 1, 6, 6)
    torch.testing.assert_close(g.images[1], to_grayscale(d.images[1:2])[0])


def test_folder_mixed_sizes_need_resolution(tmp_path):
    write_png(tmp_path / "a.png", np.zeros((8, 8), np.uint8))
    write_png(tmp_path / "b.png", np.zeros((10, 12), np.uint8))
    with pytest.raises(BiasgenError, match=r"a\.png is 8x8.*b\.png is 12x10.*--resolution"):
        load_images(str(tmp_path))
    d = load_images(str(tmp_path), resolution=4)
    assert d.images.shape == (2, 1, 4, 4)


def test_folder_corrupt_and_empty(tmp_path):
    write_png(tmp_path / "good.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(BiasgenError, match=r"bad\.png.*remove or replace"):
        load_images(str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BiasgenError, match="no PNG/JPEG/TIFF images.*put"):
        load_images(str(tmp_path / "empty"))


# -- arrays ------------------------------------------------------------------------------------


def test_arrays_all_layouts(tmp_path):
    u8 = rng.integers(0, 256, (5, 7, 7), dtype=np.uint8)
    np.save(tmp_path / "a.npy", u8)
    d = load_images(str(tmp_path / "a.npy"))
    assert d.name == "array" and d.images.shape == (5, 1, 7, 7)
    torch.testing.assert_close(d.images[:, 0], torch.from_numpy(u8).float() / 255)
    nhwc = rng.random((4, 6, 6, 3)).astype(np.float32)
    np.savez(tmp_path / "b.npz", images=nhwc, other=np.zeros(2), labels=np.arange(4))
    d = load_images(str(tmp_path / "b.npz"))
    torch.testing.assert_close(d.images, torch.from_numpy(nhwc).permute(0, 3, 1, 2))
    assert d.labels.tolist() == [0, 1, 2, 3]
    np.savez(tmp_path / "c.npz", rng.random((3, 3, 5, 5)))  # the only array, NCHW float64
    assert load_images(str(tmp_path / "c.npz"), limit=2).images.shape == (2, 3, 5, 5)


@pytest.mark.parametrize("arr, match", [
    (np.full((2, 4, 4), 2.0), r"outside \[0, 1\].*rescale"),
    (np.full((2, 4, 4), np.nan), r"outside \[0, 1\]"),
    (np.zeros((2, 4, 4), np.int64), "dtype int64.*uint8"),
    (np.zeros((2, 4, 4, 5), np.uint8), r"shape \(2, 4, 4, 5\).*reshape"),
    (np.zeros((0, 4, 4), np.uint8), "no images"),
    (np.array([{"a": 1}], dtype=object), "pickled objects are refused"),
])
def test_bad_arrays(tmp_path, arr, match):
    np.save(tmp_path / "x.npy", arr, allow_pickle=True)
    with pytest.raises(BiasgenError, match=match):
        load_images(str(tmp_path / "x.npy"))


def test_npz_without_image_key(tmp_path):
    np.savez(tmp_path / "x.npz", foo=np.zeros((2, 4, 4)), bar=np.zeros(2))
    with pytest.raises(BiasgenError, match="key 'images'"):
        load_images(str(tmp_path / "x.npz"))


def test_unknown_name_missing_path_bad_options(tmp_path):
    with pytest.raises(BiasgenError, match="neither a known data set.*digits.*path"):
        load_images("mnist")
    with pytest.raises(BiasgenError, match="neither a known data set"):
        load_images(str(tmp_path / "nope"))
    (tmp_path / "x.csv").write_text("1,2")
    with pytest.raises(BiasgenError, match="folder of PNG/JPEG/TIFF images or a .npz/.npy"):
        load_images(str(tmp_path / "x.csv"))
    with pytest.raises(BiasgenError, match="--resolution"):
        load_images("digits", resolution=0)
    with pytest.raises(BiasgenError, match="--limit"):
        load_images("digits", limit=0)


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_smoke():
    d = load_images("fashion-mnist", resolution=16, limit=100)
    assert d.images.shape == (100, 1, 16, 16) and 0 <= d.images.min() < d.images.max() <= 1


# -- pure transforms ------------------------------------------------------------------------------


def test_grayscale_and_resize():
    x = torch.zeros(1, 3, 2, 2)
    x[0, 1] = 1.0  # pure green
    torch.testing.assert_close(to_grayscale(x), torch.full((1, 1, 2, 2), 0.587))
    stripe = torch.zeros(1, 1, 4, 8)
    stripe[..., :2] = 1.0  # only outside the centred 4x4 square
    assert resize_images(stripe, 4).abs().max() == 0
    assert resize_images(stripe, 4, center_crop=False).max() > 0.5
    ramp = torch.linspace(0, 1, 32).expand(1, 1, 32, 32)
    small = resize_images(ramp, 8)
    assert small.shape == (1, 1, 8, 8) and 0 <= small.min() and small.max() <= 1
    assert abs(small.mean().item() - ramp.mean().item()) < 1e-3
    torch.testing.assert_close(resize_images(torch.full((2, 3, 5, 7), 0.3), 16), torch.full((2, 3, 16, 16), 0.3))


def test_scaling_and_inverse():
    x = torch.rand(10, 1, 4, 4)
    y, mean = scale_images(x)
    assert mean is None and y.min() >= -1 and y.max() <= 1
    torch.testing.assert_close(unscale_images(y), x)
    y, mean = scale_images(x, "center", reference=x[:6])
    assert mean.shape == (1, 4, 4)
    torch.testing.assert_close(y[:6].mean(0), torch.zeros(1, 4, 4), atol=1e-6, rtol=0)
    torch.testing.assert_close(unscale_images(y, "center", mean), x)
    with pytest.raises(BiasgenError, match="minus1to1"):
        scale_images(x, "zscore")
    with pytest.raises(BiasgenError, match="mean image"):
        unscale_images(y, "center")


# -- splits ---------------------------------------------------------------------------------------


def pool(n=60):
    return torch.rand(n, 1, 3, 3, generator=torch.Generator().manual_seed(1))


def test_splits_follow_one_seeded_permutation():
    x = pool()
    s = make_splits(x, n=10, k=3, n_test=15, seed=7)
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(7))
    for i in range(3):
        assert s.train_index[i].tolist() == perm[i * 10:(i + 1) * 10].tolist()
        torch.testing.assert_close(s.train[i], x[s.train_index[i]])
    assert s.test_index.tolist() == perm[-15:].tolist()
    torch.testing.assert_close(s.test, x[s.test_index])
    used = torch.cat(s.train_index + [s.test_index])
    assert len(set(used.tolist())) == 45  # pairwise disjoint, test disjoint from every split
    again = make_splits(x, n=10, k=3, n_test=15, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(s.train_index, again.train_index))
    other = make_splits(x, n=10, k=3, n_test=15, seed=8)
    assert not torch.equal(s.train_index[0], other.train_index[0])


def test_test_set_independent_of_n_and_k():
    x = pool()
    a = make_splits(x, n=10, k=2, n_test=15, seed=3)
    b = make_splits(x, n=20, k=2, n_test=15, seed=3)
    c = make_splits(x, n=5, k=4, n_test=15, seed=3)
    assert torch.equal(a.test_index, b.test_index) and torch.equal(a.test_index, c.test_index)
    assert torch.equal(a.train_index[0], b.train_index[0][:10])


@pytest.mark.parametrize("n, k, n_test, match", [
    (10, 1, 5, "at least 2 splits.*--splits"),
    (0, 2, 5, "n=0.*--n"),
    (10, 2, 0, "test set.*at least 1"),
    (30, 2, 5, r"30\*2 \+ 5 = 65.*only 60.*reduce --n \(at most 27"),
])
def test_split_errors(n, k, n_test, match):
    with pytest.raises(BiasgenError, match=match):
        make_splits(pool(), n=n, k=k, n_test=n_test, seed=0)


def test_planted_duplicates_are_reported():
    x = pool()
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(5))
    x[perm[10]] = x[perm[0]]  # split 0 <-> split 1
    x[perm[-1]] = x[perm[1]]  # split 0 <-> test
    x[perm[3]] = x[perm[2]]  # twice inside split 0
    x[perm[25]] = x[perm[26]]  # in the unused middle: ignored (n=10, k=2, n_test=20)
    s = make_splits(x, n=10, k=2, n_test=20, seed=5)
    dup = s.duplicates
    assert (dup["split_split"], dup["split_test"], dup["within_split"], dup["within_test"]) == (1, 1, 1, 0)
    assert dup["n_images"] == 40 and dup["n_unique"] == 37
    assert dup["examples"]["split_split"] == [[["split 0", int(perm[0])], ["split 1", int(perm[10])]]]
    assert dup["examples"]["split_test"] == [[["split 0", int(perm[1])], ["test", int(perm[-1])]]]
    assert json.loads(json.dumps(dup)) == dup
    clean = make_splits(pool(), n=10, k=2, n_test=20, seed=5).duplicates
    assert clean["split_split"] == clean["split_test"] == clean["within_split"] == 0


def test_duplicate_group_counts_pairs():
    img = torch.ones(1, 2, 2)
    idx = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    s = Splits([img.expand(2, 1, 2, 2)] * 2, img.expand(3, 1, 2, 2), idx, torch.tensor([4, 5, 6]), seed=0)
    dup = find_exact_duplicates(s)  # 7 copies of one image: 2 + 2 in splits, 3 in test
    assert (dup["split_split"], dup["split_test"], dup["within_split"], dup["within_test"]) == (4, 12, 2, 3)
    assert dup["n_unique"] == 1


def test_describe_is_json():
    d = load_images("digits", limit=100)
    s = make_splits(d.images, n=30, k=2, n_test=20, seed=0)
    rec = json.loads(json.dumps(describe(d, s)))
    assert rec["name"] == "digits" and rec["n_images"] == 100 and rec["shape"] == [1, 8, 8]
    assert (rec["n"], rec["k"], rec["n_test"], rec["seed"]) == (30, 2, 20, 0)
    assert rec["preprocessing"]["limit"] == 100 and "split_split" in rec["duplicates"]
