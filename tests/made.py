"""Records, snapshots and study files made by hand, which the report, study, metric and tracking tests share (a
test module imports this, never another test module)."""

import numpy as np

from common import records


# Report tables from hand-made records -------------------------------------------
def epoch_record(framework="torch", variant="scratch", seed=0, epoch=1, **values):
    fields = {k: 0.0 for k in records.EPOCH_KEYS}
    fields.update(
        framework=framework,
        variant=variant,
        seed=seed,
        config_id=f"{variant}-{seed}",
        epoch=epoch,
        timed_steps=10,
        warmup_steps=5,
        bn_gap=[],
        step_losses=[],
        snapshot=f"snapshots/{framework}_{variant}_s{seed}_e{epoch:03d}.npz",
    )
    fields.update(values)
    return records.make("epoch", **{k: v for k, v in fields.items() if k not in ("kind", "schema")})


# test accuracy per seed and epoch: best 0.8 / 0.75 / 0.9, final 0.7 / 0.75 / 0.6
CURVES = {0: [0.5, 0.8, 0.7], 1: [0.6, 0.7, 0.75], 2: [0.4, 0.9, 0.6]}


THROUGHPUT = [100, 200, 300, 400, 500, 600, 700, 800, 10000]


def run_records(framework="torch", variant="scratch", seed=0, epochs=3, status="complete", **fields):
    """The plan and end records of one run (the epoch records go between them)."""
    ident = dict(framework=framework, variant=variant, seed=seed, config_id=f"{variant}-{seed}")
    kind = "error" if status in ("crashed", "failed") else "run_end"
    return (records.make("plan", **ident, epochs=epochs), records.make(kind, **ident, status=status, **fields))


def summary_records():
    out, throughput = [], iter(THROUGHPUT)
    for seed in CURVES:
        out += run_records(seed=seed)
    for seed, curve in CURVES.items():
        for epoch, acc in enumerate(curve, 1):
            out.append(
                epoch_record(
                    seed=seed,
                    epoch=epoch,
                    test_acc=acc,
                    train_loss=seed + epoch,
                    train_examples_per_s=next(throughput),
                    eval_examples_per_s=50.0 * epoch,
                    probe_disagreement=0.1 * seed,
                    probe_acc_eval=0.5 + 0.1 * seed,
                    bn_gap=[{"layer": "bn1", "mean_gap": seed + 0.5, "var_log_ratio": epoch * 0.25}],
                )
            )
    return out


def write_snapshot(run_dir, record, **arrays):
    path = run_dir / record["snapshot"]
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def drift_run(tmp_path):
    torch_rec = epoch_record("torch")
    mx_rec = epoch_record("mxnet")
    write_snapshot(
        tmp_path,
        torch_rec,
        **{
            "param/conv1.weight": np.array([3.0, 4.0]),
            "param/bn1.running_var": np.array([1.0, 1.0, 1.0, 1.0]),
            "probe/logits_eval": np.array([[1.0, 0.0], [0.0, 1.0]]),
        },
    )
    write_snapshot(
        tmp_path,
        mx_rec,
        **{
            "param/conv1.weight": np.array([3.0, 4.5]),
            "param/bn1.running_var": np.array([1.0, 1.0, 1.0, 2.0]),
            "probe/logits_eval": np.array([[1.0, 0.25], [2.0, 1.0]]),
        },
    )
    return [torch_rec, mx_rec]


# Reports, from hand-made records ----------------------------------------------------------------------
def population_records():
    out = []
    # seed: (EMA test acc, population test acc, EMA disagreement, population disagreement), final epoch
    final = {0: (0.80, 0.84, 0.10, 0.02), 1: (0.82, 0.85, 0.12, 0.03)}
    for seed, (acc, pop, dis, pop_dis) in final.items():
        out += run_records(seed=seed, epochs=2)
        gap = [
            {
                "layer": "bn1",
                "mean_gap": 0.2,
                "var_log_ratio": 0.1,
                "lag_mean_gap": 0.15 + seed,
                "lag_var_log_ratio": 0.05,
                "noise_mean_gap": 0.01,
                "noise_var_log_ratio": 0.02,
            }
        ]
        out.append(
            epoch_record(
                seed=seed,
                epoch=1,
                test_acc=0.5,
                pop_test_acc=0.9,
                probe_disagreement=0.3,
                pop_probe_disagreement=0.1,
                population_images=2048,
                population_seconds=0.4,
                bn_gap=gap,
            )
        )
        out.append(
            epoch_record(
                seed=seed,
                epoch=2,
                test_acc=acc,
                pop_test_acc=pop,
                probe_disagreement=dis,
                pop_probe_disagreement=pop_dis,
                population_images=2048,
                population_seconds=0.5,
                bn_gap=gap,
            )
        )
    out += run_records(variant="none", seed=0, epochs=1)
    out.append(epoch_record(variant="none", seed=0, epoch=1, test_acc=0.3))
    return out


LR_STUDY = """\
question = "How large can the learning rate go?"
frameworks = ["torch"]
variants = ["scratch", "none"]
seeds = [0, 1]

[base]
activation = "relu"
epochs = 4

[grid]
lr = [0.1, 1.0]
batch_size = [32, 64]

[scale]
probe_size = { with = "batch_size", reference = 32, rule = "linear" }

[failure]
min_best_test_acc = 0.5

[answer]
kind = "largest-stable"
x = "lr"
"""


# Every answer kind with what is missing ------------------------------------------------------
BASE_LR = LR_STUDY.replace("batch_size = [32, 64]\n", "").replace(
    '[scale]\nprobe_size = { with = "batch_size", reference = 32, rule = "linear" }\n', ""
)


# Real studies (tox -e torch) -----------------------------------------------------------------
TINY = """\
question = "Does a larger learning rate help here?"
frameworks = ["torch"]
variants = ["scratch"]
seeds = [0, 1]

[base]
epochs = 2
batch_size = 32
probe_size = 32
eval_batch_size = 100

[grid]
lr = [0.1, 1.0]

[answer]
kind = "compare"
axis = "lr"
baseline = 0.1
"""


TIMING = {
    "train_examples_per_s",
    "train_seconds",
    "warmup_examples_per_s",
    "warmup_seconds",
    "first_step_seconds",
    "eval_examples_per_s",
    "eval_seconds",
    "population_seconds",
}
