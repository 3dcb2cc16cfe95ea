"""Small IDX data sets made by the tests, and shared numeric helpers."""

from pathlib import Path

import numpy as np

from common.data import FILES, write_idx


def make_images(n: int, seed: int) -> tuple:
    """Learnable synthetic 28x28 images: class k lights up a horizontal band, plus noise."""
    rng = np.random.RandomState(seed)
    labels = rng.randint(0, 10, size=n).astype(np.uint8)
    images = rng.randint(0, 60, size=(n, 28, 28)).astype(np.int64)
    for i, k in enumerate(labels):
        images[i, 2 + 2 * k : 5 + 2 * k, 3:25] += 180
    return np.clip(images, 0, 255).astype(np.uint8), labels


def make_idx_dir(directory: Path, n_train: int = 1200, n_test: int = 400, compress: bool = True) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    train, test = make_images(n_train, 1), make_images(n_test, 2)
    arrays = {"train_images": train[0], "train_labels": train[1], "test_images": test[0], "test_labels": test[1]}
    for part, (stem, _, _) in FILES.items():
        write_idx(directory / (stem + (".gz" if compress else "")), arrays[part])
    return directory


def random_bn_params(spec, seed=3, dtype="float64"):
    """Canonical parameters with non-trivial BN gamma, beta and running statistics."""
    from common.init import init_params

    rng = np.random.RandomState(seed)
    params = init_params(spec, seed, dtype)
    for name in params:
        suffix = name.split(".")[1]
        shape = params[name].shape
        if suffix == "gamma":
            params[name] = rng.uniform(0.5, 1.5, shape).astype(dtype)
        elif suffix in ("beta", "running_mean", "bias"):
            params[name] = rng.normal(0, 0.3, shape).astype(dtype)
        elif suffix == "running_var":
            params[name] = rng.uniform(0.5, 2.0, shape).astype(dtype)
    return params


def tiny_config(**changes):
    """A run small enough for a unit test: float64 on the CPU, 2 epochs of batch 32 at lr 0.5, a 16-image probe,
    each epoch's first 6 step losses recorded; `changes` override any field."""
    from common.config import RunConfig

    base = dict(epochs=2, batch_size=32, lr=0.5, dtype="float64", device="cpu", probe_size=16, trace_steps=6)
    return RunConfig(**{**base, **changes})


def epochs_of(backend_cls, config, dataset, progress=None) -> list:
    """The (epoch record, its arrays) pairs of one run through the loop (common.loop.run)."""
    from common.loop import run

    got = []
    run(backend_cls, config, dataset, lambda record, arrays=None: got.append((record, arrays)), progress)
    return [(r, a) for r, a in got if r["kind"] == "epoch"]


def expected_norm(spec, x, state, dy, training):
    """One normalisation layer's forward and backward (of sum(dy * y)) by the float64 reference, in the harness's
    keys: y, dx, dgamma, dbeta and the state after the step."""
    from common.reference import norm_backward, norm_forward

    y, new, cache, kind = norm_forward(spec, x, state, training=training)
    dx, dgamma, dbeta = norm_backward(dy, cache, kind)
    return {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta, "state": new}


def check_norm(got, want, tol, what):
    """A harness's result against expected_norm's, each array within tol(its expected value) (assert_allclose's
    keyword arguments), and the same state arrays."""
    for key in ("y", "dx", "dgamma", "dbeta"):
        np.testing.assert_allclose(got[key], want[key], err_msg=f"{what}: {key}", **tol(want[key]))
    assert sorted(got["state"]) == sorted(want["state"])
    for key, value in want["state"].items():
        np.testing.assert_allclose(got["state"][key], value, err_msg=f"{what}: {key} after the step", **tol(value))


def write(tmp_path, text, name="s.toml"):
    """A study file of `text` in tmp_path."""
    path = tmp_path / name
    path.write_text(text)
    return path


def runs_frame(rows):
    """A runs table as compare.report makes it: one row per run with status, coordinates and metrics (torch,
    scratch, seed 0, complete unless a row says otherwise; every study metric a column)."""
    import pandas as pd

    from compare.studies import spec

    out = []
    for i, r in enumerate(rows):
        r = {"framework": "torch", "variant": "scratch", "seed": 0, "status": "complete", **r}
        r.setdefault("config_id", f"c{i}")
        out.append(r)
    frame = pd.DataFrame(out)
    for metric in spec.METRICS:
        if metric not in frame:
            frame[metric] = np.nan
    return frame
