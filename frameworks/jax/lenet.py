"""BN-LeNet for JAX / Flax (linen), built from a ModelSpec. Layout NHWC: the convs run
`lax.conv_general_dilated` with dimension numbers (NHWC, HWIO, NHWC), JAX/XLA's natural
layout on a GPU; images are transposed from the canonical NCHW once, when they are put
on the device.

Canonical (PyTorch) parameters are converted by common.layout (conv kernel
(O, I, kh, kw) <-> (kh, kw, I, O), dense (out, in) <-> (in, out), fc1's rows between
(C, H, W) and (H, W, C) flatten order). `variables` is Flax's
{"params": ..., "batch_stats": ...}; `variable_paths` says where each canonical array lives.

Variants: scratch (our BatchNorm), builtin (flax.linen.BatchNorm(momentum=decay,
epsilon=eps): Flax's momentum weights the old running value, like our decay),
builtin-defaults (flax.linen.BatchNorm() as constructed: momentum 0.99, epsilon 1e-5),
none. Other normalisations (spec.norm): scratch BatchRenorm / GroupNorm; built-in
nn.GroupNorm, nn.LayerNorm (reduction over every non-batch axis, gamma per channel)
and nn.InstanceNorm, with use_fast_variance=False; no built-in renorm.
`model.apply(variables, x, training=..., bn_training=None)`: bn_training
defaults to training (dropout follows `training`); the probe uses training=False,
bn_training=True. Each BN layer's input is sown into the "intermediates" collection and each activation's
input into "activations" (a no-op unless the caller makes the collection mutable: the probe
asks for the first, the gradient of common.trace for the second; an output the probe does not
ask for would change how XLA fuses it).
"""

from flax import linen as nn

from common.config import ModelSpec
from common.init import has_bias, layer_shapes, parameter_shapes
from common.norms import NORM_NAMES, build, given, norm_after
from common.precision import dtype_and_mixed

from .batchnorm import PIT, BatchNorm, BatchRenorm, GroupNorm, Whiten

