"""PyTorch's own mode pitfalls (docs/conventions.md), shown on our layer and nn.BatchNorm.

PyTorch-specific by nature, so this module runs in the torch environment only.
"""

import numpy as np
import pytest

from common.config import ModelSpec

FRAMEWORK = "torch"


@pytest.fixture(scope="module")
def torch(native):
    return native


@pytest.fixture(params=["scratch", "builtin"])
def layer(request, torch):
    from common.norms import norm_layer
    from frameworks.torch.lenet import make_norm

    bn = make_norm(norm_layer(ModelSpec(variant=request.param), 3, 2), "float64")
    with torch.no_grad():
        bn.running_mean.fill_(0.5)
        bn.running_var.fill_(2.0)
    return bn


def test_eval_alone_switches_to_running_statistics(torch, layer):
    x = torch.randn(16, 3, dtype=torch.float64) * 3 + 1
    layer.eval()  # grad mode stays on: no no_grad, no inference_mode
    assert torch.is_grad_enabled()
    y = layer(x)
    np.testing.assert_allclose(y.detach().numpy(), (x.detach().numpy() - 0.5) / np.sqrt(2.0 + 1e-5), rtol=1e-12)
    assert (layer.running_mean == 0.5).all() and (layer.running_var == 2.0).all()


def test_no_grad_is_not_eval(torch, layer):
    """Pitfall 1: a train-mode forward under no_grad still uses and updates batch statistics."""
    x = torch.randn(16, 3, dtype=torch.float64) + 4
    layer.train()
    with torch.no_grad():
        y = layer(x)
    np.testing.assert_allclose(y.mean(0).numpy(), 0.0, atol=1e-12)  # batch statistics were used
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.9 * 0.5 + 0.1 * x.mean(0).numpy(), rtol=1e-12)


def test_running_statistics_carry_no_autograd_history(torch, layer):
    """The textbook's slip before it used .data: running statistics that keep the graph alive."""
    x = torch.randn(16, 3, dtype=torch.float64, requires_grad=True)
    layer.train()
    layer(x).sum().backward()
    assert not layer.running_mean.requires_grad and layer.running_mean.grad_fn is None
    assert not layer.running_var.requires_grad and layer.running_var.grad_fn is None


def test_functional_batch_norm_defaults_to_eval(torch):
    """Pitfall 2: F.batch_norm's training argument defaults to False."""
    x = torch.randn(8, 2, dtype=torch.float64) + 3
    y = torch.nn.functional.batch_norm(x, torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    np.testing.assert_allclose(y.numpy(), (x / np.sqrt(1 + 1e-5)).numpy(), rtol=1e-12)


def test_compiled_without_a_cxx_compiler_says_what_to_install(torch, monkeypatch):
    """torch.compile on the CPU generates C++: without a compiler the run fails with the fix, before any
    step, not with an Inductor traceback in the middle of the first one."""
    from torch._inductor import config as inductor

    from common.config import RunConfig
    from common.errors import BackendUnavailable
    from frameworks.torch.backend import TorchBackend

    monkeypatch.setattr(inductor.cpp, "cxx", (None, "no-such-cxx-compiler"))
    with pytest.raises(BackendUnavailable, match=r"needs a C\+\+ compiler.*apt-get install g\+\+.*--execution eager"):
        TorchBackend(RunConfig(device="cpu", execution="compiled"))
    TorchBackend(RunConfig(device="cpu", execution="eager"))  # eager needs none


# The other normalisations' built-in layers (tests/conventions.py NORM_BUILTIN_EPSILON) ---------------------
def test_layer_norm_over_a_feature_map_has_a_gamma_per_element(torch):
    """nn.LayerNorm([C, H, W]) learns C*H*W gammas and betas, the spec one per channel: after a convolution
    the suite's built-in layer normalisation is nn.GroupNorm(1, C), which normalises the same values."""
    layer = torch.nn.LayerNorm([6, 24, 24])
    assert tuple(layer.weight.shape) == (6, 24, 24)
    group = torch.nn.GroupNorm(1, 6)
    assert tuple(group.weight.shape) == (6,)
    x = torch.randn(3, 6, 24, 24, dtype=torch.float64) * 2 + 5
    torch.testing.assert_close(layer.double()(x), group.double()(x), rtol=1e-12, atol=1e-12)  # at gamma 1, beta 0


def test_instance_norm_has_no_affine_by_default(torch):
    """nn.InstanceNorm2d(C) has no gamma or beta (affine=False) and no running statistics unless asked."""
    layer = torch.nn.InstanceNorm2d(6)
    assert layer.weight is None and layer.bias is None and layer.running_mean is None
    assert torch.nn.InstanceNorm2d(6, affine=True).weight.shape == (6,)


def test_sync_batch_norm_refuses_the_cpu_once_a_process_group_exists(torch, tmp_path):
    """nn.SyncBatchNorm in training mode: without a process group it is plain BN; inside one (gloo, here a
    one-process group over a file store, no network) it refuses a CPU tensor, so --bn-sync global has no built-in
    layer on the CPU (frameworks/torch/backend.py says so) and its GPU path waits for a device."""
    import torch.distributed as dist

    x = torch.randn(4, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    plain = torch.nn.SyncBatchNorm(3)(x)
    np.testing.assert_allclose(plain.detach().numpy(), torch.nn.BatchNorm2d(3)(x).detach().numpy(), atol=1e-6)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="SyncBatchNorm expected input tensor to be on GPU"):
            torch.nn.SyncBatchNorm(3)(x)
    finally:
        dist.destroy_process_group()
