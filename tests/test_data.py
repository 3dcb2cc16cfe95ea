import numpy as np
import pytest

from common import data
from common.data import DataError, batch_order, find_data_dir, load_fashion_mnist, parse_idx, probe_indices, write_idx
from tests.helpers import make_idx_dir


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path, compress):
    make_idx_dir(tmp_path, 100, 40, compress=compress)
    ds = load_fashion_mnist(tmp_path, verify=False)
    assert ds.train_images.shape == (100, 1, 28, 28) and ds.test_labels.shape == (40,)
    assert ds.train_images.dtype == np.float32 and 0 <= ds.train_images.min() and ds.train_images.max() <= 1
    assert ds.verified is False
    padded = load_fashion_mnist(tmp_path, verify=False, dtype="float64", input_size=32)
    assert padded.train_images.shape == (100, 1, 32, 32)
    np.testing.assert_array_equal(padded.train_images[:, :, 2:30, 2:30].astype(np.float32), ds.train_images)
    assert padded.train_images[:, :, :2].max() == 0 and padded.train_images[:, :, 30:].max() == 0


def test_checksum_mismatch_names_the_file_and_the_fix(tmp_path):
    make_idx_dir(tmp_path, 100, 40)
    with pytest.raises(DataError, match=r"checksum mismatch for .*train-images.*--no-verify-data"):
        load_fashion_mnist(tmp_path)


def test_truncated_file(tmp_path):
    make_idx_dir(tmp_path, 100, 40, compress=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_fashion_mnist(tmp_path, verify=False)


def test_corrupt_gzip(tmp_path):
    make_idx_dir(tmp_path, 100, 40)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(DataError, match="corrupt or truncated"):
        load_fashion_mnist(tmp_path, verify=False)


def test_bad_magic_and_missing_file(tmp_path):
    with pytest.raises(DataError, match="bad magic"):
        parse_idx(b"\x01\x02\x03\x04rest")
    make_idx_dir(tmp_path, 100, 40)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(DataError, match="has no t10k-images-idx3-ubyte.gz.*dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, verify=False)


def test_labels_out_of_range(tmp_path):
    make_idx_dir(tmp_path, 100, 40)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.full(100, 12, np.uint8))
    with pytest.raises(DataError, match="10 classes"):
        load_fashion_mnist(tmp_path, verify=False)


def test_missing_data_directory(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist.*apt-get install dataset-fashion-mnist"):
        find_data_dir(tmp_path / "nope")
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path / "nope"))
    with pytest.raises(DataError, match="FASHION_MNIST_DIR"):
        find_data_dir()


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv(data.ENV_VAR, str(tmp_path))
    assert find_data_dir() == tmp_path
    monkeypatch.delenv(data.ENV_VAR)
    monkeypatch.setattr(data, "DEBIAN_DIR", tmp_path / "no-debian")
    cache = make_idx_dir(tmp_path / "cache", 20, 20)
    assert find_data_dir(cache_dir=cache) == cache
    with pytest.raises(DataError, match="not found.*dataset-fashion-mnist"):
        find_data_dir(cache_dir=tmp_path / "empty-cache", download=False)


def test_batch_order_is_seeded_and_complete():
    a = batch_order(0, 1, 1000, 64)
    assert a.shape == (15, 64)
    np.testing.assert_array_equal(a, batch_order(0, 1, 1000, 64))
    assert len(np.unique(a)) == 15 * 64 and a.max() < 1000
    assert not np.array_equal(a, batch_order(0, 2, 1000, 64))
    assert not np.array_equal(a, batch_order(1, 1, 1000, 64))
    with pytest.raises(DataError, match="lower --batch-size"):
        batch_order(0, 1, 10, 64)


def test_probe_set_is_fixed():
    assert len(np.unique(probe_indices(10000, 512))) == 512
    assert len(probe_indices(100, 512)) == 100


@pytest.mark.skipif(not data.DEBIAN_DIR.is_dir(), reason="the dataset-fashion-mnist package is not installed")
def test_real_fashion_mnist_verifies():
    ds = load_fashion_mnist(data.DEBIAN_DIR)
    assert ds.verified and ds.train_images.shape == (60000, 1, 28, 28) and ds.test_images.shape[0] == 10000
    assert np.bincount(ds.train_labels).tolist() == [6000] * 10


# Pins: a change in numpy's RandomState stream must fail loudly --------------
STREAM = (
    "numpy's RandomState stream changed: {what} is now {got}. Every run's batches and probe images "
    "would differ from earlier reports; make common.data draw them the old way."
)


def test_batch_order_pin():
    got = batch_order(0, 1, 20, 4).tolist()
    assert got == [[13, 19, 1, 8], [10, 9, 0, 5], [16, 18, 4, 6], [12, 7, 2, 17], [14, 15, 3, 11]], STREAM.format(
        what="the batch order of seed 0, epoch 1", got=got
    )
    assert batch_order(0, 2, 20, 4)[0].tolist() == [3, 16, 2, 18], STREAM.format(
        what="seed 0, epoch 2", got=batch_order(0, 2, 20, 4)[0].tolist()
    )
    assert batch_order(1, 1, 20, 4)[0].tolist() == [2, 3, 8, 18], STREAM.format(
        what="seed 1, epoch 1", got=batch_order(1, 1, 20, 4)[0].tolist()
    )


