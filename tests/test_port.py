"""compare.port (--framework / tox -e NAME), through the real command and worker: a tiny trained run's models folded
in their own framework; what does not fold said with its reason; in float64, a model loaded into the framework's
other variant gives its logits exactly, and each mistake of a port (common.port) computes what it says, against
the float64 reference with the mistake applied by hand; bad input refused before anything runs."""

import json
import sys

import numpy as np
import pytest

from common.config import RunConfig
from common.data import load_fashion_mnist
from common.port import MISTAKES, apply
from common.reference import lenet_forward
from compare.port import main as port_main
from compare.reporting import ports
from compare.run import main as run_main
from tests.conventions import BUILTIN, NORM_BUILTIN_EPSILON
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
    float64 = [*common, "--dtype", "float64", "--population-size", "0"]
    assert run_main([*float64, "--variants", "scratch,builtin", "--run-id", "bn64"]) == 0
    return root, data


def port(trained, framework, run, *extra):
    root, data = trained
    run_id = f"port-{run}" + "".join(f"-{a.lstrip('-')}" for a in extra if a.startswith("--"))  # one per option set
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
            run_id,
            "--repeats",
            "2",
            *extra,
        ]
    )
    return code, root / run_id


def ported_with(trained, framework, *extra) -> tuple:
    """The float32 scratch and built-in models folded and exported to ONNX (no mistakes): port.json's contents,
    and the folder."""
    code, folder = port(trained, framework, "bn", "--mistakes", "none", *extra)
    assert code == 0
    return json.loads((folder / "port.json").read_text()), folder


@pytest.fixture(scope="module")
def ported(trained, framework):
    return ported_with(trained, framework)


def test_a_trained_models_fold_keeps_its_predictions(fw, framework, ported):
    """float32: the folded network's logits within 1e-4 of the model's (rounding the folded weights), the same
    prediction on every test image but where two logits tie that closely, the same test accuracy to 1 image in 200,
    and an inference speed per round for both."""
    data, folder = ported
    rows = {r["variant"]: r for r in data["fold"]}
    assert sorted(rows) == ["builtin", "scratch"] and not data["refused"]
    for variant, r in rows.items():
        assert r["max_logit_diff"] < 1e-4 and r["agreement"] >= 0.995, (framework, variant, r)
        assert abs(r["test_acc"] - r["folded_test_acc"]) <= 1 / 200
        assert len(r["examples_per_s"]) == len(r["folded_examples_per_s"]) == 2
    text = (folder / "port.md").read_text()
    assert "BN folded into the layer before it" in text and "folded / BN" in text


# what each framework's exporter does with BN-LeNet (measured with the pinned exporters; docs/porting.md): the
# models it exports, and for the one it refuses the words of its refusal
EXPORTS = {
    "torch": {"scratch": None, "builtin": None},
    "mxnet": {"scratch": "No conversion function registered for op type rsqrt", "builtin": None},
    "tensorflow": {"scratch": None, "builtin": None},
    "jax": {"scratch": None, "builtin": None},
}
BN_NODES = {
    "torch": {"builtin"},
    "mxnet": {"builtin"},
    "jax": {"builtin"},
}  # the exports that keep BatchNormalization nodes (some)


def test_each_model_exported_to_onnx_runs_in_onnx_runtime_as_in_its_framework(fw, framework, ported):
    """Each model this framework's exporter takes: the file passes onnx.checker's structural check, ONNX Runtime
    with its graph optimisations off and on gives the framework's eval-mode logits within float32 agreement (1e-4)
    and every prediction; the normalisations are BatchNormalization nodes where the exporter keeps the built-in
    layer, elementwise ops elsewhere. A model it refuses is recorded with the exporter's reason, and said."""
    data, folder = ported
    rows = {r["variant"]: r for r in data["onnx"]}
    assert sorted(rows) == ["builtin", "scratch"]
    text = (folder / "port.md").read_text()
    assert "## ONNX: each model exported and run in ONNX Runtime" in text
    for variant, refusal in EXPORTS[framework].items():
        r = rows[variant]
        if refusal:
            assert not r["exported"] and refusal in r["why"], r
            assert f"not exported: {r['why']}" in text
            continue
        assert r["exported"] and r["checker"].startswith("pass"), r
        assert (folder / r["file"]).is_file()
        for level in ("plain", "optimized"):
            assert r[f"{level}_max_logit_diff"] < 1e-4 and r[f"{level}_agreement"] == 1.0, (variant, level, r)
            assert r[f"{level}_test_acc"] == pytest.approx(r["test_acc"], abs=1 / 200)
        bn = r["plain_ops"].get("BatchNormalization", 0)
        assert (bn > 0) == (variant in BN_NODES.get(framework, ())), r["plain_ops"]
        assert bn or sum(r["plain_ops"].get(op, 0) for op in ("Sub", "Mul", "Div")) >= 4, r["plain_ops"]


