"""Fashion-MNIST: IDX reading, checksums, data-dir lookup, seeded batch order.

Checksums are SHA-256 of the decompressed IDX bytes, so a file verifies the
same whether it is stored gzip-compressed (as upstream and Debian ship it, each
compressed differently) or raw.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "FASHION_MNIST_DIR"
MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
INSTALL_HINT = (
    "install the Debian/Ubuntu package (`sudo apt-get update && sudo apt-get install "
    "dataset-fashion-mnist`, files land in /usr/share/datasets/fashion-mnist), or pass "
    f"--data-dir / set ${ENV_VAR} to a folder holding the four *-ubyte.gz files"
)

# part -> (file stem, SHA-256 of the decompressed IDX bytes, item count)
FILES = {
    "train_images": (
        "train-images-idx3-ubyte",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        60000,
    ),
    "train_labels": (
        "train-labels-idx1-ubyte",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        60000,
    ),
    "test_images": (
        "t10k-images-idx3-ubyte",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        10000,
    ),
    "test_labels": (
        "t10k-labels-idx1-ubyte",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        10000,
    ),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8}
PROBE_SEED = 20240101  # fixed: the probe set is the same for every run and seed


@dataclass
class Dataset:
    train_images: np.ndarray  # (N, 1, H, W) float in [0, 1]
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    source: str  # the folder read
    verified: bool  # True when every file matched the official checksum


def _file_for(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def read_idx_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"cannot read {path}: {exc}; the file is corrupt or truncated. To fix: {INSTALL_HINT}") from exc


def parse_idx(raw: bytes, path: Path | str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes (magic 0x0000TTDD, big-endian dims) into an array."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path} is not an IDX file (bad magic number)")
    dtype = _IDX_DTYPES.get(raw[2])
    if dtype is None:
        raise DataError(f"{path}: unsupported IDX element type 0x{raw[2]:02x} (Fashion-MNIST uses 0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated inside its header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(
            f"{path} holds {len(raw)} bytes but its header {dims} needs {expected}: "
            f"the file is truncated or corrupt. To fix: {INSTALL_HINT}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def find_data_dir(
    data_dir: str | os.PathLike | None = None, *, cache_dir: Path | None = None, download: bool = True
) -> Path:
    """--data-dir, then $FASHION_MNIST_DIR, then the Debian package, then the cache
    (downloading from the official mirror when the network allows)."""
    if data_dir is not None:
        path = Path(data_dir)
        if not path.is_dir():
            raise DataError(f"--data-dir {path} does not exist or is not a folder; {INSTALL_HINT}")
        return path
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR])
        if not path.is_dir():
            raise DataError(f"${ENV_VAR}={path} does not exist or is not a folder; {INSTALL_HINT}")
        return path
    if all(_file_for(DEBIAN_DIR, stem) for stem, _, _ in FILES.values()):
        return DEBIAN_DIR
    cache = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bn-compare" / "fashion-mnist"
    if all(_file_for(cache, stem) for stem, _, _ in FILES.values()):
        return cache
    if download:
        try:
            _download(cache)
            return cache
        except OSError as exc:
            raise DataError(
                f"Fashion-MNIST not found (looked in ${ENV_VAR}, {DEBIAN_DIR}, {cache}) "
                f"and the download from {MIRROR} failed ({exc}). To fix: {INSTALL_HINT}"
            ) from exc
    raise DataError(f"Fashion-MNIST not found (looked in ${ENV_VAR}, {DEBIAN_DIR}, {cache}). To fix: {INSTALL_HINT}")


def _download(cache: Path) -> None:
    """Fetch the four files into cache, each verified before it is moved in place."""
    cache.mkdir(parents=True, exist_ok=True)
    for stem, digest, _ in FILES.values():
        if _file_for(cache, stem):
            continue
        part = cache / (stem + ".gz.part")
        try:
            with urllib.request.urlopen(MIRROR + stem + ".gz", timeout=20) as response, open(part, "wb") as out:
                shutil.copyfileobj(response, out)
            with gzip.open(part, "rb") as fh:
                actual = hashlib.sha256(fh.read()).hexdigest()
            if actual != digest:
                raise OSError(f"downloaded {stem}.gz has the wrong checksum")
            os.replace(part, cache / (stem + ".gz"))
        finally:
            if part.exists():
                part.unlink()


def load_fashion_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    verify: bool = True,
    dtype: str = "float32",
    input_size: int = 28,
    image_size: int = 28,
    cache_dir: str | os.PathLike | None = None,
) -> Dataset:
    """Read the four files, check their checksums and shapes, resize the images to image_size (resized, cached in
    cache_dir, default cache_root()) where it is not 28, scale to [0, 1] (zero-padded to input_size)."""
    directory = find_data_dir(data_dir)
    arrays, digests = {}, {}
    for part, (stem, digest, count) in FILES.items():
        path = _file_for(directory, stem)
        if path is None:
            raise DataError(f"{directory} has no {stem}.gz (nor {stem}); {INSTALL_HINT}")
        raw = read_idx_bytes(path)
        if verify or image_size != 28:
            actual = digests[part] = hashlib.sha256(raw).hexdigest()
        if verify:
            if actual != digest:
                raise DataError(
                    f"checksum mismatch for {path}: expected SHA-256 {digest} of the decompressed "
                    f"file, got {actual}. The file is corrupt or not the official Fashion-MNIST; "
                    f"re-install it ({INSTALL_HINT}), or pass --no-verify-data for IDX files of your own"
                )
        array = parse_idx(raw, path)
        if verify and array.shape[0] != count:
            raise DataError(f"{path} holds {array.shape[0]} items, Fashion-MNIST has {count}")
        arrays[part] = array
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"{split} images {images.shape} and labels {labels.shape} do not match")
        if labels.size and labels.max() >= len(CLASSES):
            raise DataError(f"{split} labels hold {int(labels.max())}; Fashion-MNIST has 10 classes")
    if image_size != 28:
        for part in ("train_images", "test_images"):
            arrays[part] = resized(arrays[part], image_size, digests[part], cache_dir)
        input_size = image_size
    return Dataset(
        train_images=to_model_input(arrays["train_images"], dtype, input_size),
        train_labels=arrays["train_labels"].astype(np.int64),
        test_images=to_model_input(arrays["test_images"], dtype, input_size),
        test_labels=arrays["test_labels"].astype(np.int64),
        source=str(directory),
        verified=verify,
    )


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 (N, H, W) -> uint8 (N, size, size): each image resized by Pillow's bilinear filter on the 8-bit image,
    what the textbook's torchvision.transforms.Resize does to a PIL image (it calls Image.resize with
    Image.BILINEAR), before ToTensor scales it to [0, 1]."""
    from PIL import Image

    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i, image in enumerate(images):
        out[i] = np.asarray(Image.fromarray(image, mode="L").resize((size, size), Image.BILINEAR))
    return out


