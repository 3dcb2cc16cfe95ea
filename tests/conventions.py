"""What each framework's built-in BN layer really does, pinned by tests.

One visible table instead of `if framework == ...` branches in test bodies.
Sources: the frameworks' docs and source (docs/conventions.md says what each row means); every row is
asserted by tests/test_backend.py::test_builtin_layer_conventions.
"""

BUILTIN = {
    # running_var: which batch variance is folded into the running variance
    # updated_in: when the running statistics change in training mode (CPU)
    # defaults: (decay, epsilon) of the layer as constructed by default
    # decay_dtype: precision the layer blends running statistics with. MXNet's
    #   operator keeps `momentum` as a C float: 0.9 acts as 0.899999976 even in
    #   float64 runs (a 3e-8 relative gap per update, measured).
    "torch": {"running_var": "unbiased", "updated_in": "forward", "defaults": (0.9, 1e-5), "decay_dtype": "float64"},
    "mxnet": {"running_var": "biased", "updated_in": "backward", "defaults": (0.9, 1e-5), "decay_dtype": "float32"},
    "tensorflow": {
        "running_var": "biased",
        "updated_in": "forward",
        "defaults": (0.99, 1e-3),
        "decay_dtype": "float64",
    },
    # Flax (linen) BatchNorm is functional: the forward returns the new statistics (with
    # mutable=["batch_stats"]). Its batch variance is E[x^2] - E[x]^2 by default
    # (use_fast_variance=True): tests/test_jax_pitfalls.py measures what that costs.
    "jax": {"running_var": "biased", "updated_in": "forward", "defaults": (0.99, 1e-5), "decay_dtype": "float64"},
}

# What each --execution runs as (describe()["execution"]); "default" is the framework's own choice;
# None: the framework has no such mode and refuses it.
EXECUTION_NAMES = {
    "torch": {"default": "eager", "compiled": "torch.compile", "eager": "eager", "xla": None},
    "mxnet": {"default": "hybridized", "compiled": "hybridized", "eager": "imperative", "xla": None},
    "tensorflow": {
        "default": "tf.function(jit_compile=True)",
        "compiled": "tf.function",
        "eager": "eager",
        "xla": "tf.function(jit_compile=True)",
    },
    "jax": {"default": "jax.jit", "compiled": "jax.jit", "eager": "eager", "xla": "jax.jit"},
}

# Tolerances of the scratch layer against the float64 reference.
# float32: relative error of a few ulps through mean/var/rsqrt.
# Far from zero (mean 1000, std 1, the input of test_scratch_bn_far_from_zero_mean):
# a float32 input there is only exact to its ulp, 6.1e-5, and each framework
# accumulates the float32 batch mean in its own order (PyTorch var_mean, MXNet a
# GEMM with ones, TensorFlow reduce_mean, JAX jnp.mean), so the centred values carry
# that error, scaled by gamma/std. Worst |y error| over 5 input seeds, measured: 7.5e-5
# PyTorch, 3.0e-4 MXNet, 4.4e-4 TensorFlow, 4.4e-4 JAX; the bounds leave about 1.3x of that.
# That figure cannot tell the formulas apart: TensorFlow's fused
# x * inv + (beta - mean * inv) measured 4.8e-4 in the TensorFlow scratch layer.
# What does tell them apart is the error left within a channel once a per-channel
# offset and scale are fitted out (test_scratch_bn_centres_before_scaling): all
# four layers compute (x - mean) * inv_std, measured at most 3.8e-7 over the same
# 5 seeds; the fused form rounds x * inv (about 1000) in every element, about
# 6.5e-5 (measured in a float32 numpy copy of each form).
FLOAT32 = {"rtol": 1e-4, "atol": 1e-5}
FLOAT64 = {"rtol": 1e-10, "atol": 1e-12}
FAR_FROM_ZERO_ATOL = {"torch": 1e-4, "mxnet": 4e-4, "tensorflow": 6e-4, "jax": 6e-4}
CENTRED_RESIDUAL = 2e-6

# Whether a forward outside training draws from the framework's dropout random stream. MXNet's BN-LeNet
# draws every dropout mask (mode="always") and picks it or the input with `where`, so that one hybridized
# graph follows the training flag it is given: every evaluate/probe forward advances the stream. With
# dropout > 0, extra eval-mode work (population statistics) therefore shifts MXNet's later dropout masks;
# without dropout, or in the other frameworks, it changes nothing (tests/test_population.py).
EVAL_DRAWS_DROPOUT = {"torch": False, "mxnet": True, "tensorflow": False, "jax": False}

