"""The framework under test comes from --framework (or $BN_FRAMEWORK).

Each tox env runs the whole suite for its own framework. An unknown name is a
usage error; a framework that fails to import in its own env fails its tests
(the backend fixture raises), it is never skipped. Without --framework, the
framework tests are skipped with that reason, and the framework-free ones run.
The framework-free tests run in the torch env (numpy 2) and the mxnet env
(numpy 1.23), the two numpy lines `common` must run on; the tensorflow and jax
envs skip them, saying where they run, except a module marked `every_env`
(what a framework's own env can break: that common imports no framework).
"""

import importlib
import os

import pytest

from common.registry import FRAMEWORKS, framework_info, load_backend_module


def pytest_addoption(parser):
    parser.addoption(
        "--framework", default=os.environ.get("BN_FRAMEWORK"), help=f"framework under test: {', '.join(FRAMEWORKS)}"
    )
    parser.addoption(
        "--cross", action="store_true", help="run the cross-framework tests (needs every framework's environment)"
    )
    parser.addoption("--ray", action="store_true", help="run the Ray executor tests (needs Ray: tox -e ray)")
    parser.addoption(
        "--tracking", action="store_true", help="run the MLflow tracking tests (needs MLflow: tox -e tracking)"
    )
    parser.addoption(
        "--onnx-import",
        action="store_true",
        help="run the ONNX-back-into-PyTorch tests (needs onnx2torch: tox -e onnx-import)",
    )


def pytest_configure(config):
    name = config.getoption("--framework")
    if name and name not in FRAMEWORKS:
        raise pytest.UsageError(f"--framework {name!r} is unknown; choose from {', '.join(FRAMEWORKS)}")
    prepare(name)
    config.addinivalue_line("markers", "cross: needs every framework's environment (run with --cross)")
    config.addinivalue_line("markers", "ray: starts a Ray cluster (run with --ray; tox -e ray)")
    config.addinivalue_line("markers", "tracking: MLflow, embedded and a server (run with --tracking; tox -e tracking)")
    config.addinivalue_line("markers", "onnx_import: onnx2torch (run with --onnx-import; tox -e onnx-import)")
    config.addinivalue_line("markers", "every_env: a framework-free test that runs in every framework's env")


# the envs that run the framework-free tests: numpy 2 and numpy 1.23 (see the docstring)
FREE_ENVS = ("torch", "mxnet")
# a test that uses one of these is a framework test
FRAMEWORK_FIXTURES = {"framework", "fw", "harness", "native"}

# the most data-parallel replicas a test starts (tests/test_data_parallel.py)
TEST_REPLICAS = 2


def prepare(name):
    """Before any test runs the framework: the process-wide settings the worker makes before a framework starts
    (the backend module's `prepare`: JAX's host device count), for the tests' largest data-parallel run. A
    framework that does not import is left to the `fw` fixture, which fails its tests with the error."""
    if not name:
        return
    from common.config import RunConfig

    try:
        module = load_backend_module(name)
    except Exception:  # noqa: BLE001 - reported by the fw fixture, test by test
        return
    if hasattr(module, "prepare"):
        module.prepare([RunConfig(replicas=TEST_REPLICAS)])


def pytest_report_header(config):
    return f"bn-compare framework under test: {config.getoption('--framework') or '(none: framework tests skipped)'}"


def pytest_collection_modifyitems(config, items):
    for option, marker, reason in (
        ("--cross", "cross", "cross-framework test: run with --cross (tox -e cross)"),
        ("--ray", "ray", "Ray executor test: run with --ray (tox -e ray)"),
        ("--tracking", "tracking", "MLflow test: run with --tracking (tox -e tracking)"),
        ("--onnx-import", "onnx_import", "onnx2torch test: run with --onnx-import (tox -e onnx-import)"),
    ):
        if not config.getoption(option):
            for item in items:
                if marker in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=reason))
    name = config.getoption("--framework")
    if name and name not in FREE_ENVS:
        reason = "framework-free: runs in tox -e torch (numpy 2) and tox -e mxnet (numpy 1.23)"
        for item in items:
            if not FRAMEWORK_FIXTURES & set(item.fixturenames) and "every_env" not in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def framework(request):
    name = request.config.getoption("--framework")
    if not name:
        pytest.skip("framework test: pass --framework NAME (tox -e NAME does)")
    return name


@pytest.fixture(scope="session")
def fw(framework):
    """The backend module of the framework under test (frameworks.<name>.backend)."""
    return load_backend_module(framework)


@pytest.fixture(scope="session")
def harness(framework):
    """The layer harness of the framework under test (frameworks.<name>.harness, common.harness)."""
    return load_backend_module(framework, "harness")


@pytest.fixture(scope="module")
def native(request, framework):
    """For a module of one framework's own (its pitfalls, PyTorch's two machines; it sets FRAMEWORK = name): that
    framework's module in its own env; elsewhere the module is skipped, saying where it runs."""
    wanted = request.module.FRAMEWORK
    if framework != wanted:
        pytest.skip(f"{framework_info(wanted).label}-specific: run in tox -e {wanted}")
    return importlib.import_module(framework_info(wanted).import_name)
