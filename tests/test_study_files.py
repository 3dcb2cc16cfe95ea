"""Study files: the format and its errors, the grid, the scale rules and exclusions; every shipped study loads."""

import math

import pytest

from compare.studies import spec
from compare.study import main as study_main
from tests.helpers import write
from tests.made import LR_STUDY

SHIPPED = [
    "batch-size",
    "bias-before-bn",
    "bn-placement",
    "bn-positions",
    "decay",
    "dropout-vs-bn",
    "framework-agreement",
    "frozen-gamma-beta",
    "lr-sweep",
    "noisy-bn",
    "normalizers",
    "population-size",
    "population-stats",
    "precision",
    "renorm",
    "replicas",
    "research-norms",
    "why-bn",
]


# The file ------------------------------------------------------------------------------------
def test_shipped_studies_load_and_expand():
    assert spec.shipped() == SHIPPED
    for name in SHIPPED:
        study = spec.load(spec.find(name))
        assert study.name == name and study.question.endswith("?")
        configs, coords = study.cells()
        cells = math.prod(len(v) for v in study.grid.values()) * len(study.variants)
        if name == "why-bn":  # no noise without a normalisation: 2 activations x (2 x 2 - 1) arms
            assert study.exclude == ({"variant": "none", "norm_noise": True},)
            assert not any(c.model.variant == "none" and c.model.norm_noise for c in configs)
            cells -= 2
        if name == "replicas":  # one process: the whole batch and ghost batches of 128, 64, 32; 2, 4, 8 x 2 syncs
            assert not any(c.replicas > 1 and c.model.ghost_batch for c in configs)
            cells = 4 + 3 * 2
        if name == "noisy-bn":  # BN once; noisy BN in two forms, each evaluated two ways
            cells = 1 + 2 * 2
        if name == "bn-positions":  # BN at seven sets of positions, and no BN once (it has no positions)
            assert sum(c.model.variant == "none" for c in configs) == len(study.seeds)
            cells = 7 + 1
        if name == "research-norms":  # per batch size: BN, whiten in 3 group sizes, the 2 PITs at 2 scales, none
            assert not any(c.model.norm != "whiten" and c.model.whiten_group != 2 for c in configs)
            cells = 2 * (1 + 3 + 2 + 2 + 1)
        assert len(configs) == cells * len(study.seeds)
        assert len({c.config_id for c in configs}) == len(configs)  # every cell is a different run
        assert all(set(coords[c.config_id]) == set(study.axes) for c in configs)
        quick, _ = study.cells(quick=True, seeds=(0,))
        assert {c.epochs for c in quick} == {study.quick["epochs"]} and {c.seed for c in quick} == {0}
        assert all(c.train_limit > 0 for c in quick)


def test_grid_expansion_scale_and_coordinates(tmp_path):
    study = spec.load(write(tmp_path, LR_STUDY))
    configs, coords = study.cells()
    # lr x batch_size x variant x seed, in that order of nesting
    assert [(c.lr, c.batch_size, c.model.variant, c.seed) for c in configs[:5]] == [
        (0.1, 32, "scratch", 0),
        (0.1, 32, "scratch", 1),
        (0.1, 32, "none", 0),
        (0.1, 32, "none", 1),
        (0.1, 64, "scratch", 0),
    ]
    assert len(configs) == 16
    assert {c.model.activation for c in configs} == {"relu"} and {c.epochs for c in configs} == {4}
    assert {(c.batch_size, c.probe_size) for c in configs} == {(32, 512), (64, 1024)}  # 512 x 64/32
    assert coords[configs[4].config_id] == {"lr": 0.1, "batch_size": 64, "probe_size": 1024}
    # --quick without a [quick] table: compare.run's quick budget; --seeds replaces the file's
    quick, _ = study.cells(quick=True, seeds=(7,))
    assert {(c.epochs, c.train_limit, c.test_limit, c.seed) for c in quick} == {(2, 6000, 2000, 7)}


def test_scale_gives_an_integer_field_an_integer(tmp_path):
    # a scaled integer field must stay a valid integer (probe_size 512 x 64/32 = 1024)
    study = spec.load(write(tmp_path, LR_STUDY))
    configs, _ = study.cells()
    assert all(isinstance(c.probe_size, int) for c in configs)


@pytest.mark.parametrize(
    "edit, message",
    [
        (("[grid]\nlr", "[grid]\nlrr"), r"s\.toml:11: \[grid\] lrr: unknown field; choose from lr, batch_size"),
        (
            ("lr = [0.1, 1.0]", "lr = [0.1, -1.0]"),
            r"s\.toml:11: \[grid\] lr: -1\.0 is not valid: lr \(--lr\) must be a positive",
        ),
        (("lr = [0.1, 1.0]", "lr = []"), r"s\.toml:11: \[grid\] lr: must be a non-empty list"),
        (("lr = [0.1, 1.0]", "lr = [0.1, 0.1]"), r"s\.toml:11: \[grid\] lr: lists a value twice"),
        (("epochs = 4", "epochs = 4\nlr = 0.5"), r"s\.toml:12: \[grid\] lr: is also set in \[base\]"),
        (
            ("epochs = 4", "epochs = 0"),
            r"s\.toml:8: \[base\] epochs: 0 is not valid: epochs \(--epochs\) must be an integer >= 1",
        ),
        (('activation = "relu"', 'activation = "tanh"'), r"s\.toml:7: \[base\] activation: 'tanh' is not valid"),
        (("seeds = [0, 1]", "seed = [0, 1]"), r"s\.toml:4: seed: unknown field"),
        (
            ('variants = ["scratch", "none"]', 'variants = ["scratch", "bn"]'),
            r"s\.toml:3: variants: unknown 'bn'; choose from scratch",
        ),
        (('kind = "largest-stable"', 'kind = "best"'), r"s\.toml:\d+: \[answer\] kind: choose from largest-stable"),
        (('x = "lr"', 'x = "momentum"'), r"\[answer\] x: must name a \[grid\] field; the grid has lr, batch_size"),
        (("min_best_test_acc = 0.5", "min_best_test_acc = 5"), r"\[failure\] min_best_test_acc: must be a number in"),
        (('rule = "linear"', 'rule = "cubic"'), r"\[scale\] probe_size: rule 'cubic'"),
        (('question = "How large can the learning rate go?"', ""), r"question: every study states its question"),
        (("[grid]", "[grid"), r"s\.toml: not valid TOML: .*line 10"),
    ],
)
def test_bad_files_name_the_line_and_the_field(tmp_path, edit, message):
    old, new = edit
    assert old in LR_STUDY
    with pytest.raises(spec.StudyError, match=message):
        spec.load(write(tmp_path, LR_STUDY.replace(old, new, 1)))