def test_probe_indices_pin():
    assert probe_indices(5, 4).tolist() == [0, 2, 3, 4], STREAM.format(
        what="probe_indices(5, 4)", got=probe_indices(5, 4).tolist()
    )
    got = probe_indices(100, 8).tolist()
    assert got == [0, 10, 21, 36, 37, 70, 79, 90], STREAM.format(what="probe_indices(100, 8)", got=got)
    full = probe_indices(10000, 512)
    assert full[:8].tolist() == [27, 104, 144, 150, 180, 184, 185, 223] and full[-3:].tolist() == [9945, 9973, 9986], (
        STREAM.format(what="the default probe set", got=full[:8].tolist())
    )


def test_resized_images_are_pillows_bilinear_bytes_and_cached(tmp_path):
    """--image-size: each image through Pillow's bilinear filter on the 8-bit image (torchvision's Resize on a PIL
    image), exactly; read back from the disk cache the second time; in [0, 1] as the 28x28 images are."""
    from PIL import Image

    images = np.random.RandomState(3).randint(0, 256, size=(7, 28, 28)).astype(np.uint8)
    want = np.stack([np.asarray(Image.fromarray(im).resize((96, 96), Image.BILINEAR)) for im in images])
    got = data.resized(images, 96, "ab" * 32, tmp_path)
    np.testing.assert_array_equal(got, want)
    (cached,) = tmp_path.glob("*.npz")
    stamp = cached.stat().st_mtime_ns
    np.testing.assert_array_equal(data.resized(images, 96, "ab" * 32, tmp_path), want)
    assert cached.stat().st_mtime_ns == stamp  # read, not rebuilt
    make_idx_dir(tmp_path / "idx", 100, 40)
    ds = load_fashion_mnist(tmp_path / "idx", verify=False, dtype="float64", image_size=32, cache_dir=tmp_path)
    assert ds.train_images.shape == (100, 1, 32, 32) and ds.test_images.shape == (40, 1, 32, 32)
    plain = load_fashion_mnist(tmp_path / "idx", verify=False, dtype="float64")
    first = (plain.train_images[0, 0] * 255).round().astype(np.uint8)
    np.testing.assert_array_equal(
        ds.train_images[0, 0], np.asarray(Image.fromarray(first).resize((32, 32), Image.BILINEAR)) / 255.0
    )


def test_the_resize_cache_follows_the_source_and_never_uses_a_bad_file(tmp_path):
    images = np.random.RandomState(4).randint(0, 256, size=(5, 28, 28)).astype(np.uint8)
    want = data.resize(images, 32)
    data.resized(images, 32, "cd" * 32, tmp_path)
    (path,) = tmp_path.glob("*.npz")
    # changed source files have another checksum, so another cache file: the old one is never read for them
    other = images[::-1].copy()
    np.testing.assert_array_equal(data.resized(other, 32, "ef" * 32, tmp_path), data.resize(other, 32))
    assert len(list(tmp_path.glob("*.npz"))) == 2
    # a corrupted file (its bytes changed, or cut short) is rebuilt, never used
    stored = dict(np.load(path))
    stored["images"] = stored["images"].copy()
    stored["images"][0, 0, 0] ^= 1
    np.savez(path, **stored)
    np.testing.assert_array_equal(data.resized(images, 32, "cd" * 32, tmp_path), want)
    path.write_bytes(path.read_bytes()[:100])
    np.testing.assert_array_equal(data.resized(images, 32, "cd" * 32, tmp_path), want)
    with np.load(path) as repaired:
        np.testing.assert_array_equal(repaired["images"], want)


def test_real_fashion_mnist_resizes_as_pillow_does(tmp_path):
    """The real data's first images at 96x96 (the textbook's second configuration), byte for byte Pillow's. (The
    whole split goes through the same function; resizing and caching all 70,000 here would cost CI a minute.)"""
    from PIL import Image

    real = load_fashion_mnist(data.DEBIAN_DIR, dtype="float64")
    first = (real.test_images[:8, 0] * 255).round().astype(np.uint8)
    got = data.resized(first, 96, "real" * 16, tmp_path)
    for image, resized in zip(first, got):
        np.testing.assert_array_equal(resized, np.asarray(Image.fromarray(image).resize((96, 96), Image.BILINEAR)))
    assert got.std() > 0  # real content, not a blank


def test_image_sizes_without_a_feature_map_are_a_clear_error():
    from common.config import ModelSpec
    from common.errors import ConfigError

    for size in (12, 14, 15):
        with pytest.raises(ConfigError, match="at least 16"):
            ModelSpec(image_size=size)
    with pytest.raises(ConfigError, match="multiple of 4"):
        ModelSpec(image_size=30)
    with pytest.raises(ConfigError, match="set one"):
        ModelSpec(image_size=32, input_size=32)
    assert ModelSpec(image_size=96).flat_size == 16 * 21 * 21 and ModelSpec(image_size=16).flat_size == 16
