"""BN-LeNet for TensorFlow / Keras 3, built from a ModelSpec. Layout NHWC
(TensorFlow on CPU cannot run NCHW convolutions or pooling).

Canonical (PyTorch) parameters are converted by common.layout (conv and dense
kernels, and fc1's rows: NHWC flattens in (H, W, C) order); built-in BN weights
are gamma, beta, moving_mean, moving_variance.

Variants: scratch (our BatchNorm), builtin (BatchNormalization(momentum=decay,
epsilon=eps)), builtin-defaults (BatchNormalization() as constructed:
momentum 0.99, epsilon 1e-3), none. Other normalisations (spec.norm): scratch
BatchRenorm / GroupNorm; built-in GroupNormalization (group, instance with C
groups, layer after a convolution with 1 group: LayerNormalization's gamma there
is per element) and LayerNormalization (layer after a dense layer); no built-in
renorm that fits the spec (KERAS_NORMS says why). `model(x, training=False,
bn_training=None)`: bn_training defaults to training; the probe uses
training=False (no dropout) with bn_training=True.
"""

import keras

from common.init import BN_NAMES, has_bias, layer_shapes
from common.norms import groups_of, no_builtin

from .batchnorm import BatchNorm, BatchRenorm, GroupNorm

BUILTIN_NAMES = {"running_mean": "moving_mean", "running_var": "moving_variance"}
KERAS_NORMS = (
    "BatchNormalization (its renorm=True computes r and d from a second pair of moving averages, "
    "keeps a moving average of the standard deviation instead of the variance and clips with constant "
    "limits: it cannot be set to the spec; tests/test_tensorflow_pitfalls.py measures it), "
    "GroupNormalization, LayerNormalization"
)


def make_norm(spec, num_features, dtype):
    """The layer of spec.norm and spec.variant that follows a layer of num_features channels."""
    if spec.norm == "batch":
        return make_bn(spec, num_features, dtype)
    if spec.variant == "scratch":
        if spec.norm == "renorm":
            return BatchRenorm(
                num_features,
                decay=spec.decay,
                epsilon=spec.epsilon,
                rmax=spec.renorm_rmax,
                dmax=spec.renorm_dmax,
                warmup=spec.renorm_warmup,
                dtype=dtype,
            )
        return GroupNorm(num_features, groups_of(spec, num_features), epsilon=spec.epsilon, dtype=dtype)
    if spec.norm == "renorm":
        raise no_builtin("Keras", "renorm", KERAS_NORMS)
    kwargs = {"dtype": dtype} if spec.variant == "builtin-defaults" else {"epsilon": spec.epsilon, "dtype": dtype}
    # LayerNormalization over (H, W, C) has a gamma per element: after a convolution, one group is the spec
    return keras.layers.GroupNormalization(groups=groups_of(spec, num_features), **kwargs)


def make_dense_norm(spec, num_features, dtype):
    """After a dense layer, the built-in layer normalisation is LayerNormalization itself."""
    if spec.norm == "layer" and spec.variant in ("builtin", "builtin-defaults"):
        kwargs = {"dtype": dtype} if spec.variant == "builtin-defaults" else {"epsilon": spec.epsilon, "dtype": dtype}
        return keras.layers.LayerNormalization(axis=-1, **kwargs)
    return make_norm(spec, num_features, dtype)


def make_bn(spec, num_features, dtype):
    if spec.variant == "scratch":
        return BatchNorm(num_features, decay=spec.decay, epsilon=spec.epsilon, dtype=dtype)
    if spec.variant == "builtin":
        # Keras's momentum weights the old running value, like our decay
        return keras.layers.BatchNormalization(momentum=spec.decay, epsilon=spec.epsilon, dtype=dtype)
    return keras.layers.BatchNormalization(dtype=dtype)  # builtin-defaults


class BNLeNet(keras.Model):
    def __init__(self, spec, dtype="float32"):
        super().__init__(dtype=dtype)
        self.spec = spec
        self.bn_names = [BN_NAMES[layer] for layer in BN_NAMES if spec.bn_at(layer)]
        for layer, shape in layer_shapes(spec).items():
            bias = has_bias(spec, layer)
            if layer.startswith("conv"):
                block = keras.layers.Conv2D(shape[0], shape[2:], use_bias=bias, dtype=dtype, name=layer)
            else:
                block = keras.layers.Dense(shape[0], use_bias=bias, dtype=dtype, name=layer)
            setattr(self, layer, block)
            if layer in BN_NAMES and spec.bn_at(layer):
                bn = (make_norm if layer.startswith("conv") else make_dense_norm)(spec, shape[0], dtype)
                if spec.freeze_gamma_beta:
                    bn.frozen = True  # read by trainable_gamma_beta below
                setattr(self, BN_NAMES[layer], bn)
        pool = keras.layers.AveragePooling2D if spec.pooling == "avg" else keras.layers.MaxPooling2D
        self.pool1, self.pool2 = pool(2, dtype=dtype), pool(2, dtype=dtype)
        self.flatten = keras.layers.Flatten(dtype=dtype)
        self.drop1 = keras.layers.Dropout(spec.dropout, dtype=dtype) if spec.dropout else None
        self.drop2 = keras.layers.Dropout(spec.dropout, dtype=dtype) if spec.dropout else None
        self.act = keras.activations.sigmoid if spec.activation == "sigmoid" else keras.activations.relu

    def bn_layers(self):
        return {name: getattr(self, name) for name in self.bn_names}

    def _block(self, layer, h, bn_training):
        bn = getattr(self, BN_NAMES[layer]) if self.spec.bn_at(layer) else None
        before = self.spec.bn_placement == "before_activation"
        if bn is not None and before:
            h = bn(h, training=bn_training)
        h = self.act(h)
        if bn is not None and not before:
            h = bn(h, training=bn_training)
        return h

    def call(self, x, training=False, bn_training=None):
        bn_training = training if bn_training is None else bn_training
        h = self.pool1(self._block("conv1", self.conv1(x), bn_training))
        h = self.pool2(self._block("conv2", self.conv2(h), bn_training))
        h = self._block("fc1", self.fc1(self.flatten(h)), bn_training)
        h = self.drop1(h, training=training) if self.drop1 else h
        h = self._block("fc2", self.fc2(h), bn_training)
        h = self.drop2(h, training=training) if self.drop2 else h
        # logits (and so the loss) in the variables' dtype: float32 under mixed_bfloat16 (common.precision)
        return keras.ops.cast(self.fc3(h), self.dtype_policy.variable_dtype)


def variable(model, name):
    """The Keras variable behind a canonical name."""
    layer, suffix = name.split(".")
    block = getattr(model, layer)
    if layer.startswith("bn"):
        if model.spec.variant != "scratch":
            suffix = BUILTIN_NAMES.get(suffix, suffix)
        return getattr(block, suffix)
    return block.kernel if suffix == "weight" else block.bias


def trainable_variables(model):
    """Everything SGD updates: all trainable weights, minus frozen gamma/beta."""
    frozen = set()
    for bn in model.bn_layers().values():
        if getattr(bn, "frozen", False):
            frozen.update({id(bn.gamma), id(bn.beta)})
    return [v for v in model.trainable_variables if id(v) not in frozen]
