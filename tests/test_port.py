"""compare.port (--framework / tox -e NAME): a tiny trained run's models folded in their own framework, through the
real command and worker; what does not fold said with its reason, and bad input refused before anything runs."""

import json
import sys

import pytest

from compare.port import main as port_main
from compare.run import main as run_main
from tests.helpers import make_idx_dir


@pytest.fixture(scope="module")
def trained(tmp_path_factory, framework):
    """One float32 epoch of 256 images, scratch and built-in BN and layer normalisation, in this framework."""
    root = tmp_path_factory.mktemp("port")
    data = make_idx_dir(root / "data", 256, 200)
    common = ["--frameworks", framework, "--epochs", "1", "--batch-size", "32", "--data-dir", str(data)]
    common += ["--no-verify-data", "--python", f"{framework}={sys.executable}", "--out", str(root), "--no-progress"]
    assert run_main([*common, "--variants", "scratch,builtin", "--run-id", "bn"]) == 0
    assert run_main([*common, "--variants", "scratch", "--norm", "layer", "--run-id", "layer"]) == 0
    return root, data


def port(trained, framework, run, *extra):
    root, data = trained
    code = port_main(
        [
            str(root / run),
            "--frameworks",
            framework,
            "--data-dir",
            str(data),
            "--no-verify-data",
            "--python",
            f"{framework}={sys.executable}",
            "--out",
            str(root),
            "--run-id",
            f"port-{run}",
            "--repeats",
            "2",
            *extra,
        ]
    )
    return code, root / f"port-{run}"


def test_a_trained_models_fold_keeps_its_predictions(fw, framework, trained):
    """float32: the folded network's logits within 1e-4 of the model's (rounding the folded weights), the same
    prediction on every test image but where two logits tie that closely, the same test accuracy to 1 image in 200,
    and an inference speed per round for both."""
    code, folder = port(trained, framework, "bn")
    assert code == 0
    data = json.loads((folder / "port.json").read_text())
    rows = {r["variant"]: r for r in data["fold"]}
    assert sorted(rows) == ["builtin", "scratch"] and not data["refused"]
    for variant, r in rows.items():
        assert r["max_logit_diff"] < 1e-4 and r["agreement"] >= 0.995, (framework, variant, r)
        assert abs(r["test_acc"] - r["folded_test_acc"]) <= 1 / 200
        assert len(r["examples_per_s"]) == len(r["folded_examples_per_s"]) == 2
    text = (folder / "port.md").read_text()
    assert "BN folded into the layer before it" in text and "folded / BN" in text


def test_what_does_not_fold_is_said_with_its_reason(fw, framework, trained):
    code, folder = port(trained, framework, "layer")
    assert code == 0
    data = json.loads((folder / "port.json").read_text())
    assert data["fold"] == [] and data["refused"] == [
        {
            "framework": framework,
            "variant": "scratch",
            "why": "--norm layer does not fold into the layer before it: in eval mode only BN (and batch "
            "renormalisation, whose eval mode is BN's) is an affine map per channel",
        }
    ]
    assert "## Not folded" in (folder / "port.md").read_text()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["/nonexistent/run"], "holds no records.jsonl: give a compare.run folder"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--variants", "scratch,none"], "unknown variant ['none']"),
        (["--frameworks", "caffe"], "unknown framework 'caffe'"),
    ],
)
def test_bad_port_options_are_refused_before_anything_runs(tmp_path, capsys, argv, message):
    data = make_idx_dir(tmp_path / "data", 20, 20)
    assert port_main([*argv, "--data-dir", str(data), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
