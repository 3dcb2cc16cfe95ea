"""BN-LeNet for MXNet Gluon, built from a ModelSpec. Layout NCHW, canonical names
map to attributes: conv1.weight -> net.conv1.weight, bn1.gamma -> net.bn1.gamma.

Variants: scratch (our BatchNorm), builtin (gluon.nn.BatchNorm(momentum=decay,
epsilon=eps)), builtin-defaults (gluon.nn.BatchNorm() as constructed), none.
Other normalisations (spec.norm): scratch BatchRenorm / GroupNorm; built-in
nn.LayerNorm (after a dense layer) and nn.InstanceNorm(scale=True); the rest
have no Gluon layer that fits the spec (GLUON_NORMS says why).

Modes. `net(x, training=None, bn_training=None)`: `training` defaults to Gluon's
flag `autograd.is_training()` (True inside `autograd.record()`), `bn_training`
to `training`. Both reach the graph as inputs, so a hybridized net follows
them at run time. The built-in BN reads Gluon's flag itself, at run time. The
net returns (logits, new_running_stats); call store_running(new_running_stats)
after a training forward (the scratch layers' update).
"""

from mxnet import autograd, nd
from mxnet.gluon import HybridBlock, nn

from common.errors import BackendUnavailable
from common.init import has_bias, layer_shapes, norm_features
from common.norms import CHANNELS, NORM_NAMES, build, given, norm_after

from .batchnorm import PIT, BatchNorm, BatchRenorm, GroupNorm, Whiten

# Gluon's own normalisation layers (MXNet 1.9.1), and why most cannot be set to the spec
GLUON_NORMS = (
    "nn.BatchNorm, nn.LayerNorm (one axis: fits the spec after a dense layer only), nn.InstanceNorm, "
    "nn.GroupNorm (one gamma and beta per group, not per channel, and 3-D input or more: it fits no "
    "position of the spec)"
)


def builtin_layer(layer):
    # nn.LayerNorm normalises over one axis: the spec only after a dense layer (None: no fitting layer here)
    return (
        nn.LayerNorm(axis=-1, in_channels=layer.features, **given(epsilon=layer.epsilon)) if layer.dims == 2 else None
    )


def no_closed_form():
    raise BackendUnavailable(
        "--norm-backward closed-form is not available in MXNet Gluon: a hand-written backward is an "
        "mx.autograd.Function, which runs imperatively only and cannot be part of a hybridized graph; use "
        "--norm-backward autodiff for MXNet"
    )


CONSTRUCTORS = {
    "batch": lambda layer: (
        no_closed_form()
        if layer.closed_form
        else BatchNorm(layer.features, layer.dims, decay=layer.decay, epsilon=layer.epsilon, ghost=layer.ghost)
    ),
    "renorm": lambda layer: BatchRenorm(
        layer.features, layer.dims, decay=layer.decay, epsilon=layer.epsilon, **layer.renorm_kwargs()
    ),
    "group": lambda layer: GroupNorm(layer.features, layer.dims, layer.groups, epsilon=layer.epsilon),
    "whiten": lambda layer: Whiten(
        layer.features, layer.dims, decay=layer.decay, epsilon=layer.epsilon, **layer.whiten_kwargs()
    ),
    "pit": lambda layer: PIT(
        layer.features, layer.dims, **layer.pit_kwargs(), decay=layer.decay, epsilon=layer.epsilon
    ),
    "pit-rank": lambda layer: PIT(
        layer.features, layer.dims, **layer.pit_kwargs(), decay=layer.decay, epsilon=layer.epsilon
    ),
    # Gluon's momentum weights the old running value, like our decay
    "builtin-batch": lambda layer: nn.BatchNorm(
        in_channels=layer.features, **given(momentum=layer.decay, epsilon=layer.epsilon)
    ),
    "builtin-layer": builtin_layer,
    # scale=False by default: gamma would be ignored; float32 only (check_dtype)
    "builtin-instance": lambda layer: nn.InstanceNorm(
        axis=1, scale=True, in_channels=layer.features, **given(epsilon=layer.epsilon)
    ),
}