# canonical BN suffix -> (collection, leaf) for our layer and for Flax's
SCRATCH_LEAVES = {
    "gamma": ("params", "gamma"),
    "beta": ("params", "beta"),
    "running_mean": ("batch_stats", "running_mean"),
    "running_var": ("batch_stats", "running_var"),
    "steps": ("batch_stats", "steps"),
    "running_cov": ("batch_stats", "running_cov"),
}
FLAX_LEAVES = {
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
FLAX_NORMS = "nn.BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm, nn.RMSNorm"


def flax_dtypes(precision):
    """(dtype, param_dtype) of Flax modules in a precision: the computation's (bfloat16 when mixed, Flax's own
    mixed-precision way) and the parameters' (common.precision)."""
    param_dtype, mixed = dtype_and_mixed(precision)
    return (param_dtype if mixed == "off" else mixed), param_dtype


def builtin(module, **options):
    """A Flax normalisation module with the NormLayer's epsilon (None: Flax's default). use_fast_variance=False:
    Flax's default E[x^2] - E[x]^2 cancels when |mean| >> std (tests/test_jax_pitfalls.py)."""
    return lambda layer, **kw: module(**options, **given(epsilon=layer.epsilon), use_fast_variance=False, **kw)


AXIS = "replicas"  # the mesh axis of a data-parallel run (--replicas K)
# our layers keep their parameters in param_dtype and compute in it (common.precision)
CONSTRUCTORS = {
    "batch": lambda layer, dtype, param_dtype, name: BatchNorm(
        layer.features,
        decay=layer.decay,
        epsilon=layer.epsilon,
        dtype=param_dtype,
        name=name,
        ghost=layer.ghost,
        replicas=(AXIS, layer.sync == "global") if layer.sync else None,
        closed_form=layer.closed_form,
    ),
    "renorm": lambda layer, dtype, param_dtype, name: BatchRenorm(
        layer.features, decay=layer.decay, epsilon=layer.epsilon, dtype=param_dtype, name=name, **layer.renorm_kwargs()
    ),
    "group": lambda layer, dtype, param_dtype, name: GroupNorm(
        layer.features, layer.groups, epsilon=layer.epsilon, dtype=param_dtype, name=name
    ),
    "whiten": lambda layer, dtype, param_dtype, name: Whiten(
        layer.features, decay=layer.decay, epsilon=layer.epsilon, dtype=param_dtype, name=name, **layer.whiten_kwargs()
    ),
    "pit": lambda layer, dtype, param_dtype, name: PIT(
        layer.features, decay=layer.decay, epsilon=layer.epsilon, dtype=param_dtype, name=name, **layer.pit_kwargs()
    ),
    "pit-rank": lambda layer, dtype, param_dtype, name: PIT(
        layer.features, decay=layer.decay, epsilon=layer.epsilon, dtype=param_dtype, name=name, **layer.pit_kwargs()
    ),
    # Flax's momentum weights the old running value, like our decay
    # Flax's own synchronised BN under global sync: axis_name; under local sync, each device's statistics
    "builtin-batch": lambda layer, dtype, param_dtype, **kw: nn.BatchNorm(
        **given(momentum=layer.decay, epsilon=layer.epsilon, axis_name=AXIS if layer.sync == "global" else None),
        dtype=dtype,
        param_dtype=param_dtype,
        **kw,
    ),
    # over every non-batch axis, gamma per channel (feature_axes=-1)
    "builtin-layer": lambda layer, **kw: builtin(
        nn.LayerNorm, reduction_axes=tuple(range(1, layer.dims)), feature_axes=-1
    )(layer, **kw),
    "builtin-group": lambda layer, **kw: builtin(nn.GroupNorm, num_groups=layer.groups)(layer, **kw),
    "builtin-instance": builtin(nn.InstanceNorm, feature_axes=-1),
}


def make_norm(layer, precision="float32", name=None):
    """Flax's module for a common.norms.NormLayer in a precision (flax_dtypes), named `name` in the model
    (layer.sync: --bn-sync inside a data-parallel step, over the mesh axis AXIS)."""
    dtype, param_dtype = flax_dtypes(precision)
    return build(layer, CONSTRUCTORS, "Flax", FLAX_NORMS, dtype=dtype, param_dtype=param_dtype, name=name)


def mode_kwargs(layer, training):
    """Our BN layers take `training`; Flax's BatchNorm takes `use_running_average`, its inverse; the other
    normalisations have no mode."""
    if isinstance(layer, (BatchNorm, Whiten)):
        return {"training": training}
    return {"use_running_average": not training} if isinstance(layer, nn.BatchNorm) else {}


class BNLeNet(nn.Module):
    spec: ModelSpec
    precision: str = "float32"  # common.precision: flax_dtypes gives the computation's and the parameters' dtype
    sync: str | None = None  # --bn-sync inside a data-parallel step (over the mesh axis AXIS), else None

    @nn.compact
    def __call__(self, x, *, training, bn_training=None, noise=None):
        """noise: None, or one step's {norm name: (scales, shifts)} (--norm-noise), added after each norm."""
        spec = self.spec
        dtype, param_dtype = flax_dtypes(self.precision)
        bn_training = training if bn_training is None else bn_training
        act = nn.sigmoid if spec.activation == "sigmoid" else nn.relu
        pool = nn.avg_pool if spec.pooling == "avg" else nn.max_pool
        shapes = layer_shapes(spec)

        def block(layer, h):
            if layer.startswith("conv"):
                h = nn.Conv(
                    shapes[layer][0],
                    shapes[layer][2:],
                    padding="VALID",
                    use_bias=has_bias(spec, layer),
                    dtype=dtype,
                    param_dtype=param_dtype,
                    name=layer,
                )(h)
            else:
                h = nn.Dense(
                    shapes[layer][0], use_bias=has_bias(spec, layer), dtype=dtype, param_dtype=param_dtype, name=layer
                )(h)
            if layer not in NORM_NAMES:
                return h

            def activation(h):  # its input sown into a collection of its own, which only the gradient asks for
                self.sow("activations", f"{layer}_input", h)
                return act(h)

            if not spec.norm_at(layer):
                return activation(h)
            name = NORM_NAMES[layer]
            bn = make_norm(norm_after(spec, layer, self.sync), self.precision, name=name)
            before = spec.norm_placement == "before_activation"
            if not before:
                h = activation(h)
            self.sow("intermediates", f"{name}_input", h)
            h = bn(h, **mode_kwargs(bn, bn_training))
            if noise is not None:  # noisy BN: (C,) or per example (N, C), channels last (common.norms.draw_noise)
                scale, shift = noise[name]
                shape = (-1,) + (1,) * (h.ndim - 2) + (h.shape[-1],)
                h = h * scale.reshape(shape) + shift.reshape(shape)
            return activation(h) if before else h

        h = pool(block("conv1", x), window_shape=(2, 2), strides=(2, 2))  # a keyword, as jax2onnx needs
        h = pool(block("conv2", h), window_shape=(2, 2), strides=(2, 2))
        h = h.reshape(h.shape[0], -1)  # (H, W, C) order: common.layout permutes fc1's rows
        for layer in ("fc1", "fc2"):
            h = block(layer, h)
            if spec.dropout:
                h = nn.Dropout(spec.dropout, deterministic=not training)(h)
        return block("fc3", h).astype(param_dtype)  # the logits, and so the loss, in float32 when mixed


def variable_paths(spec):
    """Canonical name -> (collection, module, leaf) in Flax's variables."""
    leaves = SCRATCH_LEAVES if spec.variant == "scratch" else FLAX_LEAVES
    paths = {}
    for name in parameter_shapes(spec):
        layer, suffix = name.split(".")
        if layer.startswith("bn"):
            paths[name] = (leaves[suffix][0], layer, leaves[suffix][1])
        else:
            paths[name] = ("params", layer, "kernel" if suffix == "weight" else "bias")
    return paths
