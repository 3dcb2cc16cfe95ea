"""BN folded into the layer before it (common.fold): exact against the float64 reference, with the two plausible
slips (epsilon left out, the other variance convention) far outside its tolerance; then in every framework, folded
against unfolded eval-mode logits, scratch and built-in (the built-in layers' own epsilon and stored variance)."""

from dataclasses import replace

import numpy as np
import pytest

from common.config import ModelSpec, RunConfig
from common.errors import ConfigError
from common.fold import check_foldable, fold, folded_spec
from common.init import parameter_shapes
from common.reference import lenet_forward
from tests.helpers import random_bn_params

IMAGES = np.random.RandomState(7).uniform(size=(32, 1, 28, 28))


def logits(params, spec, epsilon=1e-5):
    return lenet_forward(params, spec, IMAGES, training=False, epsilon=epsilon)[0]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_the_fold_is_the_eval_forward_and_the_slips_are_not(bias):
    """In float64 the folded network's logits are the BN network's eval-mode logits to 1e-12 (with and without the
    bias before BN); a fold that leaves epsilon out of the square root (running variances of about 1, epsilon 1e-3)
    or that takes the variance as PyTorch's unbiased n/(n - 1) one at batch 32 moves them by far more."""
    spec = ModelSpec(bias_before_norm=bias, epsilon=1e-3)
    params = random_bn_params(spec)
    want = logits(params, spec, 1e-3)
    target = folded_spec(spec)
    folded = fold(params, spec, 1e-3)
    assert sorted(folded) == sorted(parameter_shapes(target))  # every layer with its bias, no BN arrays
    np.testing.assert_allclose(logits(folded, target), want, rtol=0, atol=1e-12)
    no_epsilon = fold(params, spec, 0.0)
    assert np.max(np.abs(logits(no_epsilon, target) - want)) > 1e-4
    unbiased = {k: v * 32 / 31 if k.endswith("running_var") else v for k, v in params.items()}
    assert np.max(np.abs(logits(fold(unbiased, spec, 1e-3), target) - want)) > 1e-3


def test_a_noisy_runs_fold_takes_the_noise_expectation():
    """With --norm-noise and --noise-eval expectation (a = 3: each channel scaled by E[s] = 2) the folded network is
    the eval forward with gamma and beta doubled; with --noise-eval none, the plain one."""
    for noise_eval, factor in (("expectation", 2.0), ("none", 1.0)):
        spec = ModelSpec(norm_noise=True, noise_scale=3.0, noise_eval=noise_eval)
        params = random_bn_params(spec)
        scaled = {k: v * factor if k.endswith((".gamma", ".beta")) else v for k, v in params.items()}
        np.testing.assert_allclose(
            logits(fold(params, spec, 1e-5), folded_spec(spec)), logits(scaled, spec), rtol=0, atol=1e-12
        )


def test_what_does_not_fold_is_refused_with_the_reason():
    for spec, message in (
        (ModelSpec(variant="none"), "variant none has no normalisation layer to fold"),
        (ModelSpec(norm="layer"), "--norm layer does not fold into the layer before it"),
        (ModelSpec(norm="pit"), "--norm pit does not fold"),
        (ModelSpec(norm_placement="after_activation"), "BN folds into the layer after it"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_foldable(spec)
    assert folded_spec(ModelSpec(norm="renorm")).variant == "none"  # renorm's eval mode is BN's


@pytest.mark.parametrize("variant", ["scratch", "builtin", "builtin-defaults"])
def test_every_framework_folds_exactly(fw, framework, variant):
    """float64: the framework's folded network (variant none, folded weights) against its own eval mode of the BN
    network, to 1e-10; builtin-defaults with the framework's own epsilon (Keras and the MXNet operator's 1e-3)."""
    spec = ModelSpec(variant=variant, dropout=0.3)  # dropout: off in eval mode, in both
    config = RunConfig(model=spec, dtype="float64", device="cpu")
    backend = fw.BACKEND(config)
    params = random_bn_params(spec)
    backend.set_params(params)
    want = backend.predict(IMAGES)
    epsilon = backend.describe()["bn_epsilon"]
    folded = fw.BACKEND(replace(config, model=folded_spec(spec)))
    folded.set_params(fold(params, spec, epsilon))
    np.testing.assert_allclose(folded.predict(IMAGES), want, rtol=0, atol=1e-10, err_msg=f"{framework} {variant}")