def make_norm(layer, precision="float32", name=None):
    """Gluon's block for a common.norms.NormLayer. precision: the net casts every block after initialising it
    (check_dtype refuses what Gluon cannot run); name: unused, a block is named by its attribute."""
    check_layer_dtype(layer, precision)
    return build(layer, CONSTRUCTORS, "MXNet Gluon", GLUON_NORMS)


# tests/test_mxnet_pitfalls.py shows what amp.init does to the process
NO_MIXED = (
    'MXNet 1.9.1\'s mixed precision, mx.contrib.amp.init(target_dtype="bfloat16"), rewrites the operators of '
    "mx.nd and mx.sym for the whole process, once and for good, before the network is built: a float32 run "
    "after it in the same worker would no longer be float32, so the suite does not run MXNet in mixed "
    "precision; use --precision float32 or float64 for MXNet"
)


def check_dtype(spec, precision):
    """Refuse mixed precision (NO_MIXED) and a layer Gluon cannot run in `precision`, before anything is built."""
    if precision == "mixed-bfloat16":
        raise BackendUnavailable(NO_MIXED)
    if spec.has_norm:
        check_layer_dtype(norm_after(spec, spec.norm_positions[0]), precision)


def check_layer_dtype(layer, precision):
    """Gluon's InstanceNorm has a float32 kernel only (float64 fails inside the operator)."""
    if layer.kind == "builtin-instance" and precision != "float32":
        raise BackendUnavailable(
            f"Gluon's nn.InstanceNorm (MXNet 1.9.1) runs in float32 only, not {precision}; "
            f"use --dtype float32, or --variants scratch"
        )


