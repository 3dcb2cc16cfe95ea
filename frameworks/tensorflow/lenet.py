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

from common.init import has_bias, layer_shapes, norm_features
from common.norms import NORM_NAMES, build, given, norm_after

from .batchnorm import PIT, BatchNorm, BatchRenorm, GroupNorm, Whiten

BUILTIN_NAMES = {"running_mean": "moving_mean", "running_var": "moving_variance"}
KERAS_NORMS = (
    "BatchNormalization (its renorm=True computes r and d from a second pair of moving averages, "
    "keeps a moving average of the standard deviation instead of the variance and clips with constant "
    "limits: it cannot be set to the spec; tests/test_tensorflow_pitfalls.py measures it), "
    "GroupNormalization, LayerNormalization"
)


def builtin_layer(layer, **kw):
    # LayerNormalization over (H, W, C) has a gamma per element: after a convolution, one group is the spec
    if layer.dims == 2:
        return keras.layers.LayerNormalization(axis=-1, **given(epsilon=layer.epsilon), **kw)
    return keras.layers.GroupNormalization(groups=1, **given(epsilon=layer.epsilon), **kw)


def builtin_group(layer, **kw):
    return keras.layers.GroupNormalization(groups=layer.groups, **given(epsilon=layer.epsilon), **kw)


CONSTRUCTORS = {
    "batch": lambda layer, **kw: BatchNorm(
        layer.features,
        decay=layer.decay,
        epsilon=layer.epsilon,
        ghost=layer.ghost,
        pooled=layer.sync == "global",
        closed_form=layer.closed_form,
        **kw,
    ),
    "renorm": lambda layer, **kw: BatchRenorm(
        layer.features, decay=layer.decay, epsilon=layer.epsilon, **layer.renorm_kwargs(), **kw
    ),
    "group": lambda layer, **kw: GroupNorm(layer.features, layer.groups, epsilon=layer.epsilon, **kw),
    "whiten": lambda layer, **kw: Whiten(
        layer.features, decay=layer.decay, epsilon=layer.epsilon, **layer.whiten_kwargs(), **kw
    ),
    "pit": lambda layer, **kw: PIT(
        layer.features, **layer.pit_kwargs(), decay=layer.decay, epsilon=layer.epsilon, **kw
    ),
    "pit-rank": lambda layer, **kw: PIT(
        layer.features, **layer.pit_kwargs(), decay=layer.decay, epsilon=layer.epsilon, **kw
    ),
    # Keras's momentum weights the old running value, like our decay
    # under --replicas with global sync, Keras' own synchronised BN
    "builtin-batch": lambda layer, **kw: keras.layers.BatchNormalization(
        **given(momentum=layer.decay, epsilon=layer.epsilon),
        **({"synchronized": True} if layer.sync == "global" else {}),
        **kw,
    ),
    "builtin-layer": builtin_layer,
    "builtin-group": builtin_group,
    "builtin-instance": builtin_group,  # C groups
}


def keras_dtype(precision):
    """The Keras dtype policy of a precision: mixed_bfloat16, Keras' own mixed-precision mechanism, or the dtype."""
    return "mixed_bfloat16" if precision == "mixed-bfloat16" else precision


def make_norm(layer, precision="float32", name=None):
    """Keras' layer for a common.norms.NormLayer under the precision's dtype policy (layer.sync: --bn-sync inside a
    data-parallel run)."""
    return build(layer, CONSTRUCTORS, "Keras", KERAS_NORMS, dtype=keras_dtype(precision), **given(name=name))


class BNLeNet(keras.Model):
    def __init__(self, spec, precision="float32", sync=None):
        """sync: --bn-sync (local or global) when built for a data-parallel run, else None."""
        dtype = keras_dtype(precision)
        super().__init__(dtype=dtype)
        self.spec = spec
        self.norm_names = list(norm_features(spec))
        for layer, shape in layer_shapes(spec).items():
            bias = has_bias(spec, layer)
            if layer.startswith("conv"):
                block = keras.layers.Conv2D(shape[0], shape[2:], use_bias=bias, dtype=dtype, name=layer)
            else:
                block = keras.layers.Dense(shape[0], use_bias=bias, dtype=dtype, name=layer)
            setattr(self, layer, block)
            if layer in NORM_NAMES and spec.norm_at(layer):
                bn = make_norm(norm_after(spec, layer, sync), precision)
                if spec.freeze_gamma_beta:
                    bn.frozen = True  # read by trainable_gamma_beta below
                setattr(self, NORM_NAMES[layer], bn)
        pool = keras.layers.AveragePooling2D if spec.pooling == "avg" else keras.layers.MaxPooling2D
        self.pool1, self.pool2 = pool(2, dtype=dtype), pool(2, dtype=dtype)
        self.flatten = keras.layers.Flatten(dtype=dtype)
        self.drop1 = keras.layers.Dropout(spec.dropout, dtype=dtype) if spec.dropout else None
        self.drop2 = keras.layers.Dropout(spec.dropout, dtype=dtype) if spec.dropout else None
        self.act = keras.activations.sigmoid if spec.activation == "sigmoid" else keras.activations.relu
        self.activation_inputs = None  # a dict while the backend captures each activation's input
        self.norm_inputs = None  # a dict while the backend captures each normalisation layer's input

    def norm_modules(self):
        return {name: getattr(self, name) for name in self.norm_names}

    def _block(self, layer, h, bn_training, noise):
        bn = getattr(self, NORM_NAMES[layer]) if self.spec.norm_at(layer) else None
        before = self.spec.norm_placement == "before_activation"

        def norm(h):
            if self.norm_inputs is not None:  # the probe's and the population pass's (also while tracing)
                self.norm_inputs[NORM_NAMES[layer]] = h
            h = bn(h, training=bn_training)
            if noise is None:
                return h
            scale, shift = noise[NORM_NAMES[layer]]  # noisy BN: (C,) or per example (N, C) (common.norms)
            shape = (-1,) + (1,) * (len(h.shape) - 2) + (h.shape[-1],)  # channels last
            return h * keras.ops.reshape(keras.ops.cast(scale, h.dtype), shape) + keras.ops.reshape(
                keras.ops.cast(shift, h.dtype), shape
            )

        if bn is not None and before:
            h = norm(h)
        if self.activation_inputs is not None:  # eager calls only: the backend's gradient (common.trace)
            self.activation_inputs[layer] = h
        h = self.act(h)
        if bn is not None and not before:
            h = norm(h)
        return h

    def call(self, x, training=False, bn_training=None, noise=None):
        """noise: None, or one step's {norm name: (scales, shifts)} (--norm-noise), added after each norm."""
        bn_training = training if bn_training is None else bn_training
        h = self.pool1(self._block("conv1", self.conv1(x), bn_training, noise))
        h = self.pool2(self._block("conv2", self.conv2(h), bn_training, noise))
        h = self._block("fc1", self.fc1(self.flatten(h)), bn_training, noise)
        h = self.drop1(h, training=training) if self.drop1 else h
        h = self._block("fc2", self.fc2(h), bn_training, noise)
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
    for bn in model.norm_modules().values():
        if getattr(bn, "frozen", False):
            frozen.update({id(bn.gamma), id(bn.beta)})
    return [v for v in model.trainable_variables if id(v) not in frozen]
