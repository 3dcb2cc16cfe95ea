import pytest

from common.config import STORED_NAMES, ModelSpec, RunConfig
from common.errors import ConfigError
from common.init import init_params, parameter_shapes
from common.registry import load_backend_module, parse_frameworks


def test_defaults_are_the_textbook_setting():
    c = RunConfig()
    assert (c.lr, c.batch_size, c.epochs, c.dtype, c.seed) == (1.0, 256, 10, "float32", 0)
    assert (c.model.decay, c.model.epsilon, c.model.variant) == (0.9, 1e-5, "scratch")


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"lr": 0}, "lr \\(--lr\\) must be a positive"),
        ({"lr": float("nan")}, "lr \\(--lr\\) must be a positive"),
        ({"batch_size": 1}, "batch_size"),
        ({"epochs": 0}, "epochs"),
        ({"dtype": "float16"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"seed": -1}, "seed"),
        ({"batch_size": 2.5}, "batch_size"),
    ],
)
def test_bad_run_config_values(changes, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig(**changes)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"variant": "fancy"}, "unknown variant 'fancy'"),
        ({"decay": 1.0}, "decay \\(--decay\\) must be in"),
        ({"epsilon": 0}, "epsilon \\(--epsilon\\) must be a positive"),
        ({"dropout": 1.0}, "dropout"),
        ({"norm_positions": ("conv3",)}, "unknown BN position"),
        ({"activation": "tanh"}, "activation"),
        ({"input_size": 30}, "input_size"),
    ],
)
def test_bad_model_spec_values(changes, match):
    with pytest.raises(ConfigError, match=match):
        ModelSpec(**changes)


def test_round_trip_hash_and_equality():
    c = RunConfig(model=ModelSpec(variant="builtin", norm_positions=("fc1", "conv1")), seed=3)
    assert c.model.norm_positions == ("conv1", "fc1")  # normalised to network order
    again = RunConfig.from_dict(c.to_dict())
    assert again == c and hash(again) == hash(c) and again.config_id == c.config_id
    assert RunConfig(seed=4).config_id != RunConfig(seed=5).config_id
    with pytest.raises(ConfigError, match="unknown config keys"):
        RunConfig.from_dict({**c.to_dict(), "momentum": 0.1})


def test_unknown_framework_is_a_clear_error():
    with pytest.raises(ConfigError, match="unknown framework 'paddle'"):
        parse_frameworks("torch,paddle")
    with pytest.raises(ConfigError, match="unknown framework"):
        load_backend_module("caffe")


def test_spec_knobs_change_the_parameter_layout():
    spec = ModelSpec(bias_before_norm=False, norm_positions=("conv1", "fc2"), input_size=32)
    shapes = parameter_shapes(spec)
    assert "conv1.bias" not in shapes and "conv2.bias" in shapes and "fc2.bias" not in shapes
    assert "bn2.gamma" not in shapes and "bn4.running_var" in shapes
    assert shapes["fc1.weight"] == (120, 16 * 5 * 5)
    assert "bn1.gamma" not in parameter_shapes(ModelSpec(variant="none"))


def test_initial_parameters_are_seeded_and_glorot():
    spec = ModelSpec()
    a, b, c = init_params(spec, 0), init_params(spec, 0), init_params(spec, 1)
    assert all((a[k] == b[k]).all() for k in a)
    assert not (a["conv1.weight"] == c["conv1.weight"]).all()
    limit = (6 / (25 + 150)) ** 0.5
    assert abs(a["conv1.weight"]).max() <= limit and abs(a["conv1.weight"]).max() > 0.9 * limit
    assert (a["bn1.running_var"] == 1).all() and (a["bn1.running_mean"] == 0).all()  # not the textbook's 0
    assert a["fc1.weight"].dtype.name == "float32"