class BNLeNet(HybridBlock):
    def __init__(self, spec, **kwargs):
        super().__init__(**kwargs)
        self.spec = spec
        # the scratch layers with running statistics take the mode and return their new state
        self.scratch = spec.variant == "scratch" and spec.has_running_stats
        self.norm_names = list(norm_features(spec))
        self.activation_inputs = None  # a dict while the backend captures each activation's input
        self.skip_dropout = False  # set by imperative() for a forward that is not training
        with self.name_scope():
            for layer, shape in layer_shapes(spec).items():
                bias = has_bias(spec, layer)
                if layer.startswith("conv"):
                    block = nn.Conv2D(shape[0], kernel_size=shape[2:], in_channels=shape[1], use_bias=bias)
                else:  # Dense flattens NCHW input in (C, H, W) order, as the canonical layout
                    block = nn.Dense(shape[0], in_units=shape[1], use_bias=bias)
                setattr(self, layer, block)
                if layer in NORM_NAMES and spec.norm_at(layer):
                    bn = make_norm(norm_after(spec, layer))
                    setattr(self, NORM_NAMES[layer], bn)
                    if spec.freeze_gamma_beta:
                        bn.gamma.grad_req = bn.beta.grad_req = "null"

    def norm_modules(self):
        return {name: getattr(self, name) for name in self.norm_names}

    def forward(self, x, training=None, bn_training=None, noise=None):
        """noise: None, or one step's {norm name: (scales, shifts)} (--norm-noise), added after each norm."""
        return super().forward(x, *self.inputs(x, training, bn_training, noise))

    def imperative(self, x, training, bn_training, noise=None):
        """The forward as NDArray operations past this block's cached graph (its children keep theirs), so each
        activation's input can be captured without clearing the hybridized training graph (common.trace)."""
        # no dropout op at all when not training: Gluon's draws from the global stream even when it keeps every
        # value (tests/conventions.py EVAL_DRAWS_DROPOUT), and the trace must leave the run's masks alone
        self.skip_dropout = not training
        try:
            return self.hybrid_forward(nd, x, *self.inputs(x, training, bn_training, noise))
        finally:
            self.skip_dropout = False

    def inputs(self, x, training, bn_training, noise):
        """The graph's inputs after x: the mode flags, and with --norm-noise the noise arrays, on every call (a
        hybridized graph keeps one set of inputs): scale 1 and shift 0 where none is given (eval mode, probes)."""
        training = autograd.is_training() if training is None else training
        bn_training = training if bn_training is None else bn_training
        if bn_training and self.spec.has_norm and x.shape[0] < 2:
            raise ValueError(f"training-mode BN needs a batch of at least 2, got {x.shape[0]}")
        flags = nd.array([float(bn_training), float(training)], ctx=x.context, dtype=x.dtype)
        arrays = []
        for name, features in norm_features(self.spec).items() if self.spec.norm_noise else ():
            if noise is None:  # the shapes the graph was made with: per example in the paper's form
                shape = (x.shape[0], features) if self.spec.noise_form == "example" else (features,)
                ones, zeros = (f(shape, ctx=x.context, dtype=x.dtype) for f in (nd.ones, nd.zeros))
                arrays += [ones, zeros]
            else:
                arrays += list(noise[name])
        return [flags, *arrays]

    def _block(self, F, layer, h, bn_mode, new_stats, noise):
        bn = getattr(self, NORM_NAMES[layer]) if self.spec.norm_at(layer) else None

        def norm(h):
            if not self.scratch:
                y = bn(h)
            else:
                y, *state = bn(h, bn_mode)
                new_stats.extend(state)
            if not noise:
                return y
            scale, shift = noise[NORM_NAMES[layer]]  # noisy BN: (C,) or per example (N, C) (common.norms.draw_noise)
            features = CHANNELS[layer]
            shape = (-1, features, 1, 1) if layer.startswith("conv") else (-1, features)
            return F.broadcast_add(F.broadcast_mul(y, F.reshape(scale, shape=shape)), F.reshape(shift, shape=shape))

        before = self.spec.norm_placement == "before_activation"
        if bn is not None and before:
            h = norm(h)
        if self.activation_inputs is not None:  # imperative calls only: the backend's gradient (common.trace)
            self.activation_inputs[layer] = h
        h = F.Activation(h, act_type=self.spec.activation)
        if bn is not None and not before:
            h = norm(h)
        return h

    def _dropout(self, F, h, training):
        if self.spec.dropout == 0 or self.skip_dropout:
            return h
        # mode="always" plus `where`: dropout follows the `training` input, not the trace-time flag
        dropped = F.Dropout(h, p=self.spec.dropout, mode="always")
        return F.where(F.broadcast_like(F.reshape(training, shape=(1, 1)), h), dropped, h)

    def hybrid_forward(self, F, x, flags, *arrays):
        bn_mode = F.slice_axis(flags, axis=0, begin=0, end=1)
        training = F.slice_axis(flags, axis=0, begin=1, end=2)
        pool = dict(kernel=(2, 2), stride=(2, 2), pool_type=self.spec.pooling)
        new_stats = []
        noise = {name: arrays[2 * i : 2 * i + 2] for i, name in enumerate(self.norm_names)} if arrays else {}
        h = F.Pooling(self._block(F, "conv1", self.conv1(x), bn_mode, new_stats, noise), **pool)
        h = F.Pooling(self._block(F, "conv2", self.conv2(h), bn_mode, new_stats, noise), **pool)
        h = self._dropout(F, self._block(F, "fc1", self.fc1(h), bn_mode, new_stats, noise), training)
        h = self._dropout(F, self._block(F, "fc2", self.fc2(h), bn_mode, new_stats, noise), training)
        return (self.fc3(h),) + tuple(new_stats)

    def store_running(self, new_stats):
        """After a training forward: store what the scratch layers computed."""
        start = 0
        for name in self.norm_names if self.scratch else []:
            block = getattr(self, name)
            block.store(*new_stats[start : start + len(block.state)])
            start += len(block.state)
