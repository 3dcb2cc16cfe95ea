"""BN-LeNet for TensorFlow / Keras 3, built from a ModelSpec. Layout NHWC
(TensorFlow on CPU cannot run NCHW convolutions or pooling).

Canonical (PyTorch) parameters are converted by common.layout (conv and dense
kernels, and fc1's rows: NHWC flattens in (H, W, C) order); built-in BN weights
are gamma, beta, moving_mean, moving_variance.

Variants: scratch (our BatchNorm), builtin (BatchNormalization(momentum=decay,
epsilon=eps)), builtin-defaults (BatchNormalization() as constructed:
momentum 0.99, epsilon 1e-3), none. `model(x, training=False,
bn_training=None)`: bn_training defaults to training; the probe uses
training=False (no dropout) with bn_training=True.
"""
import keras

from common.init import BN_NAMES, has_bias, layer_shapes

from .batchnorm import BatchNorm

BUILTIN_NAMES = {"running_mean": "moving_mean", "running_var": "moving_variance"}


def make_bn(spec, num_features, dtype):
    if spec.variant == "scratch":
        return BatchNorm(num_features, decay=spec.decay, epsilon=spec.epsilon, dtype=dtype)
    if spec.variant == "builtin":
        # Keras's momentum weights the old running value, like our decay
        return keras.layers.BatchNormalization(momentum=spec.decay, epsilon=spec.epsilon, dtype=dtype)
    return keras.layers.BatchNormalization(dtype=dtype)  # builtin-defaults


def effective_bn(spec):
    if not spec.has_bn:
        return None, None  # no BN layer, nothing in effect
    if spec.variant == "builtin-defaults":
        layer = keras.layers.BatchNormalization()
        return layer.momentum, layer.epsilon
    return spec.decay, spec.epsilon


class BNLeNet(keras.Model):
    def __init__(self, spec, dtype="float32"):
        super().__init__(dtype=dtype)
        self.spec = spec
        self.bn_names = [BN_NAMES[l] for l in BN_NAMES if spec.bn_at(l)]
        for layer, shape in layer_shapes(spec).items():
            bias = has_bias(spec, layer)
            if layer.startswith("conv"):
                block = keras.layers.Conv2D(shape[0], shape[2:], use_bias=bias, dtype=dtype, name=layer)
            else:
                block = keras.layers.Dense(shape[0], use_bias=bias, dtype=dtype, name=layer)
            setattr(self, layer, block)
            if layer in BN_NAMES and spec.bn_at(layer):
                bn = make_bn(spec, shape[0], dtype)
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
        return self.fc3(h)


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

