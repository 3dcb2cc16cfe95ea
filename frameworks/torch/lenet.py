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

from common.init import BN_NAMES, has_bias, layer_shapes
from common.norms import groups_of, no_builtin

from .batchnorm import BatchNorm, BatchRenorm, GroupNorm

# canonical BN suffix -> attribute of the built-in layer (others keep their name)
BUILTIN_NAMES = {"gamma": "weight", "beta": "bias"}


def make_norm(spec, num_features, dims):
    """The layer of spec.norm and spec.variant that follows a layer of num_features channels."""
    if spec.norm == "batch":
        return make_bn(spec, num_features, dims)
    if spec.variant == "scratch":
        if spec.norm == "renorm":
            return BatchRenorm(
                num_features,
                decay=spec.decay,
                epsilon=spec.epsilon,
                rmax=spec.renorm_rmax,
                dmax=spec.renorm_dmax,
                warmup=spec.renorm_warmup,
            )
        return GroupNorm(num_features, groups_of(spec, num_features), epsilon=spec.epsilon)
    if spec.norm == "renorm":
        raise no_builtin(
            "PyTorch", "renorm", "nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d/2d/3d, nn.BatchNorm1d/2d/3d"
        )
    kwargs = {} if spec.variant == "builtin-defaults" else {"eps": spec.epsilon}
    if spec.norm == "layer" and dims == 2:
        return nn.LayerNorm(num_features, **kwargs)
    if spec.norm == "instance":
        return nn.InstanceNorm2d(num_features, affine=True, **kwargs)
    return nn.GroupNorm(groups_of(spec, num_features), num_features, **kwargs)


def make_bn(spec, num_features, dims):
    if spec.variant == "scratch":
        return BatchNorm(num_features, decay=spec.decay, epsilon=spec.epsilon)
    layer = nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d
    if spec.variant == "builtin":
        # PyTorch's momentum weights the new batch value: our decay 0.9 is momentum 0.1
        return layer(num_features, momentum=1.0 - spec.decay, eps=spec.epsilon)
    return layer(num_features)  # builtin-defaults


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
            if layer in BN_NAMES and spec.bn_at(layer):
                bn = make_norm(spec, shape[0], 4 if layer.startswith("conv") else 2)
                setattr(self, BN_NAMES[layer], bn)
                if spec.freeze_gamma_beta:
                    for p in bn.parameters():
                        p.requires_grad_(False)
        self.activation = torch.sigmoid if spec.activation == "sigmoid" else F.relu
        self.pool = F.avg_pool2d if spec.pooling == "avg" else F.max_pool2d
        self.dropout = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()

    def bn_modules(self):
        return {BN_NAMES[layer]: getattr(self, BN_NAMES[layer]) for layer in BN_NAMES if self.spec.bn_at(layer)}

    def _block(self, layer, h):
        bn = getattr(self, BN_NAMES[layer]) if self.spec.bn_at(layer) else None
        before = self.spec.bn_placement == "before_activation"
        if bn is not None and before:
            h = bn(h)
        h = self.activation(h)
        if bn is not None and not before:
            h = bn(h)
        return h

    def forward(self, x):
        h = self.pool(self._block("conv1", self.conv1(x)), 2)
        h = self.pool(self._block("conv2", self.conv2(h)), 2)
        h = self.dropout(self._block("fc1", self.fc1(h.flatten(1))))
        h = self.dropout(self._block("fc2", self.fc2(h)))
        return self.fc3(h)


def canonical_to_torch(name, spec):
    layer, suffix = name.split(".")
    if layer.startswith("bn") and spec.variant != "scratch":
        suffix = BUILTIN_NAMES.get(suffix, suffix)
    return f"{layer}.{suffix}"