def test_largest_stable_needs_a_failure_criterion(tmp_path):
    text = LR_STUDY.replace("[failure]\nmin_best_test_acc = 0.5\n", "")
    with pytest.raises(spec.StudyError, match=r"\[answer\] kind: largest-stable needs a \[failure\] table"):
        spec.load(write(tmp_path, text))


def test_an_unknown_study_lists_the_shipped_ones(capsys):
    assert study_main(["no-such-study", "--dry-run"]) == 2
    assert "no study 'no-such-study': pass a study file or one of: batch-size" in capsys.readouterr().err


def test_exclude_leaves_out_the_cells_it_names_and_checks_them(tmp_path):
    base = LR_STUDY.replace("seeds = [0, 1]", 'seeds = [0, 1]\nexclude = [{ variant = "none", lr = 1.0 }]')
    study = spec.load(write(tmp_path, base))
    configs, _ = study.cells()
    assert len(configs) == (2 * 2 * 2 - 2) * 2 and not any(c.model.variant == "none" and c.lr == 1.0 for c in configs)
    for rule, message in (
        ("{ dropout = 0.5 }", "'dropout' is neither 'variant' nor a \\[grid\\] field"),
        ('{ variant = "builtin" }', "variant = 'builtin' is not among"),
        ("{ lr = 7.0 }", "lr = 7.0 is not among"),
    ):
        with pytest.raises(spec.StudyError, match=message):
            spec.load(write(tmp_path, LR_STUDY.replace("seeds = [0, 1]", f"seeds = [0, 1]\nexclude = [{rule}]")))
    with pytest.raises(spec.StudyError, match="exclude: must be a list of tables"):
        spec.load(write(tmp_path, LR_STUDY.replace("seeds = [0, 1]", 'seeds = [0, 1]\nexclude = "none"')))


def test_exclude_on_a_list_field_leaves_out_the_cells_it_names(tmp_path):
    """A rule on a list field (norm_positions) compares as the cell's coordinate ('conv1,conv2'), so the cells it
    names (one per seed) are left out and the others kept."""
    text = """\
question = "Which positions?"
frameworks = ["torch"]
variants = ["scratch"]
seeds = [0, 1]
exclude = [{ norm_positions = ["conv1", "conv2"] }]

[grid]
norm_positions = [["conv1"], ["conv1", "conv2"], ["fc1"]]

[answer]
kind = "compare"
axis = "norm_positions"
baseline = ["conv1"]
metric = "best_test_acc"
"""
    configs, coords = spec.load(write(tmp_path, text)).cells()
    kept = sorted(coords[c.config_id]["norm_positions"] for c in configs)
    assert kept == ["conv1", "conv1", "fc1", "fc1"], kept


@pytest.mark.parametrize("name", ["bn-positions", "bias-before-bn", "bn-placement"])
def test_a_study_written_before_the_rename_runs_the_same_cells(name):
    """The committed study files in docs/measured spell the renamed fields by their stored names (bn_positions,
    ...): they load, their coordinates keep that spelling (their records' and answers' labels), and their cells are
    the shipped study's (which spells the new names), config id for config id, and the ones their records hold."""
    import json
    from pathlib import Path

    from common.config import STORED_NAMES

    folder = Path(__file__).resolve().parents[1] / "docs" / "measured" / name
    settings = json.loads((folder / "study.json").read_text())
    old, new = spec.load(folder / "study.toml", name=name), spec.load(spec.find(name))
    [(field, stored)] = [(f, s) for f, s in STORED_NAMES.items() if s in old.grid]
    assert field in new.grid and stored not in new.grid
    (old_configs, old_coords), (new_configs, new_coords) = (
        study.cells(settings["quick"], settings["seeds"]) for study in (old, new)
    )
    assert [c.config_id for c in old_configs] == [c.config_id for c in new_configs] and old_configs == new_configs
    assert {stored} <= set(next(iter(old_coords.values()))) and {field} <= set(next(iter(new_coords.values())))
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    assert {c.config_id for c in old_configs} == {r["config_id"] for r in records if r["kind"] == "plan"}


def test_a_study_giving_a_field_under_both_names_is_refused(tmp_path):
    text = 'question = "?"\n[base]\nbn_positions = ["conv1"]\nnorm_positions = ["conv2"]\n[answer]\nkind = "trend"\n'
    with pytest.raises(spec.StudyError, match=r"\[base\] bn_positions: is norm_positions's old name; give one"):
        spec.load(write(tmp_path, text))
    grid = text.replace('norm_positions = ["conv2"]\n[answer]', '[grid]\nnorm_positions = [["conv2"]]\n[answer]')
    with pytest.raises(spec.StudyError, match=r"\[grid\] norm_positions: is also set in \[base\]"):
        spec.load(write(tmp_path, grid))