# The built-in layer each framework has for the other normalisations (common.norms), per (norm, input
# rank): its default epsilon, or None where no built-in layer fits the spec and `builtin` fails before
# training (BackendUnavailable). Asserted by tests/test_norms.py; what each lacks is pinned in the
# framework's pitfalls module.
# - PyTorch: nn.LayerNorm after a dense layer; after a convolution nn.GroupNorm(1, C) (nn.LayerNorm([C, H,
#   W]) has a gamma per element); nn.GroupNorm; nn.InstanceNorm2d(affine=True) (affine is off by default).
# - Gluon: nn.LayerNorm normalises one axis (the spec after a dense layer only); nn.GroupNorm has one
#   gamma/beta per group and needs 3-D input; nn.InstanceNorm ignores gamma by default (scale=False) and
#   has a float32 kernel only.
# - Keras: LayerNormalization after a dense layer; GroupNormalization with 1 group (layer), G groups,
#   C groups (instance); BatchNormalization(renorm=True) does not fit the spec (test_tensorflow_pitfalls).
# - Flax: nn.LayerNorm(reduction_axes=every non-batch axis, feature_axes=-1), nn.GroupNorm, nn.InstanceNorm,
#   each with use_fast_variance=False (the default E[x^2] - E[x]^2 cancels far from zero).
NORM_BUILTIN_EPSILON = {
    "torch": {
        ("layer", 2): 1e-5,
        ("layer", 4): 1e-5,
        ("group", 2): 1e-5,
        ("group", 4): 1e-5,
        ("instance", 4): 1e-5,
        ("renorm", 2): None,
        ("renorm", 4): None,
    },
    "mxnet": {
        ("layer", 2): 1e-5,
        ("layer", 4): None,
        ("group", 2): None,
        ("group", 4): None,
        ("instance", 4): 1e-5,
        ("renorm", 2): None,
        ("renorm", 4): None,
    },
    "tensorflow": {
        ("layer", 2): 1e-3,
        ("layer", 4): 1e-3,
        ("group", 2): 1e-3,
        ("group", 4): 1e-3,
        ("instance", 4): 1e-3,
        ("renorm", 2): None,
        ("renorm", 4): None,
    },
    "jax": {
        ("layer", 2): 1e-6,
        ("layer", 4): 1e-6,
        ("group", 2): 1e-6,
        ("group", 4): 1e-6,
        ("instance", 4): 1e-6,
        ("renorm", 2): None,
        ("renorm", 4): None,
    },
}
# dtypes a built-in normalisation layer cannot run in (it fails before training, naming them)
NORM_BUILTIN_DTYPES_MISSING = {"mxnet": {"instance": ("float64",)}}
# Extra absolute error of a built-in normalisation layer against the float64 reference, beyond round-off
# (measured): Gluon's LayerNorm is 2.0e-12 off in float64 at input offsets 0, 3 and 1000 alike, so not a
# cancellation (scratch layers and the other built-ins stay within a few hundred unit roundoffs).
NORM_BUILTIN_ATOL = {"mxnet": {"layer": 5e-12}}

# Each framework's built-in BN under its own mixed-precision mechanism (--precision mixed-bfloat16), measured
# on a bfloat16 input of mean 1000 and std 1 (tests/test_precision.py): the dtype of the output, of gamma/beta
# and of the running statistics, and the batch statistics' precision, read off the running-statistics update
# against the float64 reference: "float32" (two passes), or "float32 E[x^2]-E[x]^2" (Flax's default fast
# variance: float32 too, but the variance cancels this far from zero). None: no mixed mechanism the suite runs
# (MXNet: amp.init rewrites the operators of the whole process; frameworks/mxnet/lenet.py NO_MIXED).
MIXED_BUILTIN = {
    "torch": {
        "mechanism": "torch.autocast(dtype=torch.bfloat16)",
        "output": "bfloat16",
        "gamma": "float32",
        "running": "float32",
        "statistics": "float32",
    },
    "mxnet": None,
    "tensorflow": {
        "mechanism": "mixed_bfloat16 dtype policy",
        "output": "bfloat16",
        "gamma": "float32",
        "running": "float32",
        "statistics": "float32",
    },
    "jax": {
        "mechanism": "dtype=bfloat16, param_dtype=float32",
        "output": "bfloat16",
        "gamma": "float32",
        "running": "float32",
        "statistics": "float32 E[x^2]-E[x]^2",
    },
}

# The frameworks that train with --replicas K > 1 (the others refuse it); asserted against each backend's
# data_parallel by tests/test_data_parallel.py
DATA_PARALLEL = ("torch", "jax", "tensorflow", "mxnet")

# --replicas K --bn-sync local: which running statistics eval mode uses (asserted by
# tests/test_data_parallel.py::test_local_sync_running_statistics_follow_the_framework_convention). The scratch
# layer's are the project's spec; the built-in layer's are the framework's data-parallel default:
# PyTorch's DDP broadcasts replica 0's buffers before every forward (broadcast_buffers / forward_sync_buffers).
# Flax's built-in layer without axis_name keeps one copy per device; the step's output is replica 0's. Keras'
# BatchNormalization under MirroredStrategy likewise: its moving statistics are variables that aggregate nothing, so
# each replica assigns its own copy, and a read outside the step (eval mode) sees replica 0's. Gluon's nn.BatchNorm
# over K contexts: each context's copy is written by its own slice's backward; the run reads context 0's.
REPLICA_RUNNING_STATS = {
    "torch": {"scratch": "replicas' mean", "builtin": "replica 0's"},
    "jax": {"scratch": "replicas' mean", "builtin": "replica 0's"},
    "tensorflow": {"scratch": "replicas' mean", "builtin": "replica 0's"},
    "mxnet": {"scratch": "replicas' mean", "builtin": "replica 0's"},
}