def test_every_option_field_is_a_run_option_and_reaches_the_config():
    """The run and model options are made from the config fields declared with option(): each is in
    compare.run's --help with its help text, and what it parses is what the RunConfig holds."""
    from compare import options
    from compare.run import build_parser, configs_from_args

    parser = build_parser()
    text = " ".join(parser.format_help().split())
    for cls in (RunConfig, ModelSpec):
        for f in options.option_fields(cls):
            flag = options.flag(f)
            assert flag in text and " ".join(f.metadata["help"].split()) in text, flag
    args = parser.parse_args(
        [
            "--quick",
            "--variants",
            "scratch",
            "--seeds",
            "3",
            "--norm",
            "group",
            "--groups",
            "3",
            "--no-bias-before-norm",
            "--norm-positions",
            "fc1,conv1",
            "--lr",
            "0.5",
            "--epochs",
            "4",
            "--population-size",
            "0",
            "--activation",
            "relu",
            "--decay",
            "0.8",
        ]
    )
    [config] = configs_from_args(args)
    assert (config.seed, config.lr, config.epochs, config.train_limit, config.test_limit) == (3, 0.5, 4, 6000, 2000)
    assert config.population_size == 0 and config.batch_size == 256 and config.device == "auto"
    m = config.model
    assert (m.norm, m.groups, m.bias_before_norm, m.norm_positions, m.activation, m.decay) == (
        "group",
        3,
        False,
        ("conv1", "fc1"),
        "relu",
        0.8,
    )
    [default] = configs_from_args(parser.parse_args(["--variants", "none"]))
    assert default == RunConfig(model=ModelSpec(variant="none"))  # nothing given: the dataclasses' defaults
    # the flags' older spellings, from when they named BN only, still set the same fields
    old = [
        "--variants",
        "scratch",
        "--bn-positions",
        "conv2",
        "--bn-placement",
        "after_activation",
        "--no-bias-before-bn",
    ]
    [config] = configs_from_args(parser.parse_args(old))
    assert (config.model.norm_positions, config.model.norm_placement, config.model.bias_before_norm) == (
        ("conv2",),
        "after_activation",
        False,
    )
    with pytest.raises(ConfigError, match="unknown norm position \\['fc3'\\]"):  # named as the option is now
        configs_from_args(parser.parse_args(["--norm-positions", "fc3"]))


def test_the_editions_preset_sets_the_chapters_settings_and_explicit_options_win():
    """--preset online is the chapter on d2l.ai today (lr 0.1, batch 128, 10 epochs), classic the defaults; --quick
    and explicit options win over it."""
    from compare.run import build_parser, configs_from_args

    parser = build_parser()
    [online] = configs_from_args(parser.parse_args(["--variants", "scratch", "--preset", "online"]))
    assert (online.lr, online.batch_size, online.epochs) == (0.1, 128, 10)
    [classic] = configs_from_args(parser.parse_args(["--variants", "scratch", "--preset", "classic"]))
    assert classic == RunConfig()
    args = ["--variants", "scratch", "--preset", "online", "--quick", "--batch-size", "64"]
    [mixed] = configs_from_args(parser.parse_args(args))
    assert (mixed.lr, mixed.batch_size, mixed.epochs, mixed.train_limit) == (0.1, 64, 2, 6000)


def test_committed_records_keep_their_config_ids():
    """Every configuration in the committed records (docs/measured), written before later fields existed and before
    three fields were renamed (bn_positions is norm_positions now, ...: STORED_NAMES), still hashes to the id it was
    stored under, and reads back as the field: resuming and comparing old results depends on it."""
    import json
    from pathlib import Path

    seen, renamed = 0, set()
    for path in sorted((Path(__file__).resolve().parents[1] / "docs" / "measured").glob("*/records.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if isinstance(record.get("config"), dict):
                config = RunConfig.from_dict(record["config"])
                assert config.config_id == record["config_id"], f"{path.parent.name}: {record['config']}"
                for name, stored in STORED_NAMES.items():
                    value = record["config"]["model"][stored]
                    assert getattr(config.model, name) == (tuple(value) if isinstance(value, list) else value)
                    if getattr(config.model, name) != getattr(ModelSpec(), name):
                        renamed.add(name)
                seen += 1
    assert seen > 100
    assert renamed == set(STORED_NAMES)  # each renamed field away from its default in some committed record


def test_a_configuration_hashes_its_renamed_fields_by_their_stored_names():
    """Written now, a configuration stores its fields' new names and reads back equal; its id is the one the same
    configuration had under the old names, and a configuration giving a field under both names is refused."""
    config = RunConfig(
        model=ModelSpec(norm_positions=("conv2",), bias_before_norm=False, norm_placement="after_activation")
    )
    data = config.to_dict()
    assert not set(STORED_NAMES.values()) & set(data["model"]) and RunConfig.from_dict(data) == config
    old = {**data, "model": {STORED_NAMES.get(k, k): v for k, v in data["model"].items()}}
    assert RunConfig.from_dict(old) == config and RunConfig.from_dict(old).config_id == config.config_id
    assert config.config_id != RunConfig().config_id
    both = {**data, "model": {**data["model"], "bn_positions": ["conv1"]}}
    with pytest.raises(ConfigError, match="bn_positions given under its old and its new name \\(norm_positions\\)"):
        RunConfig.from_dict(both)