def cache_root() -> Path:
    """Where resized images are cached: $XDG_CACHE_HOME (or ~/.cache) / bn-compare / resized."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bn-compare" / "resized"


def resized(images: np.ndarray, size: int, source_digest: str, cache_dir=None) -> np.ndarray:
    """resize(images, size), read from the disk cache when it holds them for this source and size. The cache file
    is keyed by the source IDX file's SHA-256 (other or changed files get their own), holds the SHA-256 of its
    images beside them, and is used only when that checks out: a corrupted or half-written file is rebuilt, never
    used. Written atomically (a temporary file, then a rename)."""
    folder = Path(cache_dir) if cache_dir is not None else cache_root()
    path = folder / f"{source_digest[:32]}-{size}x{size}.npz"
    try:
        with np.load(path) as stored:
            cached, digest = stored["images"], str(stored["sha256"])
        if cached.dtype == np.uint8 and cached.shape == (len(images), size, size):
            if hashlib.sha256(cached.tobytes()).hexdigest() == digest:
                return cached
    except Exception:  # noqa: BLE001 - absent, unreadable, truncated or not ours (any reader error): build it again
        pass
    out = resize(images, size)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.part")
        with open(tmp, "wb") as fh:
            np.savez(fh, images=out, sha256=np.array(hashlib.sha256(out.tobytes()).hexdigest()))
        os.replace(tmp, path)
    except OSError:  # a read-only cache costs the resize next time, nothing else
        pass
    return out


def to_model_input(images: np.ndarray, dtype: str, input_size: int) -> np.ndarray:
    """uint8 (N, H, W) -> (N, 1, S, S) in [0, 1], zero-padded to S if larger."""
    height, width = images.shape[1:]
    if input_size < max(height, width):
        raise DataError(f"input_size {input_size} is smaller than the {height}x{width} images")
    out = np.zeros((images.shape[0], 1, input_size, input_size), dtype=dtype)
    top, left = (input_size - height) // 2, (input_size - width) // 2
    out[:, 0, top : top + height, left : left + width] = images / np.array(255.0, dtype=dtype)
    return out


def batch_order(seed: int, epoch: int, num_examples: int, batch_size: int) -> np.ndarray:
    """(steps, batch_size) example indices for one epoch, the same on every framework.

    The last incomplete batch is dropped so every step has the same shape (no
    retracing in tf.function or hybridized Gluon); the shuffle differs each epoch,
    so every example is still seen. RandomState is used because NumPy keeps its
    stream fixed across versions (NEP 19), so numpy 1.23 and 2.x agree.
    """
    if num_examples < batch_size:
        raise DataError(
            f"only {num_examples} training examples for batch size {batch_size}; "
            f"lower --batch-size or raise --train-limit"
        )
    order = np.random.RandomState([seed, epoch, 1]).permutation(num_examples)
    steps = num_examples // batch_size
    return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int64)


def probe_indices(num_test: int, probe_size: int) -> np.ndarray:
    """Fixed test-set indices for the train/eval divergence probe (independent of the seed)."""
    size = min(probe_size, num_test)
    return np.sort(np.random.RandomState(PROBE_SEED).permutation(num_test)[:size]).astype(np.int64)


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write a uint8 array as an IDX file (gzip when the name ends in .gz). Used by tests and tools."""
    path = Path(path)
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)
    return path