@pytest.mark.onnx_import
def test_onnx_exports_come_back_into_pytorch_at_an_opset_onnx2torch_converts(fw, framework, trained):
    """--onnx-import (tox -e onnx-import: onnx2torch beside its own PyTorch build). At the exporter's default opset
    onnx2torch 1.5.15 converts neither model, and each row says which operator it lacks; with --opset 17 each export
    comes back into PyTorch with the model's logits within float32 agreement (1e-4) and every prediction, and the
    report's ONNX table says so."""
    data, _ = ported_with(trained, framework, "--onnx-import", sys.executable)
    assert sorted(r["variant"] for r in data["onnx"] if r["exported"]) == ["builtin", "scratch"]
    for r in data["onnx"]:
        assert r["opset"] > 18 and "Converter is not implemented" in r["import_error"], r
    data, folder = ported_with(trained, framework, "--onnx-import", sys.executable, "--opset", "17")
    for r in data["onnx"]:
        assert r["opset"] == 17 and r["importer"].startswith("onnx2torch ") and "import_error" not in r, r
        assert r["torch_max_logit_diff"] < 1e-4 and r["torch_agreement"] == 1.0, r
    assert "back in PyTorch (onnx2torch)" in (folder / "port.md").read_text()


def test_what_does_not_fold_is_said_with_its_reason(fw, framework, trained):
    code, folder = port(trained, framework, "layer", "--mistakes", "none", "--no-onnx")
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
    if NORM_BUILTIN_EPSILON[framework][("layer", 4)] is None:  # no built-in layer to port the layer norm into
        assert [r["task"] for r in data["not_ported"]] == [f"{framework}_scratch_s0_to_{framework}_builtin"]
    else:
        assert data["not_ported"] == [] and len(data["ports"]) == 1


def test_a_float64_model_in_the_other_variant_gives_its_logits_exactly(fw, framework, trained):
    """The scratch model loaded into the built-in one and the reverse, in this framework: logits to 1e-10; with
    --mistakes none, no mistake measured."""
    code, folder = port(trained, framework, "bn64", "--mistakes", "none", "--no-onnx")
    assert code == 0
    rows = json.loads((folder / "port.json").read_text())["ports"]
    assert sorted((r["variant"], r["target_variant"]) for r in rows) == [("builtin", "scratch"), ("scratch", "builtin")]
    for r in rows:
        assert r["max_logit_diff"] <= 1e-10 and r["agreement"] == 1.0, r
        assert r["target_test_acc"] == r["source_test_acc"]
    assert json.loads((folder / "port.json").read_text())["mistakes"] == []


