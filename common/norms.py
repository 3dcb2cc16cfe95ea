"""The normalisations beside BN (--norm), framework-free: their spec and what every framework shares.

Spec (x is (N, C, H, W) after a convolution or (N, F) after a dense layer; gamma and beta are per
channel / feature, as BN's; epsilon sits inside the square root; variances are biased, 1/n):

- batch: BN (common.reference.batch_norm_forward; docs/running.md, "The BN specification").
- layer: per example, over all of the layer's values (C x H x W, or F).
- group: per example, over each of G groups of consecutive channels (C/G x H x W, or F/G); G must
  divide C (common.config checks it at every normalised position).
- instance: per example and channel, over H x W; convolutions only (a dense layer has one value per
  feature, so a dense position is a configuration error, never silently skipped).
  layer, group and instance are one transform, group normalisation with 1, G or C groups
  (`groups_of`): one function per framework computes all three.
- renorm (batch renormalisation, Ioffe 2017): in training mode, with the batch mean mu_B and
  sigma_B = sqrt(var_B + eps), and the running statistics before this step's update, sigma =
  sqrt(running_var + eps),
      r = clip(sigma_B / sigma, 1/rmax, rmax),  d = clip((mu_B - running_mean) / sigma, -dmax, dmax)
      y = gamma * ((x - mu_B) / sigma_B * r + d) + beta
  with no gradient through r and d. rmax and dmax grow linearly from 1 and 0 to their limits over the
  first `renorm_warmup` training steps (`renorm_limits`); the running statistics update and eval mode
  are BN's. With rmax = 1 and dmax = 0 (its first step) it is BN exactly.

Only batch and renorm differ between train and eval mode; for the others the harness's divergence
figures are exactly 0, which every run checks by measuring them like BN's.
"""

from __future__ import annotations

import numpy as np

from .config import ModelSpec
from .errors import BackendUnavailable


def groups_of(spec: ModelSpec, channels: int) -> int:
    """The groups a layer/group/instance normalisation of `channels` channels splits them into."""
    return {"layer": 1, "group": spec.groups, "instance": channels}[spec.norm]


def renorm_limits(steps, rmax: float, dmax: float, warmup: int, minimum=np.minimum, ones_like=np.ones_like) -> tuple:
    """(rmax, dmax) for a training step taken after `steps` earlier ones: both grow linearly from (1, 0) over the
    first `warmup` steps (none: at once). steps may be any framework's array, with that framework's minimum and
    ones_like; every framework's BatchRenorm layer and the float64 reference compute the ramp here."""
    ramp = minimum(steps / warmup, 1.0) if warmup else ones_like(steps)
    return 1.0 + (rmax - 1.0) * ramp, dmax * ramp


def no_builtin(framework: str, norm: str, has: str) -> BackendUnavailable:
    """The error of --variants builtin / builtin-defaults for a normalisation the framework lacks."""
    return BackendUnavailable(
        f"{framework} has no built-in layer that fits the spec of --norm {norm} (its built-in normalisations: {has}); "
        f"run --variants scratch for the project's own {norm} layer"
    )
