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