def test_each_mistake_of_a_port_computes_what_it_says(fw, framework, trained):
    """float64, the built-in model ported into itself with each mistake: its logits are the float64 reference's
    with that mistake made by hand (the layers' default epsilon, fc1's columns permuted, the variance scaled by
    (m - 1) / m, gamma 1, every evaluation batch normalised with its own statistics), to 1e-9; the momentum mistake
    fine-tunes with decay 0.1 beside the right port fine-tuned with 0.9, so only its logits' existence and the
    table's row are checked here."""
    root, data = trained
    code, folder = port(trained, framework, "bn64", "--no-onnx")
    assert code == 0
    model = next(m for m in ports.trained_models(root / "bn64") if m["variant"] == "builtin")
    config = RunConfig.from_dict(model["config"])
    with np.load(model["snapshot"]) as arrays:
        params = {k[len("param/") :]: arrays[k] for k in arrays.files if k.startswith("param/")}
    images = load_fashion_mnist(data, verify=False, dtype="float64").test_images[: config.test_limit or None]
    base = ports.own_name(model)

    def logits(name):
        with np.load(folder / "logits" / f"{framework}_{name}.npz") as arrays:
            return arrays["logits"]

    def reference(p=params, **options):
        return lenet_forward(p, config.model, images, training=False, **options)[0]

    size = config.eval_batch_size  # train mode normalises each evaluation batch with its own statistics
    default = BUILTIN[framework]["defaults"][1]  # its own layer's epsilon as constructed by default
    want = {
        "epsilon": reference(epsilon=default),
        "flatten": reference(apply("flatten", params, config)),
        "variance": reference(apply("variance", params, config)),
        "gamma": reference(apply("gamma", params, config)),
        "train-mode": np.concatenate(
            [
                lenet_forward(params, config.model, images[i : i + size], training=True)[0]
                for i in range(0, len(images), size)
            ]
        ),
    }
    np.testing.assert_allclose(logits(base), reference(), rtol=0, atol=1e-9)
    for mistake, expected in want.items():
        np.testing.assert_allclose(logits(f"{base}_{mistake}"), expected, rtol=0, atol=1e-9, err_msg=mistake)
    rows = json.loads((folder / "port.json").read_text())["mistakes"]
    assert sorted(r["mistake"] for r in rows) == sorted(MISTAKES)
    epsilon = next(r for r in rows if r["mistake"] == "epsilon")
    assert epsilon["mistaken_epsilon"] == pytest.approx(default) and epsilon["right_epsilon"] == pytest.approx(1e-5)
    assert (folder / "logits" / f"{framework}_{base}_momentum.npz").is_file()
    assert "## Mistakes" in (folder / "port.md").read_text()


def test_the_onnx_table_says_what_was_not_exported_and_what_did_not_run():
    """An export ONNX Runtime cannot run (a float64 convolution, say) and one the exporter refused each get their
    words in the table, beside one that ran; nothing is made up for them (no counts, differences or agreement)."""
    base = {"seed": 0, "epoch": 1, "opset": 17, "layers": 4, "file": "f.onnx", "exporter": "x 1.0", "test_acc": 0.5}
    ops = {"Conv": 2, "BatchNormalization": 2, "Mul": 3}
    ran = {"max_logit_diff": 2e-6, "agreement": 1.0, "test_acc": 0.5}
    rows = [
        {**base, "framework": "torch", "variant": "scratch", "exported": True, "checker": "passed"}
        | {f"{level}_error": "NotImplemented: Conv(double)" for level in ("plain", "optimized")},
        {**base, "framework": "torch", "variant": "builtin", "exported": True, "checker": "passed"}
        | {f"{level}_{k}": v for level in ("plain", "optimized") for k, v in {**ran, "ops": ops}.items()},
        {**base, "framework": "mxnet", "variant": "scratch", "exported": False, "why": "AttributeError: rsqrt"},
    ]
    table = ports.onnx_table(rows)
    assert table.set_index("variant").loc["builtin"][["plain_bn_nodes", "plain_elementwise"]].tolist() == [2, 3]
    lines = ports.onnx_markdown(table)
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines[2:5]}
    assert cells["PyTorch scratch"][3:] == ["does not run: NotImplemented: Conv(double)"] * 2 + ["-; -", ""]
    assert cells["PyTorch builtin"][3:] == ["2; 3", "2; 3", "2e-06; 2e-06", "100.00%"]
    assert cells["MXNet Gluon scratch"][0] == "not exported: AttributeError: rsqrt"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["/nonexistent/run"], "holds no records.jsonl: give a compare.run folder"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--variants", "scratch,none"], "unknown variant ['none']"),
        (["--frameworks", "caffe"], "unknown framework 'caffe'"),
        (["--mistakes", "gamma,typo"], "unknown mistake ['typo']"),
        (["--opset", "3"], "--opset must be an ONNX opset, 7 or later"),
        (["--no-onnx", "--onnx-import"], "--onnx-import brings the ONNX exports back into PyTorch: drop --no-onnx"),
    ],
)
def test_bad_port_options_are_refused_before_anything_runs(tmp_path, capsys, argv, message):
    data = make_idx_dir(tmp_path / "data", 20, 20)
    assert port_main([*argv, "--data-dir", str(data), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
