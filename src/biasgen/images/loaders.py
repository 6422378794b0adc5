"""Image file formats and preprocessing: each reader returns float32 images ``(N, C, H, W)`` in ``[0, 1]``.

Readers: scikit-learn's bundled 8x8 digits, Fashion-MNIST IDX files, the CIFAR-10
python batches (through a restricted unpickler that cannot run code), a folder
of PNG/JPEG/TIFF images (8- or 16-bit, scaled by their true full scale; palette
and transparency on white: :func:`image_pixels`), a ``.npz``/``.npy`` array. Preprocessing, in this order:
luminance (``grayscale``), centre crop to a square, antialiased bilinear resize.
:func:`biasgen.images.data.load_images` picks the reader.
"""
from __future__ import annotations

import codecs
import gzip
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BiasgenError
from ..runs import progress_bar

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights, as PIL's "L" mode


def load_digits(data_dir: str | None):
    """scikit-learn's bundled 8x8 digits: values 0..16 mapped to [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images).float().div(16.0).unsqueeze(1)
    return x, torch.from_numpy(d.target).long(), "sklearn bundled"


def load_fashion_mnist(data_dir: str | None):
    """Train then t10k images from IDX files (gzipped or not): ``(70000, 1, 28, 28)`` for the full set."""
    folder = Path(data_dir or FASHION_MNIST_DIR).expanduser()
    images = [_find_idx(folder, f"{part}-images-idx3-ubyte") for part in ("train", "t10k")]
    labels = [_find_idx(folder, f"{part}-labels-idx1-ubyte") for part in ("train", "t10k")]
    if None in images:
        raise BiasgenError(
            f"Fashion-MNIST not found in {folder} (looked for train-images-idx3-ubyte[.gz] and "
            "t10k-images-idx3-ubyte[.gz]); install it with `sudo apt-get install dataset-fashion-mnist` "
            "or pass --data-dir DIR, a folder holding those IDX files.")
    x = np.concatenate([_read_idx(p, ndim=3) for p in images])
    y = None if None in labels else np.concatenate([_read_idx(p, ndim=1) for p in labels])
    if y is not None and len(y) != len(x):
        raise BiasgenError(f"Fashion-MNIST in {folder} has {len(x)} images but {len(y)} labels; "
                           "replace the damaged IDX files with fresh copies.")
    return _uint8_to_float(x[:, None]), None if y is None else torch.from_numpy(y).long(), str(folder)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (magic 0x00 0x00 0x08 ndim, big-endian int32 sizes)."""
    try:
        raw = (gzip.open if path.suffix == ".gz" else open)(path, "rb").read()
    except OSError as e:
        raise BiasgenError(f"cannot read IDX file {path} ({e}); replace it with a fresh copy.") from e
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise BiasgenError(f"{path} is not an IDX file of {ndim}-D unsigned bytes (bad magic number "
                           f"{raw[:4].hex()}); replace it with the original file.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = raw[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)):
        raise BiasgenError(f"{path} is truncated: header says shape {shape} but it holds {len(body)} bytes; "
                           "replace it with a complete copy.")
    return np.frombuffer(body, dtype=np.uint8).reshape(shape)


class _CifarUnpickler(pickle.Unpickler):
    """Resolves only the globals a CIFAR-10 batch needs (numpy arrays); anything else is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy._core.multiarray", "_reconstruct"): np.ndarray.__reduce__(np.zeros(0))[0],
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # how Python 3 writes bytes at pickle protocol 2
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load global '{module}.{name}'")
        return self.ALLOWED[(module, name)]


def load_cifar10(data_dir: str | None):
    """data_batch_1..5 then test_batch: ``(60000, 3, 32, 32)`` for the full set."""
    if data_dir is None:
        raise BiasgenError("cifar10 needs --data-dir DIR: the folder cifar-10-batches-py (or its parent) "
                           "unpacked from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz.")
    folder = Path(data_dir).expanduser()
    if (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    files = [folder / f"data_batch_{i}" for i in range(1, 6)] + [folder / "test_batch"]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise BiasgenError(f"CIFAR-10 batches missing in {folder}: {', '.join(missing)}; pass --data-dir the "
                           "folder cifar-10-batches-py from the python version of CIFAR-10.")
    xs, ys = zip(*(_read_cifar_batch(f) for f in files))
    return _uint8_to_float(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)).long(), str(folder)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch: images ``(m, 3, 32, 32)`` uint8 and labels ``(m,)``."""
    try:
        with open(path, "rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError) as e:
        raise BiasgenError(f"cannot read CIFAR-10 batch {path}: {e}; only the original python-pickle "
                           "batches are accepted (they contain nothing but arrays), so replace the file.") from e
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()} if isinstance(batch, dict) else {}
    x, y = batch.get("data"), batch.get("labels")
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 \
            or y is None or len(y) != len(x):
        raise BiasgenError(f"{path} is not a CIFAR-10 batch (expected a dict with 'data' uint8 (m, 3072) "
                           "and m 'labels'); replace it with the original file.")
    return x.reshape(-1, 3, 32, 32), np.asarray(y, dtype=np.int64)


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``: recursive, sorted by path, hidden files skipped."""
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())


def folder_labels(folder: Path, limit: int | None) -> torch.Tensor | None:
    """``(N,)`` class labels of :func:`load_folder`'s images: the index of each image's sub-folder of ``folder``
    among the sorted sub-folders (one sub-folder per class); None when some image lies directly in ``folder``."""
    classes = [p.relative_to(folder).parts[0] if len(p.relative_to(folder).parts) > 1 else None
               for p in image_files(folder)[:limit]]
    if not classes or None in classes:
        return None
    names = sorted(set(classes))
    return torch.tensor([names.index(c) for c in classes], dtype=torch.long)


def load_folder(folder: Path, limit: int | None, **options) -> tuple[torch.Tensor, list[str]]:
    """PNG/JPEG/TIFF files under ``folder`` (recursive, sorted by path), each preprocessed as it is read, and their
    paths relative to ``folder``."""
    files = image_files(folder)
    if not files:
        raise BiasgenError(f"no PNG/JPEG/TIFF images found in {folder} (searched recursively); put .png/.jpg/.tif "
                           "files there, or pass a .npz/.npy file or a data set name.")
    from PIL import Image

    images, first_size = [], None
    for path in progress_bar(files[:limit], len(files[:limit]) >= 2000, "reading images"):
        try:
            with Image.open(path) as img:
                img.load()
                pixels = image_pixels(img, path)
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise BiasgenError(f"cannot read image {path} ({e}); remove or replace that file.") from e
        if options["resolution"] is None:
            first_size = first_size or (img.size, path)
            if img.size != first_size[0]:
                (w0, h0), p0 = first_size
                raise BiasgenError(
                    f"images differ in size: {p0} is {w0}x{h0} but {path} is {img.size[0]}x{img.size[1]} "
                    "(width x height); pass --resolution R to centre-crop and resize them all to RxR.")
        images.append(preprocess(torch.from_numpy(pixels)[None], **options)[0])
    channels = max(x.shape[0] for x in images)  # gray images join RGB ones as 3 equal channels
    names = [path.relative_to(folder).as_posix() for path in files[:limit]]
    return torch.stack([x.expand(channels, -1, -1) for x in images]), names


def image_pixels(img, path: Path) -> np.ndarray:
    """The pixels of a PIL image as float32 ``(C, H, W)`` in [0, 1], C = 1 (gray) or 3 (colour), each depth
    scaled by its true full scale: 8-bit by 255, 16-bit by 65535; float images must lie in [0, 1].

    Transparent pixels are composited on white (what a viewer shows); a palette becomes its colours.
    Values are never clipped: an image whose full scale is unknown (32-bit integers) is refused.
    """
    mode = img.mode
    if mode.startswith("I;16"):
        return np.asarray(img, dtype=np.float32)[None] / 65535.0
    if mode == "I" and img.format == "PNG":  # how some Pillow versions open 16-bit gray PNGs
        return np.asarray(img, dtype=np.float32)[None] / 65535.0
    if mode == "I":
        raise ValueError("32-bit integer pixels have no fixed full scale; save the image with 8 or 16 bits")
    if mode == "F":
        x = np.asarray(img, dtype=np.float32)[None]
        if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
            raise ValueError(f"float pixels must lie in [0, 1], found {np.nanmin(x):.4g}..{np.nanmax(x):.4g}")
        return x
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode not in ("1", "L", "LA", "La", "RGB", "RGBA", "RGBa", "PA"):
        img = img.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBX
    if img.mode in ("PA", "La", "RGBa"):
        img = img.convert("RGBA")
    x = np.asarray(img.convert("L") if img.mode == "1" else img, dtype=np.float32) / 255.0
    x = x[..., None] if x.ndim == 2 else x
    if img.mode in ("LA", "RGBA"):  # composite on white
        colour, alpha = x[..., :-1], x[..., -1:]
        x = colour * alpha + (1.0 - alpha)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def load_array(path: Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A ``.npy`` or ``.npz`` array: (N,H,W), (N,H,W,C) or (N,C,H,W) with C in {1, 3}."""
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            arr, labels = loaded, None
        else:
            with loaded:
                keys = list(loaded.keys())
                key = next((k for k in ("images", "x") if k in keys), keys[0] if len(keys) == 1 else None)
                if key is None:
                    raise BiasgenError(f"{path} holds arrays {keys} but none is called 'images' or 'x'; "
                                       "save the images under the key 'images'.")
                arr = loaded[key]
                label_key = next((k for k in ("labels", "y") if k in keys), None)
                labels = loaded[label_key] if label_key else None
    except (OSError, ValueError, EOFError) as e:
        raise BiasgenError(f"cannot read {path} ({e}); save it with numpy.save/savez of a plain numeric "
                           "array (pickled objects are refused).") from e
    return _array_to_images(arr, path), _array_labels(labels, len(arr), path)


def _array_to_images(arr: np.ndarray, path: Path) -> torch.Tensor:
    if arr.ndim == 3:
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3):
        arr = arr.transpose(0, 3, 1, 2)
    elif not (arr.ndim == 4 and arr.shape[1] in (1, 3)):
        raise BiasgenError(f"{path} has shape {arr.shape}; expected (N, H, W), (N, H, W, C) or (N, C, H, W) "
                           "with C = 1 or 3 channels; reshape it before saving.")
    if len(arr) == 0:
        raise BiasgenError(f"{path} holds no images (shape {arr.shape}); save a non-empty array.")
    if arr.dtype == np.uint8:
        return _uint8_to_float(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise BiasgenError(f"{path} has dtype {arr.dtype}; save uint8 values in 0..255 or floats in [0, 1].")
    x = torch.tensor(arr, dtype=torch.float32)
    if not bool(torch.isfinite(x).all()) or x.min() < 0 or x.max() > 1:
        raise BiasgenError(f"{path} has float values outside [0, 1] (min {x.min().item():.4g}, max "
                           f"{x.max().item():.4g}); rescale to [0, 1] or save uint8 values in 0..255.")
    return x


def _array_labels(labels: np.ndarray | None, n: int, path: Path) -> torch.Tensor | None:
    if labels is None:
        return None
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise BiasgenError(f"{path} has labels of shape {labels.shape} and dtype {labels.dtype}; they must "
                           f"be {n} integers, one per image (or leave them out).")
    return torch.from_numpy(labels.astype(np.int64))


def _uint8_to_float(arr: np.ndarray) -> torch.Tensor:
    return torch.tensor(arr, dtype=torch.float32).div_(255.0)


# -- pure tensor transforms ----------------------------------------------------------


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luminance of ``(N, 3, H, W)`` -> ``(N, 1, H, W)``; one-channel input is returned as is."""
    if x.shape[1] == 1:
        return x
    return torch.einsum("nchw,c->nhw", x, x.new_tensor(LUMA)).unsqueeze(1)


def resize_images(x: torch.Tensor, resolution: int, center_crop: bool = True) -> torch.Tensor:
    """``(N, C, H, W)`` in [0, 1] -> ``(N, C, R, R)``: optional centred square crop, then antialiased bilinear resize."""
    if center_crop:
        h, w = x.shape[-2:]
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[..., top:top + s, left:left + s]
    if tuple(x.shape[-2:]) != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(0.0, 1.0)


def preprocess(x: torch.Tensor, resolution: int | None = None, grayscale: bool = False,
               center_crop: bool = True) -> torch.Tensor:
    """The loader's options on ``(N, C, H, W)`` in [0, 1]: luminance, then crop and resize."""
    if grayscale:
        x = to_grayscale(x)
    if resolution is not None:
        x = resize_images(x, resolution, center_crop)
    return x
