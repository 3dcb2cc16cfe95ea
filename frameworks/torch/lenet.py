"""BN-LeNet for PyTorch, built from a ModelSpec. Layout NCHW, canonical names as-is.

Variants: scratch (our BatchNorm), builtin (nn.BatchNorm1d/2d with momentum =
1 - decay and the spec's eps), builtin-defaults (PyTorch's own defaults:
momentum 0.1, eps 1e-5), none (no BN). Other normalisations (spec.norm): scratch
BatchRenorm / GroupNorm; built-in nn.GroupNorm (group; layer after a convolution:
nn.LayerNorm's affine is per element of C x H x W, not per channel), nn.LayerNorm
(layer after a dense layer), nn.InstanceNorm2d(affine=True); no built-in renorm.
"""

import torch
from torch import nn
from torch.nn import functional as F

from common.init import has_bias, layer_shapes
from common.norms import NORM_NAMES, build, given, norm_after
from common.precision import dtype_and_mixed

from .batchnorm import PIT, BatchNorm, BatchRenorm, GroupNorm, Whiten

# canonical BN suffix -> attribute of the built-in layer (others keep their name)
BUILTIN_NAMES = {"gamma": "weight", "beta": "bias"}


TORCH_NORMS = "nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d/2d/3d, nn.BatchNorm1d/2d/3d"


def builtin_batch(layer):
    # PyTorch's momentum weights the new batch value: our decay 0.9 is momentum 0.1
    momentum = None if layer.decay is None else 1.0 - layer.decay
    return (nn.BatchNorm2d if layer.dims == 4 else nn.BatchNorm1d)(
        layer.features, **given(momentum=momentum, eps=layer.epsilon)
    )


def builtin_group(layer):
    # nn.LayerNorm after a convolution would have a gamma per element of C x H x W: one group is the spec
    if layer.norm == "layer" and layer.dims == 2:
        return nn.LayerNorm(layer.features, **given(eps=layer.epsilon))
    return nn.GroupNorm(layer.groups, layer.features, **given(eps=layer.epsilon))


CONSTRUCTORS = {
    "batch": lambda layer: BatchNorm(
        layer.features, decay=layer.decay, epsilon=layer.epsilon, ghost=layer.ghost, closed_form=layer.closed_form
    ),
    "renorm": lambda layer: BatchRenorm(
        layer.features, decay=layer.decay, epsilon=layer.epsilon, **layer.renorm_kwargs()
    ),
    "group": lambda layer: GroupNorm(layer.features, layer.groups, epsilon=layer.epsilon),
    "whiten": lambda layer: Whiten(layer.features, decay=layer.decay, epsilon=layer.epsilon, **layer.whiten_kwargs()),
    "pit": lambda layer: PIT(layer.features, **layer.pit_kwargs(), decay=layer.decay, epsilon=layer.epsilon),
    "pit-rank": lambda layer: PIT(layer.features, **layer.pit_kwargs(), decay=layer.decay, epsilon=layer.epsilon),
    "builtin-batch": builtin_batch,
    "builtin-layer": builtin_group,
    "builtin-group": builtin_group,
    "builtin-instance": lambda layer: nn.InstanceNorm2d(layer.features, affine=True, **given(eps=layer.epsilon)),
}


def make_norm(layer, precision="float32", name=None):
    """PyTorch's module for a common.norms.NormLayer, its parameters in the precision's dtype (float32 when mixed:
    autocast computes in bfloat16). name: unused, a module is named by its attribute."""
    return build(layer, CONSTRUCTORS, "PyTorch", TORCH_NORMS).to(getattr(torch, dtype_and_mixed(precision)[0]))


class BNLeNet(nn.Module):
    def __init__(self, spec):
        super().__init__()
        self.spec = spec
        shapes = layer_shapes(spec)
        for layer, shape in shapes.items():
            bias = has_bias(spec, layer)
            if layer.startswith("conv"):
                setattr(self, layer, nn.Conv2d(shape[1], shape[0], shape[2:], bias=bias))
            else:
                setattr(self, layer, nn.Linear(shape[1], shape[0], bias=bias))
            if layer in NORM_NAMES and spec.norm_at(layer):
                bn = make_norm(norm_after(spec, layer))
                setattr(self, NORM_NAMES[layer], bn)
                if spec.freeze_gamma_beta:
                    for p in bn.parameters():
                        p.requires_grad_(False)
        self.activation = torch.sigmoid if spec.activation == "sigmoid" else F.relu
        self.pool = F.avg_pool2d if spec.pooling == "avg" else F.max_pool2d
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.activation_inputs = None  # a dict while the backend captures each activation's input (common.trace)

    def norm_modules(self):
        return {NORM_NAMES[layer]: getattr(self, NORM_NAMES[layer]) for layer in NORM_NAMES if self.spec.norm_at(layer)}

    def _block(self, layer, h, noise):
        bn = getattr(self, NORM_NAMES[layer]) if self.spec.norm_at(layer) else None
        before = self.spec.norm_placement == "before_activation"

        def norm(h):
            h = bn(h)
            if noise is None:
                return h
            scale, shift = noise[NORM_NAMES[layer]]  # noisy BN: (C,) or per example (N, C) (common.norms.draw_noise)
            shape = (-1, h.shape[1]) + (1,) * (h.dim() - 2)
            return h * scale.view(shape) + shift.view(shape)

        if bn is not None and before:
            h = norm(h)
        if self.activation_inputs is not None:
            self.activation_inputs[layer] = h
        h = self.activation(h)
        if bn is not None and not before:
            h = norm(h)
        return h

    def forward(self, x, noise=None):
        """noise: None, or one step's {norm name: (scales, shifts)} (--norm-noise), added after each norm."""
        h = self.pool(self._block("conv1", self.conv1(x), noise), 2)
        h = self.pool(self._block("conv2", self.conv2(h), noise), 2)
        h = self.dropout(self._block("fc1", self.fc1(h.flatten(1)), noise))
        h = self.dropout(self._block("fc2", self.fc2(h), noise))
        return self.fc3(h)


def canonical_to_torch(name, spec):
    layer, suffix = name.split(".")
    if layer.startswith("bn") and spec.variant != "scratch":
        suffix = BUILTIN_NAMES.get(suffix, suffix)
    return f"{layer}.{suffix}"
